-- Groups of members (issue 6): policies attached to a group apply to every member in it.
-- Boundaries are per principal (members, API keys), never per group, as in AWS.

CREATE TABLE groups (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT groups_name_key UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

CREATE TABLE group_members (
    tenant_id  uuid NOT NULL,
    group_id   uuid NOT NULL,
    user_id    uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, user_id),
    FOREIGN KEY (tenant_id, group_id) REFERENCES groups (tenant_id, id) ON DELETE CASCADE,
    -- Leaving the tenant leaves its groups.
    FOREIGN KEY (tenant_id, user_id) REFERENCES memberships (tenant_id, user_id) ON DELETE CASCADE
);
CREATE INDEX group_members_user_idx ON group_members (tenant_id, user_id);

ALTER TABLE policy_attachments ADD COLUMN group_id uuid;
ALTER TABLE policy_attachments ADD FOREIGN KEY (tenant_id, group_id) REFERENCES groups (tenant_id, id) ON DELETE CASCADE;
ALTER TABLE policy_attachments DROP CONSTRAINT policy_attachments_one_principal;
ALTER TABLE policy_attachments ADD CONSTRAINT policy_attachments_one_principal
    CHECK (num_nonnulls(user_id, api_key_id, group_id) = 1);
ALTER TABLE policy_attachments ADD CONSTRAINT policy_attachments_group_identity
    CHECK (group_id IS NULL OR purpose = 'identity');
DROP INDEX policy_attachments_unique;
CREATE UNIQUE INDEX policy_attachments_unique ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id, group_id), purpose, coalesce(managed_policy, policy_id::text));
DROP INDEX policy_attachments_one_boundary;
CREATE UNIQUE INDEX policy_attachments_one_boundary ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id)) WHERE purpose = 'boundary';

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['groups', 'group_members']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT USING (tenant_id = nimbus_current_tenant())', t || '_read', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_insert', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING (tenant_id = nimbus_current_tenant()) WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_update', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING (tenant_id = nimbus_current_tenant())', t || '_delete', t);
    END LOOP;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON groups, group_members TO nimbus_app;

CREATE TRIGGER groups_routing AFTER INSERT OR UPDATE OR DELETE ON groups
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER group_members_routing AFTER INSERT OR UPDATE OR DELETE ON group_members
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
