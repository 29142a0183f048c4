//! The control-plane side of the agent protocol (`/agent/v1/...`, see `nimbus_protocol`): join,
//! credential renewal, the desired-state long-poll, reports (heartbeat + metrics), usage ingest,
//! code download and leaving. Everything but `join` authenticates with a node credential.

use std::{collections::HashMap, time::Duration};

use axum::{
    Extension, Json,
    body::Body,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use chrono::Utc;
use nimbus_protocol::{
    Credential, DesiredState, JoinRequest, JoinResponse, MAX_NODE_NAME, MAX_WAIT_SECONDS, Report, UsageAck, UsageBatch,
};
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{NodeAuth, RENEWAL_GRACE, desired, new_credential, stats::BUCKETS, usage};
use crate::{
    audit::{self, Actor, Entry},
    auth::{RequestContext, secret},
    authz::nrn,
    autoscaler::validate_labels,
    db::{self, Scope},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    idempotency::ContainsSecret,
    names::Name,
    startup::AppState,
    store::{PackageStore, check_address},
};

/// Largest agent request body (usage batches of 5,000 records with their log lines).
pub const AGENT_BODY_LIMIT: usize = 32 << 20;
/// Most versions or metrics entries in one report.
pub const MAX_REPORT_ITEMS: usize = 10_000;
/// Longest invoke URL.
pub const MAX_URL: usize = 2048;

// The protocol's name limit is the API's DNS-label limit.
const _: () = assert!(MAX_NODE_NAME == crate::names::NAME_MAX);

/// A join token row: id, revoked at, expires at, use limit, uses.
type TokenRow = (Uuid, Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>, Option<i32>, i32);

/// Routes of the agent protocol.
pub fn router() -> OpenApiRouter<AppState> {
    // Only usage batches get the large body limit; everything else (the anonymous join
    // included) keeps the API's.
    let usage = OpenApiRouter::new().routes(routes!(ingest_usage)).layer(DefaultBodyLimit::max(AGENT_BODY_LIMIT));
    OpenApiRouter::new()
        .routes(routes!(join))
        .routes(routes!(renew))
        .routes(routes!(desired_state))
        .routes(routes!(report))
        .routes(routes!(download_code))
        .routes(routes!(leave))
        .merge(usage)
}

fn validate_join(req: &JoinRequest) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if let Err(e) = Name::try_from(req.name.clone()) {
        errors.push(FieldError::new("name", "dns_label", e));
    }
    if let Err(e) = Name::try_from(req.zone.clone()) {
        errors.push(FieldError::new("zone", "dns_label", e));
    }
    let url_ok = (req.invoke_url.starts_with("http://") || req.invoke_url.starts_with("https://"))
        && req.invoke_url.len() <= MAX_URL
        && !req.invoke_url.chars().any(|c| c.is_whitespace() || c.is_control());
    if !url_ok {
        errors.push(FieldError::new(
            "invoke_url",
            "url",
            format!("must be an http(s) URL of at most {MAX_URL} characters"),
        ));
    }
    let c = &req.capacity;
    if !(1..=1 << 24).contains(&c.memory_mb) {
        errors.push(FieldError::new("capacity.memory_mb", "range", "must be 1 to 16777216 (16 TiB)"));
    }
    if !(1..=1_000_000).contains(&c.cpu_millis) {
        errors.push(FieldError::new("capacity.cpu_millis", "range", "must be 1 to 1000000"));
    }
    if !(1..=100_000).contains(&c.instance_slots) {
        errors.push(FieldError::new("capacity.instance_slots", "range", "must be 1 to 100000"));
    }
    errors.extend(validate_labels(&req.labels, "labels"));
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(errors)) }
}

