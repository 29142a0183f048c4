//! The invocation listener: the gateway sends any method to `/invoke/{version_id}[/{path}]` with
//! `Authorization: Bearer <invoke secret>`; the answer is the function's status, headers and
//! body, plus `x-nimbus-invocation-id`, `x-nimbus-cold-start` and, on failure, `x-nimbus-error`.
//! Bodies stream both ways: a request body with a declared length goes into the function's stdin
//! as it arrives (one without is collected first, up to the limit), and the response goes out
//! once the function's header block is complete, its body as the function writes it. A failure
//! known before the head goes out is the usual error response with `x-nimbus-error`; one after
//! (timeout, response too large, crash, exit code) can only end the body abruptly, and shows in
//! the usage record and the log.
//! Refusals of the listener itself are problem+json: 401 `unauthorized`, 404
//! `version_not_assigned`, 503 `version_not_ready` or `draining`, 413 `body_too_large`, 429
//! `queue_full`.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use nimbus_protocol::{HEADER_COLD_START, HEADER_CREDENTIAL, HEADER_ERROR, HEADER_INVOCATION_ID};
use ring::digest::{SHA256, digest};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::{
    invoke::Invoker,
    problem::Problem,
    registry::Lookup,
    runtime::{
        Invocation, Outcome,
        stream::{Head, Io, Stdin, response_channel},
    },
};

/// The secret the gateway must present; kept as its SHA-256 so that comparing takes the same
/// time whatever the presented value is.
#[derive(Debug, Default)]
pub struct InvokeAuth {
    digest: RwLock<Option<[u8; 32]>>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl InvokeAuth {
    /// Accepts `secret` from now on (and no earlier one).
    pub fn set(&self, secret: &str) {
        *self.digest.write().unwrap_or_else(|p| p.into_inner()) = Some(sha256(secret.as_bytes()));
    }

    /// Whether an `Authorization` header value carries the secret.
    pub fn allows(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(expected) = *self.digest.read().unwrap_or_else(|p| p.into_inner()) else { return false };
        let Some(value) = authorization.map(HeaderValue::as_bytes) else { return false };
        let Some(token) = value.get(..7).filter(|s| s.eq_ignore_ascii_case(b"bearer ")).map(|_| &value[7..]) else {
            return false;
        };
        let presented = sha256(token);
        // Constant time: every byte is looked at whatever the first difference.
        presented.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// What the listener's handlers share.
pub struct Listener {
    /// Runs invocations.
    pub invoker: Arc<Invoker>,
    /// Checks the gateway's secret.
    pub auth: Arc<InvokeAuth>,
    /// Set when the agent drains: new invocations are refused.
    pub draining: Arc<AtomicBool>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// The control plane's URL, handed to functions as `NIMBUS_API_URL`.
    pub api_url: Option<String>,
}

/// The listener's routes.
pub fn router(listener: Arc<Listener>) -> Router {
    Router::new()
        .route("/invoke/{version_id}", any(invoke))
        .route("/invoke/{version_id}/", any(invoke))
        .route("/invoke/{version_id}/{*path}", any(invoke))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(listener)
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1), the credential
/// the gateway used, and `proxy` (httpoxy: it would become `HTTP_PROXY`, which many HTTP
/// clients in the function would take as their proxy): none of them reach the function.
const NOT_FORWARDED: [&str; 12] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "proxy",
    HEADER_CREDENTIAL,
];

fn forwarded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|n| n.trim().to_ascii_lowercase()))
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !NOT_FORWARDED.contains(&name.as_str()) && !listed.iter().any(|l| l == name.as_str()))
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect()
}

