//! The invocation gateway in-process, forwarding over real HTTP to a stand-in agent listener:
//! authentication and authorization, alias weights, pins, headers in and out, no capacity, an
//! unreachable node, and the routing table following changes through LISTEN/NOTIFY.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::Request,
    http::{Method, StatusCode},
    response::IntoResponse,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    functions::{create_function, functions_path, publish, upload, wasm_module},
    helpers::{TestApp, User, spawn_app, spawn_app_with},
};

/// What the stand-in agent saw of one request.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub path: String,
    pub authorization: String,
    pub invocation_id: String,
    pub request_id: String,
    pub body: String,
    pub forwarded_credential: bool,
    /// The role credential the gateway handed the invocation (`x-nimbus-credential`).
    pub role_credential: Option<String>,
}

/// A stand-in for an agent's invocation listener: answers `v=<version id>` and records requests.
pub(crate) async fn stand_in_agent() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let path = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
            let (authorization, invocation_id) = (header("authorization"), header("x-nimbus-invocation-id"));
            let request_id = header("x-request-id");
            let forwarded_credential = parts.headers.get_all("authorization").iter().count() > 1;
            let role_credential =
                parts.headers.get("x-nimbus-credential").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let version = path.trim_start_matches("/invoke/").split('/').next().unwrap_or("").to_owned();
            log.lock().unwrap().push(Seen {
                path,
                authorization,
                invocation_id: invocation_id.clone(),
                request_id,
                body: String::from_utf8_lossy(&body).into_owned(),
                forwarded_credential,
                role_credential,
            });
            (
                [("x-nimbus-invocation-id", invocation_id), ("x-nimbus-cold-start", "true".to_owned())],
                format!("v={version}"),
            )
                .into_response()
        }
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
    (url, seen)
}