/// Join the platform with a join token: returns the node's id and credential. Joining again
/// under a known name takes that node over (new credential, same id), and its labels replace the
/// node's.
#[utoipa::path(
    post,
    path = "/agent/v1/join",
    tag = "agent",
    request_body(content = Object, description = "`nimbus_protocol::JoinRequest`", example = json!({
        "token": "njt_0123456789ab_...", "name": "worker-1", "zone": "eu-1",
        "capacity": {"memory_mb": 8192, "cpu_millis": 2000, "instance_slots": 256},
        "invoke_url": "http://10.0.0.5:9090", "labels": {"pool": "spot"}})),
    responses(
        (status = 201, description = "Joined: `nimbus_protocol::JoinResponse`", body = Object),
        (status = 401, description = "Unknown, revoked, expired or used-up join token", body = crate::error::Problem),
        (status = 409, description = "A live node has this name", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    ctx: RequestContext,
    extract::Json(req): extract::Json<JoinRequest>,
) -> ApiResult<(StatusCode, Extension<ContainsSecret>, Json<JoinResponse>)> {
    validate_join(&req)?;
    let hash = secret::sha256(req.token.as_bytes());
    let mut tx = db::begin(&state.pool, &Scope::platform(None)).await?;
    let token: Option<TokenRow> = sqlx::query_as(
        "SELECT id, revoked_at, expires_at, max_uses, uses FROM join_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((token_id, revoked_at, expires_at, max_uses, uses)) = token else {
        metrics::counter!("nimbus_node_joins_total", "outcome" => "invalid").increment(1);
        return Err(ApiError::Unauthenticated("invalid join token"));
    };
    let refused = if revoked_at.is_some() {
        Some("join token revoked")
    } else if expires_at.is_some_and(|e| e <= Utc::now()) {
        Some("join token expired")
    } else if max_uses.is_some_and(|m| uses >= m) {
        Some("join token used up")
    } else {
        None
    };
    if let Some(why) = refused {
        metrics::counter!("nimbus_node_joins_total", "outcome" => "refused").increment(1);
        return Err(ApiError::Unauthenticated(why));
    }
    // A name belongs to one live node: a join under the name of a node that is reporting is
    // refused, so one join token cannot take a running node's place (and its traffic and
    // secrets). A node that left, went silent or was removed can be taken over by a new join.
    let live: Option<bool> = sqlx::query_scalar(
        "SELECT state = 'ready' AND last_heartbeat_at > now() - make_interval(secs => $2) FROM nodes \
         WHERE name = $1 FOR UPDATE",
    )
    .bind(&req.name)
    .bind(state.settings.node_heartbeat_timeout.0.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if live == Some(true) {
        metrics::counter!("nimbus_node_joins_total", "outcome" => "name_taken").increment(1);
        return Err(ApiError::conflict(
            "node_name_taken",
            format!("a live node is named {}; choose another name, or stop that node first", req.name),
        ));
    }
    let (credential, credential_hash, expires) = new_credential(state.settings.node_credential_ttl.0);
    let invoke_secret = secret::random_token();
    let node_id: Uuid = sqlx::query_scalar(
        "INSERT INTO nodes (id, name, zone, memory_mb, cpu_millis, instance_slots, invoke_url, invoke_secret, state, \
         credential_hash, credential_expires_at, join_token_id, labels) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'ready', $9, $10, $11, $12) \
         ON CONFLICT (name) DO UPDATE SET zone = EXCLUDED.zone, labels = EXCLUDED.labels, \
           memory_mb = EXCLUDED.memory_mb, cpu_millis = EXCLUDED.cpu_millis, instance_slots = EXCLUDED.instance_slots, \
           invoke_url = EXCLUDED.invoke_url, invoke_secret = EXCLUDED.invoke_secret, state = 'ready', \
           credential_hash = EXCLUDED.credential_hash, credential_expires_at = EXCLUDED.credential_expires_at, \
           previous_credential_hash = NULL, previous_valid_until = NULL, join_token_id = EXCLUDED.join_token_id, \
           revision = nodes.revision + 1, last_heartbeat_at = now(), state_changed_at = now() \
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(&req.name)
    .bind(&req.zone)
    .bind(i64::try_from(req.capacity.memory_mb).unwrap_or(i64::MAX))
    .bind(i32::try_from(req.capacity.cpu_millis).unwrap_or(i32::MAX))
    .bind(i32::try_from(req.capacity.instance_slots).unwrap_or(i32::MAX))
    .bind(&req.invoke_url)
    .bind(&invoke_secret)
    .bind(&credential_hash)
    .bind(expires)
    .bind(token_id)
    .bind(sqlx::types::Json(&req.labels))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE join_tokens SET uses = uses + 1 WHERE id = $1").bind(token_id).execute(&mut *tx).await?;
    audit::record(
        &mut tx,
        &ctx,
        Entry {
            tenant: None,
            actor: Actor::System,
            action: "nodes:JoinNode",
            resource: nrn::node(node_id),
            success: true,
            details: json!({
                "name": req.name, "zone": req.zone, "labels": req.labels, "join_token_id": token_id,
                "invoke_url": req.invoke_url
            }),
        },
    )
    .await?;
    tx.commit().await?;
    state.hub.notify(node_id);
    metrics::counter!("nimbus_node_joins_total", "outcome" => "joined").increment(1);
    tracing::info!(node = %node_id, name = %req.name, zone = %req.zone, "node joined");
    Ok((
        StatusCode::CREATED,
        Extension(ContainsSecret),
        Json(JoinResponse {
            node_id,
            credential: Credential { token: credential, expires_at: expires },
            invoke_secret,
            report_interval_ms: u64::try_from(state.settings.node_report_interval.0.as_millis()).unwrap_or(1000),
        }),
    ))
}

/// Exchange the node credential for a fresh one. The old one keeps working for a minute.
#[utoipa::path(
    post,
    path = "/agent/v1/renew",
    tag = "agent",
    responses(
        (status = 200, description = "`nimbus_protocol::Credential`", body = Object),
        (status = 401, description = "Invalid or expired credential", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn renew(State(state): State<AppState>, node: NodeAuth) -> ApiResult<Json<Credential>> {
    let (token, hash, expires) = new_credential(state.settings.node_credential_ttl.0);
    let mut tx = db::begin(&state.pool, &node.scope()).await?;
    sqlx::query(
        "UPDATE nodes SET previous_credential_hash = credential_hash, \
         previous_valid_until = now() + make_interval(secs => $4), credential_hash = $2, credential_expires_at = $3 \
         WHERE id = $1",
    )
    .bind(node.node_id)
    .bind(&hash)
    .bind(expires)
    .bind(RENEWAL_GRACE.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Credential { token, expires_at: expires }))
}

/// Query of the desired-state long-poll.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DesiredStateQuery {
    /// The revision the agent has; the answer waits for a newer one.
    #[serde(default)]
    pub after: Option<i64>,
    /// Seconds to wait for a newer revision (0 to 30, default 0: answer at once).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// The node's desired state. With `after` and `wait`, waits up to `wait` seconds for a revision
/// above `after`, then answers with the whole current document anyway (level-triggered).
#[utoipa::path(
    get,
    path = "/agent/v1/desired-state",
    tag = "agent",
    params(DesiredStateQuery),
    responses(
        (status = 200, description = "`nimbus_protocol::DesiredState`", body = Object),
        (status = 400, description = "Bad query", body = crate::error::Problem),
        (status = 401, description = "Invalid credential", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn desired_state(
    State(state): State<AppState>,
    node: NodeAuth,
    Query(q): Query<DesiredStateQuery>,
) -> ApiResult<Json<DesiredState>> {
    let wait = q.wait.unwrap_or(0);
    if wait > MAX_WAIT_SECONDS {
        return Err(ApiError::InvalidQuery(vec![FieldError::new(
            "wait",
            "range",
            format!("must be 0 to {MAX_WAIT_SECONDS} seconds"),
        )]));
    }
    if let (Some(after), true) = (q.after, wait > 0) {
        state.hub.wait(&state.pool, node.node_id, after, Duration::from_secs(wait)).await?;
    }
    Ok(Json(desired::build(&state, node.node_id).await?))
}

/// Heartbeat, the state of each version on the node, and per-second metrics. A lost node that
/// reports again is ready again.
#[utoipa::path(
    post,
    path = "/agent/v1/reports",
    tag = "agent",
    request_body(content = Object, description = "`nimbus_protocol::Report`", example = json!({
        "revision": 3, "in_flight": 0, "versions": [], "metrics": []})),
    responses(
        (status = 204, description = "Recorded"),
        (status = 401, description = "Invalid credential", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn report(
    State(state): State<AppState>,
    node: NodeAuth,
    extract::Json(report): extract::Json<Report>,
) -> ApiResult<StatusCode> {
    let mut errors = Vec::new();
    if report.versions.len() > MAX_REPORT_ITEMS {
        errors.push(FieldError::new("versions", "max_items", format!("at most {MAX_REPORT_ITEMS}")));
    }
    if report.metrics.len() > MAX_REPORT_ITEMS {
        errors.push(FieldError::new("metrics", "max_items", format!("at most {MAX_REPORT_ITEMS}")));
    }
    for (i, m) in report.metrics.iter().enumerate() {
        if m.latency_buckets.len() != BUCKETS {
            errors.push(FieldError::new(
                format!("metrics[{i}].latency_buckets"),
                "length",
                format!("must have {BUCKETS} counts"),
            ));
        }
        if !m.concurrency.is_finite() || m.concurrency < 0.0 {
            errors.push(FieldError::new(format!("metrics[{i}].concurrency"), "range", "must be a finite number >= 0"));
        }
        if errors.len() >= 20 {
            break;
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let mut tx = db::begin(&state.pool, &node.scope()).await?;
    sqlx::query(
        "UPDATE nodes SET last_heartbeat_at = now(), in_flight = $2, versions = $3, reported_revision = $4, \
         state = CASE WHEN state IN ('lost', 'left') THEN 'ready' ELSE state END, \
         state_changed_at = CASE WHEN state IN ('lost', 'left') THEN now() ELSE state_changed_at END \
         WHERE id = $1",
    )
    .bind(node.node_id)
    .bind(i32::try_from(report.in_flight).unwrap_or(i32::MAX))
    .bind(sqlx::types::Json(&report.versions))
    .bind(report.revision)
    .execute(&mut *tx)
    .await?;
    // Metrics count only for versions assigned to this node, under the assignment's tenant: a
    // node cannot write another tenant's figures.
    let assigned: HashMap<Uuid, Uuid> = if report.metrics.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, Uuid)>("SELECT version_id, tenant_id FROM assignments WHERE node_id = $1")
            .bind(node.node_id)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    tx.commit().await?;
    for m in &report.metrics {
        if let Some(tenant) = assigned.get(&m.version_id) {
            state.stats.record(*tenant, m);
        }
    }
    metrics::counter!("nimbus_node_reports_total").increment(1);
    Ok(StatusCode::NO_CONTENT)
}

/// Store a batch of usage records and log lines. Idempotent: records already stored (by
/// invocation id) and log lines already stored (by invocation id and position) are skipped.
#[utoipa::path(
    post,
    path = "/agent/v1/usage",
    tag = "agent",
    request_body(content = Object, description = "`nimbus_protocol::UsageBatch`", example = json!({"records": [], "logs": []})),
    responses(
        (status = 200, description = "`nimbus_protocol::UsageAck`", body = Object),
        (status = 401, description = "Invalid credential", body = crate::error::Problem),
        (status = 413, description = "Batch too large", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn ingest_usage(
    State(state): State<AppState>,
    node: NodeAuth,
    extract::Json(batch): extract::Json<UsageBatch>,
) -> ApiResult<Json<UsageAck>> {
    Ok(Json(usage::ingest(&state.pool, node.node_id, &batch).await?))
}

/// Download a code package the node is assigned (local store; with S3 the desired state carries
/// presigned URLs instead).
#[utoipa::path(
    get,
    path = "/agent/v1/code/{sha256}",
    tag = "agent",
    params(("sha256" = String, Path, description = "Hex SHA-256 of the package")),
    responses(
        (status = 200, description = "The package bytes", content_type = "application/octet-stream"),
        (status = 401, description = "Invalid credential", body = crate::error::Problem),
        (status = 404, description = "No package of this node's versions has this SHA-256", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn download_code(
    State(state): State<AppState>,
    node: NodeAuth,
    Path(sha256): Path<String>,
) -> ApiResult<Response> {
    check_address(&sha256).map_err(|_| {
        ApiError::InvalidPath(vec![FieldError::new("sha256", "format", "must be 64 lowercase hex digits")])
    })?;
    let mut tx = db::begin(&state.pool, &node.scope()).await?;
    // Row-level security shows the node only its assigned versions.
    let assigned: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM versions WHERE sha256 = $1)")
        .bind(&sha256)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if !assigned {
        return Err(ApiError::NotFound("package"));
    }
    metrics::counter!("nimbus_code_downloads_total").increment(1);
    // Streamed from the store, never held whole in memory: many nodes fetching large packages
    // at once must not exhaust the API.
    let body = match &state.store {
        PackageStore::Local(local) => {
            let file = match tokio::fs::File::open(local.path_of(&sha256).map_err(|e| anyhow::anyhow!(e))?).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ApiError::NotFound("package")),
                Err(e) => return Err(ApiError::Internal(e.into())),
            };
            let len = file.metadata().await.map_err(|e| ApiError::Internal(e.into()))?.len();
            let chunks = futures_util::stream::unfold(file, |mut file| async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 256 * 1024];
                match file.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(buf)), file))
                    }
                    Err(e) => Some((Err(e), file)),
                }
            });
            return Ok((
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                Body::from_stream(chunks),
            )
                .into_response());
        }
        PackageStore::S3(s3) => {
            let stream = s3
                .stream_package(&sha256)
                .await
                .map_err(|e| anyhow::anyhow!(e))?
                .ok_or(ApiError::NotFound("package"))?;
            Body::from_stream(stream)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Leave the platform (graceful shutdown): the node's assignments are dropped and it is `left`
/// until it reports again; its credential keeps working so that a restarted agent can renew it.
#[utoipa::path(
    post,
    path = "/agent/v1/leave",
    tag = "agent",
    responses(
        (status = 204, description = "Left"),
        (status = 401, description = "Invalid credential", body = crate::error::Problem),
    ),
    security(("node" = []))
)]
pub async fn leave(State(state): State<AppState>, ctx: RequestContext, node: NodeAuth) -> ApiResult<StatusCode> {
    let mut tx =
        db::begin(&state.pool, &Scope { node: Some(node.node_id), platform: true, ..Scope::default() }).await?;
    sqlx::query("DELETE FROM assignments WHERE node_id = $1").bind(node.node_id).execute(&mut *tx).await?;
    // The credential stays: a restarted agent renews it and reports, which makes the node ready
    // again, without needing a join token.
    sqlx::query("UPDATE nodes SET state = 'left', state_changed_at = now(), revision = revision + 1 WHERE id = $1")
        .bind(node.node_id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut tx,
        &ctx,
        Entry {
            tenant: None,
            actor: Actor::System,
            action: "nodes:LeaveNode",
            resource: nrn::node(node.node_id),
            success: true,
            details: json!({}),
        },
    )
    .await?;
    tx.commit().await?;
    state.hub.notify(node.node_id);
    tracing::info!(node = %node.node_id, "node left");
    Ok(StatusCode::NO_CONTENT)
}
