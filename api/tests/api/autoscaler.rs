//! The autoscaler's tick against a real PostgreSQL: it places a routed version on a matching
//! node, reports versions no node matches as unschedulable with the reason, keeps tenants out of
//! pools dedicated to others, and a new leader resumes from the state the last one stored. The
//! function's metrics show desired vs ready instances and the requests gateways held.

use std::time::Duration;

use chrono::DurationRound;

use axum::http::StatusCode;
use nimbus_api::autoscaler::run::Autoscaler;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    functions::{create_function, functions_path, publish, upload, wasm_module},
    helpers::{TestApp, User, spawn_app},
};

/// A wasm function `thumbs` with version 1 behind the alias `live`; returns the version id.
async fn routed_thumbs(app: &TestApp, owner: &User) -> Uuid {
    assert_eq!(
        create_function(app, owner, json!({"name": "thumbs", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    assert!(upload(app, owner, "thumbs", "application/wasm", wasm_module(1)).await.status.is_success());
    let v1: Uuid = publish(app, owner, "thumbs").await.body["id"].as_str().unwrap().parse().unwrap();
    let alias = app
        .post(&format!("{}/thumbs/aliases", functions_path(owner.tenant)))
        .token(&owner.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;
    assert_eq!(alias.status, StatusCode::CREATED, "{}", alias.text);
    v1
}

/// A ready node in `zone` with `labels`; returns its id.
async fn node(app: &TestApp, admin: &User, name: &str, labels: Value) -> Uuid {
    let token = app.post("/v1/join-tokens").token(&admin.token).json(json!({"name": name})).send().await;
    let joined = app
        .post("/agent/v1/join")
        .json(json!({"token": token.body["secret"], "name": name, "zone": "zone-a", "labels": labels,
                     "capacity": {"memory_mb": 4096, "cpu_millis": 2000, "instance_slots": 16},
                     "invoke_url": "http://127.0.0.1:9"}))
        .send()
        .await;
    assert_eq!(joined.status, StatusCode::CREATED, "{}", joined.text);
    joined.body["node_id"].as_str().unwrap().parse().unwrap()
}

async fn assigned(app: &TestApp, admin: &User, node: Uuid) -> Vec<(String, u64)> {
    let res = app.get(&format!("/v1/nodes/{node}/assignments")).token(&admin.token).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    res.body["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["version_id"].as_str().unwrap().to_owned(), a["instances"].as_u64().unwrap()))
        .collect()
}

async fn scale(app: &TestApp, owner: &User) -> Value {
    let f = app.get(&format!("{}/thumbs", functions_path(owner.tenant))).token(&owner.token).send().await;
    assert_eq!(f.status, StatusCode::OK, "{}", f.text);
    f.body["scale"].clone()
}

async fn set_placement(app: &TestApp, owner: &User, placement: Value) {
    let res = app
        .patch(&format!("{}/thumbs", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"placement": placement}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
}

#[tokio::test]
async fn a_tick_places_matching_nodes_only_reports_unschedulable_versions_and_resumes_as_a_new_leader() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let other = app.sign_up("other@example.com", "globex").await;
    let v1 = routed_thumbs(&app, &owner).await;
    let spot = node(&app, &admin, "spot-1", json!({"pool": "spot"})).await;
    let gpu = node(&app, &admin, "gpu-1", json!({"pool": "gpu", "accelerator": "gpu"})).await;
    let mut autoscaler = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());

    // Required labels no ready node has: unschedulable, with the reason, and nothing placed.
    set_placement(&app, &owner, json!({"required": {"accelerator": "tpu"}})).await;
    autoscaler.tick().await.unwrap();
    let s = scale(&app, &owner).await;
    assert_eq!(s[0]["status"], "unschedulable", "{s}");
    assert!(s[0]["reason"].as_str().unwrap().contains("accelerator=tpu"), "{s}");
    assert!(assigned(&app, &admin, spot).await.is_empty() && assigned(&app, &admin, gpu).await.is_empty());

    // A matching node: the routed version gets its initial scale there, and only there.
    set_placement(&app, &owner, json!({"required": {"accelerator": "gpu"}})).await;
    autoscaler.tick().await.unwrap();
    assert_eq!(assigned(&app, &admin, gpu).await, [(v1.to_string(), 1)]);
    assert!(assigned(&app, &admin, spot).await.is_empty());
    let s = scale(&app, &owner).await;
    assert_eq!(
        (s[0]["status"].as_str(), s[0]["desired"].as_u64(), s[0]["placed"].as_u64()),
        (Some("ok"), Some(1), Some(1)),
        "{s}"
    );

    // The gpu pool dedicated to another tenant: acme's version may no longer run there.
    let dedicate = app
        .req(axum::http::Method::PUT, "/v1/pools/gpu/dedication")
        .token(&admin.token)
        .json(json!({"tenant_id": other.tenant}))
        .send()
        .await;
    assert_eq!(dedicate.status, StatusCode::OK, "{}", dedicate.text);
    autoscaler.tick().await.unwrap();
    assert!(assigned(&app, &admin, gpu).await.is_empty(), "never on another tenant's pool");
    let s = scale(&app, &owner).await;
    assert_eq!(s[0]["status"], "unschedulable", "{s}");
    assert!(
        s[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no ready node available to the tenant has the labels accelerator=gpu"),
        "{s}"
    );

    // Without rules it runs on the shared node; a new leader resumes from the stored state (the
    // version keeps the time it was first seen) instead of starting over.
    set_placement(&app, &owner, json!({})).await;
    autoscaler.tick().await.unwrap();
    assert_eq!(assigned(&app, &admin, spot).await, [(v1.to_string(), 1)]);
    let before = stored(&app, v1).await;
    assert!(before["first_seen_ms"].as_u64().is_some(), "{before}");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut leader = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    leader.resume().await.unwrap();
    leader.tick().await.unwrap();
    assert_eq!(stored(&app, v1).await["first_seen_ms"], before["first_seen_ms"], "the new leader resumed");
    assert_eq!(assigned(&app, &admin, spot).await, [(v1.to_string(), 1)], "and decided the same");

    // The function's metrics: desired vs ready now, and the requests gateways held.
    app.state.stats.record_queue(owner.tenant, v1, Duration::from_millis(4));
    app.state.stats.flush(&app.state.pool).await.unwrap();
    let m = app
        .get(&format!("{}/thumbs/metrics?window=15m", functions_path(owner.tenant)))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    let v = &m.body["versions"][0];
    assert_eq!(
        (v["desired_instances"].as_i64(), v["ready_instances"].as_i64(), v["queued"].as_i64()),
        (Some(1), Some(0), Some(1)),
        "{v}"
    );
    assert!((v["queue_ms_avg"].as_f64().unwrap() - 4.0).abs() < 0.5, "{v}");
}

/// A tenant (`owner`) with `thumbs` published and routed by `live`, and one ready node named
/// `node_name` without labels: where most autoscaler tests start.
struct One {
    app: TestApp,
    admin: User,
    owner: User,
    version: Uuid,
    node: Uuid,
}

async fn one_routed_version_on_a_node(node_name: &str) -> One {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let version = routed_thumbs(&app, &owner).await;
    let node = node(&app, &admin, node_name, json!({})).await;
    One { app, admin, owner, version, node }
}

async fn stored(app: &TestApp, version: Uuid) -> Value {
    let mut c = app.admin_conn().await;
    sqlx::query_scalar::<_, Value>("SELECT state FROM autoscaler_state WHERE version_id = $1")
        .bind(version)
        .fetch_one(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_replica_leads_at_a_time_and_another_takes_over_when_it_dies() {
    let One { app, admin, version: v1, node: n, .. } = one_routed_version_on_a_node("w1").await;
    let replica = || Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone()).run();
    let wait_assigned = || async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while assigned(&app, &admin, n).await != [(v1.to_string(), 1)] {
            assert!(tokio::time::Instant::now() < deadline, "the version was never placed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let holders = || async {
        let mut c = app.admin_conn().await;
        sqlx::query_scalar::<_, i64>(
            // Advisory locks are per database; other tests' databases hold the same key.
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(nimbus_api::autoscaler::run::LOCK_KEY)
        .fetch_one(&mut c)
        .await
        .unwrap()
    };

    // A replica that does not hold the lock cannot write, even if it tries.
    {
        use nimbus_api::autoscaler::run::{Sink, compute, load, store};
        let mut c = app.admin_conn().await;
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut c).await.unwrap();
        let inputs = load(&app.state.pool).await.unwrap();
        let mut states = std::collections::HashMap::new();
        let outcome = compute(&inputs, &mut states, &Default::default(), &Default::default(), 1_000_000);
        assert_eq!(outcome.assignments.len(), 1, "there is something to write");
        let sink = Sink { pool: &app.state.pool, leader_pid: Some(pid), purge: false };
        let refused = store(&sink, &inputs, &outcome, &states, 1_000_000, &mut Default::default()).await;
        assert!(refused.is_err(), "a write without the lock is refused");
        assert!(assigned(&app, &admin, n).await.is_empty(), "and nothing was written");
    }

    let first = tokio::spawn(replica());
    wait_assigned().await;
    let second = tokio::spawn(replica());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(holders().await, 1, "one leader");

    // The leader dies (its lock connection with it); the other takes over and places again.
    first.abort();
    let _ = first.await;
    let mut c = app.admin_conn().await;
    sqlx::query("DELETE FROM assignments").execute(&mut c).await.unwrap();
    wait_assigned().await;
    assert_eq!(holders().await, 1, "the second replica leads now");
    second.abort();
}

/// `concurrency` in flight for `version` in each of the last 60 whole seconds, recorded in
/// `stats` as agents report it.
fn last_minute(stats: &nimbus_api::nodes::Stats, tenant: Uuid, version: Uuid, concurrency: f64) {
    let now = chrono::Utc::now().duration_trunc(chrono::TimeDelta::seconds(1)).unwrap();
    for s in 1..=60 {
        stats.record(
            tenant,
            &nimbus_protocol::VersionMetrics {
                version_id: version,
                tenant_id: tenant,
                second: now - chrono::TimeDelta::seconds(s),
                concurrency,
                requests: 10,
                errors: 0,
                cold_starts: 0,
                latency_buckets: vec![],
            },
        );
    }
}

/// The stored row of `version`: whether it was active, when it was written, and the heartbeat.
async fn stored_activity(app: &TestApp, version: Uuid) -> (bool, chrono::DateTime<chrono::Utc>, i64) {
    let mut c = app.admin_conn().await;
    sqlx::query_as(
        "SELECT s.active, s.updated_at, h.tick_ms FROM autoscaler_state s, autoscaler_heartbeat h \
         WHERE s.version_id = $1",
    )
    .bind(version)
    .fetch_one(&mut c)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_active_versions_row_is_not_rewritten_each_tick_and_a_new_leader_takes_its_activity_from_the_heartbeat() {
    let One { app, owner, version: v1, .. } = one_routed_version_on_a_node("w1").await;
    // Demand for the last minute, as this replica's agents reported it.
    last_minute(&app.state.stats, owner.tenant, v1, 5.0);
    let mut leader = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    leader.tick().await.unwrap();
    let (active, written_at, first_beat) = stored_activity(&app, v1).await;
    assert!(active, "it had demand at the tick that wrote it");
    assert_eq!(stored(&app, v1).await["last_active_ms"].as_i64(), Some(first_beat));

    // Still active a tick later (the clock moved on): the row stays, the heartbeat moves.
    tokio::time::sleep(Duration::from_millis(5)).await;
    leader.tick().await.unwrap();
    let (active, rewritten_at, beat) = stored_activity(&app, v1).await;
    assert!(active && beat > first_beat, "{beat} after {first_beat}");
    assert_eq!(rewritten_at, written_at, "the row was not rewritten");
    assert_eq!(leader.state(&v1).and_then(|s| s.last_active_ms), u64::try_from(beat).ok());

    // A new leader: the version was active until the heartbeat, not only until its row.
    let mut next = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    next.resume().await.unwrap();
    assert_eq!(next.state(&v1).and_then(|s| s.last_active_ms), u64::try_from(beat).ok());
}

#[tokio::test]
async fn the_leader_scales_on_what_agents_reported_to_other_replicas() {
    let One { app, admin, owner, version: v1, node: n } = one_routed_version_on_a_node("w1").await;

    // Another replica's agents ran 35 invocations at once for the last minute; it publishes.
    let elsewhere = nimbus_api::nodes::Stats::default();
    last_minute(&elsewhere, owner.tenant, v1, 35.0);
    assert!(elsewhere.publish(&app.state.pool, Uuid::now_v7(), 120).await.unwrap() >= 60);

    // This replica's own stats saw nothing, yet the leader wants 35 / (10 × 0.7) = 5 instances.
    let mut leader = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    leader.tick().await.unwrap();
    assert_eq!(assigned(&app, &admin, n).await, [(v1.to_string(), 5)]);
}

/// Waits for the routing channel to announce a change of `table` (each test database has its
/// own channel: notifications do not cross databases).
async fn announced(listener: &mut sqlx::postgres::PgListener, table: &str) {
    let wait = async {
        loop {
            if listener.recv().await.unwrap().payload() == table {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("the change is announced");
}

#[tokio::test]
async fn a_watching_autoscaler_reads_versions_again_only_when_the_catalogue_changes() {
    let One { app, admin, owner, version: v1, node: n } = one_routed_version_on_a_node("node-1").await;
    let mut listener = sqlx::postgres::PgListener::connect(&app.db_url).await.unwrap();
    listener.listen(nimbus_api::gateway::table::CHANNEL).await.unwrap();
    let mut autoscaler = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    autoscaler.watch().await.unwrap();
    autoscaler.tick().await.unwrap();
    assert_eq!(assigned(&app, &admin, n).await, [(v1.to_string(), 1)]);
    // A version counts as active when first seen; without demand the next tick stores it quiet.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(autoscaler.tick().await.unwrap(), 1, "the version's row, now quiet");

    // An assignment changed behind its back, with no catalogue change announced: the watching
    // autoscaler keeps the assignments it wrote and writes nothing (an unwatched one re-reads
    // every tick and puts the row back).
    let mut su = app.admin_conn().await;
    sqlx::query("DELETE FROM assignments").execute(&mut su).await.unwrap();
    assert_eq!(autoscaler.tick().await.unwrap(), 0, "nothing to write: the kept assignments say so");
    assert!(assigned(&app, &admin, n).await.is_empty());

    // A new routed version: announced on the channel, so the next tick reads everything again,
    // places the new version and restores the row.
    let v2: Uuid = publish(&app, &owner, "thumbs").await.body["id"].as_str().unwrap().parse().unwrap();
    let alias = app
        .post(&format!("{}/thumbs/aliases", functions_path(owner.tenant)))
        .token(&owner.token)
        .json(json!({"name": "beta", "routing": {"weights": [{"version": 2, "weight": 100}]}}))
        .send()
        .await;
    assert_eq!(alias.status, StatusCode::CREATED, "{}", alias.text);
    announced(&mut listener, "aliases").await;
    // The autoscaler's own listener receives the same notification on its own connection; a
    // tick reads it if it has arrived, so allow it a few ticks.
    let mut rows = Vec::new();
    for _ in 0..50 {
        autoscaler.tick().await.unwrap();
        rows = assigned(&app, &admin, n).await;
        if rows.len() == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    rows.sort();
    let mut want = vec![(v1.to_string(), 1), (v2.to_string(), 1)];
    want.sort();
    assert_eq!(rows, want, "the new version placed and the deleted row restored");

    let mut unwatched = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    unwatched.resume().await.unwrap();
    sqlx::query("DELETE FROM assignments WHERE version_id = $1").bind(v1).execute(&mut su).await.unwrap();
    unwatched.tick().await.unwrap();
    assert!(assigned(&app, &admin, n).await.contains(&(v1.to_string(), 1)), "an unwatched tick reads everything");
}

#[tokio::test]
async fn the_periodic_full_read_runs_between_ticks_and_sees_what_no_notification_announced() {
    let One { app, admin, version: v1, node: n, .. } = one_routed_version_on_a_node("node-1").await;
    let mut su = app.admin_conn().await;

    // With the default period the read is not due right after a tick's full read.
    let mut default = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    default.watch().await.unwrap();
    default.tick().await.unwrap();
    assert!(!default.refresh_if_due().await.unwrap(), "not due 30 s early");
    assert_eq!(assigned(&app, &admin, n).await, [(v1.to_string(), 1)]);

    // With a period of one tick it is due after every tick: an assignment deleted behind the
    // autoscaler's back (nothing announced) is read between ticks, and the next tick restores it.
    let mut autoscaler = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone())
        .full_reload_every(nimbus_api::autoscaler::run::TICK);
    autoscaler.watch().await.unwrap();
    autoscaler.resume().await.unwrap();
    autoscaler.tick().await.unwrap();
    sqlx::query("DELETE FROM assignments").execute(&mut su).await.unwrap();
    assert!(autoscaler.refresh_if_due().await.unwrap(), "due with a one-tick period");
    autoscaler.tick().await.unwrap();
    assert_eq!(assigned(&app, &admin, n).await, [(v1.to_string(), 1)], "the row read back and restored");

    // Without one (the default autoscaler, just refreshed), the same deletion stays unseen.
    sqlx::query("DELETE FROM assignments").execute(&mut su).await.unwrap();
    assert!(!default.refresh_if_due().await.unwrap());
    default.tick().await.unwrap();
    assert!(assigned(&app, &admin, n).await.is_empty(), "the kept assignments say nothing changed");
}

/// What `node` reports, through the agents' report route.
async fn report(app: &TestApp, credential: &str, versions: Value) {
    let res = app
        .post("/agent/v1/reports")
        .token(credential)
        .json(json!({"revision": 1, "in_flight": 0, "versions": versions, "metrics": []}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
}

#[tokio::test]
async fn the_ready_instances_a_tick_reads_are_what_the_nodes_last_reported_ready() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("ready-owner@example.com", "ready").await;
    let v1 = routed_thumbs(&app, &owner).await;
    let other = Uuid::now_v7();
    let mut nodes = Vec::new();
    for name in ["r1", "r2"] {
        let token = app.post("/v1/join-tokens").token(&admin.token).json(json!({"name": name})).send().await;
        let joined = app
            .post("/agent/v1/join")
            .json(json!({"token": token.body["secret"], "name": name, "zone": "zone-a",
                         "capacity": {"memory_mb": 4096, "cpu_millis": 2000, "instance_slots": 16},
                         "invoke_url": "http://127.0.0.1:9"}))
            .send()
            .await;
        assert_eq!(joined.status, StatusCode::CREATED, "{}", joined.text);
        let id: Uuid = joined.body["node_id"].as_str().unwrap().parse().unwrap();
        nodes.push((id, joined.body["credential"]["token"].as_str().unwrap().to_owned()));
    }
    let status = |v: Uuid, state: &str, instances: u32| json!({"version_id": v, "state": state, "instances": instances, "in_flight": 0, "error": null});
    // Only entries reported `ready` count, per node and summed over nodes.
    report(&app, &nodes[0].1, json!([status(v1, "ready", 2), status(other, "loading", 3)])).await;
    report(&app, &nodes[1].1, json!([status(other, "failed", 1), status(v1, "ready", 1)])).await;
    let inputs = nimbus_api::autoscaler::run::load(&app.state.pool).await.unwrap();
    assert_eq!(inputs.ready.get(&v1), Some(&3), "{:?}", inputs.ready);
    assert_eq!(inputs.ready.get(&other), None, "{:?}", inputs.ready);
    assert_eq!(inputs.ready_on.get(&(nodes[0].0, v1)), Some(&2));
    assert_eq!(inputs.ready_on.get(&(nodes[1].0, v1)), Some(&1));

    // A later report replaces what the node reported before.
    report(&app, &nodes[0].1, json!([status(v1, "loading", 0), status(other, "ready", 4)])).await;
    let inputs = nimbus_api::autoscaler::run::load(&app.state.pool).await.unwrap();
    assert_eq!(inputs.ready.get(&v1), Some(&1), "{:?}", inputs.ready);
    assert_eq!(inputs.ready_on.get(&(nodes[0].0, v1)), None);
    assert_eq!(inputs.ready_on.get(&(nodes[0].0, other)), Some(&4));
}

/// The value `/metrics` shows for the autoscaler gauge `name` of thumbs version 1, if any.
async fn thumbs_gauge(app: &TestApp, name: &str) -> Option<f64> {
    let metrics = app.get("/metrics").send().await.text;
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains("function=\"thumbs\"") && l.contains("version=\"1\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn the_desired_and_ready_gauges_follow_the_decisions_and_fall_to_zero_when_a_version_goes_quiet() {
    let One { app, owner, .. } = one_routed_version_on_a_node("n-1").await;
    let mut autoscaler = Autoscaler::new(app.state.pool.clone(), app.db_url.clone(), app.state.stats.clone());
    let (desired, ready) = ("nimbus_autoscaler_desired_instances", "nimbus_autoscaler_ready_instances");

    autoscaler.tick().await.unwrap();
    assert_eq!(thumbs_gauge(&app, desired).await, Some(1.0), "its initial scale");
    assert_eq!(thumbs_gauge(&app, ready).await, Some(0.0), "no node reported it ready yet");

    // Unschedulable, still routed: still wanted.
    set_placement(&app, &owner, json!({"required": {"accelerator": "tpu"}})).await;
    autoscaler.tick().await.unwrap();
    assert_eq!(thumbs_gauge(&app, desired).await, Some(1.0));

    // No alias routes to it and nothing is assigned: no longer active, and the gauges say 0
    // rather than the last decision.
    let gone =
        app.delete(&format!("{}/thumbs/aliases/live", functions_path(owner.tenant))).token(&owner.token).send().await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text);
    autoscaler.tick().await.unwrap();
    assert!(scale(&app, &owner).await.as_array().is_none_or(Vec::is_empty), "no decision for it any more");
    assert_eq!(thumbs_gauge(&app, desired).await, Some(0.0));
    assert_eq!(thumbs_gauge(&app, ready).await, Some(0.0));
}
