-- IAM (issue 6): a tenant's own policies (versioned, one default version in force), their
-- attachments to members and API keys (as identity policies or as the permissions boundary),
-- and the guardrails a platform operator sets per tenant. The policies Nimbus ships (managed
-- policies) live in code (`nimbus_iam::managed`) and are referenced by name.
--
-- A membership's or an API key's role now names the managed policies it stands for
-- (admin: TenantAdmin; developer: Developer and Viewer; viewer: Viewer); `none` stands for none,
-- so that a member or key has exactly what is attached to it.

ALTER TABLE memberships DROP CONSTRAINT memberships_role_check;
ALTER TABLE memberships ADD CONSTRAINT memberships_role_check CHECK (role IN ('admin', 'developer', 'viewer', 'none'));
ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check CHECK (role IN ('admin', 'developer', 'viewer', 'none'));

CREATE TABLE policies (
    id              uuid PRIMARY KEY,
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name            text NOT NULL,
    description     text NOT NULL DEFAULT '',
    default_version integer NOT NULL,
    next_version    integer NOT NULL DEFAULT 2,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT policies_name_key UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

-- Versions are immutable; at most five per policy (checked by the API under the policy's lock).
CREATE TABLE policy_versions (
    tenant_id  uuid NOT NULL,
    policy_id  uuid NOT NULL,
    version    integer NOT NULL,
    -- The document as its author wrote it (validated on save).
    document   text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (policy_id, version),
    FOREIGN KEY (tenant_id, policy_id) REFERENCES policies (tenant_id, id) ON DELETE CASCADE
);

-- A policy attached to one principal: a managed policy by name, or one of the tenant's own.
-- `identity` attachments grant; the one `boundary` attachment a principal may have caps them.
CREATE TABLE policy_attachments (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id        uuid,
    api_key_id     uuid,
    purpose        text NOT NULL CONSTRAINT policy_attachments_purpose_check CHECK (purpose IN ('identity', 'boundary')),
    managed_policy text,
    -- An attached policy cannot be deleted (409), as in AWS.
    policy_id      uuid,
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, user_id) REFERENCES memberships (tenant_id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (api_key_id) REFERENCES api_keys (id) ON DELETE CASCADE,
    CONSTRAINT policy_attachments_policy_fkey FOREIGN KEY (tenant_id, policy_id) REFERENCES policies (tenant_id, id),
    CONSTRAINT policy_attachments_one_principal CHECK ((user_id IS NULL) <> (api_key_id IS NULL)),
    CONSTRAINT policy_attachments_one_policy CHECK ((managed_policy IS NULL) <> (policy_id IS NULL))
);
CREATE UNIQUE INDEX policy_attachments_unique ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id), purpose, coalesce(managed_policy, policy_id::text));
CREATE UNIQUE INDEX policy_attachments_one_boundary ON policy_attachments
    (tenant_id, coalesce(user_id, api_key_id)) WHERE purpose = 'boundary';
CREATE INDEX policy_attachments_policy_idx ON policy_attachments (policy_id) WHERE policy_id IS NOT NULL;

-- What a platform operator allows a tenant at most (like an organization's service control
-- policy): every request in the tenant must also be allowed by it. No row: no guardrail.
CREATE TABLE tenant_guardrails (
    tenant_id  uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    document   text NOT NULL,
    updated_by uuid REFERENCES users (id) ON DELETE SET NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Principal tags of a member in the tenant (`nimbus:PrincipalTag/<key>`).
ALTER TABLE memberships ADD COLUMN tags jsonb NOT NULL DEFAULT '{}';

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['policies', 'policy_versions', 'policy_attachments']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT USING (tenant_id = nimbus_current_tenant())', t || '_read', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_insert', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING (tenant_id = nimbus_current_tenant()) WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_update', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING (tenant_id = nimbus_current_tenant())', t || '_delete', t);
    END LOOP;
END $$;
GRANT SELECT, INSERT, UPDATE, DELETE ON policies, policy_attachments TO nimbus_app;
GRANT SELECT, INSERT, DELETE ON policy_versions TO nimbus_app;

-- Guardrails: the tenant's requests read them (every decision in the tenant needs them); only
-- the platform scope writes them.
ALTER TABLE tenant_guardrails ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_guardrails FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_guardrails_read ON tenant_guardrails FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR nimbus_platform());
CREATE POLICY tenant_guardrails_write ON tenant_guardrails FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_guardrails TO nimbus_app;

-- Every change that can move a decision announces itself on the routing channel, which every
-- replica listens to and on which it drops its cached policies.
CREATE TRIGGER policies_routing AFTER INSERT OR UPDATE OR DELETE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER policy_attachments_routing AFTER INSERT OR UPDATE OR DELETE ON policy_attachments
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER tenant_guardrails_routing AFTER INSERT OR UPDATE OR DELETE ON tenant_guardrails
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER api_keys_routing_insert AFTER INSERT ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
