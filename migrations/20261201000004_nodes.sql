-- Worker nodes (issue 4): join tokens, nodes and their credentials, desired state (assignments),
-- usage records, function logs and per-minute metrics rollups.
--
-- Two new transaction-local settings reach the RLS policies:
--   nimbus.node_id   the node an agent request acts as (set after its credential was checked)
--   nimbus.platform  'on' in transactions of a platform admin or of a background loop that acts
--                    for the platform (placement, rollups, retention); never set by a tenant request
-- Join tokens and nodes are platform objects without tenant data (no tenant_id, no user_id) and
-- are guarded by the API's platform-admin check; every table holding tenant data has RLS.

CREATE FUNCTION nimbus_current_node() RETURNS uuid
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT nimbus_setting_uuid('nimbus.node_id') $$;

CREATE FUNCTION nimbus_platform() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('nimbus.platform', true), '') = 'on' $$;

CREATE TABLE join_tokens (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    prefix      text NOT NULL CONSTRAINT join_tokens_prefix_key UNIQUE,
    token_hash  bytea NOT NULL CONSTRAINT join_tokens_hash_key UNIQUE,
    created_by  uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    max_uses    integer CONSTRAINT join_tokens_max_uses_check CHECK (max_uses IS NULL OR max_uses >= 1),
    uses        integer NOT NULL DEFAULT 0,
    revoked_at  timestamptz
);

CREATE TABLE nodes (
    id                      uuid PRIMARY KEY,
    name                    text NOT NULL CONSTRAINT nodes_name_key UNIQUE,
    zone                    text NOT NULL,
    memory_mb               bigint NOT NULL,
    cpu_millis              integer NOT NULL,
    instance_slots          integer NOT NULL,
    invoke_url              text NOT NULL,
    invoke_secret           text NOT NULL,
    -- Liveness and membership: ready (reporting), lost (silent past the heartbeat timeout),
    -- left (stopped gracefully; its credential still renews), removed (by an admin).
    state                   text NOT NULL
        CONSTRAINT nodes_state_check CHECK (state IN ('ready', 'lost', 'left', 'removed')),
    -- An admin's drain, kept apart from liveness so that a node that goes lost and comes back,
    -- or restarts, stays drained.
    draining                boolean NOT NULL DEFAULT false,
    -- The current credential and, for a minute after a renewal, the one before it (so a renewal
    -- whose answer was lost does not lock the agent out).
    credential_hash         bytea CONSTRAINT nodes_credential_hash_key UNIQUE,
    credential_expires_at   timestamptz,
    previous_credential_hash bytea,
    previous_valid_until    timestamptz,
    join_token_id           uuid REFERENCES join_tokens (id) ON DELETE SET NULL,
    -- Desired-state revision: grows with every change of the node's assignments or state.
    revision                bigint NOT NULL DEFAULT 1,
    -- What the node last reported.
    reported_revision       bigint,
    in_flight               integer NOT NULL DEFAULT 0,
    versions                jsonb NOT NULL DEFAULT '[]'::jsonb,
    joined_at               timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at       timestamptz NOT NULL DEFAULT now(),
    state_changed_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX nodes_previous_credential_idx ON nodes (previous_credential_hash) WHERE previous_credential_hash IS NOT NULL;
CREATE INDEX nodes_heartbeat_idx ON nodes (last_heartbeat_at) WHERE state = 'ready';

-- Desired state: the versions each node keeps (instances = warm instances; 0 = code cached only).
CREATE TABLE assignments (
    node_id    uuid NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    version_id uuid NOT NULL,
    instances  integer NOT NULL CONSTRAINT assignments_instances_check CHECK (instances BETWEEN 0 AND 10000),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, version_id),
    CONSTRAINT assignments_version_fkey FOREIGN KEY (tenant_id, version_id) REFERENCES versions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX assignments_version_idx ON assignments (version_id);

-- Any change of a node's assignments (including a cascade from a deleted version) bumps its
-- revision and wakes its long-poll on every replica.
CREATE FUNCTION nimbus_assignments_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE n uuid;
BEGIN
    n := CASE WHEN TG_OP = 'DELETE' THEN OLD.node_id ELSE NEW.node_id END;
    UPDATE nodes SET revision = revision + 1 WHERE id = n;
    PERFORM pg_notify('nimbus_desired_state', n::text);
    RETURN NULL;
END $$;
CREATE TRIGGER assignments_changed AFTER INSERT OR UPDATE OR DELETE ON assignments
    FOR EACH ROW EXECUTE FUNCTION nimbus_assignments_changed();

-- One row per invocation, written by the node that ran it; the primary key makes ingest
-- idempotent. No foreign key to functions or versions: usage outlives what it was billed for.
CREATE TABLE usage_records (
    invocation_id uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id   uuid NOT NULL,
    version_id    uuid NOT NULL,
    version       integer NOT NULL,
    node_id       uuid NOT NULL REFERENCES nodes (id),
    started_at    timestamptz NOT NULL,
    duration_us   bigint NOT NULL CONSTRAINT usage_records_duration_check CHECK (duration_us >= 0),
    billed_ms     bigint NOT NULL CONSTRAINT usage_records_billed_check CHECK (billed_ms >= 1),
    memory_mb     integer NOT NULL,
    http_status   smallint NOT NULL,
    status        text NOT NULL CONSTRAINT usage_records_status_check CHECK (status IN
        ('ok', 'timeout', 'memory_limit', 'crash', 'exit_code', 'response_too_large', 'invalid_response', 'start_failed')),
    cold_start    boolean NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_records_tenant_time_idx ON usage_records (tenant_id, started_at);
CREATE INDEX usage_records_function_time_idx ON usage_records (tenant_id, function_id, started_at);

-- Function stderr, line by line; (invocation_id, seq) makes re-shipped lines land once.
CREATE TABLE function_logs (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id   uuid NOT NULL,
    version       integer NOT NULL,
    invocation_id uuid NOT NULL,
    seq           integer NOT NULL,
    node_id       uuid NOT NULL REFERENCES nodes (id),
    time          timestamptz NOT NULL,
    line          text NOT NULL,
    CONSTRAINT function_logs_line_key UNIQUE (invocation_id, seq)
);
CREATE INDEX function_logs_function_idx ON function_logs (tenant_id, function_id, id);
CREATE INDEX function_logs_time_idx ON function_logs (time);

-- Per-minute rollups of what agents reported, per version (summed over nodes and replicas).
CREATE TABLE version_metrics (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    version_id      uuid NOT NULL,
    minute          timestamptz NOT NULL,
    requests        bigint NOT NULL,
    errors          bigint NOT NULL,
    cold_starts     bigint NOT NULL,
    -- Sum over node-seconds of the in-flight average; divided by 60 it is the minute's average
    -- concurrency over all nodes.
    concurrency_sum double precision NOT NULL,
    latency_buckets bigint[] NOT NULL,
    PRIMARY KEY (version_id, minute)
);
CREATE INDEX version_metrics_tenant_idx ON version_metrics (tenant_id, version_id, minute);

ALTER TABLE assignments ENABLE ROW LEVEL SECURITY;
ALTER TABLE assignments FORCE ROW LEVEL SECURITY;
CREATE POLICY assignments_read ON assignments FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR node_id = nimbus_current_node() OR nimbus_platform());
CREATE POLICY assignments_write ON assignments FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());

