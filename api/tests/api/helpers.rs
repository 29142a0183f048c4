//! `spawn_app()`: a fresh database, the real router, and request helpers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{HeaderMap, Method, Request, StatusCode},
};
use clap::Parser;
use nimbus_api::{
    auth::keys::KeyRing,
    config::ServerArgs,
    db,
    startup::{self, AppState},
    telemetry,
};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tower::ServiceExt;
use uuid::Uuid;

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    server: ServerArgs,
}

/// The privileged URL of the machine's PostgreSQL.
pub fn admin_url() -> String {
    std::env::var("NIMBUS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn url_for(db: &str) -> String {
    let base = admin_url();
    let (head, _) = base.rsplit_once('/').expect("a database URL");
    format!("{head}/{db}")
}

pub struct TestApp {
    pub router: Router,
    pub state: AppState,
    pub db_name: String,
    pub db_url: String,
    /// The local package store's directory (removed on drop).
    pub package_dir: std::path::PathBuf,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.package_dir);
        let name = self.db_name.clone();
        // Dropping runs outside the test's runtime; a thread with its own runtime removes the database.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                if let Ok(mut c) = PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
                }
            })
        })
        .join();
    }
}

/// Starts the app on a fresh database with default settings plus `flags`.
pub async fn spawn_app_with(flags: &[&str]) -> TestApp {
    telemetry::init_logging(nimbus_api::config::LogFormat::Text, "warn");
    let db_name = format!("nimbus_test_{}", Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&admin_url()).await.expect("connect to the test PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {db_name}")).execute(&mut admin).await.unwrap();
    let db_url = url_for(&db_name);
    db::migrate(&db_url).await.expect("migrations apply");
    let pool = db::connect_app(&db_url, 5).await.unwrap();
    let package_dir = std::env::temp_dir().join(format!("nimbus-test-packages-{}", Uuid::now_v7().simple()));
    let package_flag = format!("--package-dir={}", package_dir.display());
    let secrets_flag = format!("--secrets-keys=test:{}", nimbus_api::secrets::generate_key());
    let mut args = vec!["test"];
    if !flags.iter().any(|f| f.starts_with("--package-dir") || f.starts_with("--s3-bucket")) {
        args.push(&package_flag);
    }
    if !flags.iter().any(|f| f.starts_with("--secrets-keys")) {
        args.push(&secrets_flag);
    }
    // Requests for versions nobody serves wait briefly here (no autoscaler runs in-process).
    if !flags.iter().any(|f| f.starts_with("--gateway-hold-timeout")) {
        args.push("--gateway-hold-timeout=200ms");
    }
    args.extend_from_slice(flags);
    let settings = Flags::parse_from(args).server;
    let keys = KeyRing::load(pool.clone(), "http://nimbus.test".into(), settings.access_token_ttl.0).await.unwrap();
    nimbus_api::extract::set_body_limit_hint(settings.max_body_bytes);
    let state = AppState::new(pool, keys, settings).await.expect("state builds");
    TestApp { router: startup::app(state.clone()), state, db_name, db_url, package_dir }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestResponse {
    /// Asserts a problem+json error with this status and code.
    pub fn assert_problem(&self, status: StatusCode, code: &str) -> &Self {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        assert_eq!(self.body["code"], code, "{}", self.text);
        assert_eq!(self.body["status"], status.as_u16(), "{}", self.text);
        self
    }
}

pub struct Req<'a> {
    app: &'a TestApp,
    method: Method,
    path: String,
    token: Option<String>,
    body: Option<Body>,
    headers: Vec<(String, String)>,
    ip: IpAddr,
}

