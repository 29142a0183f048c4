//! `Idempotency-Key` on creating POSTs.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn same_key_same_body_same_response() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let send = |body: serde_json::Value, key: &'static str| {
        app.post("/v1/tenants").token(&ada.token).header("idempotency-key", key).json(body).send()
    };
    let first = send(json!({"name": "second"}), "k-1").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert!(first.headers.get("idempotency-replayed").is_none());
    let again = send(json!({"name": "second"}), "k-1").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body);
    assert_eq!(again.headers["idempotency-replayed"], "true");
    assert_eq!(again.headers["content-type"], "application/json");

    // Same key, different body: refused, nothing created.
    send(json!({"name": "third"}), "k-1")
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    let mine = app.get("/v1/tenants").token(&ada.token).send().await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 2, "{}", mine.text);

    // Error responses are replayed too (the same request gets the same answer).
    let conflict = send(json!({"name": "acme"}), "k-2").await;
    conflict.assert_problem(StatusCode::CONFLICT, "tenant_name_taken");
    let replay = send(json!({"name": "acme"}), "k-2").await;
    replay.assert_problem(StatusCode::CONFLICT, "tenant_name_taken");
    assert_eq!(replay.headers["idempotency-replayed"], "true");

    // Keys are per principal: another user's identical key is independent.
    let bob = app.sign_up("bob@example.com", "bobs").await;
    let res = app
        .post("/v1/tenants")
        .token(&bob.token)
        .header("idempotency-key", "k-1")
        .json(json!({"name": "bobs-2"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED);

    // Without a key, two posts are two creations (and the name conflict shows it).
    app.post("/v1/tenants").token(&ada.token).json(json!({"name": "fourth"})).send().await;
    app.post("/v1/tenants")
        .token(&ada.token)
        .json(json!({"name": "fourth"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "tenant_name_taken");
}

#[tokio::test]
async fn api_key_secrets_are_never_stored_for_replay() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let path = format!("/v1/tenants/{}/api-keys", ada.tenant);
    let body = json!({"name": "deploy", "role": "developer"});
    let a = app.post(&path).token(&ada.token).header("idempotency-key", "key-create").json(body.clone()).send().await;
    assert_eq!(a.status, StatusCode::CREATED);
    let secret = a.body["secret"].as_str().unwrap().to_owned();
    // A retry does not create a second key, and does not get the secret again either.
    let b = app.post(&path).token(&ada.token).header("idempotency-key", "key-create").json(body).send().await;
    b.assert_problem(StatusCode::CONFLICT, "idempotent_replay_unavailable");
    let list = app.get(&path).token(&ada.token).send().await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    // The secret is stored nowhere in clear.
    let mut c = app.admin_conn().await;
    let stored: Vec<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT response_body FROM idempotency_keys").fetch_all(&mut c).await.unwrap();
    assert!(stored.iter().flatten().all(|b| !String::from_utf8_lossy(b).contains(&secret)));
}

#[tokio::test]
async fn auth_routes_ignore_idempotency_keys() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let res = app
        .post("/v1/auth/refresh")
        .token(&ada.token)
        .header("idempotency-key", "refresh-1")
        .json(json!({"refresh_token": ada.refresh}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK);
    let mut c = app.admin_conn().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys").fetch_one(&mut c).await.unwrap();
    assert_eq!(rows, 0, "no credentials are kept for replay");
}

#[tokio::test]
async fn malformed_keys_are_refused() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let res = app
        .post("/v1/tenants")
        .token(&ada.token)
        .header("idempotency-key", &"k".repeat(256))
        .json(json!({"name": "second"}))
        .send()
        .await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "Idempotency-Key");
}

#[tokio::test]
async fn a_claim_whose_request_died_is_taken_over() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let mut c = app.admin_conn().await;
    // A claim left by a request that never finished (a crash between claim and store).
    sqlx::query(
        "INSERT INTO idempotency_keys (principal, key, request_hash, created_at) VALUES ($1, 'k-dead', '\\x00', now() - interval '1 hour')",
    )
    .bind(format!("user:{}", ada.id))
    .execute(&mut c)
    .await
    .unwrap();
    let res = app
        .post("/v1/tenants")
        .token(&ada.token)
        .header("idempotency-key", "k-dead")
        .json(json!({"name": "second"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}
