//! Functions, packages, versions and aliases through the API, with the local package store.

use axum::{
    body::Body,
    http::{Method, StatusCode},
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{TestApp, TestResponse, User, spawn_app, spawn_app_with};

/// A minimal WASI command: exports `_start`, imports one WASI function. `tag` changes the bytes.
pub fn wasm_module(tag: i32) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
             (memory (export "memory") 1)
             (func (export "_start") (call $exit (i32.const {tag}))))"#
    ))
    .unwrap()
}

/// A gzip tarball with one executable file at `path`.
pub fn tarball(path: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let data = b"#!/bin/sh\necho hello\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o755);
    builder.append_data(&mut header, path, &data[..]).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

pub fn functions_path(tenant: Uuid) -> String {
    format!("/v1/tenants/{tenant}/functions")
}

pub async fn create_function(app: &TestApp, user: &User, body: Value) -> TestResponse {
    app.post(&functions_path(user.tenant)).token(&user.token).json(body).send().await
}

pub async fn upload(app: &TestApp, user: &User, name: &str, content_type: &str, bytes: Vec<u8>) -> TestResponse {
    app.req(Method::PUT, &format!("{}/{name}/code", functions_path(user.tenant)))
        .token(&user.token)
        .raw(content_type, bytes)
        .send()
        .await
}

pub async fn publish(app: &TestApp, user: &User, name: &str) -> TestResponse {
    app.post(&format!("{}/{name}/versions", functions_path(user.tenant)))
        .token(&user.token)
        .json(json!({}))
        .send()
        .await
}

fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|it| it.flatten().map(|e| if e.path().is_dir() { files_under(&e.path()) } else { 1 }).sum())
        .unwrap_or(0)
}

async fn count(app: &TestApp, table: &str) -> i64 {
    let mut c = app.admin_conn().await;
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&mut c).await.unwrap()
}

