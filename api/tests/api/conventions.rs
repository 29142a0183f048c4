//! Conventions: problem+json for every error, request ids, body limits, timeouts, metrics,
//! health, the OpenAPI document and the offline API reference.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn body_errors_are_problems_naming_the_field() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;

    app.post("/v1/tenants")
        .token(&ada.token)
        .raw("application/json", "{\"name\": ")
        .send()
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "malformed_json");
    app.post("/v1/tenants")
        .token(&ada.token)
        .raw("text/plain", "{}")
        .send()
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    app.post("/v1/tenants")
        .token(&ada.token)
        .raw("", "{}")
        .send()
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    let res = app.post("/v1/tenants").token(&ada.token).json(json!({"name": "ok", "colour": "red"})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "colour");
    assert_eq!(res.body["errors"][0]["rule"], "unknown_field");

    let res = app.post("/v1/tenants").token(&ada.token).json(json!({"name": "Not A Label"})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "name");

    let res = app.post("/v1/tenants").token(&ada.token).json(json!({})).send().await;
    assert_eq!(res.body["errors"][0]["rule"], "required");

    let res = app
        .post("/v1/auth/signup")
        .json(json!({"email": "x@example.com", "password": "short", "display_name": "X", "tenant_name": "x"}))
        .send()
        .await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(res.body["errors"][0]["field"], "password");
    assert!(res.body["errors"][0]["message"].as_str().unwrap().contains("at least 10"));
    // Nothing was stored by any of the failures.
    let mine = app.get("/v1/tenants").token(&ada.token).send().await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn path_query_route_and_method_errors_are_problems() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let res = app.get("/v1/tenants/not-a-uuid").token(&ada.token).send().await;
    res.assert_problem(StatusCode::BAD_REQUEST, "invalid_path_parameter");
    assert_eq!(res.body["errors"][0]["field"], "tenant_id");

    let res = app.get("/v1/tenants?limit=abc").token(&ada.token).send().await;
    res.assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    assert_eq!(res.body["errors"][0]["field"], "limit");
    let res = app.get("/v1/tenants?colour=red").token(&ada.token).send().await;
    res.assert_problem(StatusCode::BAD_REQUEST, "invalid_query");
    assert_eq!(res.body["errors"][0]["field"], "colour");
    let res = app.get("/v1/tenants?after=garbage").token(&ada.token).send().await;
    assert_eq!(res.body["errors"][0]["field"], "after");
    app.get("/v1/tenants?limit=1000")
        .token(&ada.token)
        .send()
        .await
        .assert_problem(StatusCode::BAD_REQUEST, "invalid_query");

    app.get("/v1/nothing-here").send().await.assert_problem(StatusCode::NOT_FOUND, "route_not_found");
    app.delete("/v1/me")
        .token(&ada.token)
        .send()
        .await
        .assert_problem(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn oversize_bodies_are_refused_and_store_nothing() {
    let app = spawn_app_with(&["--max-body-bytes", "256"]).await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let big = json!({"name": "big", "display_name": "x".repeat(400)});
    let res = app.post("/v1/tenants").token(&ada.token).json(big.clone()).send().await;
    res.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(res.body["detail"].as_str().unwrap().contains("256"));
    // Also through the idempotency layer, which buffers the body itself.
    app.post("/v1/tenants")
        .token(&ada.token)
        .header("idempotency-key", "big-1")
        .json(big)
        .send()
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let mine = app.get("/v1/tenants").token(&ada.token).send().await;
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn slow_requests_time_out_with_a_problem() {
    // Hashing a password with argon2id (19 MiB) cannot finish within a millisecond.
    let app = spawn_app_with(&["--request-timeout", "1ms"]).await;
    app.post("/v1/auth/signup")
        .json(json!({"email": "ada@example.com", "password": "correct horse battery", "display_name": "A", "tenant_name": "acme"}))
        .send()
        .await
        .assert_problem(StatusCode::SERVICE_UNAVAILABLE, "timeout");
}

#[tokio::test]
async fn request_ids_are_made_or_propagated() {
    let app = spawn_app().await;
    let res = app.get("/healthz").send().await;
    let id = res.headers["x-request-id"].to_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    let res = app.get("/healthz").header("x-request-id", "abc-123").send().await;
    assert_eq!(res.headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").send().await.body["status"], "ok");
    assert_eq!(app.get("/readyz").send().await.status, StatusCode::OK);
    app.get("/v1/me").send().await;
    let metrics = app.get("/metrics").send().await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.text.contains(r#"http_requests_total{method="GET",route="/v1/me",status="401"}"#),
        "{}",
        metrics.text
    );
    assert!(metrics.text.contains("http_request_duration_seconds_bucket"), "{}", metrics.text);

    // With the database gone, readiness says so while liveness stays up.
    app.state.pool.close();
    app.get("/readyz").send().await.assert_problem(StatusCode::SERVICE_UNAVAILABLE, "timeout");
    assert_eq!(app.get("/healthz").send().await.status, StatusCode::OK);
}

#[test]
fn checked_in_openapi_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi/openapi.json");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    let generated = nimbus_api::openapi::document_json();
    assert!(
        checked_in == generated,
        "openapi/openapi.json is out of date; run: cargo run -p nimbus-api -- openapi --out openapi/openapi.json"
    );
}

#[tokio::test]
async fn api_reference_is_served_offline() {
    let app = spawn_app().await;
    let page = app.get("/docs/").send().await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("swagger-ui"), "{}", page.text);
    for needle in ["unpkg.com", "cdn.jsdelivr", "cdnjs"] {
        assert!(!page.text.contains(needle), "the reference page loads from a CDN: {needle}");
    }
    let bundle = app.get("/docs/swagger-ui-bundle.js").send().await;
    assert_eq!(bundle.status, StatusCode::OK);
    assert!(bundle.text.len() > 100_000, "the bundle is served from the binary");
    let doc = app.get("/openapi.json").send().await;
    assert_eq!(doc.body["info"]["title"], "Nimbus API");
}
