//! A small stand-in for the control plane's agent endpoints over real HTTP: join (with a fixed
//! token, which can be revoked), renew, desired state (long poll), reports, usage (records every
//! batch; can be made to fail, to answer any status, or to refuse batches holding given records
//! as invalid), leave (which keeps the credential, as the control plane does: a restarted agent
//! renews), and code downloads (the desired state names them by path, `/agent/v1/code/<sha256>`,
//! as the control plane does for its local store). It remembers everything the agent sent.

#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use nimbus_protocol::{Credential, DesiredState, JoinRequest, JoinResponse, Report, UsageAck, UsageBatch};
use uuid::Uuid;

/// The join token the fake accepts.
pub const TOKEN: &str = "njt_test-token";

/// What the fake saw and what it answers.
pub struct State0 {
    pub node_id: Uuid,
    pub invoke_secret: String,
    pub credential: Mutex<String>,
    pub credential_ttl: Mutex<chrono::Duration>,
    pub joins: Mutex<Vec<JoinRequest>>,
    pub renews: AtomicUsize,
    pub leaves: AtomicUsize,
    pub reports: Mutex<Vec<Report>>,
    pub batches: Mutex<Vec<UsageBatch>>,
    pub fail_usage: AtomicBool,
    /// Refuse usage batches with 422 (as invalid).
    pub reject_usage: AtomicBool,
    /// Answer usage batches with this status (0: answer normally).
    pub usage_status: AtomicU16,
    /// Refuse (422) any usage batch holding a record of one of these invocations.
    pub poisoned: Mutex<HashSet<Uuid>>,
    /// Usage batches answered 422.
    pub refused_batches: AtomicUsize,
    /// Refuse every join (401), as for a revoked join token.
    pub token_revoked: AtomicBool,
    /// Joins refused.
    pub refused_joins: AtomicUsize,
    pub desired: Mutex<DesiredState>,
    pub code: Mutex<HashMap<String, Vec<u8>>>,
    /// The `Authorization` of each code download.
    pub code_auth: Mutex<Vec<Option<String>>>,
    /// Serve code to anyone (as a presigned object-store URL would).
    pub open_code: AtomicBool,
}

/// A running fake.
pub struct FakeCp {
    pub url: String,
    pub state: Arc<State0>,
}

type Shared = Arc<State0>;

fn authorized(state: &State0, headers: &HeaderMap) -> bool {
    let expected = format!("Bearer {}", state.credential.lock().unwrap());
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
}

fn new_credential(state: &State0) -> Credential {
    let token = format!("nnc_{}", Uuid::now_v7().simple());
    *state.credential.lock().unwrap() = token.clone();
    Credential { token, expires_at: Utc::now() + *state.credential_ttl.lock().unwrap() }
}