#[tokio::test]
async fn functions_are_created_read_updated_with_etags_and_deleted() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let res = create_function(
        &app,
        &owner,
        json!({"name": "thumbs", "runtime": "wasm", "memory_mb": 256, "tags": {"team": "media"},
               "environment": {"LOG_LEVEL": {"value": "info"}}}),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let etag = res.headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(res.body["etag"], etag.as_str());
    assert_eq!(res.body["memory_mb"], 256);
    assert_eq!(res.body["timeout_ms"], 10_000, "defaults apply");
    assert_eq!(res.body["package"], Value::Null);
    assert_eq!(res.body["environment"]["LOG_LEVEL"], json!({"value": "info", "secret": false, "set": true}));

    let path = format!("{}/thumbs", functions_path(owner.tenant));
    let got = app.get(&path).token(&owner.token).send().await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["etag"].to_str().unwrap(), etag);

    // Without If-Match: 428. With a stale ETag: 412, and nothing changes.
    app.patch(&path)
        .token(&owner.token)
        .json(json!({"memory_mb": 512}))
        .send()
        .await
        .assert_problem(StatusCode::PRECONDITION_REQUIRED, "precondition_required");
    let ok =
        app.patch(&path).token(&owner.token).header("if-match", &etag).json(json!({"memory_mb": 512})).send().await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let newer = ok.headers["etag"].to_str().unwrap().to_owned();
    assert_ne!(newer, etag);
    let stale =
        app.patch(&path).token(&owner.token).header("if-match", &etag).json(json!({"memory_mb": 1024})).send().await;
    stale.assert_problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let now = app.get(&path).token(&owner.token).send().await;
    assert_eq!(now.body["memory_mb"], 512, "the stale update changed nothing");
    // `*` matches whatever is current; null clears an optional field.
    let star = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"reserved_concurrency": 5}))
        .send()
        .await;
    assert_eq!(star.body["reserved_concurrency"], 5, "{}", star.text);
    let cleared = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"reserved_concurrency": null}))
        .send()
        .await;
    assert_eq!(cleared.body["reserved_concurrency"], Value::Null, "{}", cleared.text);

    // Invalid fields are all named; the name is unique per tenant.
    let bad = create_function(
        &app,
        &owner,
        json!({"name": "bad", "runtime": "process", "memory_mb": 1, "min_scale": 3, "max_scale": 1,
               "environment": {"NIMBUS_X": {"value": "1"}}}),
    )
    .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let fields: Vec<&str> =
        bad.body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["memory_mb", "min_scale", "entry", "environment.NIMBUS_X"], "{}", bad.text);
    create_function(&app, &owner, json!({"name": "thumbs", "runtime": "wasm"}))
        .await
        .assert_problem(StatusCode::CONFLICT, "function_name_taken");
    create_function(&app, &owner, json!({"name": "Thumbs", "runtime": "wasm"}))
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    let list = app.get(&functions_path(owner.tenant)).token(&owner.token).send().await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);

    // A viewer reads but cannot change.
    let viewer = app.sign_up("viewer@example.com", "viewers").await;
    app.add_member(&owner, owner.tenant, &viewer, "viewer").await;
    assert_eq!(app.get(&path).token(&viewer.token).send().await.status, StatusCode::OK);
    let denied = app.delete(&path).token(&viewer.token).send().await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:DeleteFunction");

    assert_eq!(app.delete(&path).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    app.get(&path).token(&owner.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let actions: Vec<String> = app.audit_actions(Some(owner.tenant)).await.into_iter().map(|(a, _)| a).collect();
    for a in ["functions:CreateFunction", "functions:UpdateFunction", "functions:DeleteFunction"] {
        assert!(actions.iter().any(|x| x == a), "{a} audited: {actions:?}");
    }
}

#[tokio::test]
async fn upload_dedupe_publish_alias_and_weights() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    for name in ["api", "worker"] {
        let res = create_function(&app, &owner, json!({"name": name, "runtime": "wasm"})).await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    }
    let first = upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert_eq!(first.body["deduplicated"], false);
    let sha = first.body["package"]["sha256"].as_str().unwrap().to_owned();
    assert_eq!(sha, nimbus_api::store::hex(ring::digest::digest(&ring::digest::SHA256, &wasm_module(1)).as_ref()));
    // Same bytes again: the same package, nothing stored twice.
    let again = upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body["deduplicated"], true);
    assert_eq!(again.body["package"]["id"], first.body["package"]["id"]);
    // Another function, same bytes: its own package row, the object is shared.
    let other = upload(&app, &owner, "worker", "application/wasm", wasm_module(1)).await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_eq!(other.body["deduplicated"], true);
    assert_ne!(other.body["package"]["id"], first.body["package"]["id"]);
    assert_eq!(files_under(&app.package_dir.join("sha256")), 1);
    assert_eq!(files_under(&app.package_dir.join("tmp")), 0);

    let base = format!("{}/api", functions_path(owner.tenant));
    let fun = app.get(&base).token(&owner.token).send().await;
    assert_eq!(fun.body["package"]["sha256"], sha.as_str());

    let v1 = publish(&app, &owner, "api").await;
    assert_eq!(v1.status, StatusCode::CREATED, "{}", v1.text);
    assert_eq!(v1.body["number"], 1);
    assert_eq!(v1.body["package"]["sha256"], sha.as_str());
    assert_eq!(v1.body["published_by"], owner.id.to_string());
    assert_eq!(v1.body["published_via"], "user");
    upload(&app, &owner, "api", "application/wasm", wasm_module(2)).await;
    let v2 = publish(&app, &owner, "api").await;
    assert_eq!(v2.body["number"], 2);
    assert_ne!(v2.body["package"]["sha256"], sha.as_str());
    // Versions are frozen: changing the function does not change them.
    app.patch(&base).token(&owner.token).header("if-match", "*").json(json!({"memory_mb": 2048})).send().await;
    let v1_again = app.get(&format!("{base}/versions/1")).token(&owner.token).send().await;
    assert_eq!(v1_again.body["config"]["memory_mb"], 128);
    assert_eq!(v1_again.body["package"]["sha256"], sha.as_str());

    let aliases = format!("{base}/aliases");
    let live = app
        .post(&aliases)
        .token(&owner.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;
    assert_eq!(live.status, StatusCode::CREATED, "{}", live.text);
    let etag = live.headers["etag"].to_str().unwrap().to_owned();
    let routing = json!({"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}], "sticky": true,
                         "header_rules": [{"header": "X-Canary", "value": "1", "version": 2}]});
    let updated = app
        .req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", &etag)
        .json(json!({"routing": routing}))
        .send()
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    assert_eq!(updated.body["routing"]["weights"][1], json!({"version": 2, "weight": 10}));
    assert_eq!(updated.body["routing"]["header_rules"][0]["header"], "x-canary", "header names are stored lowercase");
    // The old ETag is stale now.
    app.req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", &etag)
        .json(json!({"routing": {"weights": [{"version": 2, "weight": 100}]}}))
        .send()
        .await
        .assert_problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    // Weights must sum to 100 and name existing versions.
    let bad = app
        .req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"routing": {"weights": [{"version": 1, "weight": 50}, {"version": 9, "weight": 40}]}}))
        .send()
        .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "routing.weights", "{}", bad.text);
    let missing = app
        .req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"routing": {"weights": [{"version": 9, "weight": 100}]}}))
        .send()
        .await;
    missing.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(missing.body["errors"][0]["field"], "routing.weights[0].version");
    app.post(&aliases)
        .token(&owner.token)
        .json(json!({"name": "7", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    // A routed version cannot be deleted; an unrouted one can, and its number is not reused.
    app.delete(&format!("{base}/versions/2"))
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "version_in_use");
    let events = app.get(&format!("{aliases}/live/events")).token(&owner.token).send().await;
    let items = events.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", events.text);
    assert_eq!(items[0]["from_routing"], Value::Null);
    assert_eq!(items[0]["to_routing"]["weights"][0]["weight"], 100);
    assert_eq!(items[1]["from_routing"]["weights"][0]["weight"], 100);
    assert_eq!(items[1]["to_routing"]["weights"][0]["weight"], 90);
    assert_eq!(items[1]["actor_id"], owner.id.to_string());
    assert_eq!(items[1]["source"], "api");

    let now = app.get(&format!("{aliases}/live")).token(&owner.token).send().await;
    let etag = now.headers["etag"].to_str().unwrap().to_owned();
    app.req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", &etag)
        .json(json!({"routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;
    assert_eq!(
        app.delete(&format!("{base}/versions/2")).token(&owner.token).send().await.status,
        StatusCode::NO_CONTENT
    );
    let v3 = publish(&app, &owner, "api").await;
    assert_eq!(v3.body["number"], 3, "numbers are never reused");
    let list = app.get(&format!("{base}/versions")).token(&owner.token).send().await;
    let numbers: Vec<i64> =
        list.body["items"].as_array().unwrap().iter().map(|v| v["number"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [1, 3]);

    // Deleting the alias is an event too, and the history stays.
    assert_eq!(app.delete(&format!("{aliases}/live")).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    let events = app.get(&format!("{aliases}/live/events")).token(&owner.token).send().await;
    let items = events.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[3]["to_routing"], Value::Null);

    // Switching back to an earlier package of the function.
    let first_id = first.body["package"]["id"].as_str().unwrap();
    let back =
        app.patch(&base).token(&owner.token).header("if-match", "*").json(json!({"package_id": first_id})).send().await;
    assert_eq!(back.body["package"]["sha256"], sha.as_str(), "{}", back.text);
    let packages = app.get(&format!("{base}/packages")).token(&owner.token).send().await;
    assert_eq!(packages.body["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn versions_are_immutable_in_the_database() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    publish(&app, &owner, "api").await;
    let mut tx = nimbus_api::db::begin(&app.state.pool, &nimbus_api::db::Scope::tenant(owner.tenant, Some(owner.id)))
        .await
        .unwrap();
    let err = sqlx::query("UPDATE versions SET description = 'rewritten'").execute(&mut *tx).await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
}

#[tokio::test]
async fn publishing_needs_code() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    publish(&app, &owner, "api").await.assert_problem(StatusCode::CONFLICT, "no_code");
}

#[tokio::test]
async fn invalid_packages_are_refused_naming_the_problem_and_leave_nothing() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    let no_start = wat::parse_str(r#"(module (import "env" "f" (func)) (func (export "main")))"#).unwrap();
    let res = upload(&app, &owner, "api", "application/wasm", no_start).await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    let rules: Vec<(&str, &str)> = res.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap(), e["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(rules, [("package.imports[0]", "wasi_preview1_only"), ("package.exports", "start_required")]);
    upload(&app, &owner, "api", "application/wasm", b"garbage".to_vec())
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    // The media type must fit the runtime.
    upload(&app, &owner, "api", "application/zip", wasm_module(1))
        .await
        .assert_problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    // Process packages must hold their entry.
    create_function(&app, &owner, json!({"name": "native", "runtime": "process", "entry": "bin/handler"})).await;
    let res = upload(&app, &owner, "native", "application/gzip", tarball("bin/other")).await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    assert_eq!(res.body["errors"][0]["rule"], "entry_missing");

    assert_eq!(files_under(&app.package_dir), 0, "nothing stored, no spool file left");
    assert_eq!(count(&app, "packages").await, 0);
    let fun = app.get(&format!("{}/api", functions_path(owner.tenant))).token(&owner.token).send().await;
    assert_eq!(fun.body["package"], Value::Null);

    let ok = upload(&app, &owner, "native", "application/gzip", tarball("bin/handler")).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    assert_eq!(ok.body["package"]["format"], "tar.gz");
}

#[tokio::test]
async fn oversize_packages_get_413_and_leave_nothing() {
    let app = spawn_app_with(&["--max-package-bytes=2048"]).await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    // Declared too large: refused before reading (the body here would fit; the header decides).
    app.req(Method::PUT, &format!("{}/api/code", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("content-length", "4096")
        .raw("application/wasm", Body::from_stream(futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>()))
        .send()
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Streamed without a length: refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![0u8; 1024])).collect();
    let res = app
        .req(Method::PUT, &format!("{}/api/code", functions_path(owner.tenant)))
        .token(&owner.token)
        .raw("application/wasm", Body::from_stream(futures_util::stream::iter(chunks)))
        .send()
        .await;
    res.assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(files_under(&app.package_dir), 0);
    assert_eq!(count(&app, "packages").await, 0);
}

#[tokio::test]
async fn functions_versions_aliases_and_packages_of_another_tenant_are_out_of_reach() {
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    create_function(&app, &a, json!({"name": "api", "runtime": "wasm"})).await;
    let up = upload(&app, &a, "api", "application/wasm", wasm_module(1)).await;
    let a_package = up.body["package"]["id"].as_str().unwrap().to_owned();
    publish(&app, &a, "api").await;
    app.post(&format!("{}/api/aliases", functions_path(a.tenant)))
        .token(&a.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;

    // B, with its own token, on A's paths.
    let base = format!("{}/api", functions_path(a.tenant));
    for path in [
        base.clone(),
        format!("{base}/versions"),
        format!("{base}/versions/1"),
        format!("{base}/aliases/live"),
        format!("{base}/aliases/live/events"),
        format!("{base}/packages"),
        format!("{base}/packages/{a_package}"),
    ] {
        app.get(&path).token(&b.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    }
    app.delete(&format!("{base}/versions/1"))
        .token(&b.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    let res = app
        .req(Method::PUT, &format!("{base}/code"))
        .token(&b.token)
        .raw("application/wasm", wasm_module(3))
        .send()
        .await;
    res.assert_problem(StatusCode::NOT_FOUND, "not_found");

    // B uploads the very same bytes: a package of its own, never A's.
    create_function(&app, &b, json!({"name": "api", "runtime": "wasm"})).await;
    let mine = upload(&app, &b, "api", "application/wasm", wasm_module(1)).await;
    assert_eq!(mine.body["deduplicated"], true);
    assert_ne!(mine.body["package"]["id"], a_package.as_str());
    // And cannot point its function at A's package, though the SHA-256 is the same.
    app.patch(&format!("{}/api", functions_path(b.tenant)))
        .token(&b.token)
        .header("if-match", "*")
        .json(json!({"package_id": a_package}))
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    // Nor read it through its own function's path.
    app.get(&format!("{}/api/packages/{a_package}", functions_path(b.tenant)))
        .token(&b.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    // Its alias can only name its own versions (it has none).
    app.post(&format!("{}/api/aliases", functions_path(b.tenant)))
        .token(&b.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // A's function is untouched.
    let fun = app.get(&base).token(&a.token).send().await;
    assert_eq!(fun.body["package"]["id"], a_package.as_str());
}

#[tokio::test]
async fn secret_values_are_sealed_and_never_returned() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let secret = "hunter2-correct-horse";
    let res = create_function(
        &app,
        &owner,
        json!({"name": "api", "runtime": "wasm", "environment": {"DB_PASSWORD": {"value": secret, "secret": true}}}),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert!(!res.text.contains(secret));
    assert_eq!(res.body["environment"]["DB_PASSWORD"], json!({"secret": true, "set": true}));
    let path = format!("{}/api", functions_path(owner.tenant));
    // An update that names the secret without a value keeps it.
    let kept = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"environment": {"DB_PASSWORD": {"secret": true}, "MODE": {"value": "prod"}}}))
        .send()
        .await;
    assert_eq!(kept.body["environment"]["DB_PASSWORD"], json!({"secret": true, "set": true}), "{}", kept.text);
    upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    let v = publish(&app, &owner, "api").await;
    let audit = app.get(&format!("/v1/tenants/{}/audit-log", owner.tenant)).token(&owner.token).send().await;
    for text in [&kept.text, &v.text, &audit.text, &app.get(&path).token(&owner.token).send().await.text] {
        assert!(!text.contains(secret), "secret leaked: {text}");
    }
    // At rest it is sealed, in the function and in the version.
    let mut c = app.admin_conn().await;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT environment::text FROM functions UNION ALL SELECT config::text FROM versions UNION ALL \
         SELECT details::text FROM audit_log",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert!(stored.iter().any(|s| s.contains("key_id")), "{stored:?}");
    assert!(stored.iter().all(|s| !s.contains(secret)), "{stored:?}");
}

#[tokio::test]
async fn a_function_with_routed_aliases_is_deleted_with_everything_it_has() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    publish(&app, &owner, "api").await;
    let base = format!("{}/api", functions_path(owner.tenant));
    let res = app
        .post(&format!("{base}/aliases"))
        .token(&owner.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}],
                     "header_rules": [{"header": "x-a", "value": "1", "version": 1}]}}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let res = app.delete(&base).token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    for table in ["functions", "versions", "aliases", "alias_routes", "packages", "routing_events"] {
        assert_eq!(count(&app, table).await, 0, "{table} emptied");
    }
}

#[tokio::test]
async fn changing_a_process_functions_entry_checks_its_package_again() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "native", "runtime": "process", "entry": "bin/handler"})).await;
    let up = upload(&app, &owner, "native", "application/gzip", tarball("bin/handler")).await;
    assert_eq!(up.status, StatusCode::CREATED, "{}", up.text);
    let path = format!("{}/native", functions_path(owner.tenant));
    let res =
        app.patch(&path).token(&owner.token).header("if-match", "*").json(json!({"entry": "bin/other"})).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    assert_eq!(res.body["errors"][0]["rule"], "entry_missing");
    let fun = app.get(&path).token(&owner.token).send().await;
    assert_eq!(fun.body["entry"], "bin/handler", "nothing changed");
    let ok = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"entry": "./bin/handler"}))
        .send()
        .await;
    assert_eq!(ok.status, StatusCode::UNPROCESSABLE_ENTITY, "entries are plain relative paths: {}", ok.text);
}

