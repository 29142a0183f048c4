//! Worker nodes through the API: join tokens, joining, credentials, desired state with its
//! long-poll, reports, usage ingest, logs, lost nodes, draining and removal.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use nimbus_api::{
    db::{self, Scope},
    nodes,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    functions::{create_function, publish, upload, wasm_module},
    helpers::{TestApp, User, spawn_app},
};

async fn join_token(app: &TestApp, admin: &User, body: Value) -> (Uuid, String) {
    let res = app.post("/v1/join-tokens").token(&admin.token).json(body).send().await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    (res.body["id"].as_str().unwrap().parse().unwrap(), res.body["secret"].as_str().unwrap().to_owned())
}

fn join_body(token: &str, name: &str) -> Value {
    json!({"token": token, "name": name, "zone": "zone-a",
           "capacity": {"memory_mb": 4096, "cpu_millis": 2000, "instance_slots": 64},
           "invoke_url": "http://10.0.0.9:9090"})
}

struct Joined {
    id: Uuid,
    credential: String,
}

async fn join(app: &TestApp, token: &str, name: &str) -> Joined {
    let res = app.post("/agent/v1/join").json(join_body(token, name)).send().await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert!(res.body["invoke_secret"].as_str().unwrap().len() >= 40);
    Joined {
        id: res.body["node_id"].as_str().unwrap().parse().unwrap(),
        credential: res.body["credential"]["token"].as_str().unwrap().to_owned(),
    }
}

fn empty_report() -> Value {
    json!({"revision": 1, "in_flight": 0, "versions": [], "metrics": []})
}

/// A published wasm function `name` in `user`'s tenant with a secret env var; returns its version id.
async fn deployed(app: &TestApp, user: &User, name: &str) -> Uuid {
    deployed_with(app, user, name, 7).await
}

async fn deployed_with(app: &TestApp, user: &User, name: &str, tag: i32) -> Uuid {
    let res = create_function(
        app,
        user,
        json!({"name": name, "runtime": "wasm", "environment": {"TOKEN": {"value": "s3cr3t-value", "secret": true}, "MODE": {"value": "prod"}}}),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let up = upload(app, user, name, "application/wasm", wasm_module(tag)).await;
    assert!(up.status.is_success(), "{}", up.text);
    let v = publish(app, user, name).await;
    assert_eq!(v.status, StatusCode::CREATED, "{}", v.text);
    v.body["id"].as_str().unwrap().parse().unwrap()
}

async fn assign(app: &TestApp, admin: &User, node: Uuid, body: Value) -> crate::helpers::TestResponse {
    app.req(Method::PUT, &format!("/v1/nodes/{node}/assignments")).token(&admin.token).json(body).send().await
}

#[tokio::test]
async fn join_tokens_are_for_platform_admins_and_bad_revoked_expired_or_used_up_tokens_are_refused() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let user = app.sign_up("dev@example.com", "acme").await;
    let (_, key) = app.create_key(&user.token, user.tenant, "admin").await;
    for who in [&user.token, &key] {
        app.post("/v1/join-tokens")
            .token(who)
            .json(json!({"name": "x"}))
            .send()
            .await
            .assert_problem(StatusCode::FORBIDDEN, "forbidden");
        app.get("/v1/nodes").token(who).send().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    }
    app.post("/v1/join-tokens")
        .token(&admin.token)
        .json(json!({"name": "x", "max_uses": 0}))
        .send()
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    // Unknown token.
    app.post("/agent/v1/join")
        .json(join_body("njt_000000000000_nope", "w1"))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // Used up.
    let (_, once) = join_token(&app, &admin, json!({"name": "once", "max_uses": 1})).await;
    join(&app, &once, "w1").await;
    let res = app.post("/agent/v1/join").json(join_body(&once, "w2")).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.text.contains("used up"), "{}", res.text);
    // Revoked.
    let (id, revoked) = join_token(&app, &admin, json!({"name": "revoked"})).await;
    let del = app.delete(&format!("/v1/join-tokens/{id}")).token(&admin.token).send().await;
    assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
    let res = app.post("/agent/v1/join").json(join_body(&revoked, "w3")).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.text.contains("revoked"), "{}", res.text);
    // Expired.
    let (id, expired) = join_token(&app, &admin, json!({"name": "expired"})).await;
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE join_tokens SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&mut c)
        .await
        .unwrap();
    let res = app.post("/agent/v1/join").json(join_body(&expired, "w4")).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.text.contains("expired"), "{}", res.text);
    // Bad fields are named.
    let (_, good) = join_token(&app, &admin, json!({"name": "good"})).await;
    let mut body = join_body(&good, "Not A Label");
    body["capacity"]["instance_slots"] = json!(0);
    let res = app.post("/agent/v1/join").json(body).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let fields: Vec<&str> =
        res.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["name", "capacity.instance_slots"]);
    // Only the one successful join happened and the token list shows its use.
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes").fetch_one(&mut c).await.unwrap();
    assert_eq!(nodes, 1);
    let list = app.get("/v1/join-tokens").token(&admin.token).send().await;
    assert_eq!(list.body["items"][0]["uses"], 1, "{}", list.text);
    assert!(!list.text.contains(&once), "secrets are shown once");
}

