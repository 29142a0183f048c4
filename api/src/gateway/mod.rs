//! The invocation gateway: `ANY /fn/{tenant}/{function}[:{alias-or-version}]/{path...}`.
//!
//! Per request: authenticate (access token or API key), authorize `functions:InvokeFunction`
//! through the one authorization function, resolve the alias (default `live`) to a version with
//! the routing decision of [`crate::routing`], pick the node with the fewest outstanding requests
//! among those with a ready instance (ties toward the caller's zone, `x-nimbus-zone`), and
//! forward to the agent's listener with the node's invoke secret, streaming the request and the
//! response bodies. Routing reads only the in-memory [`table::Routes`].
//!
//! Answers of its own are problem+json: 404 for an unknown tenant, function, alias or version;
//! 503 `no_capacity` (with `Retry-After`) when no node has the version ready; 502
//! `agent_unreachable` when the node cannot be reached (the node is then skipped for a few
//! seconds); 504 `function_timeout` when the agent does not answer within the version's timeout
//! plus a margin. Responses carry `x-nimbus-version` and the agent's `x-nimbus-invocation-id` and
//! `x-nimbus-cold-start`.

pub mod limits;
pub mod table;
pub mod upstream;

use std::{sync::atomic::Ordering, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{RawPathParams, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::any,
};
use nimbus_protocol::{HEADER_COLD_START, HEADER_CREDENTIAL, HEADER_INVOCATION_ID};
use uuid::Uuid;

use crate::{
    auth,
    authz::{self, Action, nrn},
    error::ApiError,
    startup::AppState,
};

pub use table::Routes;

/// The alias a request without a qualifier goes to.
pub const DEFAULT_ALIAS: &str = "live";
/// How much longer than the function's timeout the gateway waits for the agent.
pub const TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// Response header: the version that served the request.
pub const HEADER_VERSION: &str = "x-nimbus-version";
/// Request header: a caller's sticky key (for sticky aliases); else the principal is the key.
pub const HEADER_STICKY_KEY: &str = "x-nimbus-sticky-key";
/// Request header: the caller's zone, to prefer a node there.
pub const HEADER_ZONE: &str = "x-nimbus-zone";

/// The gateway's routes (mounted outside the REST API's OpenAPI document: any method, any path).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/fn/{tenant}/{target}", any(invoke))
        .route("/fn/{tenant}/{target}/", any(invoke))
        .route("/fn/{tenant}/{target}/{*path}", any(invoke))
}

/// Headers about one connection (RFC 9110 §7.6.1), and the caller's credential: never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
];

fn problem(status: StatusCode, code: &'static str, detail: String) -> Response {
    let body = serde_json::json!({
        "type": format!("https://nimbus.dev/problems/{}", code.replace('_', "-")),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::error::PROBLEM_JSON));
    res
}

/// Authenticates like every API route ([`auth::authenticate`]), remembering API keys for
/// [`table::AUTH_TTL`] so that a busy key costs no query per invocation (access tokens are
/// verified in memory anyway).
async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<crate::auth::Principal, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| t.starts_with(crate::api_keys::KEY_PREFIX));
    let Some(key) = presented else { return auth::authenticate(state, headers).await };
    let digest = crate::auth::secret::sha256(key.trim().as_bytes());
    if let Some(p) = state.routes.cached_key(&digest) {
        return Ok(p);
    }
    let p = auth::authenticate(state, headers).await?;
    state.routes.cache_key(digest, p.clone());
    Ok(p)
}

/// What the one decision point ([`authz::decide`]) knows of the principal in `tenant`: cached
/// per process (see [`authz::policies`]), read in a transaction of its own on a miss.
async fn loaded_in(
    state: &AppState,
    principal: &crate::auth::Principal,
    tenant: Uuid,
) -> Result<std::sync::Arc<authz::policies::Loaded>, ApiError> {
    if let Some(l) = authz::policies::cached(principal, tenant) {
        return Ok(l);
    }
    let mut tx = crate::db::begin(&state.pool, &crate::db::Scope::tenant(tenant, principal.user_id())).await?;
    let loaded = authz::policies::load(&mut tx, principal, tenant).await?;
    tx.commit().await?;
    Ok(loaded)
}

