-- The access log of IAM decisions, aggregated: per principal, action and resource, per day, how
-- often it was allowed and when last. Written by each replica from memory every few seconds
-- (so the hot path takes no write), read by access reports and policy generation. Kept 90 days.

CREATE TABLE iam_activity (
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    principal_kind text NOT NULL CONSTRAINT iam_activity_kind_check CHECK (principal_kind IN ('user', 'api_key')),
    principal_id   uuid NOT NULL,
    action         text NOT NULL,
    resource       text NOT NULL,
    day            date NOT NULL,
    count          bigint NOT NULL,
    last_at        timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, principal_id, action, resource, day)
);
CREATE INDEX iam_activity_day_idx ON iam_activity (day);

ALTER TABLE iam_activity ENABLE ROW LEVEL SECURITY;
ALTER TABLE iam_activity FORCE ROW LEVEL SECURITY;
CREATE POLICY iam_activity_read ON iam_activity FOR SELECT
    USING (tenant_id = nimbus_current_tenant() OR nimbus_platform());
CREATE POLICY iam_activity_write ON iam_activity FOR ALL
    USING (nimbus_platform()) WITH CHECK (nimbus_platform());
GRANT SELECT, INSERT, UPDATE, DELETE ON iam_activity TO nimbus_app;
