//! The S3 package store against a real S3-protocol server: `moto_server` (PyPI `moto[server]`),
//! started per test on a free port. `./dev test` installs it when missing.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use axum::http::{Method, StatusCode};
use serde_json::json;

use super::functions::{create_function, functions_path, publish, upload, wasm_module};
use crate::helpers::{TestApp, spawn_app, spawn_app_with};

/// A running moto S3 server, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server runs (pip install 'moto[server]'; ./dev test installs it)");
        let endpoint = format!("http://127.0.0.1:{port}");
        let moto = Moto { child, endpoint };
        // Readiness has no event to await: poll the port until the server answers.
        let deadline = Instant::now() + Duration::from_secs(60);
        let http = reqwest::Client::new();
        while http.get(format!("{}/moto-api/", moto.endpoint)).send().await.is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        moto
    }

    /// App flags that put packages in bucket `bucket` of this server.
    pub fn flags(&self, bucket: &str, spool: &std::path::Path) -> Vec<String> {
        vec![
            format!("--s3-bucket={bucket}"),
            format!("--s3-endpoint={}", self.endpoint),
            "--s3-path-style".into(),
            "--s3-access-key-id=test".into(),
            "--s3-secret-access-key=test".into(),
            "--s3-create-bucket".into(),
            format!("--spool-dir={}", spool.display()),
        ]
    }

    /// Keys in `bucket` under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .endpoint_url(&self.endpoint)
                .force_path_style(true)
                .http_client(nimbus_api::store::http_client())
                .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "test"))
                .build(),
        );
        let out = client.list_objects_v2().bucket(bucket).prefix(prefix).send().await.unwrap();
        out.contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn s3_app(moto: &Moto, bucket: &str) -> (TestApp, std::path::PathBuf) {
    let spool = std::env::temp_dir().join(format!("nimbus-test-spool-{}", uuid::Uuid::now_v7().simple()));
    let flags = moto.flags(bucket, &spool);
    let mut refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    refs.push("--max-package-bytes=65536");
    (spawn_app_with(&refs).await, spool)
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn s3_upload_dedupe_publish_alias_and_refusals() {
    let moto = Moto::start().await;
    let (app, spool) = s3_app(&moto, "packages-a").await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    for name in ["api", "worker"] {
        create_function(&app, &owner, json!({"name": name, "runtime": "wasm"})).await;
    }
    let first = upload(&app, &owner, "api", "application/wasm", wasm_module(1)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert_eq!(first.body["deduplicated"], false);
    let sha = first.body["package"]["sha256"].as_str().unwrap().to_owned();
    let again = upload(&app, &owner, "worker", "application/wasm", wasm_module(1)).await;
    assert_eq!(again.body["deduplicated"], true, "{}", again.text);
    assert_eq!(moto.keys("packages-a", "").await, [format!("packages/sha256/{sha}")]);
    assert_eq!(files_in(&spool), 0, "spool files are gone once stored");

    let v1 = publish(&app, &owner, "api").await;
    assert_eq!(v1.status, StatusCode::CREATED, "{}", v1.text);
    upload(&app, &owner, "api", "application/wasm", wasm_module(2)).await;
    assert_eq!(publish(&app, &owner, "api").await.body["number"], 2);
    let aliases = format!("{}/api/aliases", functions_path(owner.tenant));
    let live = app
        .post(&aliases)
        .token(&owner.token)
        .json(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}}))
        .send()
        .await;
    let etag = live.headers["etag"].to_str().unwrap().to_owned();
    let moved = app
        .req(Method::PUT, &format!("{aliases}/live"))
        .token(&owner.token)
        .header("if-match", &etag)
        .json(json!({"routing": {"weights": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]}}))
        .send()
        .await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.text);
    // The bytes are in S3 and read back intact.
    use nimbus_api::store::ObjectStore;
    assert_eq!(app.state.store.get(&sha).await.unwrap().unwrap().as_ref(), wasm_module(1).as_slice());

    // Invalid and oversize packages leave nothing in the bucket or the spool directory.
    let before = moto.keys("packages-a", "").await.len();
    upload(&app, &owner, "api", "application/wasm", b"not wasm".to_vec())
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    upload(&app, &owner, "api", "application/wasm", vec![0u8; 70_000])
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(moto.keys("packages-a", "").await.len(), before);
    assert_eq!(files_in(&spool), 0);
    let _ = std::fs::remove_dir_all(spool);
}

