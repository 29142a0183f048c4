//! Desired state: the document telling a node which versions to keep, and the hub that wakes
//! long-polls when it changes.
//!
//! Every change of a node's assignments bumps `nodes.revision` and sends
//! `pg_notify('nimbus_desired_state', node_id)` (a trigger does both, so even a cascade from a
//! deleted version counts). Each replica listens on that channel ([`Hub::listen`]) and wakes the
//! long-polls of that node; a long-poll also re-reads the revision every few seconds, so a lost
//! notification delays a change, never loses it. The document is always the whole truth
//! (level-triggered): an agent that missed a revision gets everything with the next one.

use std::time::Duration;

use nimbus_protocol::{Assignment, DesiredState, PackageFormat, PackageRef, Runtime};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{
    db,
    error::ApiError,
    functions::{self, env, versions::StoredConfig},
    startup::AppState,
    store::PackageStore,
};

/// The channel assignments changes are announced on.
pub const CHANNEL: &str = "nimbus_desired_state";
/// How long a presigned code URL stays valid.
pub const CODE_URL_TTL: Duration = Duration::from_secs(15 * 60);
/// A long-poll re-reads the revision at least this often (covers lost notifications).
const RECHECK: Duration = Duration::from_secs(5);

/// Wakes long-polls of a node when its desired state changed (on this replica or another).
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Uuid>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: broadcast::channel(1024).0 }
    }
}

impl Hub {
    /// Announces a change of `node`'s desired state to this replica's long-polls.
    pub fn notify(&self, node: Uuid) {
        let _ = self.tx.send(node);
    }

    /// Relays `pg_notify` announcements from every replica, reconnecting after failures.
    pub async fn listen(self, database_url: String) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match sqlx::postgres::PgListener::connect(&database_url).await {
                Ok(mut listener) => match listener.listen(CHANNEL).await {
                    Ok(()) => {
                        backoff = Duration::from_millis(200);
                        loop {
                            match listener.recv().await {
                                Ok(n) => {
                                    if let Ok(node) = n.payload().parse::<Uuid>() {
                                        self.notify(node);
                                    }
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "desired-state listener lost its connection");
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "LISTEN {CHANNEL} failed"),
                },
                Err(e) => tracing::warn!(error = %e, "desired-state listener cannot connect"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Waits until `node`'s revision exceeds `after` or `wait` has passed; returns the revision.
    pub async fn wait(&self, pool: &db::Db, node: Uuid, after: i64, wait: Duration) -> Result<i64, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        // Subscribed before the first read: a change between the read and the wait still wakes.
        let mut rx = self.tx.subscribe();
        loop {
            let revision = revision(pool, node).await?;
            let now = tokio::time::Instant::now();
            if revision > after || now >= deadline {
                return Ok(revision);
            }
            let slice = (deadline - now).min(RECHECK);
            let _ = tokio::time::timeout(slice, async {
                loop {
                    match rx.recv().await {
                        Ok(id) if id == node => return,
                        Ok(_) => continue,
                        // Missed announcements: re-read to be sure.
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            })
            .await;
        }
    }
}

async fn revision(pool: &db::Db, node: Uuid) -> Result<i64, ApiError> {
    let mut tx = db::begin(pool, &db::Scope::node(node)).await?;
    let rev: Option<i64> =
        sqlx::query_scalar("SELECT revision FROM nodes WHERE id = $1").bind(node).fetch_optional(&mut *tx).await?;
    tx.commit().await?;
    rev.ok_or(ApiError::Unauthenticated("this node was removed; join again"))
}

#[derive(sqlx::FromRow)]
struct Row {
    version_id: Uuid,
    tenant_id: Uuid,
    function_id: Uuid,
    function: String,
    number: i32,
    sha256: String,
    config: sqlx::types::Json<StoredConfig>,
    size: i64,
    format: String,
    instances: i32,
}

/// The whole desired state of `node`, read with the node's scope (row-level security shows it
/// exactly its assigned versions). Secret environment values are opened here: the document
/// travels only to the authenticated node.
pub async fn build(state: &AppState, node: Uuid) -> Result<DesiredState, ApiError> {
    let mut tx = db::begin(&state.pool, &db::Scope::node(node)).await?;
    // The revision first: a change landing between the two reads then shows up as a newer
    // revision later, never as content the document's revision claims to cover but lacks.
    let (revision, draining): (i64, bool) = sqlx::query_as("SELECT revision, draining FROM nodes WHERE id = $1")
        .bind(node)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::Unauthenticated("this node was removed; join again"))?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.version_id, a.tenant_id, v.function_id, f.name AS function, v.number, v.sha256, v.config, \
         p.size, p.format, a.instances \
         FROM assignments a \
         JOIN versions v ON v.id = a.version_id AND v.tenant_id = a.tenant_id \
         JOIN functions f ON f.id = v.function_id AND f.tenant_id = a.tenant_id \
         JOIN packages p ON p.id = v.package_id AND p.tenant_id = a.tenant_id \
         WHERE a.node_id = $1 ORDER BY a.version_id",
    )
    .bind(node)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut assignments = Vec::with_capacity(rows.len());
    for r in rows {
        let config = r.config.0;
        // A secret that cannot be opened (its key left the key set) keeps that one version off
        // the node; every other version of every tenant still reconciles.
        let env = match env::reveal(state.secrets.as_deref(), r.tenant_id, r.function_id, &config.environment) {
            Ok(env) => env,
            Err(e) => {
                metrics::counter!("nimbus_desired_state_skipped_total").increment(1);
                tracing::error!(version_id = %r.version_id, tenant_id = %r.tenant_id, error = %e,
                    "a secret of this version cannot be opened; it is left out of the node's desired state");
                continue;
            }
        };
        let format = match r.format.as_str() {
            "wasm" => PackageFormat::Wasm,
            "zip" => PackageFormat::Zip,
            "tar.gz" => PackageFormat::TarGz,
            other => return Err(ApiError::Internal(anyhow::anyhow!("unknown package format {other:?}"))),
        };
        assignments.push(Assignment {
            version_id: r.version_id,
            tenant_id: r.tenant_id,
            function_id: r.function_id,
            function: r.function,
            version: u32::try_from(r.number).unwrap_or(0),
            runtime: match config.runtime {
                functions::Runtime::Wasm => Runtime::Wasm,
                functions::Runtime::Process => Runtime::Process,
            },
            entry: config.entry,
            package: PackageRef {
                url: code_url(state, &r.sha256).await?,
                sha256: r.sha256,
                size: u64::try_from(r.size).unwrap_or(0),
                format,
            },
            memory_mb: config.memory_mb,
            timeout_ms: config.timeout_ms,
            concurrency: config.concurrency,
            instances: u32::try_from(r.instances).unwrap_or(0),
            env,
        });
    }
    metrics::counter!("nimbus_desired_state_served_total").increment(1);
    Ok(DesiredState { node_id: node, revision, draining, assignments })
}

/// Where a node fetches a package: a presigned S3 URL (absolute), or for the local store the
/// control plane's own download endpoint as a path (`/agent/v1/code/<sha256>`), which the agent
/// resolves against the control-plane URL it knows and authenticates with its credential — so
/// the control plane's idea of its public URL never has to match the agent's.
async fn code_url(state: &AppState, sha256: &str) -> Result<String, ApiError> {
    match &state.store {
        PackageStore::S3(s3) => Ok(s3.presign_get(sha256, CODE_URL_TTL).await.map_err(|e| anyhow::anyhow!(e))?),
        PackageStore::Local(_) => Ok(format!("/agent/v1/code/{sha256}")),
    }
}
