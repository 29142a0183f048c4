-- An API key may act with its creator's policies (issue 6): whatever the creator may do in the
-- tenant now — role, attached policies, groups — within the key's own boundary, instead of its
-- own role and attachments. A creator who leaves the tenant leaves such keys with nothing.
ALTER TABLE api_keys ADD COLUMN inherits boolean NOT NULL DEFAULT false;
