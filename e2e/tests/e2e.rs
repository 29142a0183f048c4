//! Whole-system tests with the real binary.

use std::time::Duration;

use nimbus_e2e::{Running, client, drop_database, fresh_database};
use serde_json::{Value, json};

#[tokio::test]
async fn serve_signs_up_verifies_tokens_by_jwks_and_stops_gracefully() {
    let (db, url) = fresh_database().await.unwrap();
    let mut api = Running::start(&["serve", "--listen", "127.0.0.1:0"], &[("DATABASE_URL", &url)]).unwrap();
    let line = api.wait_for_line("listening on", Duration::from_secs(60)).unwrap();
    let base = line.trim_start_matches("listening on ").trim().to_owned();
    let http = client();

    let res = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({"email": "e2e@example.com", "password": "correct horse battery", "display_name": "E", "tenant_name": "e2e"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let token = body["tokens"]["access_token"].as_str().unwrap().to_owned();

    // A client that knows only the JWKS URL verifies the token.
    let jwks: jsonwebtoken::jwk::JwkSet =
        http.get(format!("{base}/.well-known/jwks.json")).send().await.unwrap().json().await.unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["nimbus-api"]);
    v.set_issuer(&[base.as_str()]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &v).unwrap().claims;
    assert_eq!(claims["sub"], body["user_id"]);

    let me: Value = http.get(format!("{base}/v1/me")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(me["user"]["email"], "e2e@example.com");

    let status = api.terminate().unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");
    drop_database(&db).await;
}

#[tokio::test]
async fn unknown_settings_are_rejected() {
    let out = std::process::Command::new(nimbus_e2e::api_binary())
        .args(["serve", "--database-url", "postgres://x@127.0.0.1/none"])
        .env("NIMBUS_LISTN", "127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown setting") && stderr.contains("NIMBUS_LISTN"), "{stderr}");
    // An unknown flag is an error too.
    let out = std::process::Command::new(nimbus_e2e::api_binary()).args(["serve", "--listn", "x"]).output().unwrap();
    assert!(!out.status.success());
}

async fn sign_in_through_the_console(base: &str, email: &str, password: &str) -> String {
    let http = client();
    let res = http
        .post(format!("{base}/console/sign-in"))
        .form(&[("email", email), ("password", password)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "{:?}", res.text().await);
    let cookies: Vec<String> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect();
    let page = http.get(format!("{base}/console")).header("cookie", cookies.join("; ")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    page.text().await.unwrap()
}

#[tokio::test]
async fn local_run_starts_a_private_postgres_and_prints_a_working_login() {
    let dir = std::env::temp_dir().join(format!("nimbus-e2e-{}", uuid::Uuid::now_v7().simple()));
    let dir_s = dir.to_str().unwrap().to_owned();
    let args = ["local", "--data-dir", &dir_s, "--listen", "127.0.0.1:0"];

    let mut run = Running::start(&args, &[]).unwrap();
    let login_line = run.wait_for_line("login:", Duration::from_secs(180)).unwrap();
    let console =
        run.seen.iter().find(|l| l.contains("console:")).unwrap().split_whitespace().last().unwrap().to_owned();
    let base = console.trim_end_matches("/console").to_owned();
    let login: Vec<&str> = login_line.split_whitespace().collect();
    let (email, password) = (login[1].to_owned(), login[3].to_owned());
    assert_eq!(email, "admin@nimbus.local");

    let page = sign_in_through_the_console(&base, &email, &password).await;
    assert!(page.contains("admin@nimbus.local") && page.contains("<td>default</td>"), "{page}");
    run.wait_for_line("agent:    local-1", Duration::from_secs(10)).unwrap();
    // Code packages go to the data folder; secrets can be stored (a key was generated and kept).
    let http = client();
    let token = sign_in(&base, &email, &password).await;
    let tenant = default_tenant(&base, &token).await;
    let res = http
        .post(format!("{base}/v1/tenants/{tenant}/functions"))
        .bearer_auth(&token)
        .json(&json!({"name": "hello", "runtime": "wasm", "environment": {"TOKEN": {"value": "t0ken-value", "secret": true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    let res = http
        .put(format!("{base}/v1/tenants/{tenant}/functions/hello/code"))
        .bearer_auth(&token)
        .header("content-type", "application/wasm")
        .body(hello_wasm())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201, "{:?}", res.text().await);
    assert_eq!(std::fs::read_dir(dir.join("packages/sha256")).unwrap().count(), 1, "stored under the data folder");
    // The one local agent joins: the first admin is a platform admin and sees it ready.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Value =
            http.get(format!("{base}/v1/nodes")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        if nodes["items"]
            .as_array()
            .is_some_and(|n| n.len() == 1 && n[0]["name"] == "local-1" && n[0]["state"] == "ready")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the local agent never joined: {nodes}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = std::fs::read_to_string(dir.join("secrets-key")).unwrap();
    assert!(run.terminate().unwrap().success());
    assert!(!dir.join("postgres/postmaster.pid").exists(), "the private PostgreSQL is stopped on exit");

    // The next run reuses the data folder: same login, same data.
    let mut again = Running::start(&args, &[]).unwrap();
    let login_again = again.wait_for_line("login:", Duration::from_secs(120)).unwrap();
    assert_eq!(login_again, login_line);
    let base = again
        .seen
        .iter()
        .find(|l| l.contains("console:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .trim_end_matches("/console")
        .to_owned();
    let page = sign_in_through_the_console(&base, &email, &password).await;
    assert!(page.contains("<td>default</td>"));
    assert!(again.terminate().unwrap().success());
    assert_eq!(std::fs::read_to_string(dir.join("secrets-key")).unwrap(), key, "the secrets key is kept");
    let _ = std::fs::remove_dir_all(&dir);
}

fn hello_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
                   (memory (export "memory") 1)
                   (func (export "_start") (call $exit (i32.const 0))))"#,
    )
    .unwrap()
}

async fn sign_in(base: &str, email: &str, password: &str) -> String {
    let res = client()
        .post(format!("{base}/v1/auth/signin"))
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

async fn default_tenant(base: &str, token: &str) -> String {
    let tenants: Value =
        client().get(format!("{base}/v1/tenants")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    tenants["items"][0]["id"].as_str().unwrap().to_owned()
}

/// Secret values of environment variables appear in no response and no log line, even with
/// debug logging, across create, update, read, list, publish, the audit log and a refused request.
#[tokio::test]
async fn secret_values_never_appear_in_responses_or_logs() {
    let (db, url) = fresh_database().await.unwrap();
    let packages = std::env::temp_dir().join(format!("nimbus-e2e-pkg-{}", uuid::Uuid::now_v7().simple()));
    let keys = "e2e:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("NIMBUS_LOG", "debug"),
        ("NIMBUS_SECRETS_KEYS", keys),
        ("NIMBUS_PACKAGE_DIR", packages.to_str().unwrap()),
    ];
    let mut api = Running::start(&["serve", "--listen", "127.0.0.1:0"], &env).unwrap();
    let line = api.wait_for_line("listening on", Duration::from_secs(60)).unwrap();
    let base = line.split("listening on ").nth(1).unwrap().trim().to_owned();
    let http = client();
    let res = http
        .post(format!("{base}/v1/auth/signup"))
        .json(&json!({"email": "s@example.com", "password": "correct horse battery", "display_name": "S", "tenant_name": "s"}))
        .send()
        .await
        .unwrap();
    let body: Value = res.json().await.unwrap();
    let token = body["tokens"]["access_token"].as_str().unwrap().to_owned();
    let tenant = body["tenant"]["id"].as_str().unwrap().to_owned();
    let fns = format!("{base}/v1/tenants/{tenant}/functions");

    let (first, second) = ("pa55-first-SECRET-value", "pa55-second-SECRET-value");
    let mut bodies = Vec::new();
    let res = http
        .post(&fns)
        .bearer_auth(&token)
        .json(&json!({"name": "api", "runtime": "wasm", "environment": {"DB_PASSWORD": {"value": first, "secret": true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    bodies.push(res.text().await.unwrap());
    let res = http
        .patch(format!("{fns}/api"))
        .bearer_auth(&token)
        .header("if-match", "*")
        .json(&json!({"environment": {"DB_PASSWORD": {"value": second, "secret": true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    bodies.push(res.text().await.unwrap());
    // Refused: a reserved name carrying a secret value.
    let res = http
        .patch(format!("{fns}/api"))
        .bearer_auth(&token)
        .header("if-match", "*")
        .json(&json!({"environment": {"NIMBUS_X": {"value": first, "secret": true}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    bodies.push(res.text().await.unwrap());
    let res = http
        .put(format!("{fns}/api/code"))
        .bearer_auth(&token)
        .header("content-type", "application/wasm")
        .body(hello_wasm())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    bodies.push(res.text().await.unwrap());
    for (method, path) in [("post", "/api/versions"), ("get", "/api"), ("get", ""), ("get", "/api/versions/1")] {
        let req = if method == "post" {
            http.post(format!("{fns}{path}")).json(&json!({}))
        } else {
            http.get(format!("{fns}{path}"))
        };
        let res = req.bearer_auth(&token).send().await.unwrap();
        assert!(res.status().is_success(), "{method} {path}: {}", res.status());
        bodies.push(res.text().await.unwrap());
    }
    let audit = http.get(format!("{base}/v1/tenants/{tenant}/audit-log")).bearer_auth(&token).send().await.unwrap();
    bodies.push(audit.text().await.unwrap());

    let (status, lines) = api.finish().unwrap();
    assert!(status.success());
    assert!(lines.len() > 20 && lines.iter().any(|l| l.contains("/functions")), "debug logs were captured: {lines:?}");
    for secret in [first, second] {
        for b in &bodies {
            assert!(!b.contains(secret), "a response carried the secret: {b}");
        }
        for l in &lines {
            assert!(!l.contains(secret), "a log line carried the secret: {l}");
        }
    }
    drop_database(&db).await;
    let _ = std::fs::remove_dir_all(packages);
}