/// Below the API: even a query that names another tenant's rows by id cannot link to them. The
/// application role, scoped to tenant B, tries to point B's rows at A's function, alias and
/// version; the composite foreign keys refuse every attempt.
#[tokio::test]
async fn rows_of_one_tenant_cannot_point_at_another_tenants_rows() {
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    create_function(&app, &a, json!({"name": "api", "runtime": "wasm"})).await;
    let up = upload(&app, &a, "api", "application/wasm", wasm_module(1)).await;
    let a_package: Uuid = up.body["package"]["id"].as_str().unwrap().parse().unwrap();
    publish(&app, &a, "api").await;
    let alias = app
        .post(&format!("{}/api/aliases", functions_path(a.tenant)))
        .token(&a.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;
    let a_alias: Uuid = alias.body["id"].as_str().unwrap().parse().unwrap();
    let a_function: Uuid = alias.body["function_id"].as_str().unwrap().parse().unwrap();
    let b_fn = create_function(&app, &b, json!({"name": "api", "runtime": "wasm"})).await;
    let b_function: Uuid = b_fn.body["id"].as_str().unwrap().parse().unwrap();

    let scope = nimbus_api::db::Scope::tenant(b.tenant, Some(b.id));
    let attempts: [(&str, Vec<Uuid>); 5] = [
        (
            "INSERT INTO packages (id, tenant_id, function_id, sha256, size, format) VALUES ($1, $2, $3, repeat('a', 64), 1, 'wasm')",
            vec![Uuid::now_v7(), b.tenant, a_function],
        ),
        (
            "INSERT INTO versions (id, tenant_id, function_id, number, package_id, sha256, config, published_via) \
          VALUES ($1, $2, $3, 9, $4, repeat('a', 64), '{}', 'user')",
            vec![Uuid::now_v7(), b.tenant, b_function, a_package],
        ),
        (
            "INSERT INTO aliases (id, tenant_id, function_id, name, routing) VALUES ($1, $2, $3, 'x', '{}')",
            vec![Uuid::now_v7(), b.tenant, a_function],
        ),
        (
            "INSERT INTO alias_routes (tenant_id, alias_id, function_id, version) VALUES ($1, $2, $3, 5)",
            vec![b.tenant, a_alias, a_function],
        ),
        ("UPDATE functions SET package_id = $2 WHERE id = $1", vec![b_function, a_package]),
    ];
    for (sql, binds) in attempts {
        let mut tx = nimbus_api::db::begin(&app.state.pool, &scope).await.unwrap();
        let mut q = sqlx::query(sql);
        for v in binds {
            q = q.bind(v);
        }
        let err = q.execute(&mut *tx).await.expect_err(sql);
        let msg = err.to_string();
        assert!(msg.contains("foreign key") || msg.contains("row-level security"), "{sql}: {msg}");
    }
}

#[tokio::test]
async fn scaling_settings_and_placement_rules_are_the_functions_live_and_shown_with_the_autoscalers_state() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let res = create_function(
        &app,
        &owner,
        json!({"name": "thumbs", "runtime": "wasm",
               "scaling": {"target_utilization": 0.5, "stable_window_s": 120, "panic_window_s": 12},
               "placement": {"required": {"accelerator": "gpu"}, "preferred": {"region": "eu"},
                             "priority": "critical"}}),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["scaling"], json!({"target_utilization": 0.5, "stable_window_s": 120, "panic_window_s": 12}));
    assert_eq!(
        res.body["placement"],
        json!({"required": {"accelerator": "gpu"}, "preferred": {"region": "eu"}, "priority": "critical"})
    );
    assert_eq!(res.body["scale"], json!([]));
    // Defaults when left out.
    let plain = create_function(&app, &owner, json!({"name": "plain", "runtime": "wasm"})).await;
    assert_eq!(plain.body["scaling"], json!({}), "{}", plain.text);
    assert_eq!(plain.body["placement"], json!({"priority": "normal"}));

    let path = format!("{}/thumbs", functions_path(owner.tenant));
    let got = app.get(&path).token(&owner.token).send().await;
    assert_eq!(got.body["scaling"]["stable_window_s"], 120, "{}", got.text);
    assert_eq!(got.body["placement"]["required"]["accelerator"], "gpu");
    upload(&app, &owner, "thumbs", "application/wasm", wasm_module(3)).await;
    let v1 = publish(&app, &owner, "thumbs").await;
    assert_eq!(v1.status, StatusCode::CREATED, "{}", v1.text);

    // PATCH replaces the whole object, needs If-Match like every other field, and is audited.
    let etag = got.headers["etag"].to_str().unwrap().to_owned();
    let patched = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"scaling": {"panic_threshold": 3.0}, "placement": {"priority": "low"}}))
        .send()
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text);
    assert_eq!(patched.body["scaling"], json!({"panic_threshold": 3.0}), "the whole object is replaced");
    assert_eq!(patched.body["placement"], json!({"priority": "low"}));
    assert_ne!(patched.body["etag"], etag.as_str());
    app.patch(&path)
        .token(&owner.token)
        .header("if-match", &etag)
        .json(json!({"scaling": {}}))
        .send()
        .await
        .assert_problem(StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let mut c = app.admin_conn().await;
    let changed: Value = sqlx::query_scalar(
        "SELECT details->'changed' FROM audit_log WHERE action = 'functions:UpdateFunction' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert_eq!(changed, json!(["scaling", "placement"]));
    // Other fields leave them alone.
    let other =
        app.patch(&path).token(&owner.token).header("if-match", "*").json(json!({"memory_mb": 256})).send().await;
    assert_eq!(other.body["scaling"], json!({"panic_threshold": 3.0}), "{}", other.text);

    // Live, not frozen: the published version carries neither.
    let version = app.get(&format!("{path}/versions/1")).token(&owner.token).send().await;
    assert_eq!(version.status, StatusCode::OK, "{}", version.text);
    assert!(version.body["config"].get("scaling").is_none(), "{}", version.text);
    assert!(version.body["config"].get("placement").is_none(), "{}", version.text);

    // What the autoscaler decided shows per version, on the function and in the list.
    let (version_id, function_id): (Uuid, Uuid) =
        sqlx::query_as("SELECT id, function_id FROM versions WHERE tenant_id = $1")
            .bind(owner.tenant)
            .fetch_one(&mut c)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO autoscaler_state (version_id, tenant_id, function_id, state, desired, placed, ready, panicking, \
         status, reason) VALUES ($1, $2, $3, '{}', 3, 1, 1, true, 'unplaced', 'no room on nodes with accelerator=gpu')",
    )
    .bind(version_id)
    .bind(owner.tenant)
    .bind(function_id)
    .execute(&mut c)
    .await
    .unwrap();
    let expected = json!([{"version": 1, "desired": 3, "placed": 1, "ready": 1, "panicking": true,
                           "status": "unplaced", "reason": "no room on nodes with accelerator=gpu"}]);
    let got = app.get(&path).token(&owner.token).send().await;
    assert_eq!(got.body["scale"], expected, "{}", got.text);
    let list = app.get(&functions_path(owner.tenant)).token(&owner.token).send().await;
    let items = list.body["items"].as_array().unwrap();
    let by_name = |n: &str| items.iter().find(|f| f["name"] == n).unwrap().clone();
    assert_eq!(by_name("thumbs")["scale"], expected, "{}", list.text);
    assert_eq!(by_name("plain")["scale"], json!([]));
    assert_eq!(by_name("thumbs")["placement"]["priority"], "low");

    // Invalid settings are named, on create and on update; nothing is stored.
    let bad = create_function(
        &app,
        &owner,
        json!({"name": "bad", "runtime": "wasm", "scaling": {"target_utilization": 1.5},
               "placement": {"required": {"-gpu": "yes"}}}),
    )
    .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let fields: Vec<(&str, &str)> = bad.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["field"].as_str().unwrap(), e["rule"].as_str().unwrap()))
        .collect();
    assert_eq!(
        fields,
        [("scaling.target_utilization", "out_of_range"), ("placement.required.-gpu", "invalid_label_key")],
        "{}",
        bad.text
    );
    let bad = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"scaling": {"target_utilization": 0}}))
        .send()
        .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "scaling.target_utilization", "{}", bad.text);
    let unknown = app
        .patch(&path)
        .token(&owner.token)
        .header("if-match", "*")
        .json(json!({"scaling": {"target_utilisation": 0.5}}))
        .send()
        .await;
    unknown.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(unknown.body["errors"][0]["rule"], "unknown_field", "{}", unknown.text);
    let now = app.get(&path).token(&owner.token).send().await;
    assert_eq!(now.body["scaling"], json!({"panic_threshold": 3.0}), "refused updates change nothing");
    assert_eq!(count(&app, "functions").await, 2);
}