/// A node at `invoke_url` that reports `versions` ready; returns its invoke secret.
pub(crate) async fn ready_node(app: &TestApp, admin: &User, name: &str, invoke_url: &str, versions: &[Uuid]) -> String {
    let token = app.post("/v1/join-tokens").token(&admin.token).json(json!({"name": name})).send().await;
    let joined = app
        .post("/agent/v1/join")
        .json(json!({"token": token.body["secret"], "name": name, "zone": "zone-a",
                     "capacity": {"memory_mb": 4096, "cpu_millis": 2000, "instance_slots": 64}, "invoke_url": invoke_url}))
        .send()
        .await;
    assert_eq!(joined.status, StatusCode::CREATED, "{}", joined.text);
    let statuses: Vec<Value> = versions
        .iter()
        .map(|v| json!({"version_id": v, "state": "ready", "instances": 1, "in_flight": 0, "error": null}))
        .collect();
    let res = app
        .post("/agent/v1/reports")
        .token(joined.body["credential"]["token"].as_str().unwrap())
        .json(json!({"revision": 1, "in_flight": 0, "versions": statuses, "metrics": []}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    joined.body["invoke_secret"].as_str().unwrap().to_owned()
}

/// Two published versions of `thumbs` and an alias `live` at 90/10; returns the version ids.
async fn two_versions(app: &TestApp, owner: &User) -> (Uuid, Uuid) {
    assert_eq!(
        create_function(app, owner, json!({"name": "thumbs", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let mut ids = Vec::new();
    for tag in [1, 2] {
        assert!(upload(app, owner, "thumbs", "application/wasm", wasm_module(tag)).await.status.is_success());
        let v = publish(app, owner, "thumbs").await;
        ids.push(v.body["id"].as_str().unwrap().parse().unwrap());
    }
    let res = app
        .post(&format!("{}/thumbs/aliases", functions_path(owner.tenant)))
        .token(&owner.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]}}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    (ids[0], ids[1])
}

#[tokio::test]
async fn the_gateway_authorizes_routes_by_weight_and_pin_and_forwards_to_a_ready_node() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let stranger = app.sign_up("stranger@example.com", "globex").await;
    let viewer = app.sign_up("viewer@example.com", "viewers").await;
    app.add_member(&owner, owner.tenant, &viewer, "viewer").await;
    let (v1, v2) = two_versions(&app, &owner).await;
    let (url, seen) = stand_in_agent().await;
    let secret = ready_node(&app, &admin, "w1", &url, &[v1, v2]).await;
    app.state.routes.reload(&app.state.pool).await.unwrap();

    // Who may invoke.
    app.post("/fn/acme/thumbs").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post("/fn/acme/thumbs").token(&stranger.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let denied = app.post("/fn/acme/thumbs").token(&viewer.token).send().await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:InvokeFunction");
    app.post("/fn/acme/nope").token(&owner.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    app.post("/fn/acme/thumbs:staging")
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    app.post("/fn/acme/thumbs:7").token(&owner.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    assert!(seen.lock().unwrap().is_empty(), "nothing refused reached the agent");

    // One request, in full: path, query, body, the node's secret instead of the caller's token.
    let res = app
        .post("/fn/acme/thumbs:1/resize/x?w=100")
        .token(&owner.token)
        .raw("text/plain", "picture")
        .header("x-request-id", "req-1")
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.text, format!("v={v1}"));
    assert_eq!(res.headers["x-nimbus-version"], "1");
    assert_eq!(res.headers["x-nimbus-cold-start"], "true");
    assert!(res.headers["content-security-policy"].to_str().unwrap().starts_with("sandbox"), "functions run sandboxed");
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first.path, format!("/invoke/{v1}/resize/x?w=100"));
    assert_eq!(first.authorization, format!("Bearer {secret}"));
    assert!(!first.forwarded_credential);
    assert_eq!(first.body, "picture");
    assert!(first.invocation_id.parse::<Uuid>().is_ok());
    assert_eq!(res.headers["x-nimbus-invocation-id"], first.invocation_id.as_str());
    // The caller's request id reaches the function and comes back; without one, the
    // invocation id is the request id.
    assert_eq!(first.request_id, "req-1");
    assert_eq!(res.headers["x-request-id"], "req-1");
    let res = app.post("/fn/acme/thumbs:1").token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let second = seen.lock().unwrap()[1].clone();
    assert_eq!(second.request_id, second.invocation_id);
    assert_eq!(res.headers["x-request-id"], second.invocation_id.as_str());
    let refused = app.post("/fn/acme/nope").token(&owner.token).header("x-request-id", "req-2").send().await;
    assert_eq!(refused.headers["x-request-id"], "req-2", "the gateway's own answers carry it too");

    // The alias's weights, over many requests: about 10 % to version 2.
    let mut to_v2 = 0;
    for _ in 0..400 {
        let res = app.req(Method::GET, "/fn/acme/thumbs/").token(&owner.token).send().await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        if res.text == format!("v={v2}") {
            to_v2 += 1;
        }
    }
    assert!((20..=65).contains(&to_v2), "version 2 got {to_v2} of 400 at a 10 % weight");
    // Anonymous callers reach only functions whose resource policy allows anyone; everything
    // else is the usual 401.
    app.post("/fn/acme/thumbs:1").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    let thumbs = format!("nrn:nimbus:functions:{}:function/thumbs", owner.tenant);
    let public = |principal: Value| {
        json!({"document": {"Version": "2012-10-17", "Statement": [{"Sid": "Invoke", "Effect": "Allow",
            "Principal": principal, "Action": "functions:InvokeFunction", "Resource": thumbs.clone()}]}})
    };
    let policy_path = format!("{}/thumbs/policy", functions_path(owner.tenant));
    let res = app.req(Method::PUT, &policy_path).token(&owner.token).json(public(json!("*"))).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let anonymous = app.post("/fn/acme/thumbs:1").send().await;
    assert_eq!((anonymous.status, anonymous.text.as_str()), (StatusCode::OK, format!("v={v1}").as_str()));
    // The tenant's guardrail binds anonymous callers too.
    let guardrail = format!("/v1/tenants/{}/guardrails", owner.tenant);
    let rail = json!({"document": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "functions:InvokeFunction", "Resource": thumbs.clone()}]}});
    let res = app.req(Method::PUT, &guardrail).token(&admin.token).json(rail).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    app.post("/fn/acme/thumbs:1").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(app.delete(&guardrail).token(&admin.token).send().await.status, StatusCode::NO_CONTENT);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    assert_eq!(app.post("/fn/acme/thumbs:1").send().await.status, StatusCode::OK);

    // Another tenant's API key: its own policy must allow the function, and the function's
    // policy must name its tenant; either alone is not enough.
    let globex = app.sign_up("ops@globex.example", "globex-corp").await;
    let (key_id, key) = app.create_key(&globex.token, globex.tenant, "none").await;
    let app_ref = &app;
    let call = move |key: String| async move { app_ref.post("/fn/acme/thumbs:1").token(&key).send().await };
    let globex_policy = app
        .post(&format!("/v1/tenants/{}/policies", globex.tenant))
        .token(&globex.token)
        .json(json!({"name": "call-acme-thumbs", "document": {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "functions:InvokeFunction", "Resource": thumbs.clone()}]}}))
        .send()
        .await;
    assert_eq!(globex_policy.status, StatusCode::CREATED, "{}", globex_policy.text);
    let attach = format!("/v1/tenants/{}/api-keys/{key_id}/policies/call-acme-thumbs", globex.tenant);
    assert_eq!(app.req(Method::PUT, &attach).token(&globex.token).send().await.status, StatusCode::NO_CONTENT);
    // acme's policy names anyone, but not as a tenant: a key of globex is still denied unless
    // named (the `*` statement is for callers without credentials as much as for everyone).
    let named = public(json!({"Nimbus": format!("nrn:nimbus:iam:{}:root", globex.tenant)}));
    let res = app.req(Method::PUT, &policy_path).token(&owner.token).json(named).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let allowed = call(key.clone()).await;
    assert_eq!((allowed.status, allowed.text.as_str()), (StatusCode::OK, format!("v={v1}").as_str()));
    app.post("/fn/acme/thumbs:1").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // Without its own policy the key is refused even though acme names its tenant.
    assert_eq!(app.delete(&attach).token(&globex.token).send().await.status, StatusCode::NO_CONTENT);
    call(key.clone()).await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    // Without acme's policy the key is a stranger (404), even with its own policy.
    assert_eq!(app.req(Method::PUT, &attach).token(&globex.token).send().await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.delete(&policy_path).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    call(key).await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    app.post("/fn/acme/other").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.post("/fn/nobody/thumbs").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // A path cannot climb out of the version's endpoint, however it is encoded.
    for bad in [
        "/fn/acme/thumbs:1/%2e%2e/other",
        "/fn/acme/thumbs:1/a/%2E%2E/b",
        "/fn/acme/thumbs:1/x%2Fy",
        "/fn/acme/thumbs:1/a%5cb",
    ] {
        let before = seen.lock().unwrap().len();
        app.post(bad)
            .token(&owner.token)
            .send()
            .await
            .assert_problem(StatusCode::BAD_REQUEST, "invalid_path_parameter");
        assert_eq!(seen.lock().unwrap().len(), before, "{bad} reached the agent");
    }
    // A pin to a version the alias serves wins.
    let pinned = app.post("/fn/acme/thumbs").token(&owner.token).header("x-nimbus-version", "2").send().await;
    assert_eq!(pinned.text, format!("v={v2}"));
    // Per-function metrics on /metrics, labelled with names the routing table knows.
    let metrics = app.get("/metrics").send().await.text;
    assert!(
        metrics.lines().any(|l| l.starts_with("nimbus_function_invocations_total")
            && l.contains("function=\"thumbs\"")
            && l.contains("version=\"2\"")),
        "{metrics}"
    );
    assert!(!metrics.contains("function=\"nope\""), "unknown names never become labels");

    // Identity policies can decide by the function's tags (`nimbus:ResourceTag/*`).
    let tester = app.sign_up("tester@example.com", "tester-home").await;
    app.add_member(&owner, owner.tenant, &tester, "none").await;
    let by_tag = app
        .post(&format!("/v1/tenants/{}/policies", owner.tenant))
        .token(&owner.token)
        .json(json!({"name": "invoke-dev", "document": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": "functions:InvokeFunction", "Resource": "*",
            "Condition": {"StringEquals": {"nimbus:ResourceTag/stage": "dev"}}}]}}))
        .send()
        .await;
    assert_eq!(by_tag.status, StatusCode::CREATED, "{}", by_tag.text);
    let attach = format!("/v1/tenants/{}/members/{}/policies/invoke-dev", owner.tenant, tester.id);
    assert_eq!(app.req(Method::PUT, &attach).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    let tag = |stage: &'static str| {
        let req = app
            .patch(&format!("{}/thumbs", functions_path(owner.tenant)))
            .token(&owner.token)
            .header("if-match", "*")
            .json(json!({"tags": {"stage": stage}}));
        req.send()
    };
    assert_eq!(tag("dev").await.status, StatusCode::OK);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let res = app.post("/fn/acme/thumbs:1").token(&tester.token).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(tag("prod").await.status, StatusCode::OK);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    app.post("/fn/acme/thumbs:1").token(&tester.token).send().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn no_ready_node_is_503_and_an_unreachable_node_is_502() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let (v1, _) = two_versions(&app, &owner).await;
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let res = app.post("/fn/acme/thumbs:1").token(&owner.token).send().await;
    res.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    assert_eq!(res.headers["retry-after"], "1");
    // A node whose listener is gone: the connection is refused, fast.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    ready_node(&app, &admin, "w1", &url, &[v1]).await;
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let started = std::time::Instant::now();
    app.post("/fn/acme/thumbs:1")
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::BAD_GATEWAY, "agent_unreachable");
    assert!(started.elapsed() < Duration::from_secs(10), "a refused connection fails fast");
}