async fn invoke(
    State(listener): State<Arc<Listener>>,
    params: Result<Path<HashMap<String, String>>, axum::extract::rejection::PathRejection>,
    request: Request,
) -> Response {
    let received = Instant::now();
    if !listener.auth.allows(request.headers().get(header::AUTHORIZATION)) {
        return Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid invoke secret is required")
            .into_response();
    }
    if listener.draining.load(Ordering::Relaxed) {
        return Problem::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "this node is shutting down")
            .retry_after(1)
            .into_response();
    }
    let Ok(Path(params)) = params else {
        return Problem::new(StatusCode::BAD_REQUEST, "invalid_path", "the path is not valid UTF-8").into_response();
    };
    let raw_id = params.get("version_id").map(String::as_str).unwrap_or_default();
    let not_assigned = || {
        Problem::new(StatusCode::NOT_FOUND, "version_not_assigned", format!("version {raw_id} is not assigned here"))
            .into_response()
    };
    let Ok(version_id) = raw_id.parse::<Uuid>() else { return not_assigned() };
    let version = match listener.invoker.registry.lookup(version_id) {
        Lookup::Ready(v) => v,
        Lookup::NotReady => {
            return Problem::new(StatusCode::SERVICE_UNAVAILABLE, "version_not_ready", "the version is not ready yet")
                .retry_after(1)
                .into_response();
        }
        Lookup::Unknown => return not_assigned(),
    };

    let (parts, body) = request.into_parts();
    let too_large = || {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {} bytes", listener.max_body_bytes),
        )
        .into_response()
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > listener.max_body_bytes as u64) {
        return too_large();
    }
    // With a declared length (which hyper holds the body to), the body streams into the
    // function as it arrives; without one it is collected first, for `CONTENT_LENGTH`.
    let (body, stdin) = match declared {
        Some(length) => {
            let (tx, chunks) = tokio::sync::mpsc::channel(8);
            // Until the body ends or breaks off, or nobody takes it any more (the function ended,
            // or the invocation was refused before it started).
            tokio::spawn(async move {
                let mut body = body;
                loop {
                    let frame = tokio::select! {
                        frame = body.frame() => frame,
                        () = tx.closed() => break,
                    };
                    let Some(Ok(frame)) = frame else { break };
                    let Ok(data) = frame.into_data() else { continue };
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
            });
            (Vec::new(), Some(Stdin { length, chunks }))
        }
        None => match Limited::new(body, listener.max_body_bytes).collect().await {
            Ok(collected) => (collected.to_bytes().to_vec(), None),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
            Err(_) => {
                return Problem::new(StatusCode::BAD_REQUEST, "body_unreadable", "the request body could not be read")
                    .into_response();
            }
        },
    };

    let id = parts
        .headers
        .get(HEADER_INVOCATION_ID)
        .and_then(|v| v.to_str().ok()?.parse::<Uuid>().ok())
        .unwrap_or_else(Uuid::now_v7);
    let path = params.get("path").map(|p| format!("/{p}")).unwrap_or_else(|| "/".to_owned());
    let inv = Invocation {
        id: id.to_string(),
        function: version.assignment.function.clone(),
        version: version.assignment.version,
        method: parts.method.as_str().to_owned(),
        path,
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: forwarded_headers(&parts.headers),
        body,
        env: version.assignment.env.clone(),
        api_url: listener.api_url.clone(),
        credential: parts.headers.get(HEADER_CREDENTIAL).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };

    // Waiting for a slot is bounded like the invocation itself would be.
    let queue_wait = Duration::from_millis(u64::from(version.assignment.timeout_ms.max(1000)));
    let slot = match tokio::time::timeout(queue_wait, version.limiter().acquire()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) => {
            return Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                "the version runs as many invocations as it may and its queue is full",
            )
            .retry_after(1)
            .into_response();
        }
        Err(_) => {
            return Problem::new(StatusCode::TOO_MANY_REQUESTS, "queue_timeout", "no slot became free in time")
                .retry_after(1)
                .into_response();
        }
    };

    // The invocation runs on its own task: a caller that goes away neither stops it halfway
    // nor keeps its usage from being recorded, and a panic ends only that task.
    let invoker = listener.invoker.clone();
    let span = tracing::info_span!("invocation", invocation_id = %id, %version_id);
    let (sink, source) = response_channel();
    let io = Io { stdin, response: Some(sink) };
    let task = tokio::spawn(
        async move {
            let outcome = invoker.run(&version, id, inv, received, io).await;
            drop(slot);
            outcome
        }
        .instrument(span),
    );
    // The head comes as soon as the function's header block is complete; without it (the
    // function ended first, or failed before), the outcome holds the whole response.
    if let Ok(head) = source.head.await {
        return streamed(id, head, source.body, task);
    }
    match task.await {
        Ok(outcome) => respond(id, outcome),
        Err(e) => {
            tracing::error!(invocation_id = %id, error = %e, "the invocation task failed");
            let mut response =
                Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the invocation failed").into_response();
            set_invocation_headers(response.headers_mut(), id, false);
            response
        }
    }
}

