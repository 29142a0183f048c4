-- Autoscaling and placement (issue 5): node labels and pools, per-function scaling settings and
-- placement rules, pools dedicated to a tenant, and the autoscaler's stored state.
--
-- The autoscaler runs in one API replica at a time (a session advisory lock) with the platform
-- scope; what it decides per version is stored here so that a new leader resumes from it.

-- Labels a node carries (`pool=spot`, `accelerator=gpu`, ...): set at join, editable by a
-- platform admin. {"key": "value"}.
ALTER TABLE nodes ADD COLUMN labels jsonb NOT NULL DEFAULT '{}'::jsonb;

-- A function's KPA settings beyond its versions' min/max scale (absent keys take the defaults),
-- and its placement rules: {"required": {..}, "preferred": {..}, "priority": "low|normal|critical"}.
ALTER TABLE functions ADD COLUMN scaling jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE functions ADD COLUMN placement jsonb NOT NULL DEFAULT '{}'::jsonb;

-- A pool (the value of a node's `pool` label) dedicated to one tenant: that tenant's functions
-- run only on its nodes, and no other tenant's function is placed there.
CREATE TABLE pool_dedications (
    pool       text PRIMARY KEY CONSTRAINT pool_dedications_pool_check CHECK (pool ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_by uuid REFERENCES users (id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pool_dedications_tenant_idx ON pool_dedications (tenant_id);

-- What the autoscaler decided for a version at its last tick, with the KPA state it carries to
-- the next (panic mode, the scale-down-delay window, last activity; wall-clock milliseconds).
CREATE TABLE autoscaler_state (
    version_id uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    function_id uuid NOT NULL,
    state      jsonb NOT NULL,
    desired    integer NOT NULL,
    placed     integer NOT NULL,
    ready      integer NOT NULL,
    panicking  boolean NOT NULL,
    -- 'ok', 'unplaced' (no room on matching nodes) or 'unschedulable' (no node matches at all).
    status     text NOT NULL CONSTRAINT autoscaler_state_status_check CHECK (status IN ('ok', 'unplaced', 'unschedulable')),
    reason     text,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT autoscaler_state_version_fkey FOREIGN KEY (tenant_id, version_id) REFERENCES versions (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX autoscaler_state_function_idx ON autoscaler_state (tenant_id, function_id);

ALTER TABLE pool_dedications ENABLE ROW LEVEL SECURITY;
ALTER TABLE pool_dedications FORCE ROW LEVEL SECURITY;
CREATE POLICY pool_dedications_platform ON pool_dedications FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());

ALTER TABLE autoscaler_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE autoscaler_state FORCE ROW LEVEL SECURITY;
CREATE POLICY autoscaler_state_read ON autoscaler_state FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR nimbus_platform());
CREATE POLICY autoscaler_state_write ON autoscaler_state FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());

GRANT SELECT, INSERT, UPDATE, DELETE ON pool_dedications, autoscaler_state TO nimbus_app;

-- A gateway holding requests for a version nobody serves asks the autoscaler leader to act now:
-- `pg_notify('nimbus_autoscaler', '<version id> <requests held>')`.

-- Requests the gateways held while an instance started (the cold path), and their waiting time.
ALTER TABLE version_metrics ADD COLUMN queued bigint NOT NULL DEFAULT 0;
ALTER TABLE version_metrics ADD COLUMN queue_ms_sum double precision NOT NULL DEFAULT 0;

-- The per-second concurrency each replica's agents reported, published every 2 s by replicas
-- that do not lead the autoscaler, so the leader sees the agents that report elsewhere too.
-- Unlogged: it is a minute's worth of soft state, rebuilt by the next reports after a crash.
CREATE UNLOGGED TABLE concurrency_samples (
    version_id  uuid NOT NULL,
    second      timestamptz NOT NULL,
    replica_id  uuid NOT NULL,
    concurrency double precision NOT NULL,
    PRIMARY KEY (version_id, second, replica_id)
);
CREATE INDEX concurrency_samples_second_idx ON concurrency_samples (second);
ALTER TABLE concurrency_samples ENABLE ROW LEVEL SECURITY;
ALTER TABLE concurrency_samples FORCE ROW LEVEL SECURITY;
CREATE POLICY concurrency_samples_platform ON concurrency_samples FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());
GRANT SELECT, INSERT, UPDATE, DELETE ON concurrency_samples TO nimbus_app;