#[tokio::test]
async fn the_routing_table_follows_changes_through_listen_notify() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let routes = app.state.routes.clone();
    tokio::spawn(routes.clone().refresh_loop(app.state.pool.clone(), app.db_url.clone()));
    let wait_for = |what: &'static str, ok: Box<dyn Fn(&nimbus_api::gateway::table::Table) -> bool>| {
        let routes = routes.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !ok(&routes.table()) {
                assert!(tokio::time::Instant::now() < deadline, "the table never showed {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let tenant = owner.tenant;
    wait_for("the tenant", Box::new(move |t| t.tenants.get("acme") == Some(&tenant))).await;
    two_versions(&app, &owner).await;
    wait_for(
        "the alias",
        Box::new(move |t| t.functions.get(&(tenant, "thumbs".into())).is_some_and(|f| f.aliases.contains_key("live"))),
    )
    .await;
    let res = app
        .req(Method::PUT, &format!("{}/thumbs/aliases/live", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"routing": {"weights": [{"version": 2, "weight": 100}]}}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    wait_for(
        "the new weights",
        Box::new(move |t| {
            t.functions
                .get(&(tenant, "thumbs".into()))
                .and_then(|f| f.aliases.get("live"))
                .is_some_and(|r| r.weights.len() == 1 && r.weights[0].version == 2)
        }),
    )
    .await;
    // A revoked API key stops working at the gateway (its cached authentication is dropped).
    let (key_id, key) = app.create_key(&owner.token, owner.tenant, "developer").await;
    let before = app.post("/fn/acme/thumbs:2").token(&key).send().await;
    before.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    let revoked =
        app.delete(&format!("/v1/tenants/{}/api-keys/{key_id}", owner.tenant)).token(&owner.token).send().await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.post("/fn/acme/thumbs:2").token(&key).send().await.status != StatusCode::UNAUTHORIZED {
        assert!(tokio::time::Instant::now() < deadline, "the revoked key kept working");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let del = app
        .delete(&format!("{}/thumbs", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("if-match", "*")
        .send()
        .await;
    assert!(del.status.is_success(), "{}", del.text);
    wait_for("the function gone", Box::new(move |t| !t.functions.contains_key(&(tenant, "thumbs".into())))).await;
}

#[tokio::test]
async fn limits_answer_429_with_retry_after_and_give_their_slots_back() {
    let app = crate::helpers::spawn_app_with(&["--tenant-rate-limit=2"]).await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let (v1, _) = two_versions(&app, &owner).await;
    // A stand-in agent that holds each request until the test lets it go.
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(tokio::sync::Notify::new());
    let (r, a) = (release.clone(), arrived.clone());
    let agent = axum::Router::new().fallback(move || {
        let (r, a) = (r.clone(), a.clone());
        async move {
            a.notify_one();
            r.notified().await;
            "done"
        }
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, agent).await.unwrap() });
    ready_node(&app, &admin, "w1", &url, &[v1]).await;
    let res = app
        .patch(&format!("{}/thumbs", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"reserved_concurrency": 1}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.state.routes.reload(&app.state.pool).await.unwrap();

    // The function's one slot is taken by a request the agent holds; the next is refused.
    let router = app.router.clone();
    let token = owner.token.clone();
    let held = tokio::spawn(async move {
        let req = axum::http::Request::post("/fn/acme/thumbs:1")
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let res = tower::ServiceExt::oneshot(router, req).await.unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        (status, body)
    });
    arrived.notified().await;
    let refused = app.post("/fn/acme/thumbs:1").token(&owner.token).send().await;
    refused.assert_problem(StatusCode::TOO_MANY_REQUESTS, "function_concurrency_limit");
    assert_eq!(refused.headers["retry-after"], "1");
    release.notify_one();
    let (status, body) = held.await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"done"[..]));

    // The tenant's rate: a burst of twice 2/s, then 429s (the slot above was given back, so it
    // is the rate that refuses, not the concurrency).
    let release_all = release.clone();
    let arrivals = arrived.clone();
    tokio::spawn(async move {
        loop {
            arrivals.notified().await;
            release_all.notify_one();
        }
    });
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let res = app.post("/fn/acme/thumbs:1").token(&owner.token).send().await;
        if res.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(res.body["code"], "tenant_rate_limit", "{}", res.text);
        }
        statuses.push(res.status.as_u16());
    }
    assert!(statuses.contains(&200) && statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 200).count() <= 6, "{statuses:?}");
}

