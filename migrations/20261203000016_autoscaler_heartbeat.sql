-- The autoscaler no longer rewrites an active version's stored KPA state every 30 s to move its
-- last activity (that was most of the rows a tick wrote at fleet scale). Instead:
-- * `active` says the version had demand at the tick that wrote the row; rows are rewritten when
--   that changes (a version that goes quiet is written with its final last activity);
-- * the heartbeat holds the time of the last tick that stored anything (at least every 30 s),
--   and every row marked active was still active then. A new leader takes it as their last
--   activity.
ALTER TABLE autoscaler_state ADD COLUMN active boolean NOT NULL DEFAULT false;

CREATE TABLE autoscaler_heartbeat (
    singleton boolean PRIMARY KEY DEFAULT true CONSTRAINT autoscaler_heartbeat_singleton CHECK (singleton),
    -- Wall-clock milliseconds of the leader's tick.
    tick_ms   bigint NOT NULL
);

ALTER TABLE autoscaler_heartbeat ENABLE ROW LEVEL SECURITY;
ALTER TABLE autoscaler_heartbeat FORCE ROW LEVEL SECURITY;
CREATE POLICY autoscaler_heartbeat_platform ON autoscaler_heartbeat FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());
GRANT SELECT, INSERT, UPDATE ON autoscaler_heartbeat TO nimbus_app;
