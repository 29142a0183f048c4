-- Functions, code packages, immutable versions, aliases and their routing events (issue 3).
-- Every table is tenant-scoped with row-level security ENABLEd and FORCEd; rows reference each
-- other through (tenant_id, id) pairs, so a row of one tenant can never point at another's.

CREATE TABLE functions (
    id                   uuid PRIMARY KEY,
    tenant_id            uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name                 text NOT NULL,
    runtime              text NOT NULL CONSTRAINT functions_runtime_check CHECK (runtime IN ('wasm', 'process')),
    entry                text,
    memory_mb            integer NOT NULL,
    timeout_ms           integer NOT NULL,
    concurrency          integer NOT NULL,
    min_scale            integer NOT NULL,
    max_scale            integer NOT NULL,
    reserved_concurrency integer,
    description          text NOT NULL DEFAULT '',
    tags                 jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- {"NAME": {"value": "..."}} or, for secrets, {"NAME": {"secret": {"key_id": "...", "sealed": "<base64>"}}}
    -- (or {"secret": null} for a declared secret without a value). Secret values are AEAD-sealed.
    environment          jsonb NOT NULL DEFAULT '{}'::jsonb,
    package_id           uuid,
    revision             bigint NOT NULL DEFAULT 1,
    next_version         integer NOT NULL DEFAULT 1,
    created_by           uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT functions_name_key UNIQUE (tenant_id, name),
    CONSTRAINT functions_tenant_id_key UNIQUE (tenant_id, id),
    CONSTRAINT functions_scale_check CHECK (min_scale <= max_scale)
);

-- A code package: bytes uploaded for a function, stored content-addressed in the object store.
-- The same bytes uploaded to the same function are one package; uploaded by another tenant they
-- are another package row (the object itself is stored once).
CREATE TABLE packages (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id uuid NOT NULL,
    sha256      text NOT NULL CONSTRAINT packages_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size        bigint NOT NULL,
    format      text NOT NULL CONSTRAINT packages_format_check CHECK (format IN ('wasm', 'zip', 'tar.gz')),
    created_by  uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT packages_function_sha256_key UNIQUE (function_id, sha256),
    CONSTRAINT packages_tenant_id_key UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, function_id) REFERENCES functions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX packages_tenant_function_idx ON packages (tenant_id, function_id, id);

ALTER TABLE functions ADD CONSTRAINT functions_package_fkey
    FOREIGN KEY (tenant_id, package_id) REFERENCES packages (tenant_id, id);

-- Presigned uploads in flight (S3 only): the client PUTs to a staging object, then completes.
CREATE TABLE package_uploads (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id  uuid NOT NULL,
    staging_key  text NOT NULL,
    sha256       text NOT NULL CONSTRAINT package_uploads_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size         bigint NOT NULL,
    format       text NOT NULL CONSTRAINT package_uploads_format_check CHECK (format IN ('wasm', 'zip', 'tar.gz')),
    created_by   uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    completed_at timestamptz,
    FOREIGN KEY (tenant_id, function_id) REFERENCES functions (tenant_id, id) ON DELETE CASCADE
);

-- Immutable snapshots of code + configuration. The application may insert and delete versions,
-- never update them (no UPDATE privilege).
CREATE TABLE versions (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id   uuid NOT NULL,
    number        integer NOT NULL CONSTRAINT versions_number_check CHECK (number >= 1),
    package_id    uuid NOT NULL,
    sha256        text NOT NULL,
    config        jsonb NOT NULL,
    description   text NOT NULL DEFAULT '',
    published_by  uuid,
    published_via text NOT NULL CONSTRAINT versions_published_via_check CHECK (published_via IN ('user', 'api_key')),
    published_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT versions_function_number_key UNIQUE (function_id, number),
    CONSTRAINT versions_tenant_id_key UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, function_id) REFERENCES functions (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, package_id) REFERENCES packages (tenant_id, id)
);

CREATE TABLE aliases (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id uuid NOT NULL,
    name        text NOT NULL,
    routing     jsonb NOT NULL,
    description text NOT NULL DEFAULT '',
    revision    bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT aliases_function_name_key UNIQUE (function_id, name),
    CONSTRAINT aliases_tenant_id_key UNIQUE (tenant_id, id),
    FOREIGN KEY (tenant_id, function_id) REFERENCES functions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX aliases_tenant_function_idx ON aliases (tenant_id, function_id, id);

-- Which versions each alias can route to (weights and header-rule targets). The foreign key to
-- versions (checked at the end of each statement) is what refuses deleting a routed version.
CREATE TABLE alias_routes (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    alias_id    uuid NOT NULL,
    function_id uuid NOT NULL,
    version     integer NOT NULL,
    PRIMARY KEY (alias_id, version),
    FOREIGN KEY (tenant_id, alias_id) REFERENCES aliases (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT alias_routes_version_fkey FOREIGN KEY (function_id, version) REFERENCES versions (function_id, number)
);
CREATE INDEX alias_routes_version_idx ON alias_routes (function_id, version);

-- Every routing change of an alias (creation, update, deletion; later rollouts): who, from, to, when.
CREATE TABLE routing_events (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id  uuid NOT NULL,
    alias_name   text NOT NULL,
    actor_type   text NOT NULL CONSTRAINT routing_events_actor_type_check CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id     uuid,
    source       text NOT NULL CONSTRAINT routing_events_source_check CHECK (source IN ('api', 'rollout')),
    from_routing jsonb,
    to_routing   jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (tenant_id, function_id) REFERENCES functions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX routing_events_alias_idx ON routing_events (function_id, alias_name, id);

DO $$
DECLARE t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['functions', 'packages', 'package_uploads', 'versions', 'aliases', 'alias_routes', 'routing_events']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR SELECT USING (tenant_id = nimbus_current_tenant())', t || '_read', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_insert', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING (tenant_id = nimbus_current_tenant()) WITH CHECK (tenant_id = nimbus_current_tenant())', t || '_update', t);
        EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING (tenant_id = nimbus_current_tenant())', t || '_delete', t);
    END LOOP;
END $$;

GRANT SELECT, INSERT, UPDATE, DELETE ON functions, packages, package_uploads, aliases, alias_routes TO nimbus_app;
-- Versions are immutable; routing events are append-only.
GRANT SELECT, INSERT, DELETE ON versions TO nimbus_app;
GRANT SELECT, INSERT ON routing_events TO nimbus_app;
