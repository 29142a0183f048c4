//! Worker nodes: join tokens, nodes and their credentials, desired state, the agent protocol's
//! control-plane side (DESIGN §5), usage ingest, and the watchdog that marks silent nodes lost.
//!
//! Nodes, their pools and join tokens are platform objects: only platform admins manage them
//! ([`crate::authz::begin_platform`]). Agents authenticate with node credentials ([`NodeAuth`])
//! and every query they cause runs with the `nimbus.node_id` scope, which row-level security
//! uses to show a node exactly the versions assigned to it.

pub mod admin;
pub mod agent;
pub mod desired;
pub mod pools;
pub mod stats;
pub mod tokens;
pub mod usage;

use std::time::Duration;

use axum::{extract::FromRequestParts, http::request::Parts};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    auth::secret,
    db::{self, Scope},
    error::ApiError,
    startup::AppState,
};

pub use desired::Hub;
pub use stats::Stats;

/// Every node credential starts with this.
pub const CREDENTIAL_PREFIX: &str = "nnc_";
/// How long the credential before a renewal keeps working (a renewal whose answer was lost
/// does not lock the agent out).
pub const RENEWAL_GRACE: Duration = Duration::from_secs(60);

/// Routes of this module: the admin API (tokens, nodes, pools) and the agent protocol.
pub fn router() -> utoipa_axum::router::OpenApiRouter<AppState> {
    tokens::router().merge(admin::router()).merge(pools::router()).merge(agent::router())
}

/// A fresh node credential: the token to hand out, its hash to store, its expiry.
pub(crate) fn new_credential(ttl: Duration) -> (String, Vec<u8>, DateTime<Utc>) {
    let token = format!("{CREDENTIAL_PREFIX}{}", secret::random_token());
    let hash = secret::sha256(token.as_bytes());
    let expires = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    (token, hash, expires)
}

/// A node found by its credential: id, state, draining, whether the credential is the current
/// one, its expiry.
type CredentialRow = (Uuid, String, bool, bool, Option<DateTime<Utc>>);

/// An authenticated agent: the node its credential belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeAuth {
    /// The node.
    pub node_id: Uuid,
    /// Whether the node is draining.
    pub draining: bool,
}

impl NodeAuth {
    /// The scope of the node's queries.
    pub fn scope(&self) -> Scope {
        Scope::node(self.node_id)
    }
}

impl FromRequestParts<AppState> for NodeAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(n) = parts.extensions.get::<NodeAuth>() {
            return Ok(*n);
        }
        let value = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or(ApiError::Unauthenticated("missing Authorization header"))?
            .to_str()
            .map_err(|_| ApiError::Unauthenticated("malformed Authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or(ApiError::Unauthenticated("expected Authorization: Bearer <node credential>"))?
            .trim();
        if !token.starts_with(CREDENTIAL_PREFIX) {
            return Err(ApiError::Unauthenticated("expected a node credential (nnc_...)"));
        }
        let hash = secret::sha256(token.as_bytes());
        // Nodes are platform rows without tenant data: no scope is needed to find one.
        let mut tx = db::begin(&state.pool, &Scope::default()).await?;
        let row: Option<CredentialRow> = sqlx::query_as(
            "SELECT id, state, draining, credential_hash = $1, credential_expires_at FROM nodes \
             WHERE credential_hash = $1 OR (previous_credential_hash = $1 AND previous_valid_until > now())",
        )
        .bind(&hash)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some((node_id, node_state, draining, current, expires)) = row else {
            return Err(ApiError::Unauthenticated("invalid node credential"));
        };
        // A node that left keeps its credential (a restarted agent renews it); only an admin's
        // removal ends it.
        if node_state == "removed" {
            return Err(ApiError::Unauthenticated("this node was removed; join again"));
        }
        if current && expires.is_none_or(|e| e <= Utc::now()) {
            return Err(ApiError::Unauthenticated("node credential expired; join again"));
        }
        let auth = NodeAuth { node_id, draining };
        parts.extensions.insert(auth);
        Ok(auth)
    }
}

/// Marks nodes that have not reported within `timeout` as `lost` and returns them. Safe on
/// every replica at once (one UPDATE).
pub async fn mark_lost(pool: &db::Db, timeout: Duration) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = db::begin(pool, &Scope::platform(None)).await?;
    let lost: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE nodes SET state = 'lost', state_changed_at = now(), revision = revision + 1 \
         WHERE state = 'ready' AND last_heartbeat_at < now() - make_interval(secs => $1) RETURNING id",
    )
    .bind(timeout.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for id in &lost {
        sqlx::query("SELECT pg_notify('nimbus_desired_state', $1)").bind(id.to_string()).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    if !lost.is_empty() {
        metrics::counter!("nimbus_nodes_lost_total").increment(lost.len() as u64);
        tracing::warn!(nodes = ?lost, "nodes missed their heartbeats and are marked lost");
    }
    Ok(lost)
}

/// Deletes function log lines older than `retention` (platform scope: every tenant's).
pub async fn purge_logs(pool: &db::Db, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = db::begin(pool, &Scope::platform(None)).await?;
    let r = sqlx::query("DELETE FROM function_logs WHERE time < now() - make_interval(secs => $1)")
        .bind(retention.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(r.rows_affected())
}

/// The watchdog loop: marks silent nodes lost, a few times per heartbeat timeout.
pub async fn watchdog_loop(state: AppState) {
    let timeout = state.settings.node_heartbeat_timeout.0;
    let mut tick = tokio::time::interval((timeout / 3).max(Duration::from_secs(1)));
    loop {
        tick.tick().await;
        if let Err(e) = mark_lost(&state.pool, timeout).await {
            tracing::warn!(error = ?e, "node watchdog failed");
        }
    }
}