#[tokio::test]
async fn a_request_for_a_version_nobody_serves_is_held_until_a_node_has_it_ready() {
    let app = spawn_app_with(&["--gateway-hold-timeout=30s", "--gateway-hold-queue=3"]).await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let (v1, v2) = two_versions(&app, &owner).await;
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let mut pokes = sqlx::postgres::PgListener::connect(&app.db_url).await.unwrap();
    pokes.listen(nimbus_api::autoscaler::run::CHANNEL).await.unwrap();
    let (agent_url, seen) = stand_in_agent().await;

    // Held: the autoscaler is poked with the version and the count held, and the request is
    // answered by the node that reports the version ready, without the caller retrying.
    let held = app.post("/fn/acme/thumbs:1").token(&owner.token).send();
    let release = async {
        let poke = pokes.recv().await.unwrap();
        assert_eq!(poke.payload(), nimbus_api::autoscaler::run::poke_payload(v1, 1, app.state.routes.replica()));
        assert!(seen.lock().unwrap().is_empty(), "nothing was forwarded while no node had the version");
        ready_node(&app, &admin, "w1", &agent_url, &[v1]).await;
        app.state.routes.reload(&app.state.pool).await.unwrap();
    };
    let (res, ()) = tokio::join!(held, release);
    assert_eq!((res.status, res.text.as_str()), (StatusCode::OK, format!("v={v1}").as_str()));

    // The hold queue is bounded per version: the fourth of four waiting requests is refused at
    // once with 503 and Retry-After, the three held are answered once the version is ready.
    let send = || app.post("/fn/acme/thumbs:2").token(&owner.token).send();
    let (a, b, c, d, ()) = tokio::join!(send(), send(), send(), send(), async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while app.state.routes.held().get(&v2) != Some(&3) {
            assert!(tokio::time::Instant::now() < deadline, "three requests were never held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ready_node(&app, &admin, "w2", &agent_url, &[v2]).await;
        app.state.routes.reload(&app.state.pool).await.unwrap();
    });
    let mut statuses: Vec<u16> = [&a, &b, &c, &d].iter().map(|r| r.status.as_u16()).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 503]);
    let refused = [a, b, c, d].into_iter().find(|r| r.status == StatusCode::SERVICE_UNAVAILABLE).unwrap();
    assert_eq!(refused.headers["retry-after"], "1");
    refused.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "hold_queue_full");
    assert!(app.state.routes.held().is_empty(), "every held place was given back");
}
