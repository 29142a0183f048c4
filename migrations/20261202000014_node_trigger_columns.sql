-- The nodes' routing trigger considers only updates that set the columns the routing table
-- reads. Every assignment statement bumps its nodes' `revision`; before this, each such update
-- still evaluated the trigger's condition, which compares the nodes' reported `versions`
-- documents (about 15 KB each at 100 versions per node, read back from TOAST twice).
DROP TRIGGER nodes_routing_update ON nodes;
CREATE TRIGGER nodes_routing_update AFTER UPDATE OF state, zone, invoke_url, invoke_secret, versions ON nodes
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.zone IS DISTINCT FROM NEW.zone
          OR OLD.invoke_url IS DISTINCT FROM NEW.invoke_url OR OLD.invoke_secret IS DISTINCT FROM NEW.invoke_secret
          OR (OLD.versions IS DISTINCT FROM NEW.versions
              AND nimbus_ready_versions(OLD.versions) IS DISTINCT FROM nimbus_ready_versions(NEW.versions)))
    EXECUTE FUNCTION nimbus_routing_changed();