async fn join(State(s): State<Shared>, Json(req): Json<JoinRequest>) -> Response {
    if req.token != TOKEN || s.token_revoked.load(Ordering::Relaxed) {
        s.refused_joins.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.joins.lock().unwrap().push(req);
    let credential = new_credential(&s);
    let body = JoinResponse {
        node_id: s.node_id,
        credential,
        invoke_secret: s.invoke_secret.clone(),
        report_interval_ms: 200,
    };
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn renew(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    s.renews.fetch_add(1, Ordering::Relaxed);
    Json(new_credential(&s)).into_response()
}

async fn desired(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let after: i64 = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let wait: u64 = q.get("wait").and_then(|a| a.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(wait.min(30));
    loop {
        let doc = s.desired.lock().unwrap().clone();
        if doc.revision > after || Instant::now() >= deadline {
            return Json(doc).into_response();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reports(State(s): State<Shared>, headers: HeaderMap, Json(report): Json<Report>) -> StatusCode {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED;
    }
    s.reports.lock().unwrap().push(report);
    StatusCode::NO_CONTENT
}

async fn usage(State(s): State<Shared>, headers: HeaderMap, Json(batch): Json<UsageBatch>) -> Response {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if s.fail_usage.load(Ordering::Relaxed) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let status = s.usage_status.load(Ordering::Relaxed);
    if status != 0 {
        return StatusCode::from_u16(status).unwrap().into_response();
    }
    let poisoned = {
        let poisoned = s.poisoned.lock().unwrap();
        batch.records.iter().any(|r| poisoned.contains(&r.invocation_id))
    };
    if s.reject_usage.load(Ordering::Relaxed) || poisoned {
        s.refused_batches.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNPROCESSABLE_ENTITY, "records[0]: invalid").into_response();
    }
    let accepted = batch.records.len() as u64;
    s.batches.lock().unwrap().push(batch);
    Json(UsageAck { accepted, duplicates: 0 }).into_response()
}

async fn leave(State(s): State<Shared>, headers: HeaderMap) -> StatusCode {
    if !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED;
    }
    // The node is `left`; its credential keeps working, so a restarted agent renews it.
    s.leaves.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

async fn code(State(s): State<Shared>, headers: HeaderMap, Path(sha): Path<String>) -> Response {
    s.code_auth.lock().unwrap().push(headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned));
    if !s.open_code.load(Ordering::Relaxed) && !authorized(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match s.code.lock().unwrap().get(&sha) {
        Some(bytes) => bytes.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

impl FakeCp {
    /// Starts a fake on a free port.
    pub async fn start() -> FakeCp {
        let node_id = Uuid::now_v7();
        let state = Arc::new(State0 {
            node_id,
            invoke_secret: format!("nis_{}", Uuid::now_v7().simple()),
            credential: Mutex::new(String::from("none yet")),
            credential_ttl: Mutex::new(chrono::Duration::hours(1)),
            joins: Mutex::default(),
            renews: AtomicUsize::new(0),
            leaves: AtomicUsize::new(0),
            reports: Mutex::default(),
            batches: Mutex::default(),
            fail_usage: AtomicBool::new(false),
            reject_usage: AtomicBool::new(false),
            usage_status: AtomicU16::new(0),
            poisoned: Mutex::default(),
            refused_batches: AtomicUsize::new(0),
            token_revoked: AtomicBool::new(false),
            refused_joins: AtomicUsize::new(0),
            desired: Mutex::new(DesiredState { node_id, revision: 1, draining: false, assignments: Vec::new() }),
            code: Mutex::default(),
            code_auth: Mutex::default(),
            open_code: AtomicBool::new(false),
        });
        let app = Router::new()
            .route("/agent/v1/join", post(join))
            .route("/agent/v1/renew", post(renew))
            .route("/agent/v1/desired-state", get(desired))
            .route("/agent/v1/reports", post(reports))
            .route("/agent/v1/usage", post(usage))
            .route("/agent/v1/leave", post(leave))
            .route("/agent/v1/code/{sha256}", get(code))
            .with_state(state.clone());
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
        FakeCp { url, state }
    }

    /// Every usage record received, in order.
    pub fn records(&self) -> Vec<nimbus_protocol::UsageRecord> {
        self.state.batches.lock().unwrap().iter().flat_map(|b| b.records.clone()).collect()
    }

    /// Every log line received, in order.
    pub fn logs(&self) -> Vec<nimbus_protocol::LogLine> {
        self.state.batches.lock().unwrap().iter().flat_map(|b| b.logs.clone()).collect()
    }

    /// Makes every credential issued so far invalid (the next call gets 401).
    pub fn revoke(&self) {
        *self.state.credential.lock().unwrap() = "revoked".into();
    }

    /// The code URL of package `sha256` as the control plane sends it for its local store: a
    /// path, resolved by the agent against its control-plane URL.
    pub fn code_path(sha256: &str) -> String {
        format!("/agent/v1/code/{sha256}")
    }

    /// Replaces the desired state with `assignments` at the next revision.
    pub fn assign(&self, assignments: Vec<nimbus_protocol::Assignment>) {
        let mut d = self.state.desired.lock().unwrap();
        d.revision += 1;
        d.assignments = assignments;
    }

    /// The last report, if any.
    pub fn last_report(&self) -> Option<Report> {
        self.state.reports.lock().unwrap().last().cloned()
    }
}
