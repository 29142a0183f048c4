-- Assignment changes bump their nodes' revisions once per statement, not once per row.
--
-- The autoscaler writes a tick's changed assignments in two statements (one delete, one
-- upsert). With a row trigger each row updated its node's row again — a node holding hundreds
-- of assignments was rewritten hundreds of times per tick, each time evaluating the nodes'
-- routing trigger over its reported versions. Statement triggers over the transition tables
-- update each touched node once per statement and notify it once.

DROP TRIGGER assignments_changed ON assignments;
DROP FUNCTION nimbus_assignments_changed();

CREATE FUNCTION nimbus_assignments_touched() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    -- `changed` is the statement's transition table (new rows, or old rows for deletes).
    UPDATE nodes SET revision = revision + 1 WHERE id IN (SELECT node_id FROM changed);
    PERFORM pg_notify('nimbus_desired_state', t.node_id::text) FROM (SELECT DISTINCT node_id FROM changed) t;
    RETURN NULL;
END $$;

CREATE TRIGGER assignments_inserted AFTER INSERT ON assignments
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_assignments_touched();
CREATE TRIGGER assignments_updated AFTER UPDATE ON assignments
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_assignments_touched();
-- An update that moved a row to another node (nothing does, but the key allows it) touches the
-- node it left as well.
CREATE TRIGGER assignments_updated_from AFTER UPDATE ON assignments
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_assignments_touched();
CREATE TRIGGER assignments_deleted AFTER DELETE ON assignments
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION nimbus_assignments_touched();

-- A node's row changes every second (reports) and at every assignment statement (revision);
-- compare its reported versions only when the document changed at all.
DROP TRIGGER nodes_routing_update ON nodes;
CREATE TRIGGER nodes_routing_update AFTER UPDATE ON nodes
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.zone IS DISTINCT FROM NEW.zone
          OR OLD.invoke_url IS DISTINCT FROM NEW.invoke_url OR OLD.invoke_secret IS DISTINCT FROM NEW.invoke_secret
          OR (OLD.versions IS DISTINCT FROM NEW.versions
              AND nimbus_ready_versions(OLD.versions) IS DISTINCT FROM nimbus_ready_versions(NEW.versions)))
    EXECUTE FUNCTION nimbus_routing_changed();
