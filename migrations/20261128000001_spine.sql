-- Spine: tenants, users, memberships, API keys, refresh tokens, signing keys, audit log,
-- idempotency records and sign-in throttling, with row-level security on every table that
-- holds tenant or user data.
--
-- The application connects with the session role `nimbus_app` (see api/src/db.rs). That role is
-- not a superuser, has no BYPASSRLS and owns no table, and every RLS table also has FORCE ROW
-- LEVEL SECURITY, so the policies below apply to it whatever happens to table ownership later.
-- The request's identity reaches the policies through transaction-local settings:
--   nimbus.tenant_id       the tenant the request acts in
--   nimbus.user_id         the signed-in user
--   nimbus.lookup_email    an e-mail address the request may look up (sign-in, add member)
--   nimbus.api_key_prefix  the API key prefix being authenticated
--   nimbus.refresh_token_hash  the hex SHA-256 of a refresh token being exchanged

DO $$
BEGIN
    CREATE ROLE nimbus_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOINHERIT;
EXCEPTION
    -- The role is cluster-wide: another database of the same cluster (or a concurrent test)
    -- may have created it already.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

DO $$
BEGIN
    IF NOT pg_has_role(current_user, 'nimbus_app', 'MEMBER') THEN
        EXECUTE format('GRANT nimbus_app TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA public TO nimbus_app;

CREATE FUNCTION nimbus_setting_uuid(name text) RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT NULLIF(current_setting(name, true), '')::uuid $$;

CREATE FUNCTION nimbus_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nimbus_setting_uuid('nimbus.tenant_id') $$;

CREATE FUNCTION nimbus_current_user() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nimbus_setting_uuid('nimbus.user_id') $$;

-- Users are global identities; a user sees itself and the members of the tenant it acts in.
CREATE TABLE users (
    id                uuid PRIMARY KEY,
    email             text NOT NULL CONSTRAINT users_email_key UNIQUE,
    display_name      text NOT NULL,
    password_hash     text NOT NULL,
    is_platform_admin boolean NOT NULL DEFAULT false,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_email_lowercase CHECK (email = lower(email))
);

-- Tenants are global too (their names appear in URLs), but each is visible only to its members.
CREATE TABLE tenants (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CONSTRAINT tenants_name_key UNIQUE,
    display_name text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE memberships (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       text NOT NULL CONSTRAINT memberships_role_check CHECK (role IN ('admin', 'developer', 'viewer')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name         text NOT NULL,
    prefix       text NOT NULL CONSTRAINT api_keys_prefix_key UNIQUE,
    secret_hash  bytea NOT NULL,
    role         text NOT NULL CONSTRAINT api_keys_role_check CHECK (role IN ('admin', 'developer', 'viewer')),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id, id);

-- Refresh tokens belong to a user and a family (one sign-in); reuse of a rotated token revokes
-- the whole family.
CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY,
    family_id   uuid NOT NULL,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL CONSTRAINT refresh_tokens_hash_key UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

-- Access-token signing keys (Ed25519). Every replica loads them; a retired key still verifies
-- tokens until they have all expired, so rotation logs nobody out.
CREATE TABLE signing_keys (
    kid         text PRIMARY KEY,
    algorithm   text NOT NULL CONSTRAINT signing_keys_algorithm_check CHECK (algorithm = 'EdDSA'),
    private_key bytea NOT NULL,
    public_key  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);

-- Append-only record of every state-changing call.
CREATE TABLE audit_log (
    id          uuid PRIMARY KEY,
    tenant_id   uuid REFERENCES tenants (id) ON DELETE CASCADE,
    actor_type  text NOT NULL CONSTRAINT audit_log_actor_type_check CHECK (actor_type IN ('user', 'api_key', 'anonymous', 'system')),
    actor_id    uuid,
    action      text NOT NULL,
    resource    text NOT NULL,
    outcome     text NOT NULL CONSTRAINT audit_log_outcome_check CHECK (outcome IN ('success', 'failure')),
    source_ip   text,
    user_agent  text,
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_idx ON audit_log (tenant_id, id);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_id, id);

-- Stored responses of creating POSTs, keyed by principal and Idempotency-Key.
CREATE TABLE idempotency_keys (
    principal     text NOT NULL,
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status_code   smallint,
    content_type  text,
    response_body bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);

-- Failed sign-ins per account and per source address, in fixed windows.
CREATE TABLE signin_throttle (
    scope        text NOT NULL CONSTRAINT signin_throttle_scope_check CHECK (scope IN ('account', 'address')),
    key          text NOT NULL,
    window_start timestamptz NOT NULL,
    failures     integer NOT NULL,
    PRIMARY KEY (scope, key)
);

-- Row-level security. Reads may be wider than writes (a user sees the tenants it belongs to, a
-- lookup sees the one row it names); writes are always confined to the tenant or user the
-- transaction acts for, so a wide read clause never lets a statement change another tenant.
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
CREATE POLICY users_read ON users FOR SELECT
    USING (
        id = nimbus_current_user()
        OR email = current_setting('nimbus.lookup_email', true)
        OR id IN (SELECT m.user_id FROM memberships m WHERE m.tenant_id = nimbus_current_tenant())
    );
CREATE POLICY users_insert ON users FOR INSERT WITH CHECK (id = nimbus_current_user());
CREATE POLICY users_update ON users FOR UPDATE
    USING (id = nimbus_current_user()) WITH CHECK (id = nimbus_current_user());
CREATE POLICY users_delete ON users FOR DELETE USING (id = nimbus_current_user());

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenants_read ON tenants FOR SELECT
    USING (
        id = nimbus_current_tenant()
        OR id IN (SELECT m.tenant_id FROM memberships m WHERE m.user_id = nimbus_current_user())
    );
CREATE POLICY tenants_insert ON tenants FOR INSERT WITH CHECK (id = nimbus_current_tenant());
CREATE POLICY tenants_update ON tenants FOR UPDATE
    USING (id = nimbus_current_tenant()) WITH CHECK (id = nimbus_current_tenant());
CREATE POLICY tenants_delete ON tenants FOR DELETE USING (id = nimbus_current_tenant());

ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE memberships FORCE ROW LEVEL SECURITY;
CREATE POLICY memberships_read ON memberships FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR user_id = nimbus_current_user());
CREATE POLICY memberships_insert ON memberships FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY memberships_update ON memberships FOR UPDATE
    USING (tenant_id = nimbus_current_tenant()) WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY memberships_delete ON memberships FOR DELETE USING (tenant_id = nimbus_current_tenant());

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY api_keys_read ON api_keys FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR prefix = current_setting('nimbus.api_key_prefix', true));
CREATE POLICY api_keys_insert ON api_keys FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY api_keys_update ON api_keys FOR UPDATE
    USING (tenant_id = nimbus_current_tenant()) WITH CHECK (tenant_id = nimbus_current_tenant());
CREATE POLICY api_keys_delete ON api_keys FOR DELETE USING (tenant_id = nimbus_current_tenant());

ALTER TABLE refresh_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE refresh_tokens FORCE ROW LEVEL SECURITY;
-- A refresh token is presented before the user is known, so a request may also read the one row
-- whose hash it names (only the holder of the token can compute that hash).
CREATE POLICY refresh_tokens_read ON refresh_tokens FOR SELECT
    USING (
        user_id = nimbus_current_user()
        OR token_hash = decode(current_setting('nimbus.refresh_token_hash', true), 'hex')
    );
CREATE POLICY refresh_tokens_insert ON refresh_tokens FOR INSERT WITH CHECK (user_id = nimbus_current_user());
CREATE POLICY refresh_tokens_update ON refresh_tokens FOR UPDATE
    USING (user_id = nimbus_current_user()) WITH CHECK (user_id = nimbus_current_user());
CREATE POLICY refresh_tokens_delete ON refresh_tokens FOR DELETE USING (user_id = nimbus_current_user());

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_log_read ON audit_log FOR SELECT
    USING (
        tenant_id = nimbus_current_tenant()
        OR (tenant_id IS NULL AND actor_id = nimbus_current_user())
    );
CREATE POLICY audit_log_write ON audit_log FOR INSERT
    WITH CHECK (tenant_id IS NULL OR tenant_id = nimbus_current_tenant());

-- Privileges of the application role. The audit log is append-only for it.
GRANT SELECT, INSERT, UPDATE, DELETE ON users, tenants, memberships, api_keys, refresh_tokens,
    idempotency_keys, signin_throttle TO nimbus_app;
GRANT SELECT, INSERT, UPDATE ON signing_keys TO nimbus_app;
GRANT SELECT, INSERT ON audit_log TO nimbus_app;