impl<'a> Req<'a> {
    pub fn token(mut self, t: &str) -> Self {
        self.token = Some(t.to_owned());
        self
    }
    pub fn json(mut self, v: Value) -> Self {
        self.headers.push(("content-type".into(), "application/json".into()));
        self.body = Some(Body::from(v.to_string()));
        self
    }
    pub fn raw(mut self, content_type: &str, body: impl Into<Body>) -> Self {
        if !content_type.is_empty() {
            self.headers.push(("content-type".into(), content_type.into()));
        }
        self.body = Some(body.into());
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn peer_ip(mut self, ip: [u8; 4]) -> Self {
        self.ip = IpAddr::V4(Ipv4Addr::from(ip));
        self
    }
    pub async fn send(self) -> TestResponse {
        let mut b = Request::builder().method(self.method).uri(&self.path);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        let mut req = b.body(self.body.unwrap_or_else(Body::empty)).unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::new(self.ip, 40000)));
        let res = self.app.router.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX).await.unwrap();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        TestResponse { status, headers, body, text }
    }
}

impl TestApp {
    pub fn req(&self, method: Method, path: &str) -> Req<'_> {
        Req {
            app: self,
            method,
            path: path.to_owned(),
            token: None,
            body: None,
            headers: Vec::new(),
            ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        }
    }
    pub fn get(&self, path: &str) -> Req<'_> {
        self.req(Method::GET, path)
    }
    pub fn post(&self, path: &str) -> Req<'_> {
        self.req(Method::POST, path)
    }
    pub fn patch(&self, path: &str) -> Req<'_> {
        self.req(Method::PATCH, path)
    }
    pub fn delete(&self, path: &str) -> Req<'_> {
        self.req(Method::DELETE, path)
    }

    /// Signs up a user with a first tenant named `tenant`.
    pub async fn sign_up(&self, email: &str, tenant: &str) -> User {
        let res = self
            .post("/v1/auth/signup")
            .json(json!({"email": email, "password": PASSWORD, "display_name": "Test User", "tenant_name": tenant}))
            .send()
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        User {
            id: res.body["user_id"].as_str().unwrap().parse().unwrap(),
            tenant: res.body["tenant"]["id"].as_str().unwrap().parse().unwrap(),
            token: res.body["tokens"]["access_token"].as_str().unwrap().to_owned(),
            refresh: res.body["tokens"]["refresh_token"].as_str().unwrap().to_owned(),
            email: email.to_owned(),
        }
    }

    /// Adds `user` to `tenant` with `role`, as `admin`.
    pub async fn add_member(&self, admin: &User, tenant: Uuid, user: &User, role: &str) {
        let res = self
            .post(&format!("/v1/tenants/{tenant}/members"))
            .token(&admin.token)
            .json(json!({"email": user.email, "role": role}))
            .send()
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    }

    /// Creates an API key; returns (id, secret).
    pub async fn create_key(&self, by: &str, tenant: Uuid, role: &str) -> (Uuid, String) {
        let res = self
            .post(&format!("/v1/tenants/{tenant}/api-keys"))
            .token(by)
            .json(json!({"name": "test key", "role": role}))
            .send()
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        (res.body["id"].as_str().unwrap().parse().unwrap(), res.body["secret"].as_str().unwrap().to_owned())
    }

    /// Signs up `ops@example.com` and makes it a platform admin (with the privileged connection).
    pub async fn platform_admin(&self) -> User {
        let admin = self.sign_up("ops@example.com", "ops").await;
        let mut c = self.admin_conn().await;
        sqlx::query("UPDATE users SET is_platform_admin = true WHERE id = $1")
            .bind(admin.id)
            .execute(&mut c)
            .await
            .unwrap();
        admin
    }

    /// A privileged connection to the test database (bypasses RLS: for setting up and checking).
    pub async fn admin_conn(&self) -> PgConnection {
        PgConnection::connect(&self.db_url).await.unwrap()
    }

    /// Audit actions recorded for a tenant (read with the privileged connection), oldest first.
    pub async fn audit_actions(&self, tenant: Option<Uuid>) -> Vec<(String, String)> {
        let mut c = self.admin_conn().await;
        sqlx::query_as("SELECT action, outcome FROM audit_log WHERE tenant_id IS NOT DISTINCT FROM $1 ORDER BY id")
            .bind(tenant)
            .fetch_all(&mut c)
            .await
            .unwrap()
    }
}

pub const PASSWORD: &str = "correct horse battery";

pub struct User {
    pub id: Uuid,
    pub tenant: Uuid,
    pub token: String,
    pub refresh: String,
    pub email: String,
}