#[tokio::test]
async fn credentials_renew_with_a_grace_period_and_stop_when_the_node_is_removed() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;
    app.post("/agent/v1/reports").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post("/agent/v1/reports")
        .token(&admin.token)
        .json(empty_report())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    let renewed = app.post("/agent/v1/renew").token(&node.credential).send().await;
    assert_eq!(renewed.status, StatusCode::OK, "{}", renewed.text);
    let fresh = renewed.body["token"].as_str().unwrap().to_owned();
    assert_ne!(fresh, node.credential);
    for credential in [&node.credential, &fresh] {
        let res = app.post("/agent/v1/reports").token(credential).json(empty_report()).send().await;
        assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    }
    // Past the grace period the old one stops working.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE nodes SET previous_valid_until = now() - interval '1 second'").execute(&mut c).await.unwrap();
    app.post("/agent/v1/reports")
        .token(&node.credential)
        .json(empty_report())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // An expired credential is refused.
    sqlx::query("UPDATE nodes SET credential_expires_at = now() - interval '1 second'").execute(&mut c).await.unwrap();
    app.post("/agent/v1/reports")
        .token(&fresh)
        .json(empty_report())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    sqlx::query("UPDATE nodes SET credential_expires_at = now() + interval '1 hour'").execute(&mut c).await.unwrap();
    // Removing the node ends its credential.
    let del = app.delete(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
    let res = app.post("/agent/v1/reports").token(&fresh).json(empty_report()).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    let listed = app.get(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(listed.body["state"], "removed", "{}", listed.text);
}

#[tokio::test]
async fn desired_state_carries_assignments_wakes_long_polls_and_shows_a_node_only_its_versions() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let other = app.sign_up("other@example.com", "globex").await;
    let version = deployed(&app, &owner, "thumbs").await;
    let unassigned = deployed_with(&app, &other, "secret-fn", 8).await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;

    let first = app.get("/agent/v1/desired-state").token(&node.credential).send().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.body["assignments"], json!([]));
    let revision = first.body["revision"].as_i64().unwrap();

    // A long-poll waits for the change and wakes when the assignment lands.
    let poll = {
        let router = app.router.clone();
        let credential = node.credential.clone();
        tokio::spawn(async move {
            let req = axum::http::Request::get(format!("/agent/v1/desired-state?after={revision}&wait=25"))
                .header("authorization", format!("Bearer {credential}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let res = tower::ServiceExt::oneshot(router, req).await.unwrap();
            let bytes = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
            serde_json::from_slice::<Value>(&bytes).unwrap()
        })
    };
    let res = assign(
        &app,
        &admin,
        node.id,
        json!({"assignments": [{"tenant_id": owner.tenant, "function": "thumbs", "version": 1, "instances": 2}]}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["assignments"][0]["function"], "thumbs");
    let woke = tokio::time::timeout(Duration::from_secs(20), poll).await.expect("the long-poll woke").unwrap();
    assert!(woke["revision"].as_i64().unwrap() > revision, "{woke}");
    let a = &woke["assignments"][0];
    assert_eq!(a["version_id"], version.to_string());
    assert_eq!(a["function"], "thumbs");
    assert_eq!(a["instances"], 2);
    assert_eq!(a["runtime"], "wasm");
    assert_eq!(a["env"]["TOKEN"], "s3cr3t-value", "secrets are opened for the node");
    assert_eq!(a["env"]["MODE"], "prod");
    let url = a["package"]["url"].as_str().unwrap();
    let sha = a["package"]["sha256"].as_str().unwrap();
    assert_eq!(url, format!("/agent/v1/code/{sha}"), "local-store code URLs are relative to the control plane");

    // The code downloads with the node credential and hashes to what the document says.
    let code = app.get(&format!("/agent/v1/code/{sha}")).token(&node.credential).send().await;
    assert_eq!(code.status, StatusCode::OK);
    assert_eq!(code.headers["content-type"], "application/octet-stream");
    let other_sha = {
        let mut c = app.admin_conn().await;
        sqlx::query_scalar::<_, String>("SELECT sha256 FROM versions WHERE id = $1")
            .bind(unassigned)
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    app.get(&format!("/agent/v1/code/{other_sha}"))
        .token(&node.credential)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");

    // Row-level security: the node sees exactly its assigned version, even unfiltered.
    let mut tx = db::begin(&app.state.pool, &Scope::node(node.id)).await.unwrap();
    let seen: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM versions").fetch_all(&mut *tx).await.unwrap();
    let functions: i64 = sqlx::query_scalar("SELECT count(*) FROM functions").fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(seen, vec![version]);
    assert_eq!(functions, 1);

    // An unknown version is named; the stored assignments are unchanged.
    let res = assign(
        &app,
        &admin,
        node.id,
        json!({"assignments": [{"tenant_id": owner.tenant, "function": "thumbs", "version": 9, "instances": 1}]}),
    )
    .await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "assignments[0].version");
    let now = app.get(&format!("/v1/nodes/{}/assignments", node.id)).token(&admin.token).send().await;
    assert_eq!(now.body["assignments"].as_array().unwrap().len(), 1, "{}", now.text);

    // Removing the assignment empties the document at a newer revision.
    let before = woke["revision"].as_i64().unwrap();
    assert_eq!(assign(&app, &admin, node.id, json!({"assignments": []})).await.status, StatusCode::OK);
    let doc = app.get("/agent/v1/desired-state").token(&node.credential).send().await;
    assert_eq!(doc.body["assignments"], json!([]));
    assert!(doc.body["revision"].as_i64().unwrap() > before);
    // A draining node takes no assignments.
    let drained = app.post(&format!("/v1/nodes/{}/drain", node.id)).token(&admin.token).send().await;
    assert_eq!(
        (drained.body["state"].as_str(), drained.body["draining"].as_bool()),
        (Some("ready"), Some(true)),
        "{}",
        drained.text
    );
    assign(
        &app,
        &admin,
        node.id,
        json!({"assignments": [{"tenant_id": owner.tenant, "function": "thumbs", "version": 1, "instances": 1}]}),
    )
    .await
    .assert_problem(StatusCode::CONFLICT, "node_not_schedulable");
    let doc = app.get("/agent/v1/desired-state").token(&node.credential).send().await;
    assert_eq!(doc.body["draining"], true);
    // A drain outlives the node going silent and coming back.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 minute'").execute(&mut c).await.unwrap();
    assert_eq!(nodes::mark_lost(&app.state.pool, Duration::from_secs(15)).await.unwrap(), vec![node.id]);
    app.post("/agent/v1/reports").token(&node.credential).json(empty_report()).send().await;
    let back = app.get(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(
        (back.body["state"].as_str(), back.body["draining"].as_bool()),
        (Some("ready"), Some(true)),
        "{}",
        back.text
    );
}

#[tokio::test]
async fn a_version_whose_secret_cannot_be_opened_is_left_out_and_the_rest_still_reconciles() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let broken = deployed_with(&app, &owner, "broken", 7).await;
    let fine = deployed_with(&app, &owner, "fine", 8).await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;
    let res = assign(
        &app,
        &admin,
        node.id,
        json!({"assignments": [{"tenant_id": owner.tenant, "function": "broken", "version": 1, "instances": 1},
                               {"tenant_id": owner.tenant, "function": "fine", "version": 1, "instances": 1}]}),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let mut c = app.admin_conn().await;
    sqlx::query(
        "UPDATE versions SET config = jsonb_set(config, '{environment,TOKEN,secret,key_id}', '\"gone\"') WHERE id = $1",
    )
    .bind(broken)
    .execute(&mut c)
    .await
    .unwrap();
    let doc = app.get("/agent/v1/desired-state").token(&node.credential).send().await;
    assert_eq!(doc.status, StatusCode::OK, "{}", doc.text);
    let ids: Vec<&str> =
        doc.body["assignments"].as_array().unwrap().iter().map(|a| a["version_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![fine.to_string()]);
}

#[tokio::test]
async fn a_live_nodes_name_cannot_be_taken_over_and_a_node_that_left_renews_without_a_token() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;
    app.post("/agent/v1/join")
        .json(join_body(&token, "w1"))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "node_name_taken");
    // The anonymous join takes only the API's body limit, not the usage batches' 32 MiB.
    let mut big = join_body(&token, "w9");
    big["zone"] = json!("z".repeat(2 << 20));
    app.post("/agent/v1/join")
        .json(big)
        .send()
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Leaving keeps the credential: the restarted agent renews and reports, and is ready again.
    let left = app.post("/agent/v1/leave").token(&node.credential).send().await;
    assert_eq!(left.status, StatusCode::NO_CONTENT, "{}", left.text);
    let shown = app.get(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(shown.body["state"], "left");
    assert_eq!(app.post("/agent/v1/renew").token(&node.credential).send().await.status, StatusCode::OK);
    let res = app.post("/agent/v1/reports").token(&node.credential).json(empty_report()).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    let shown = app.get(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(shown.body["state"], "ready");

    // A silent node's name can be taken over: same id, new credential.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 minute'").execute(&mut c).await.unwrap();
    let again = join(&app, &token, "w1").await;
    assert_eq!(again.id, node.id);
    assert_ne!(again.credential, node.credential);
    app.post("/agent/v1/reports")
        .token(&node.credential)
        .json(empty_report())
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
}

fn record(invocation: Uuid, owner: &User, function: Uuid, version: Uuid) -> Value {
    json!({"invocation_id": invocation, "tenant_id": owner.tenant, "function_id": function, "version_id": version,
           "version": 1, "started_at": "2026-12-01T10:00:00Z", "duration_us": 1500, "billed_ms": 2, "memory_mb": 128,
           "http_status": 200, "status": "ok", "cold_start": false})
}

#[tokio::test]
async fn usage_batches_are_stored_once_and_logs_are_listed_newest_first() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let stranger = app.sign_up("stranger@example.com", "globex").await;
    let version = deployed(&app, &owner, "thumbs").await;
    let function: Uuid = {
        let mut c = app.admin_conn().await;
        sqlx::query_scalar("SELECT function_id FROM versions WHERE id = $1")
            .bind(version)
            .fetch_one(&mut c)
            .await
            .unwrap()
    };
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let log = |inv: Uuid, seq: u32, line: &str| {
        json!({"invocation_id": inv, "tenant_id": owner.tenant, "function_id": function, "version": 1, "seq": seq,
               "time": "2026-12-01T10:00:01Z", "line": line})
    };
    let batch = json!({"records": [record(a, &owner, function, version), record(b, &owner, function, version)],
                       "logs": [log(a, 0, "first"), log(a, 1, "second")]});
    let res = app.post("/agent/v1/usage").token(&node.credential).json(batch.clone()).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body, json!({"accepted": 2, "duplicates": 0}));
    // The same batch again, and one overlapping it: every record and line lands once.
    let res = app.post("/agent/v1/usage").token(&node.credential).json(batch).send().await;
    assert_eq!(res.body, json!({"accepted": 0, "duplicates": 2}));
    let overlap = json!({"records": [record(b, &owner, function, version), record(c, &owner, function, version),
                                      record(c, &owner, function, version)],
                         "logs": [log(a, 1, "second"), log(c, 0, "third")]});
    let res = app.post("/agent/v1/usage").token(&node.credential).json(overlap).send().await;
    assert_eq!(res.body, json!({"accepted": 1, "duplicates": 2}), "{}", res.text);
    let mut conn = app.admin_conn().await;
    let (records, billed): (i64, i64) = sqlx::query_as("SELECT count(*), sum(billed_ms)::bigint FROM usage_records")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!((records, billed), (3, 6));
    let node_ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT node_id FROM usage_records").fetch_all(&mut conn).await.unwrap();
    assert_eq!(node_ids, vec![node.id]);

    // A billed duration that does not follow from the duration is refused, naming the record.
    let mut bad = record(Uuid::now_v7(), &owner, function, version);
    bad["billed_ms"] = json!(1);
    let res = app.post("/agent/v1/usage").token(&node.credential).json(json!({"records": [bad]})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "records[0].billed_ms");

    // Logs: newest first, per invocation on request, the owner only.
    let path = format!("/v1/tenants/{}/functions/thumbs/logs", owner.tenant);
    let logs = app.get(&path).token(&owner.token).send().await;
    assert_eq!(logs.status, StatusCode::OK, "{}", logs.text);
    let lines: Vec<&str> = logs.body["items"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["third", "second", "first"]);
    let one = app.get(&format!("{path}?invocation_id={a}&limit=1")).token(&owner.token).send().await;
    assert_eq!(one.body["items"][0]["line"], "second");
    let next = one.body["next_cursor"].as_str().unwrap();
    let rest = app.get(&format!("{path}?invocation_id={a}&after={next}")).token(&owner.token).send().await;
    assert_eq!(rest.body["items"][0]["line"], "first", "{}", rest.text);
    assert_eq!(app.get(&path).token(&stranger.token).send().await.status, StatusCode::NOT_FOUND);

    // A node cannot write usage as another node, even below the API.
    let mut tx = db::begin(&app.state.pool, &Scope::node(Uuid::now_v7())).await.unwrap();
    let forged = sqlx::query(
        "INSERT INTO usage_records (invocation_id, tenant_id, function_id, version_id, version, node_id, started_at, \
         duration_us, billed_ms, memory_mb, http_status, status, cold_start) \
         VALUES ($1, $2, $3, $4, 1, $5, now(), 1, 1, 128, 200, 'ok', false)",
    )
    .bind(Uuid::now_v7())
    .bind(owner.tenant)
    .bind(function)
    .bind(version)
    .bind(node.id)
    .execute(&mut *tx)
    .await;
    assert!(forged.is_err(), "RLS lets a node write only rows naming itself");
}

#[tokio::test]
async fn silent_nodes_are_marked_lost_and_come_back_when_they_report() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let quiet = join(&app, &token, "quiet").await;
    let alive = join(&app, &token, "alive").await;
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 minute' WHERE id = $1")
        .bind(quiet.id)
        .execute(&mut c)
        .await
        .unwrap();
    let lost = nodes::mark_lost(&app.state.pool, Duration::from_secs(15)).await.unwrap();
    assert_eq!(lost, vec![quiet.id]);
    let list = app.get("/v1/nodes").token(&admin.token).send().await;
    let states: Vec<(String, String)> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_owned(), n["state"].as_str().unwrap().to_owned()))
        .collect();
    assert!(
        states.contains(&("quiet".into(), "lost".into())) && states.contains(&("alive".into(), "ready".into())),
        "{states:?}"
    );
    let res = app.post("/agent/v1/reports").token(&quiet.credential).json(empty_report()).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    let node = app.get(&format!("/v1/nodes/{}", quiet.id)).token(&admin.token).send().await;
    assert_eq!(node.body["state"], "ready");
    assert!(nodes::mark_lost(&app.state.pool, Duration::from_secs(15)).await.unwrap().is_empty());
    drop(alive);
}