ALTER TABLE usage_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE usage_records FORCE ROW LEVEL SECURITY;
CREATE POLICY usage_records_read ON usage_records FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR node_id = nimbus_current_node());
CREATE POLICY usage_records_insert ON usage_records FOR INSERT
    WITH CHECK (node_id = nimbus_current_node());

ALTER TABLE function_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE function_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY function_logs_read ON function_logs FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR node_id = nimbus_current_node());
CREATE POLICY function_logs_insert ON function_logs FOR INSERT
    WITH CHECK (node_id = nimbus_current_node());
CREATE POLICY function_logs_retention ON function_logs FOR DELETE USING (nimbus_platform());

ALTER TABLE version_metrics ENABLE ROW LEVEL SECURITY;
ALTER TABLE version_metrics FORCE ROW LEVEL SECURITY;
CREATE POLICY version_metrics_read ON version_metrics FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR nimbus_platform());
CREATE POLICY version_metrics_insert ON version_metrics FOR INSERT WITH CHECK (nimbus_platform());
CREATE POLICY version_metrics_update ON version_metrics FOR UPDATE
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());

-- A node reads exactly the versions (and their functions and packages) assigned to it.
CREATE POLICY versions_node_read ON versions FOR SELECT
    USING (id IN (SELECT a.version_id FROM assignments a WHERE a.node_id = nimbus_current_node()));
CREATE POLICY functions_node_read ON functions FOR SELECT
    USING (id IN (SELECT v.function_id FROM versions v JOIN assignments a ON a.version_id = v.id
                  WHERE a.node_id = nimbus_current_node()));
CREATE POLICY packages_node_read ON packages FOR SELECT
    USING (id IN (SELECT v.package_id FROM versions v JOIN assignments a ON a.version_id = v.id
                  WHERE a.node_id = nimbus_current_node()));

GRANT SELECT, INSERT, UPDATE ON join_tokens, nodes TO nimbus_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON assignments TO nimbus_app;
-- Usage is append-only for the application; logs are appended and expire.
GRANT SELECT, INSERT ON usage_records TO nimbus_app;
GRANT SELECT, INSERT, DELETE ON function_logs TO nimbus_app;
GRANT SELECT, INSERT, UPDATE ON version_metrics TO nimbus_app;
