//! API key lifecycle: create (secret once, hash stored), use, list, revoke, expiry, role ceiling.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn api_key_lifecycle() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let res = app
        .post(&format!("/v1/tenants/{}/api-keys", ada.tenant))
        .token(&ada.token)
        .json(json!({"name": "ci deploy", "role": "developer"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let secret = res.body["secret"].as_str().unwrap().to_owned();
    let prefix = res.body["prefix"].as_str().unwrap().to_owned();
    let id = res.body["id"].as_str().unwrap().to_owned();
    assert!(secret.starts_with(&format!("{prefix}_")) && prefix.starts_with("nmb_") && prefix.len() == 16);

    // Only a hash is stored.
    let mut c = app.admin_conn().await;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT secret_hash FROM api_keys").fetch_one(&mut c).await.unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&secret[17..]));

    // The key authenticates, acts in its tenant with its role, and records its last use.
    let me = app.get("/v1/me").token(&secret).send().await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    assert_eq!(me.body["api_key"]["role"], "developer");
    let t = app.get(&format!("/v1/tenants/{}", ada.tenant)).token(&secret).send().await;
    assert_eq!(t.status, StatusCode::OK);

    // Listing shows the prefix and last use, never the secret.
    let list = app.get(&format!("/v1/tenants/{}/api-keys", ada.tenant)).token(&ada.token).send().await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text.contains(&secret));
    assert_eq!(list.body["items"][0]["prefix"], prefix);
    assert!(list.body["items"][0]["last_used_at"].is_string(), "{}", list.text);

    // A wrong secret with a right prefix is refused.
    let forged = format!("{prefix}_{}", "A".repeat(43));
    app.get("/v1/me").token(&forged).send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");

    // Revoked: refused at once.
    let res = app.delete(&format!("/v1/tenants/{}/api-keys/{id}", ada.tenant)).token(&ada.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    let res = app.get("/v1/me").token(&secret).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.body["detail"].as_str().unwrap().contains("revoked"));
    let list = app.get(&format!("/v1/tenants/{}/api-keys", ada.tenant)).token(&ada.token).send().await;
    assert!(list.body["items"][0]["revoked_at"].is_string());

    let actions = app.audit_actions(Some(ada.tenant)).await;
    assert!(actions.contains(&("iam:CreateApiKey".into(), "success".into())));
    assert!(actions.contains(&("iam:RevokeApiKey".into(), "success".into())));
}

#[tokio::test]
async fn expired_key_is_refused_and_expiry_must_be_future() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let path = format!("/v1/tenants/{}/api-keys", ada.tenant);
    let res = app
        .post(&path)
        .token(&ada.token)
        .json(json!({"name": "old", "role": "viewer", "expires_at": "2020-01-01T00:00:00Z"}))
        .send()
        .await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "expires_at");

    let soon = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let res = app
        .post(&path)
        .token(&ada.token)
        .json(json!({"name": "soon", "role": "viewer", "expires_at": soon}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED);
    let secret = res.body["secret"].as_str().unwrap();
    assert_eq!(app.get("/v1/me").token(secret).send().await.status, StatusCode::OK);
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second'").execute(&mut c).await.unwrap();
    let res = app.get("/v1/me").token(secret).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.body["detail"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn keys_cannot_exceed_their_creators_role_or_create_tenants() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let bob = app.sign_up("bob@example.com", "bobs").await;
    app.add_member(&ada, ada.tenant, &bob, "developer").await;
    let path = format!("/v1/tenants/{}/api-keys", ada.tenant);
    let res = app.post(&path).token(&bob.token).json(json!({"name": "x", "role": "admin"})).send().await;
    res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let (_, dev_key) = app.create_key(&bob.token, ada.tenant, "developer").await;

    // A developer key can mint keys up to developer, not admin.
    let res = app.post(&path).token(&dev_key).json(json!({"name": "y", "role": "admin"})).send().await;
    res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    // API keys are bound to their tenant: they cannot create tenants.
    app.post("/v1/tenants")
        .token(&dev_key)
        .json(json!({"name": "keyed"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    // Bad role values are named.
    let res = app.post(&path).token(&ada.token).json(json!({"name": "z", "role": "owner"})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "role");
}

#[tokio::test]
async fn keys_never_carry_more_than_their_creator_has_now() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let bob = app.sign_up("bob@example.com", "bobs").await;
    let dev = app.sign_up("dev@example.com", "devs").await;
    app.add_member(&ada, ada.tenant, &bob, "admin").await;
    app.add_member(&ada, ada.tenant, &dev, "developer").await;
    let t = ada.tenant;
    let (admin_key_id, admin_key) = app.create_key(&bob.token, t, "admin").await;
    let (_, viewer_key) = app.create_key(&bob.token, t, "viewer").await;

    // A developer cannot revoke an admin's key.
    let res = app.delete(&format!("/v1/tenants/{t}/api-keys/{admin_key_id}")).token(&dev.token).send().await;
    res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(app.get("/v1/me").token(&admin_key).send().await.status, StatusCode::OK);

    // Demoting Bob to viewer revokes his admin key and keeps his viewer key.
    let res = app
        .patch(&format!("/v1/tenants/{t}/members/{}", bob.id))
        .token(&ada.token)
        .json(json!({"role": "viewer"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.get("/v1/me").token(&admin_key).send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(app.get("/v1/me").token(&viewer_key).send().await.status, StatusCode::OK);

    // Removing him revokes the rest.
    let res = app.delete(&format!("/v1/tenants/{t}/members/{}", bob.id)).token(&ada.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    app.get("/v1/me").token(&viewer_key).send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
}
