//! Sign-up, sign-in, refresh rotation and reuse detection, sign-out, throttling, key rotation.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{PASSWORD, spawn_app, spawn_app_with};

#[tokio::test]
async fn sign_up_then_sign_in_then_me() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;

    let me = app.get("/v1/me").token(&user.token).send().await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    assert_eq!(me.body["principal_type"], "user");
    assert_eq!(me.body["user"]["email"], "ada@example.com");

    // E-mail is case-insensitive at sign-in.
    let res = app.post("/v1/auth/signin").json(json!({"email": "ADA@example.com", "password": PASSWORD})).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let token = res.body["access_token"].as_str().unwrap();
    assert_eq!(res.body["token_type"], "Bearer");
    assert_eq!(res.body["expires_in"], 900);
    let me = app.get("/v1/me").token(token).send().await;
    assert_eq!(me.body["user"]["id"], user.id.to_string());

    app.post("/v1/auth/signin")
        .json(json!({"email": "ada@example.com", "password": "wrong password"}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_credentials");
    app.post("/v1/auth/signin")
        .json(json!({"email": "nobody@example.com", "password": PASSWORD}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "invalid_credentials");

    // The password is stored as an argon2id hash, never in clear.
    let mut c = app.admin_conn().await;
    let hash: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(user.id)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$") && !hash.contains(PASSWORD));
}

#[tokio::test]
async fn duplicate_email_and_tenant_name_conflict_and_store_nothing() {
    let app = spawn_app().await;
    app.sign_up("ada@example.com", "acme").await;
    app.post("/v1/auth/signup")
        .json(json!({"email": "ada@example.com", "password": PASSWORD, "display_name": "X", "tenant_name": "other"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "email_taken");
    // A taken tenant name fails the whole sign-up: the user is not left behind without a tenant.
    app.post("/v1/auth/signup")
        .json(json!({"email": "bob@example.com", "password": PASSWORD, "display_name": "Bob", "tenant_name": "acme"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "tenant_name_taken");
    let mut c = app.admin_conn().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&mut c).await.unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn sign_up_can_be_disabled() {
    let app = spawn_app_with(&["--allow-signup", "false"]).await;
    app.post("/v1/auth/signup")
        .json(json!({"email": "ada@example.com", "password": PASSWORD, "display_name": "A", "tenant_name": "acme"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;

    let first = app.post("/v1/auth/refresh").json(json!({"refresh_token": user.refresh})).send().await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let second_token = first.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_token, user.refresh);
    let me = app.get("/v1/me").token(first.body["access_token"].as_str().unwrap()).send().await;
    assert_eq!(me.status, StatusCode::OK);

    // Presenting the used token again is reuse: refused, and the family is revoked.
    app.post("/v1/auth/refresh")
        .json(json!({"refresh_token": user.refresh}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "refresh_token_reused");
    // So the legitimate newest token no longer works either.
    app.post("/v1/auth/refresh")
        .json(json!({"refresh_token": second_token}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");

    // Another session of the same user is unaffected.
    let other =
        app.post("/v1/auth/signin").json(json!({"email": "ada@example.com", "password": PASSWORD})).send().await;
    let rt = other.body["refresh_token"].as_str().unwrap();
    assert_eq!(app.post("/v1/auth/refresh").json(json!({"refresh_token": rt})).send().await.status, StatusCode::OK);

    let actions = app.audit_actions(None).await;
    assert!(actions.contains(&("auth:RefreshToken".into(), "success".into())), "{actions:?}");
    assert!(actions.contains(&("auth:RefreshToken".into(), "failure".into())), "{actions:?}");

    app.post("/v1/auth/refresh")
        .json(json!({"refresh_token": "nmr_made_up"}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn sign_out_revokes_the_session() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    let res = app.post("/v1/auth/signout").json(json!({"refresh_token": user.refresh})).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    app.post("/v1/auth/refresh")
        .json(json!({"refresh_token": user.refresh}))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(app.audit_actions(None).await.contains(&("auth:SignOut".into(), "success".into())));
}

#[tokio::test]
async fn expired_refresh_token_is_refused() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'").execute(&mut c).await.unwrap();
    let res = app.post("/v1/auth/refresh").json(json!({"refresh_token": user.refresh})).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.body["detail"].as_str().unwrap().contains("expired"));
}

#[tokio::test]
async fn tokens_are_checked() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    app.get("/v1/me").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    app.get("/v1/me").token("not.a.jwt").send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // A token with a tampered payload fails signature verification.
    let mut parts: Vec<String> = user.token.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].chars().rev().collect();
    let res = app.get("/v1/me").token(&parts.join(".")).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert_eq!(res.headers["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn expired_access_token_is_refused() {
    // A token signed with the deployment's own key, but expired ten minutes ago.
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    let mut c = app.admin_conn().await;
    let der: Vec<u8> = sqlx::query_scalar("SELECT private_key FROM signing_keys WHERE retired_at IS NULL")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let kid: String =
        sqlx::query_scalar("SELECT kid FROM signing_keys WHERE retired_at IS NULL").fetch_one(&mut c).await.unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"sub": user.id, "sid": uuid::Uuid::now_v7(), "iss": "http://nimbus.test", "aud": "nimbus-api",
                        "iat": now - 3600, "exp": now - 600, "jti": uuid::Uuid::now_v7()});
    let token = jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ed_der(&der)).unwrap();
    let res = app.get("/v1/me").token(&token).send().await;
    res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    assert!(res.body["detail"].as_str().unwrap().contains("expired"), "{}", res.text);
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_valid_and_publishes_both_keys() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    let before = app.get("/.well-known/jwks.json").send().await;
    assert_eq!(before.body["keys"].as_array().unwrap().len(), 1);
    let old_kid = before.body["keys"][0]["kid"].as_str().unwrap().to_owned();

    let new_kid = app.state.keys.rotate().await.unwrap();
    assert_ne!(new_kid, old_kid);

    // The token signed with the old key still works: rotation logs nobody out.
    assert_eq!(app.get("/v1/me").token(&user.token).send().await.status, StatusCode::OK);
    let jwks = app.get("/.well-known/jwks.json").send().await;
    let kids: Vec<&str> = jwks.body["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
    assert_eq!(kids, [old_kid.as_str(), new_kid.as_str()]);

    // New tokens are signed with the new key.
    let res = app.post("/v1/auth/signin").json(json!({"email": "ada@example.com", "password": PASSWORD})).send().await;
    let header = jsonwebtoken::decode_header(res.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new_kid.as_str()));

    // A key retired longer ago than a token lives is no longer trusted.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE signing_keys SET retired_at = now() - interval '1 day' WHERE kid = $1")
        .bind(&old_kid)
        .execute(&mut c)
        .await
        .unwrap();
    app.state.keys.reload().await.unwrap();
    app.get("/v1/me").token(&user.token).send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
}

#[tokio::test]
async fn jwks_verifies_tokens_for_a_client_that_knows_nothing_else() {
    let app = spawn_app().await;
    let user = app.sign_up("ada@example.com", "acme").await;
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(app.get("/.well-known/jwks.json").send().await.body).unwrap();
    let kid = jsonwebtoken::decode_header(&user.token).unwrap().kid.unwrap();
    let jwk = jwks.find(&kid).expect("the token's key is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["nimbus-api"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&user.token, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], user.id.to_string());
}

#[tokio::test]
async fn sign_in_is_throttled_per_account() {
    let app = spawn_app_with(&["--signin-max-failures-per-account", "3"]).await;
    app.sign_up("ada@example.com", "acme").await;
    for i in 0..3u8 {
        app.post("/v1/auth/signin")
            .peer_ip([10, 1, 0, i])
            .json(json!({"email": "ada@example.com", "password": "wrong password"}))
            .send()
            .await
            .assert_problem(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    // Even the right password, from a fresh address, is now refused until the window passes.
    let res = app
        .post("/v1/auth/signin")
        .peer_ip([10, 2, 0, 1])
        .json(json!({"email": "ada@example.com", "password": PASSWORD}))
        .send()
        .await;
    res.assert_problem(StatusCode::TOO_MANY_REQUESTS, "signin_throttled");
    let retry: u64 = res.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=900).contains(&retry), "{retry}");

    // Another account is not affected.
    app.sign_up("bob@example.com", "bobs").await;
    let ok = app
        .post("/v1/auth/signin")
        .peer_ip([10, 2, 0, 1])
        .json(json!({"email": "bob@example.com", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(ok.status, StatusCode::OK);

    // Once the window has passed, the account can sign in again.
    let mut c = app.admin_conn().await;
    sqlx::query("UPDATE signin_throttle SET window_start = now() - interval '1 hour'").execute(&mut c).await.unwrap();
    let ok = app.post("/v1/auth/signin").json(json!({"email": "ada@example.com", "password": PASSWORD})).send().await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
}

#[tokio::test]
async fn sign_in_is_throttled_per_address() {
    let app = spawn_app_with(&["--signin-max-failures-per-address", "4"]).await;
    app.sign_up("ada@example.com", "acme").await;
    for i in 0..4 {
        app.post("/v1/auth/signin")
            .peer_ip([192, 0, 2, 7])
            .json(json!({"email": format!("guess{i}@example.com"), "password": "wrong password"}))
            .send()
            .await
            .assert_problem(StatusCode::UNAUTHORIZED, "invalid_credentials");
    }
    app.post("/v1/auth/signin")
        .peer_ip([192, 0, 2, 7])
        .json(json!({"email": "ada@example.com", "password": PASSWORD}))
        .send()
        .await
        .assert_problem(StatusCode::TOO_MANY_REQUESTS, "signin_throttled");
    // Another address signs in fine.
    let ok = app
        .post("/v1/auth/signin")
        .peer_ip([192, 0, 2, 8])
        .json(json!({"email": "ada@example.com", "password": PASSWORD}))
        .send()
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let failures =
        app.audit_actions(None).await.into_iter().filter(|a| a == &("auth:SignIn".into(), "failure".into())).count();
    assert_eq!(failures, 4);
}

#[tokio::test]
async fn addresses_with_quotes_are_bound_not_spliced() {
    // Sign-in looks the user up through a transaction setting; an apostrophe in the address must
    // reach PostgreSQL as data.
    let app = spawn_app().await;
    app.sign_up("o'brien@example.com", "obrien").await;
    let res =
        app.post("/v1/auth/signin").json(json!({"email": "o'brien@example.com", "password": PASSWORD})).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let res = app
        .post("/v1/auth/signin")
        .json(json!({"email": "x'); DROP TABLE users; --@example.com", "password": PASSWORD}))
        .send()
        .await;
    assert!(res.status == StatusCode::UNAUTHORIZED || res.status == StatusCode::UNPROCESSABLE_ENTITY, "{}", res.text);
    let mut c = app.admin_conn().await;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&mut c).await.unwrap();
    assert_eq!(users, 1);
}

#[tokio::test]
async fn parallel_guesses_cannot_slip_past_the_limit() {
    use axum::{body::Body, extract::ConnectInfo, http::Request};
    use tower::ServiceExt;
    let app = spawn_app_with(&["--signin-max-failures-per-account", "3"]).await;
    app.sign_up("ada@example.com", "acme").await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12u8 {
        let router = app.router.clone();
        tasks.spawn(async move {
            let mut req = Request::post("/v1/auth/signin")
                .header("content-type", "application/json")
                .body(Body::from(json!({"email": "ada@example.com", "password": "wrong password"}).to_string()))
                .unwrap();
            req.extensions_mut().insert(ConnectInfo(std::net::SocketAddr::from(([10, 9, 0, i], 4000))));
            router.oneshot(req).await.unwrap().status()
        });
    }
    let statuses: Vec<StatusCode> = tasks.join_all().await;
    let checked = statuses.iter().filter(|s| **s == StatusCode::UNAUTHORIZED).count();
    let throttled = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((checked, throttled), (3, 9), "{statuses:?}");
}