#[tokio::test]
async fn reported_metrics_are_rolled_up_per_minute_for_assigned_versions_only() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let version = deployed(&app, &owner, "thumbs").await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let node = join(&app, &token, "w1").await;
    assign(
        &app,
        &admin,
        node.id,
        json!({"assignments": [{"tenant_id": owner.tenant, "function": "thumbs", "version": 1, "instances": 1}]}),
    )
    .await;
    // This minute, so that the metrics endpoint's window holds it.
    let minute = chrono::DurationRound::duration_trunc(chrono::Utc::now(), chrono::TimeDelta::minutes(1)).unwrap();
    let mut buckets = vec![0u64; 15];
    buckets[1] = 3;
    let second = |s: u32, v: Uuid| {
        let second = minute + chrono::TimeDelta::seconds(i64::from(s));
        json!({"version_id": v, "tenant_id": owner.tenant, "second": second,
               "concurrency": 1.5, "requests": 3, "errors": 1, "cold_starts": 1, "latency_buckets": buckets})
    };
    let report = json!({"revision": 2, "in_flight": 1,
        "versions": [{"version_id": version, "state": "ready", "instances": 1, "in_flight": 1, "error": null}],
        "metrics": [second(1, version), second(2, version), second(3, Uuid::now_v7())]});
    let res = app.post("/agent/v1/reports").token(&node.credential).json(report).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    assert_eq!(app.state.stats.recent(version).len(), 2);
    assert_eq!(app.state.stats.flush(&app.state.pool).await.unwrap(), 1);
    let mut c = app.admin_conn().await;
    let rows: Vec<(Uuid, i64, i64, f64, Vec<i64>)> =
        sqlx::query_as("SELECT version_id, requests, errors, concurrency_sum, latency_buckets FROM version_metrics")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(rows.len(), 1, "the unassigned version's figures are dropped");
    assert_eq!((rows[0].0, rows[0].1, rows[0].2, rows[0].3), (version, 6, 2, 3.0));
    assert_eq!(rows[0].4[1], 6);
    let shown = app.get(&format!("/v1/nodes/{}", node.id)).token(&admin.token).send().await;
    assert_eq!(shown.body["warm_instances"], 1, "{}", shown.text);
    assert_eq!(shown.body["reported_revision"], 2);
    // A second flush of the same minute adds to the row.
    app.post("/agent/v1/reports")
        .token(&node.credential)
        .json(json!({"revision": 2, "in_flight": 0, "versions": [], "metrics": [second(4, version)]}))
        .send()
        .await;
    app.state.stats.flush(&app.state.pool).await.unwrap();
    let requests: i64 = sqlx::query_scalar("SELECT requests FROM version_metrics").fetch_one(&mut c).await.unwrap();
    assert_eq!(requests, 9);
    // The function's metrics show it: 9 requests, 3 errors, p50 in the 1 ms bucket.
    let m = app
        .get(&format!("/v1/tenants/{}/functions/thumbs/metrics?window=15m", owner.tenant))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    let v = &m.body["versions"][0];
    assert_eq!(
        (v["version"].as_i64(), v["requests"].as_i64(), v["errors"].as_i64()),
        (Some(1), Some(9), Some(3)),
        "{}",
        m.text
    );
    assert_eq!(v["p50_ms"], 1.0);
    app.get(&format!("/v1/tenants/{}/functions/thumbs/metrics?window=2d", owner.tenant))
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
}