/// One request out to a node, counted in its outstanding requests until dropped.
struct Outstanding<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Outstanding<'a> {
    fn take(counter: &'a std::sync::atomic::AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Outstanding(counter)
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether a `Set-Cookie` from a function is scoped below the function's own path (a cookie
/// without `Path` defaults to the request's directory, which is below it).
fn cookie_stays_below(value: &HeaderValue, own_path: &str) -> bool {
    let Ok(text) = value.to_str() else { return false };
    let mut below = true;
    for attr in text.split(';').skip(1) {
        let attr = attr.trim();
        let starts = |p: &str| attr.len() >= p.len() && attr[..p.len()].eq_ignore_ascii_case(p);
        if starts("domain=") {
            return false;
        }
        if starts("path=") {
            let path = &attr[5..];
            below = path == own_path || path.starts_with(&format!("{own_path}/"));
        }
    }
    below
}

/// `{function}[:{qualifier}]`.
fn split_target(target: &str) -> (&str, Option<&str>) {
    match target.split_once(':') {
        Some((f, q)) => (f, Some(q)),
        None => (target, None),
    }
}

/// Handles registered once per replica (after the recorder is installed): the gateway's own
/// counters carry no per-request labels, so a request costs no registry lookup for them.
pub struct GatewayMetrics {
    /// `nimbus_gateway_requests_total` by status class (2xx, 4xx, 5xx).
    requests: [metrics::Counter; 3],
    duration: metrics::Histogram,
    anonymous: metrics::Counter,
    retries: metrics::Counter,
    agent_failures: metrics::Counter,
}

impl GatewayMetrics {
    /// Registers the handles with the installed recorder.
    pub fn register() -> Self {
        GatewayMetrics {
            requests: ["2xx", "4xx", "5xx"].map(|c| metrics::counter!("nimbus_gateway_requests_total", "status" => c)),
            duration: metrics::histogram!("nimbus_gateway_request_duration_seconds"),
            anonymous: metrics::counter!("nimbus_gateway_anonymous_total"),
            retries: metrics::counter!("nimbus_gateway_retries_total"),
            agent_failures: metrics::counter!("nimbus_gateway_agent_failures_total"),
        }
    }
}

/// One version's metric handles (labels from the routing table only, so callers cannot grow
/// the label set), kept in its [`table::VersionEntry`].
#[derive(Debug)]
pub struct VersionMetrics {
    invocations: metrics::Counter,
    /// `nimbus_function_invocations_by_status_total` by status class (2xx, 4xx, 5xx).
    by_status: [metrics::Counter; 3],
    response: metrics::Histogram,
    cold_starts: metrics::Counter,
    queue: metrics::Histogram,
}

impl VersionMetrics {
    fn register(tenant: &str, function: &str, version: u32) -> Self {
        let labels =
            [("tenant", tenant.to_owned()), ("function", function.to_owned()), ("version", version.to_string())];
        VersionMetrics {
            invocations: metrics::counter!("nimbus_function_invocations_total", &labels),
            by_status: ["2xx", "4xx", "5xx"].map(|c| {
                metrics::counter!("nimbus_function_invocations_by_status_total", "status" => c, "function" => function.to_owned())
            }),
            response: metrics::histogram!("nimbus_function_response_seconds", &labels),
            cold_starts: metrics::counter!("nimbus_function_cold_starts_total", "function" => function.to_owned()),
            queue: metrics::histogram!("nimbus_gateway_queue_seconds", "function" => function.to_owned()),
        }
    }
}

/// The index of a status class in the `[2xx, 4xx, 5xx]` handle arrays.
fn class(status: StatusCode) -> usize {
    match status.as_u16() {
        200..=299 => 0,
        400..=499 => 1,
        _ => 2,
    }
}

/// `{base path}/invoke/{version}{path}?{query}` on the node's listener, or `None` when the
/// result would leave the version's endpoint (the URL parser resolves dot segments).
fn agent_url(base: &url::Url, version: Uuid, path: &str, query: Option<&str>) -> Option<url::Url> {
    let mut url = base.clone();
    let prefix = format!("{}/invoke/{version}", base.path().trim_end_matches('/'));
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(query);
    let rest = url.path().strip_prefix(prefix.as_str())?;
    (rest.is_empty() || rest.starts_with('/')).then_some(url)
}

/// The gateway's routes sit outside the REST API's middleware stack (request-id generation,
/// trace spans, per-route HTTP metrics, the request timeout): an invocation is bounded by its
/// function's timeout, counted by the gateway's own metrics, and its request id is the
/// caller's `x-request-id` or else its invocation id, echoed on every answer.
async fn invoke(State(state): State<AppState>, params: RawPathParams, req: Request) -> Response {
    let started = std::time::Instant::now();
    let invocation_id = Uuid::now_v7();
    // A hyphenated UUID is always a valid header value.
    let invocation = HeaderValue::from_str(invocation_id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
        .unwrap_or(HeaderValue::from_static(""));
    let request_id = req.headers().get(REQUEST_ID).cloned().unwrap_or_else(|| invocation.clone());
    let facts = authz::policies::RequestFacts {
        source_ip: crate::auth::source_ip(req.headers(), req.extensions(), state.settings.trust_forwarded_for),
    };
    let routed = route(&state, &params, req, (invocation_id, invocation), &request_id);
    let mut response = match authz::policies::REQUEST.scope(facts, routed).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    let m = &state.gateway_metrics;
    m.requests[class(response.status())].increment(1);
    m.duration.record(started.elapsed().as_secs_f64());
    response.headers_mut().insert(REQUEST_ID, request_id);
    response
}

/// The request-id header.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

async fn route(
    state: &AppState,
    params: &RawPathParams,
    req: Request,
    (invocation_id, invocation): (Uuid, HeaderValue),
    request_id: &HeaderValue,
) -> Result<Response, ApiError> {
    let get = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| v);
    let (tenant_name, target) = (get("tenant").unwrap_or(""), get("target").unwrap_or(""));
    // The path after the function, as the caller sent it (still percent-encoded): the decoded
    // form could carry `/`, `..` or `?` into the agent's URL.
    let raw = req.uri().path();
    let path = raw.splitn(5, '/').nth(4).map(|p| format!("/{p}")).unwrap_or_default();
    let (function_name, qualifier) = split_target(target);

    let table = state.routes.table();
    // Without credentials only a public function can be invoked; for anything else the answer is
    // the same 401 as for every credential-less call, so nothing is told to a stranger.
    let (tenant, function, principal) = if req.headers().contains_key(header::AUTHORIZATION) {
        // Authentication first: nothing about a tenant's functions is told to a stranger.
        let principal = authenticate(state, req.headers()).await?;
        let tenant = *table.tenants.get(tenant_name).ok_or(ApiError::NotFound("tenant"))?;
        let resource = nrn::function(tenant, function_name);
        let function = table.functions.get(&(tenant, function_name.to_owned()));
        let policy = function.and_then(|f| f.policy.as_deref());
        // An API key of another tenant acts with its own tenant's policies, and the function's
        // policy must name it (or its tenant) too.
        let home = principal.home_tenant().unwrap_or(tenant);
        authz::decide_on(
            &*loaded_in(state, &principal, home).await?,
            Action::InvokeFunction,
            &resource,
            tenant,
            policy,
            function.and_then(|f| f.tags.as_ref()),
        )?;
        let function = function.ok_or(ApiError::NotFound("function"))?;
        (tenant, function, Some(principal))
    } else {
        let public =
            table.tenants.get(tenant_name).and_then(|t| table.functions.get(&(*t, function_name.to_owned()))).filter(
                |f| {
                    f.policy.as_deref().is_some_and(|p| {
                        let resource = nrn::function(f.tenant_id, function_name);
                        authz::policies::anonymous_allowed(
                            Action::InvokeFunction,
                            &resource,
                            f.tenant_id,
                            p,
                            f.tags.as_ref(),
                            table.guardrails.get(&f.tenant_id).map(|g| &**g),
                        )
                    })
                },
            );
        let Some(function) = public else { return Err(ApiError::Unauthenticated("missing Authorization header")) };
        state.gateway_metrics.anonymous.increment(1);
        (function.tenant_id, function, None)
    };

    let version = match qualifier.unwrap_or(DEFAULT_ALIAS) {
        q if q.bytes().all(|b| b.is_ascii_digit()) && !q.is_empty() => {
            let n: u32 = q.parse().map_err(|_| ApiError::NotFound("version"))?;
            function.versions.get(&n).ok_or(ApiError::NotFound("version"))?
        }
        alias => {
            let routing = function.aliases.get(alias).ok_or(ApiError::NotFound("alias"))?;
            let headers = req.headers();
            let sticky = routing
                .sticky
                .then(|| headers.get(HEADER_STICKY_KEY).map(|v| v.as_bytes().to_vec()))
                .flatten()
                .unwrap_or_else(|| {
                    if routing.sticky {
                        principal.as_ref().map_or(invocation_id, |p| p.actor().1).as_bytes().to_vec()
                    } else {
                        invocation_id.as_bytes().to_vec()
                    }
                });
            let decision = routing.decide(&sticky, |name| headers.get(name).and_then(|v| v.to_str().ok()));
            function.versions.get(&decision.version).ok_or(ApiError::NotFound("version"))?
        }
    };

    let permit = match state.limits.admit(
        tenant,
        function.id,
        state.settings.tenant_rate_limit,
        state.settings.tenant_max_concurrency,
        function.reserved_concurrency,
    ) {
        Ok(p) => p,
        Err(refusal) => {
            metrics::counter!("nimbus_gateway_refused_total", "limit" => refusal.code()).increment(1);
            let mut res = problem(
                StatusCode::TOO_MANY_REQUESTS,
                refusal.code(),
                format!("over the {} limit; try again shortly", refusal.code().replace('_', " ")),
            );
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Ok(res);
        }
    };

    let metrics = version
        .metrics
        .get_or_init(|| std::sync::Arc::new(VersionMetrics::register(tenant_name, function_name, version.number)));
    let zone = req.headers().get(HEADER_ZONE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let target = match table.pick(version.id, zone.as_deref(), state.routes.now_ms()) {
        Some(t) => t,
        None => {
            // The cold path: hold the request while the autoscaler starts an instance.
            let held_at = std::time::Instant::now();
            let (pool, version_id, replica) = (state.pool.clone(), version.id, state.routes.replica());
            let poke = move |held: u32| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let payload = crate::autoscaler::run::poke_payload(version_id, held, replica);
                    let sent = async {
                        let mut tx = crate::db::begin(&pool, &crate::db::Scope::default()).await?;
                        sqlx::query("SELECT pg_notify($1, $2)")
                            .bind(crate::autoscaler::run::CHANNEL)
                            .bind(payload)
                            .execute(&mut *tx)
                            .await?;
                        tx.commit().await
                    }
                    .await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "poking the autoscaler failed");
                    }
                });
            };
            let settings = &state.settings;
            let held = state
                .routes
                .hold(version.id, zone.as_deref(), settings.gateway_hold_queue, settings.gateway_hold_timeout.0, poke)
                .await;
            // Time in the queue, for requests that were held (not those refused at once).
            if !matches!(held, Err(table::HoldRefusal::Full)) {
                let queued = held_at.elapsed();
                metrics.queue.record(queued.as_secs_f64());
                state.stats.record_queue(tenant, version.id, queued);
            }
            match held {
                Ok(t) => t,
                Err(refusal) => {
                    let (code, detail) = match refusal {
                        table::HoldRefusal::Full => {
                            ("hold_queue_full", "too many requests are waiting for an instance")
                        }
                        table::HoldRefusal::Timeout => ("no_capacity", "no instance became ready in time"),
                    };
                    metrics::counter!("nimbus_gateway_no_capacity_total", "reason" => code).increment(1);
                    let mut res = problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        code,
                        format!("version {} of {function_name}: {detail}; try again shortly", version.number),
                    );
                    res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Ok(res);
                }
            }
        }
    };

    let (parts, body) = req.into_parts();
    // Whatever the path holds, the request must stay below this version's endpoint.
    let dotted = path.split('/').any(|seg| {
        let lower = seg.to_ascii_lowercase();
        seg == "."
            || seg == ".."
            || lower.contains("%2e%2e")
            || lower.contains("%2f")
            || lower.contains("%5c")
            || seg.contains('\\')
    });
    let query = parts.uri.query();
    let url = if dotted { None } else { agent_url(&target.base, version.id, &path, query) };
    let Some(url) = url else {
        return Err(ApiError::InvalidPath(vec![crate::error::FieldError::new(
            "path",
            "no_dot_segments",
            "the path after the function may not hold `.`/`..` segments or encoded slashes",
        )]));
    };
    let mut headers = HeaderMap::with_capacity(parts.headers.len() + 4);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && !name.as_str().starts_with("x-nimbus-") {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(HeaderName::from_static(HEADER_INVOCATION_ID), invocation);
    headers.insert(REQUEST_ID, request_id.clone());
    if let Some(role) = function.execution_role {
        let credential = state.routes.credential(&state.keys, tenant, function.id, role)?;
        headers.insert(HeaderName::from_static(HEADER_CREDENTIAL), credential);
    }

    // A request that is safe to send twice (an idempotent method without a body) goes to another
    // node when the first cannot be reached or drops the connection before answering.
    let retry_safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS)
        && axum::body::HttpBody::size_hint(&body).exact() == Some(0);
    let mut body = Some(body);
    let mut target = target;
    let mut url = Some(url);
    let mut retried = false;
    let forwarded = std::time::Instant::now();
    let sent = loop {
        headers.insert(header::AUTHORIZATION, target.authorization.clone());
        // Only a request that may be retried keeps a copy of its URL and headers.
        let (attempt_url, attempt_headers) = match url.take() {
            Some(u) if retry_safe => (u, headers.clone()),
            Some(u) => (u, std::mem::take(&mut headers)),
            None => match agent_url(&target.base, version.id, &path, query) {
                Some(u) => (u, headers.clone()),
                None => break Ok(None),
            },
        };
        let request_body = match body.take() {
            Some(b) if !retry_safe => b,
            _ => Body::empty(),
        };
        let Ok(uri) = axum::http::Uri::try_from(&attempt_url[url::Position::BeforePath..]) else { break Ok(None) };
        let mut request = axum::http::Request::new(request_body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = attempt_headers;
        // Counted while the request to the agent is out; the guard gives the count back even
        // when the caller goes away and this future is dropped mid-request.
        let outstanding = Outstanding::take(&target.outstanding);
        // A retry gets what is left of the one deadline, not a new one.
        let left = (version.timeout + TIMEOUT_MARGIN).saturating_sub(forwarded.elapsed());
        let deadline = tokio::time::Instant::now() + left.max(Duration::from_millis(1));
        let sent = target.links.send(request, deadline).await;
        drop(outstanding);
        match sent {
            Err(e) if retry_safe && !retried && !e.is_timeout() => {
                if e.is_connect() {
                    target.failed_at.store(state.routes.now_ms().max(1), Ordering::Relaxed);
                }
                let other =
                    state.routes.table().pick_other(version.id, zone.as_deref(), state.routes.now_ms(), target.node_id);
                match other {
                    // One retry: the next failure is the answer.
                    Some(t) if forwarded.elapsed() < version.timeout => {
                        state.gateway_metrics.retries.increment(1);
                        tracing::info!(node = %target.node_id, error = %e, "retrying an idempotent request on another node");
                        target = t;
                        retried = true;
                        continue;
                    }
                    _ => break Err(e),
                }
            }
            sent => break sent.map(Some),
        }
    };
    // Per function and version (names from the routing table only, so callers cannot grow the
    // label set): invocations by status class, and the time to the agent's response head.
    let record = |status: StatusCode| {
        metrics.invocations.increment(1);
        metrics.by_status[class(status)].increment(1);
        metrics.response.record(forwarded.elapsed().as_secs_f64());
    };
    let upstream = match sent {
        Ok(Some(r)) => r,
        // The other node's listener URL cannot hold this path (a listener with a path of its
        // own); the first node's could, so the path itself was fine.
        Ok(None) => {
            record(StatusCode::BAD_GATEWAY);
            return Ok(problem(
                StatusCode::BAD_GATEWAY,
                "agent_unreachable",
                "the node running the function could not be reached".to_owned(),
            ));
        }
        Err(e) if e.is_timeout() => {
            record(StatusCode::GATEWAY_TIMEOUT);
            return Ok(problem(
                StatusCode::GATEWAY_TIMEOUT,
                "function_timeout",
                format!("the function did not answer within {} ms", (version.timeout + TIMEOUT_MARGIN).as_millis()),
            ));
        }
        Err(e) => {
            record(StatusCode::BAD_GATEWAY);
            // Only a node that cannot be reached is marked; a caller's broken body is not the
            // node's fault.
            if e.is_connect() {
                target.failed_at.store(state.routes.now_ms().max(1), Ordering::Relaxed);
            }
            state.gateway_metrics.agent_failures.increment(1);
            tracing::warn!(node = %target.node_id, error = %e, "the agent could not be reached");
            return Ok(problem(
                StatusCode::BAD_GATEWAY,
                "agent_unreachable",
                "the node running the function could not be reached".to_owned(),
            ));
        }
    };
    let status = upstream.status();
    record(status);
    let cold = upstream.headers().get(HEADER_COLD_START);
    if cold.is_some_and(|v| v == "true") {
        metrics.cold_starts.increment(1);
    }
    let mut out = HeaderMap::with_capacity(upstream.headers().len() + 4);
    if cold.is_none() {
        out.insert(HEADER_COLD_START, HeaderValue::from_static("false"));
    }
    // Functions share the console's origin until the gateway gets a host of its own: their pages
    // run sandboxed (an opaque origin: no access to the console or its cookies), and a cookie a
    // function sets may only be scoped below its own path.
    let own_path = std::cell::OnceCell::new();
    for (name, value) in upstream.headers() {
        if HOP_BY_HOP.contains(&name.as_str())
            || name == header::CONTENT_LENGTH
            || name == header::CONTENT_SECURITY_POLICY
        {
            continue;
        }
        if name == header::SET_COOKIE
            && !cookie_stays_below(value, own_path.get_or_init(|| format!("/fn/{tenant_name}/{function_name}")))
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox allow-scripts allow-forms allow-popups allow-downloads"),
    );
    // The platform's header, whatever the function said.
    out.insert(HEADER_VERSION, HeaderValue::from(version.number));
    // The permit is held until the response body has been sent (or the caller went away).
    let mut relay = upstream.into_body();
    relay.hold(permit);
    let mut res = Response::new(Body::new(relay));
    *res.status_mut() = status;
    *res.headers_mut() = out;
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_functions_cookies_stay_below_its_path() {
        let ok = |v: &str| cookie_stays_below(&HeaderValue::from_str(v).unwrap(), "/fn/acme/shop");
        assert!(ok("cart=1"));
        assert!(ok("cart=1; Path=/fn/acme/shop; HttpOnly"));
        assert!(ok("cart=1; path=/fn/acme/shop/basket"));
        assert!(!ok("nimbus_at=x; Path=/console"));
        assert!(!ok("cart=1; Path=/"));
        assert!(!ok("cart=1; Path=/fn/acme/shopping"));
        assert!(!ok("cart=1; Path=/fn/acme/shop; Domain=example.com"));
    }
}