async fn start_upload(app: &TestApp, token: &str, tenant: uuid::Uuid, bytes: &[u8], sha: &str) -> serde_json::Value {
    let res = app
        .post(&format!("{}/api/uploads", functions_path(tenant)))
        .token(token)
        .json(json!({"size": bytes.len(), "sha256": sha, "content_type": "application/wasm"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    res.body
}

async fn put_presigned(upload: &serde_json::Value, bytes: Vec<u8>) -> reqwest::StatusCode {
    let mut req = reqwest::Client::new().put(upload["url"].as_str().unwrap()).body(bytes);
    for (k, v) in upload["headers"].as_object().unwrap() {
        if !k.eq_ignore_ascii_case("content-length") {
            req = req.header(k, v.as_str().unwrap());
        }
    }
    req.send().await.unwrap().status()
}

fn sha256(bytes: &[u8]) -> String {
    nimbus_api::store::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[tokio::test]
async fn presigned_uploads_go_straight_to_s3_and_are_verified_on_completion() {
    let moto = Moto::start().await;
    let (app, spool) = s3_app(&moto, "packages-b").await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    let base = format!("{}/api/uploads", functions_path(owner.tenant));
    let bytes = wasm_module(7);
    let sha = sha256(&bytes);

    // Completing before anything was uploaded.
    let up = start_upload(&app, &owner.token, owner.tenant, &bytes, &sha).await;
    let complete = format!("{base}/{}/complete", up["id"].as_str().unwrap());
    app.post(&complete).token(&owner.token).send().await.assert_problem(StatusCode::CONFLICT, "upload_not_received");
    assert!(put_presigned(&up, bytes.clone()).await.is_success());
    let done = app.post(&complete).token(&owner.token).send().await;
    assert_eq!(done.status, StatusCode::CREATED, "{}", done.text);
    assert_eq!(done.body["package"]["sha256"], sha.as_str());
    assert_eq!(moto.keys("packages-b", "uploads/").await.len(), 0, "the staging object is gone");
    assert_eq!(moto.keys("packages-b", "packages/").await, [format!("packages/sha256/{sha}")]);
    app.post(&complete).token(&owner.token).send().await.assert_problem(StatusCode::CONFLICT, "upload_completed");
    let fun = app.get(&format!("{}/api", functions_path(owner.tenant))).token(&owner.token).send().await;
    assert_eq!(fun.body["package"]["sha256"], sha.as_str());

    // Other bytes than declared (same length): refused, and the uploaded object deleted.
    let other = wasm_module(8);
    assert_eq!(other.len(), bytes.len());
    let up = start_upload(&app, &owner.token, owner.tenant, &bytes, &sha).await;
    assert!(put_presigned(&up, other).await.is_success());
    let res = app.post(&format!("{base}/{}/complete", up["id"].as_str().unwrap())).token(&owner.token).send().await;
    res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    assert_eq!(res.body["errors"][0]["field"], "sha256");
    assert_eq!(moto.keys("packages-b", "uploads/").await.len(), 0);

    // A length other than declared: S3 refuses it (the length is signed; moto does not check
    // signatures), and completion refuses it in any case.
    let up = start_upload(&app, &owner.token, owner.tenant, &bytes, &sha).await;
    if put_presigned(&up, vec![0u8; bytes.len() + 5]).await.is_success() {
        let res = app.post(&format!("{base}/{}/complete", up["id"].as_str().unwrap())).token(&owner.token).send().await;
        res.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
        assert_eq!(res.body["errors"][0]["field"], "size");
    }
    assert_eq!(moto.keys("packages-b", "uploads/").await.len(), 0);

    // An invalid module that matches its declaration: validated like any upload.
    let junk = b"\0asm\x01\0\0\0garbage".to_vec();
    let up = start_upload(&app, &owner.token, owner.tenant, &junk, &sha256(&junk)).await;
    assert!(put_presigned(&up, junk).await.is_success());
    app.post(&format!("{base}/{}/complete", up["id"].as_str().unwrap()))
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid_package");
    assert_eq!(moto.keys("packages-b", "packages/").await.len(), 1, "only the good package is stored");

    // Declared sizes over the limit are refused up front; another tenant cannot complete ours.
    app.post(&base)
        .token(&owner.token)
        .json(json!({"size": 1 << 30, "sha256": sha, "content_type": "application/wasm"}))
        .send()
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let stranger = app.sign_up("x@example.com", "other").await;
    // The stranger has a function of the same name: the upload id still leads nowhere.
    create_function(&app, &stranger, json!({"name": "api", "runtime": "wasm"})).await;
    let up = start_upload(&app, &owner.token, owner.tenant, &bytes, &sha).await;
    app.post(&format!("{}/api/uploads/{}/complete", functions_path(stranger.tenant), up["id"].as_str().unwrap()))
        .token(&stranger.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    let _ = std::fs::remove_dir_all(spool);
}

#[tokio::test]
async fn an_upload_is_completed_once_even_when_completed_twice_at_the_same_time() {
    let moto = Moto::start().await;
    let (app, spool) = s3_app(&moto, "packages-c").await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    let bytes = wasm_module(9);
    let up = start_upload(&app, &owner.token, owner.tenant, &bytes, &sha256(&bytes)).await;
    assert!(put_presigned(&up, bytes.clone()).await.is_success());
    let complete = format!("{}/api/uploads/{}/complete", functions_path(owner.tenant), up["id"].as_str().unwrap());
    let (a, b) =
        tokio::join!(app.post(&complete).token(&owner.token).send(), app.post(&complete).token(&owner.token).send());
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 409], "{} / {}", a.text, b.text);
    let loser = if a.status == StatusCode::CONFLICT { &a } else { &b };
    assert!(
        ["upload_in_progress", "upload_completed"].contains(&loser.body["code"].as_str().unwrap()),
        "{}",
        loser.text
    );
    let packages = app.get(&format!("{}/api/packages", functions_path(owner.tenant))).token(&owner.token).send().await;
    assert_eq!(packages.body["items"].as_array().unwrap().len(), 1);
    let _ = std::fs::remove_dir_all(spool);
}

#[tokio::test]
async fn presigned_uploads_need_the_s3_store() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await;
    app.post(&format!("{}/api/uploads", functions_path(owner.tenant)))
        .token(&owner.token)
        .json(json!({"size": 10, "sha256": "0".repeat(64), "content_type": "application/wasm"}))
        .send()
        .await
        .assert_problem(StatusCode::NOT_IMPLEMENTED, "presigned_uploads_unavailable");
}