fn labels_of(res: &crate::helpers::TestResponse) -> Value {
    res.body["labels"].clone()
}

#[tokio::test]
async fn nodes_carry_the_labels_they_join_with_and_platform_admins_replace_them() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let user = app.sign_up("dev@example.com", "acme").await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let mut body = join_body(&token, "w1");
    body["labels"] = json!({"pool": "spot", "accelerator": "gpu", "nimbus.dev/rack": "r3"});
    let res = app.post("/agent/v1/join").json(body).send().await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let id: Uuid = res.body["node_id"].as_str().unwrap().parse().unwrap();
    let node_path = format!("/v1/nodes/{id}");
    let shown = app.get(&node_path).token(&admin.token).send().await;
    assert_eq!(
        labels_of(&shown),
        json!({"pool": "spot", "accelerator": "gpu", "nimbus.dev/rack": "r3"}),
        "{}",
        shown.text
    );
    let list = app.get("/v1/nodes").token(&admin.token).send().await;
    assert_eq!(list.body["items"][0]["labels"]["pool"], "spot", "{}", list.text);
    // A join without labels has none.
    let plain = join(&app, &token, "w2").await;
    let shown = app.get(&format!("/v1/nodes/{}", plain.id)).token(&admin.token).send().await;
    assert_eq!(labels_of(&shown), json!({}), "{}", shown.text);

    // Bad labels at join are named and refused.
    let mut bad = join_body(&token, "w3");
    bad["labels"] = json!({"-pool": "spot", "zone": "a/b"});
    let res = app.post("/agent/v1/join").json(bad).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let errors: Vec<(&str, &str)> = res.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap(), e["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(errors, [("labels.-pool", "invalid_label_key"), ("labels.zone", "invalid_label_value")], "{}", res.text);
    let mut many = join_body(&token, "w3");
    many["labels"] = Value::Object((0..33).map(|i| (format!("k{i}"), json!("v"))).collect());
    let res = app.post("/agent/v1/join").json(many).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "labels", "{}", res.text);

    // A platform admin replaces them; the desired-state revision does not move.
    let revision = app.get(&node_path).token(&admin.token).send().await.body["revision"].clone();
    let patched =
        app.patch(&node_path).token(&admin.token).json(json!({"labels": {"pool": "reserved", "ssd": ""}})).send().await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
    assert_eq!(labels_of(&patched), json!({"pool": "reserved", "ssd": ""}));
    let shown = app.get(&node_path).token(&admin.token).send().await;
    assert_eq!(labels_of(&shown), json!({"pool": "reserved", "ssd": ""}));
    assert_eq!(shown.body["revision"], revision);
    let unchanged = app.patch(&node_path).token(&admin.token).json(json!({})).send().await;
    assert_eq!(labels_of(&unchanged), json!({"pool": "reserved", "ssd": ""}), "{}", unchanged.text);
    // Invalid ones are named and change nothing; others may not change labels at all.
    let res = app
        .patch(&node_path)
        .token(&admin.token)
        .json(json!({"labels": {"pool": "spot", "bad key": "x"}}))
        .send()
        .await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "labels.bad key", "{}", res.text);
    assert_eq!(res.body["errors"][0]["rule"], "invalid_label_key");
    let res = app.patch(&node_path).token(&admin.token).json(json!({"zone": "b"})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["rule"], "unknown_field");
    let (_, key) = app.create_key(&user.token, user.tenant, "admin").await;
    for who in [&user.token, &key] {
        let res = app.patch(&node_path).token(who).json(json!({"labels": {}})).send().await;
        res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(res.body["action"], "nodes:UpdateNode");
    }
    let shown = app.get(&node_path).token(&admin.token).send().await;
    assert_eq!(labels_of(&shown), json!({"pool": "reserved", "ssd": ""}));
    let actions: Vec<String> = app.audit_actions(None).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions.iter().filter(|a| *a == "nodes:UpdateNode").count(), 2, "{actions:?}");

    // Joining again replaces them with the agent's.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE nodes SET last_heartbeat_at = now() - interval '1 minute'").execute(&mut c).await.unwrap();
    let mut again = join_body(&token, "w1");
    again["labels"] = json!({"pool": "spot"});
    let res = app.post("/agent/v1/join").json(again).send().await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["node_id"], id.to_string());
    let shown = app.get(&node_path).token(&admin.token).send().await;
    assert_eq!(labels_of(&shown), json!({"pool": "spot"}), "{}", shown.text);
    // A removed node's labels cannot be changed.
    assert_eq!(app.delete(&node_path).token(&admin.token).send().await.status, StatusCode::NO_CONTENT);
    app.patch(&node_path)
        .token(&admin.token)
        .json(json!({"labels": {}}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "node_gone");
}