/// A response that streams: the head now, then the body as the function writes it. The body
/// ends only once the invocation has (its usage is spooled by then); a failure after the head
/// (timeout, response too large, crash, exit code) ends it abruptly — an incomplete chunked
/// body — since the status and headers are gone already.
fn streamed(
    id: Uuid,
    head: Head,
    body: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
    task: tokio::task::JoinHandle<Outcome>,
) -> Response {
    let chunks = futures_util::stream::unfold(Some((body, task)), |state| async move {
        let (mut body, task) = state?;
        if let Some(chunk) = body.recv().await {
            return Some((Ok(chunk), Some((body, task))));
        }
        match task.await {
            Ok(outcome) if outcome.response.failure.is_none() => None,
            Ok(outcome) => {
                let reason = outcome.response.failure.map_or("failed", |f| f.as_str());
                Some((
                    Err(std::io::Error::other(format!("the function failed after its response began: {reason}"))),
                    None,
                ))
            }
            Err(e) => Some((Err(std::io::Error::other(format!("the invocation task failed: {e}"))), None)),
        }
    });
    let mut response = respond(
        id,
        Outcome {
            response: head.response,
            log: Vec::new(),
            log_truncated: false,
            cold_start: head.cold_start,
            duration: Duration::ZERO,
        },
    );
    *response.body_mut() = Body::from_stream(chunks);
    response
}

fn set_invocation_headers(headers: &mut HeaderMap, id: Uuid, cold_start: bool) {
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        headers.insert(HEADER_INVOCATION_ID, v);
    }
    headers.insert(HEADER_COLD_START, HeaderValue::from_static(if cold_start { "true" } else { "false" }));
}

/// The caller's response: the function's, with the platform's headers (a function cannot set
/// `x-nimbus-*` headers itself).
fn respond(id: Uuid, outcome: Outcome) -> Response {
    let r = outcome.response;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = Response::new(Body::from(r.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in &r.headers {
        if name.to_ascii_lowercase().starts_with("x-nimbus-") {
            continue;
        }
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    set_invocation_headers(headers, id, outcome.cold_start);
    if let Some(reason) = r.failure {
        headers.insert(HEADER_ERROR, HeaderValue::from_static(reason.as_str()));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_checked_whole_and_only_as_a_bearer_token() {
        let auth = InvokeAuth::default();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(!auth.allows(Some(&h("Bearer anything"))), "nothing passes before a secret is set");
        auth.set("nis_right");
        assert!(auth.allows(Some(&h("Bearer nis_right"))));
        assert!(auth.allows(Some(&h("bearer nis_right"))));
        for wrong in ["Bearer nis_wrong", "Bearer nis_righ", "Basic nis_right", "nis_right", "Bearer", ""] {
            assert!(!auth.allows(Some(&h(wrong))), "{wrong:?}");
        }
        assert!(!auth.allows(None));
    }

    #[test]
    fn hop_by_hop_headers_the_credential_and_proxy_stay_behind() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer s"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
            ("x-test", "yes"),
            ("proxy", "http://evil.example:3128"),
            ("x-nimbus-credential", "nrc_token"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut names: Vec<String> = forwarded_headers(&headers).into_iter().map(|(k, _)| k).collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-test"]);
    }
}
