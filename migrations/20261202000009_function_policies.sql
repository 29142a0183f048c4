-- Resource policies on functions (issue 6), replacing the gateway's temporary `public_invoke`
-- flag: a function is invocable without credentials when its policy allows `Principal: "*"`
-- `functions:InvokeFunction`, and by another tenant's principals when it names them.

ALTER TABLE functions ADD COLUMN resource_policy text;

UPDATE functions SET resource_policy = json_build_object(
    'Version', '2012-10-17',
    'Statement', json_build_array(json_build_object(
        'Sid', 'PublicInvoke',
        'Effect', 'Allow',
        'Principal', '*',
        'Action', 'functions:InvokeFunction',
        'Resource', 'nrn:nimbus:functions:' || tenant_id || ':function/' || name))
)::text
WHERE public_invoke;

ALTER TABLE functions DROP COLUMN public_invoke;
