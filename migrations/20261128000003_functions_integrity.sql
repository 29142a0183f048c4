-- Integrity fixes for functions (issue 3 review):
-- * alias_routes rows are tied to their tenant, function and alias through composite keys, so
--   no route can name another tenant's (or another function's) alias or version, and deleting a
--   function removes its routes in the same cascade step as its versions;
-- * presigned uploads carry a state, so one upload is completed once and a refused one is spent;
-- * the foreign key of package_uploads gets a stable name.

ALTER TABLE versions ADD CONSTRAINT versions_tenant_function_number_key UNIQUE (tenant_id, function_id, number);
ALTER TABLE aliases ADD CONSTRAINT aliases_tenant_id_function_key UNIQUE (tenant_id, id, function_id);

ALTER TABLE alias_routes DROP CONSTRAINT alias_routes_version_fkey;
ALTER TABLE alias_routes DROP CONSTRAINT alias_routes_tenant_id_alias_id_fkey;
ALTER TABLE alias_routes
    ADD CONSTRAINT alias_routes_function_fkey FOREIGN KEY (tenant_id, function_id)
        REFERENCES functions (tenant_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT alias_routes_alias_fkey FOREIGN KEY (tenant_id, alias_id, function_id)
        REFERENCES aliases (tenant_id, id, function_id) ON DELETE CASCADE,
    ADD CONSTRAINT alias_routes_version_fkey FOREIGN KEY (tenant_id, function_id, version)
        REFERENCES versions (tenant_id, function_id, number);

ALTER TABLE package_uploads RENAME CONSTRAINT package_uploads_tenant_id_function_id_fkey TO package_uploads_function_fkey;
ALTER TABLE package_uploads
    ADD COLUMN state text NOT NULL DEFAULT 'pending'
        CONSTRAINT package_uploads_state_check CHECK (state IN ('pending', 'completing', 'completed', 'refused', 'expired')),
    ADD COLUMN claimed_at timestamptz;
CREATE INDEX package_uploads_function_idx ON package_uploads (tenant_id, function_id, state);
