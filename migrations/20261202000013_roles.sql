-- Roles (issue 6), and the gateway reading guardrails: principals no person signs in as. A function's execution role is what its
-- invocations act as when they call the Nimbus API: the gateway hands each invocation a
-- short-lived credential for the role (signed like access tokens, nothing stored), and the
-- role's attached policies, within its boundary, decide what that credential may do.

CREATE TABLE roles (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name        text NOT NULL,
    description text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT roles_name_key UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

ALTER TABLE policy_attachments ADD COLUMN role_id uuid;
ALTER TABLE policy_attachments ADD FOREIGN KEY (tenant_id, role_id) REFERENCES roles (tenant_id, id) ON DELETE CASCADE;
ALTER TABLE policy_attachments DROP CONSTRAINT policy_attachments_one_principal;
ALTER TABLE policy_attachments ADD CONSTRAINT policy_attachments_one_principal
    CHECK (num_nonnulls(user_id, api_key_id, group_id, role_id) = 1);
DROP INDEX policy_attachments_unique;
CREATE UNIQUE INDEX policy_attachments_unique ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id, group_id, role_id), purpose, coalesce(managed_policy, policy_id::text));
DROP INDEX policy_attachments_one_boundary;
CREATE UNIQUE INDEX policy_attachments_one_boundary ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id, role_id)) WHERE purpose = 'boundary';
CREATE INDEX policy_attachments_role_idx ON policy_attachments (tenant_id, role_id) WHERE role_id IS NOT NULL;

-- A function's execution role. A role some function uses cannot be deleted (the foreign key is
-- checked at the end of the statement, so deleting a tenant still cascades through both).
ALTER TABLE functions ADD COLUMN execution_role_id uuid;
ALTER TABLE functions ADD CONSTRAINT functions_execution_role_fkey
    FOREIGN KEY (tenant_id, execution_role_id) REFERENCES roles (tenant_id, id);
CREATE INDEX functions_execution_role_idx ON functions (tenant_id, execution_role_id) WHERE execution_role_id IS NOT NULL;

-- Roles act, so they appear in the audit log, routing events and the access log.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_actor_type_check;
ALTER TABLE audit_log ADD CONSTRAINT audit_log_actor_type_check
    CHECK (actor_type IN ('user', 'api_key', 'role', 'anonymous', 'system'));
ALTER TABLE routing_events DROP CONSTRAINT routing_events_actor_type_check;
ALTER TABLE routing_events ADD CONSTRAINT routing_events_actor_type_check
    CHECK (actor_type IN ('user', 'api_key', 'role', 'system'));
ALTER TABLE iam_activity DROP CONSTRAINT iam_activity_kind_check;
ALTER TABLE iam_activity ADD CONSTRAINT iam_activity_kind_check CHECK (principal_kind IN ('user', 'api_key', 'role'));

ALTER TABLE roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE roles FORCE ROW LEVEL SECURITY;
CREATE POLICY roles_read ON roles FOR SELECT USING (tenant_id = nimbus_current_tenant());
CREATE POLICY roles_insert ON roles FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY roles_update ON roles FOR UPDATE USING (tenant_id = nimbus_current_tenant())
    WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY roles_delete ON roles FOR DELETE USING (tenant_id = nimbus_current_tenant());
GRANT SELECT, INSERT, UPDATE, DELETE ON roles TO nimbus_app;

-- The gateway holds tenants' guardrails, which bind anonymous invocations of public functions too.
CREATE POLICY tenant_guardrails_gateway_read ON tenant_guardrails FOR SELECT USING (nimbus_gateway());

CREATE TRIGGER roles_routing AFTER INSERT OR UPDATE OR DELETE ON roles
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
