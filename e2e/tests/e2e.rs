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
    let _ = std::fs::remove_dir_all(&dir);
}
