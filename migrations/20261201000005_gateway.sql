-- The invocation gateway (issue 5): the in-memory routing table of every API replica is loaded
-- with the `nimbus.gateway` scope and refreshed when routing-relevant rows change.
--
--   nimbus.gateway  'on' only in the routing-table loader's read-only transactions
--
-- The gateway setting widens reads of exactly what routing needs (tenant names, functions,
-- versions, aliases) and no write: there is no gateway policy for INSERT, UPDATE or DELETE.

-- Functions anyone may invoke without credentials (until resource policies replace the flag).
ALTER TABLE functions ADD COLUMN public_invoke boolean NOT NULL DEFAULT false;

CREATE FUNCTION nimbus_gateway() RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    AS $$ SELECT coalesce(current_setting('nimbus.gateway', true), '') = 'on' $$;

CREATE POLICY tenants_gateway_read ON tenants FOR SELECT USING (nimbus_gateway());
CREATE POLICY functions_gateway_read ON functions FOR SELECT USING (nimbus_gateway());
CREATE POLICY versions_gateway_read ON versions FOR SELECT USING (nimbus_gateway());
CREATE POLICY aliases_gateway_read ON aliases FOR SELECT USING (nimbus_gateway());

-- Every change that can move a route announces itself on `nimbus_routing`.
CREATE FUNCTION nimbus_routing_changed() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nimbus_routing', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER tenants_routing AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER functions_routing AFTER INSERT OR UPDATE OR DELETE ON functions
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER versions_routing AFTER INSERT OR DELETE ON versions
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER aliases_routing AFTER INSERT OR UPDATE OR DELETE ON aliases
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();

-- The versions a node reports ready, as a sorted list: reports arrive every second with fresh
-- load figures, and only a change of this list (or of the node's state or address) moves routes.
CREATE FUNCTION nimbus_ready_versions(versions jsonb) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT coalesce(array_agg(v->>'version_id' ORDER BY v->>'version_id'), '{}')
          FROM jsonb_array_elements(versions) v WHERE v->>'state' = 'ready' $$;

CREATE TRIGGER nodes_routing_insert AFTER INSERT ON nodes
    FOR EACH ROW EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER nodes_routing_update AFTER UPDATE ON nodes
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.zone IS DISTINCT FROM NEW.zone
          OR OLD.invoke_url IS DISTINCT FROM NEW.invoke_url OR OLD.invoke_secret IS DISTINCT FROM NEW.invoke_secret
          OR nimbus_ready_versions(OLD.versions) IS DISTINCT FROM nimbus_ready_versions(NEW.versions))
    EXECUTE FUNCTION nimbus_routing_changed();

-- Revoked or re-roled API keys and changed memberships clear the gateway's authentication
-- caches at once (the rebuild that follows a notification clears them).
CREATE TRIGGER memberships_routing AFTER INSERT OR UPDATE OR DELETE ON memberships
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER api_keys_routing AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at)
    EXECUTE FUNCTION nimbus_routing_changed();
CREATE TRIGGER api_keys_routing_delete AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION nimbus_routing_changed();