#[tokio::test]
async fn pools_come_from_node_labels_and_platform_admins_dedicate_them_to_a_tenant() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let acme = app.sign_up("owner@example.com", "acme").await;
    let globex = app.sign_up("other@example.com", "globex").await;
    let (_, token) = join_token(&app, &admin, json!({"name": "t"})).await;
    let mut ids = Vec::new();
    for (name, pool) in [("w1", Some("spot")), ("w2", Some("spot")), ("w3", Some("reserved")), ("w4", None)] {
        let mut body = join_body(&token, name);
        if let Some(pool) = pool {
            body["labels"] = json!({"pool": pool});
        }
        let res = app.post("/agent/v1/join").json(body).send().await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        ids.push(res.body["node_id"].as_str().unwrap().to_owned());
    }
    // Removed nodes do not count.
    assert_eq!(
        app.delete(&format!("/v1/nodes/{}", ids[1])).token(&admin.token).send().await.status,
        StatusCode::NO_CONTENT
    );
    let pools = app.get("/v1/pools").token(&admin.token).send().await;
    assert_eq!(pools.status, StatusCode::OK, "{}", pools.text);
    assert_eq!(
        pools.body["items"],
        json!([{"name": "reserved", "nodes": 1, "dedicated_to": null, "dedicated_at": null},
               {"name": "spot", "nodes": 1, "dedicated_to": null, "dedicated_at": null}])
    );

    // Dedicate, by tenant id; again to another tenant replaces it.
    let dedication = "/v1/pools/spot/dedication";
    let res = app.req(Method::PUT, dedication).token(&admin.token).json(json!({"tenant_id": acme.tenant})).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["name"], "spot");
    assert_eq!(res.body["nodes"], 1);
    assert_eq!(res.body["dedicated_to"], json!({"id": acme.tenant, "name": "acme"}));
    assert!(res.body["dedicated_at"].is_string(), "{}", res.text);
    let res =
        app.req(Method::PUT, dedication).token(&admin.token).json(json!({"tenant_id": globex.tenant})).send().await;
    assert_eq!(res.body["dedicated_to"], json!({"id": globex.tenant, "name": "globex"}), "{}", res.text);
    // A pool without nodes yet can be dedicated, and is listed.
    let res = app
        .req(Method::PUT, "/v1/pools/gpu.eu_1/dedication")
        .token(&admin.token)
        .json(json!({"tenant_id": acme.tenant}))
        .send()
        .await;
    assert_eq!((res.body["name"].as_str(), res.body["nodes"].as_i64()), (Some("gpu.eu_1"), Some(0)), "{}", res.text);
    let pools = app.get("/v1/pools").token(&admin.token).send().await;
    let listed: Vec<(String, i64, Value)> = pools.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (p["name"].as_str().unwrap().to_owned(), p["nodes"].as_i64().unwrap(), p["dedicated_to"]["name"].clone())
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("gpu.eu_1".to_owned(), 0, json!("acme")),
            ("reserved".to_owned(), 1, Value::Null),
            ("spot".to_owned(), 1, json!("globex"))
        ]
    );
    let mut c = app.admin_conn().await;
    let stored: Vec<(String, Uuid, Option<Uuid>)> =
        sqlx::query_as("SELECT pool, tenant_id, created_by FROM pool_dedications ORDER BY pool")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(
        stored,
        [("gpu.eu_1".to_owned(), acme.tenant, Some(admin.id)), ("spot".to_owned(), globex.tenant, Some(admin.id))]
    );

    // Unknown tenants and bad pool names are refused, naming them.
    let res =
        app.req(Method::PUT, dedication).token(&admin.token).json(json!({"tenant_id": Uuid::now_v7()})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "tenant_id", "{}", res.text);
    let long = format!("/v1/pools/{}/dedication", "p".repeat(64));
    for path in
        ["/v1/pools/-spot/dedication", "/v1/pools/a%2Fb/dedication", "/v1/pools/sp%20ot/dedication", long.as_str()]
    {
        let res = app.req(Method::PUT, path).token(&admin.token).json(json!({"tenant_id": acme.tenant})).send().await;
        res.assert_problem(StatusCode::BAD_REQUEST, "invalid_path_parameter");
        assert_eq!(res.body["errors"][0]["field"], "pool", "{path}: {}", res.text);
        let res = app.delete(path).token(&admin.token).send().await;
        res.assert_problem(StatusCode::BAD_REQUEST, "invalid_path_parameter");
        assert_eq!(res.body["errors"][0]["field"], "pool", "{path}: {}", res.text);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_dedications").fetch_one(&mut c).await.unwrap();
    assert_eq!(count, 2, "nothing refused was stored");

    // Only platform admins: tenant admins and API keys get 403 naming the action.
    let (_, key) = app.create_key(&acme.token, acme.tenant, "admin").await;
    for who in [&acme.token, &key] {
        let res = app.get("/v1/pools").token(who).send().await;
        res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(res.body["action"], "nodes:ListPools");
        let res = app.req(Method::PUT, dedication).token(who).json(json!({"tenant_id": acme.tenant})).send().await;
        res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(res.body["action"], "nodes:DedicatePool");
        let res = app.delete(dedication).token(who).send().await;
        res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
        assert_eq!(res.body["action"], "nodes:UndedicatePool");
    }
    // Row-level security: pool dedications are the platform's alone, even below the API.
    let mut tx = db::begin(&app.state.pool, &Scope::tenant(globex.tenant, Some(globex.id))).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_dedications").fetch_one(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(seen, 0);

    // Ending a dedication: 204, then 404; the pool is listed without it.
    assert_eq!(app.delete(dedication).token(&admin.token).send().await.status, StatusCode::NO_CONTENT);
    app.delete(dedication).token(&admin.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let pools = app.get("/v1/pools").token(&admin.token).send().await;
    let spot = pools.body["items"].as_array().unwrap().iter().find(|p| p["name"] == "spot").unwrap().clone();
    assert_eq!(spot["dedicated_to"], Value::Null, "{}", pools.text);
    let actions: Vec<String> = app.audit_actions(None).await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions.iter().filter(|a| *a == "nodes:DedicatePool").count(), 3, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| *a == "nodes:UndedicatePool").count(), 1, "{actions:?}");
}
