//! Database access: the migrator, the application pool (connected as the `nimbus_app` role, to
//! which row-level security applies) and scoped transactions that tell the RLS policies who is
//! asking.
//!
//! The pool is `deadpool` over sqlx connections rather than sqlx's own pool, because sqlx's pool
//! sends a ping on every release. Per request that is a fourth round trip next to
//! BEGIN, the query and COMMIT, and on a small machine the round trips are the cost of a request
//! (see BENCHMARKS.md). Here a connection goes back to the pool as it is, and is checked only when
//! it was left in an unknown state (a transaction dropped without COMMIT, which is rolled back
//! first) or has sat idle for a while.

use std::{
    ops::{Deref, DerefMut},
    str::FromStr,
    time::Duration,
};

use anyhow::Context;
use deadpool::managed::{self, Metrics, Object, RecycleError, RecycleResult};
use sqlx::{
    ConnectOptions, Connection, Executor, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

/// The role every application connection acts as.
pub const APP_ROLE: &str = "nimbus_app";

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long a connection may sit idle before it is checked on its next checkout.
const IDLE_CHECK_AFTER: Duration = Duration::from_secs(30);

/// Applies pending migrations using the privileged connection of `url`.
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url).context("parsing the database URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .context("connecting to PostgreSQL to migrate")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    pool.close().await;
    Ok(())
}

/// Creates and recycles application connections.
pub struct Manager {
    options: PgConnectOptions,
}

impl managed::Manager for Manager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = self.options.connect().await?;
        let prepare: String = Hot::ALL.iter().map(|h| format!("PREPARE {} AS {};", h.name(), h.sql())).collect();
        conn.execute(prepare.as_str()).await?;
        Ok(conn)
    }

    async fn recycle(&self, conn: &mut PgConnection, metrics: &Metrics) -> RecycleResult<sqlx::Error> {
        // A ping flushes and drains whatever an interrupted use left behind, and proves the
        // connection alive after a long idle spell; a failed ping discards the connection.
        if metrics.last_used() > IDLE_CHECK_AFTER || conn.should_flush() {
            conn.ping().await.map_err(RecycleError::Backend)?;
        }
        Ok(())
    }
}

/// Hot reads: statements on the path of most authenticated requests, prepared on every
/// connection when it is opened, so that [`read_hot`] can scope and run one in a single round
/// trip with a cached plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hot {
    /// The signed-in user, by id (`GET /v1/me`).
    UserById,
    /// An API key, by prefix (API-key authentication).
    ApiKeyByPrefix,
}

impl Hot {
    /// Every hot statement.
    pub const ALL: &'static [Hot] = &[Hot::UserById, Hot::ApiKeyByPrefix];

    fn name(self) -> &'static str {
        match self {
            Hot::UserById => "nimbus_hot_user_by_id",
            Hot::ApiKeyByPrefix => "nimbus_hot_api_key_by_prefix",
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Hot::UserById => {
                "SELECT id, email, display_name, is_platform_admin, created_at FROM users WHERE id = $1::uuid"
            }
            Hot::ApiKeyByPrefix => {
                "SELECT id, tenant_id, secret_hash, role, created_by, expires_at, revoked_at, \
                 (last_used_at IS NULL OR last_used_at < now() - interval '1 minute') AS stale \
                 FROM api_keys WHERE prefix = $1::text"
            }
        }
    }
}

/// Runs a [`Hot`] statement under `scope` in one round trip: `SET LOCAL`s and `EXECUTE` travel
/// as one simple query, which PostgreSQL runs as one implicit transaction (rolled back as a
/// whole on error), so the settings hold for exactly this read. The simple protocol has no bind
/// parameters, so the scope and `arg` are written into the statement, and only plain values
/// (letters, digits, `-`, `_`) are accepted.
pub async fn read_hot<T>(db: &Db, scope: &Scope, hot: Hot, arg: &str) -> Result<Vec<T>, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let settings = scope.settings();
    if !is_plain(arg) || !settings.iter().all(|(_, v)| is_plain(v)) {
        return Err(sqlx::Error::Protocol("a hot read takes only plain values".into()));
    }
    let mut statement = String::with_capacity(384);
    for (name, value) in &settings {
        statement.push_str(&format!("SET LOCAL {name} = '{value}'; "));
    }
    statement.push_str(&format!("EXECUTE {}('{arg}')", hot.name()));
    let mut conn = db.conn().await?;
    let c: &mut PgConnection = &mut conn;
    match c.fetch_all(statement.as_str()).await {
        Ok(rows) => rows.iter().map(T::from_row).collect(),
        Err(e) => {
            discard_unless_idle(conn).await;
            Err(e)
        }
    }
}

/// The application pool.
#[derive(Clone)]
pub struct Db {
    pool: managed::Pool<Manager>,
}

/// A pooled connection.
type Conn = Object<Manager>;

impl Db {
    /// Opens the application pool. Every connection starts with the session role `nimbus_app`
    /// (a startup option, so even `RESET ROLE` returns to it).
    pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<Db> {
        let options = PgConnectOptions::from_str(url)
            .context("parsing the database URL")?
            .options([("role", APP_ROLE)])
            .application_name("nimbus-api");
        let pool = managed::Pool::builder(Manager { options })
            .max_size(max_connections.max(1) as usize)
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .build()
            .context("building the connection pool")?;
        let db = Db { pool };
        // Fail at startup, not on the first request, when the database is unreachable.
        drop(db.conn().await.context("connecting to PostgreSQL as the application role")?);
        Ok(db)
    }

    /// A connection; callers outside this module go through [`begin`] or [`read_hot`], which
    /// clean up a connection left in an unknown state.
    async fn conn(&self) -> Result<Conn, sqlx::Error> {
        self.pool.get().await.map_err(|e| match e {
            managed::PoolError::Backend(e) => e,
            managed::PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
            managed::PoolError::Closed => sqlx::Error::PoolClosed,
            other => sqlx::Error::Protocol(format!("connection pool: {other}")),
        })
    }

    /// Whether the role the connections logged in as (not `nimbus_app`, which they act as) could
    /// bypass row-level security after a `SET ROLE NONE`.
    pub async fn login_can_bypass_rls(&self) -> Result<bool, sqlx::Error> {
        let mut tx = begin(self, &Scope::default()).await?;
        let bypass: bool =
            sqlx::query_scalar("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = session_user")
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(bypass)
    }

    /// Closes the pool: connections are dropped as they come back.
    pub fn close(&self) {
        self.pool.close();
    }
}

/// Opens the application pool (see [`Db::connect`]).
pub async fn connect_app(url: &str, max_connections: u32) -> anyhow::Result<Db> {
    Db::connect(url, max_connections).await
}

/// A transaction on a pooled connection. Use it as an executor with `&mut *tx`; end it with
/// [`Tx::commit`]. Dropped without committing, it is rolled back on a background task before
/// its connection can be used again (or the connection is discarded if that fails).
pub struct Tx {
    conn: Option<Conn>,
}

impl Tx {
    /// Commits and returns the connection to the pool.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.finish("COMMIT").await
    }

    /// Rolls back and returns the connection to the pool.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.finish("ROLLBACK").await
    }

    async fn finish(mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        // The connection stays in `self` while the statement runs: if this future is dropped
        // half-way, or the statement fails, `Drop` cleans the connection up.
        let conn: &mut PgConnection = &mut self;
        conn.execute(statement).await?;
        drop(self.conn.take());
        Ok(())
    }
}

/// A connection in an unknown state goes back to the pool only if a ROLLBACK succeeds on it
/// (which also reads whatever an interrupted statement left unread); otherwise it is closed.
async fn discard_unless_idle(mut conn: Conn) {
    let c: &mut PgConnection = &mut conn;
    if c.execute("ROLLBACK").await.is_err() {
        drop(Object::take(conn));
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            // An early return (`?`) or a cancelled request: roll back before the connection is
            // reused, so no locks or snapshot outlive the request. `raw_sql` first drains any
            // response a cancelled query left unread.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(discard_unless_idle(conn));
            } else {
                drop(Object::take(conn));
            }
        }
    }
}

impl Deref for Tx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("a live transaction")
    }
}

impl DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("a live transaction")
    }
}

/// Who a transaction acts for; each set field becomes a transaction-local setting that the
/// row-level security policies read.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    /// The tenant the request acts in.
    pub tenant: Option<Uuid>,
    /// The signed-in user.
    pub user: Option<Uuid>,
    /// An e-mail address the transaction may look up.
    pub lookup_email: Option<String>,
    /// An API key prefix being authenticated.
    pub api_key_prefix: Option<String>,
    /// Hex SHA-256 of a refresh token being exchanged.
    pub refresh_token_hash: Option<String>,
    /// The worker node an agent request acts as (after its credential was checked).
    pub node: Option<Uuid>,
    /// Acting for the platform: a platform admin's request (after the admin check) or a
    /// background loop. Widens exactly the policies that name `nimbus_platform()`.
    pub platform: bool,
    /// The gateway's routing-table loader: read-only access to what routing needs.
    pub gateway: bool,
}

impl Scope {
    /// Acting as a user outside any tenant.
    pub fn user(user: Uuid) -> Self {
        Scope { user: Some(user), ..Scope::default() }
    }
    /// Acting in a tenant, optionally as a user.
    pub fn tenant(tenant: Uuid, user: Option<Uuid>) -> Self {
        Scope { tenant: Some(tenant), user, ..Scope::default() }
    }
    /// Acting as a worker node.
    pub fn node(node: Uuid) -> Self {
        Scope { node: Some(node), ..Scope::default() }
    }
    /// Acting for the platform, optionally as a (platform admin) user.
    pub fn platform(user: Option<Uuid>) -> Self {
        Scope { user, platform: true, ..Scope::default() }
    }
}

/// Begins a transaction with the scope's settings in place.
///
/// `BEGIN` and the settings travel in one round trip. That statement has no bind parameters, so
/// the values are written into it; only values made of letters, digits, `-` and `_` (UUIDs, hex
/// digests, API key prefixes) are, since those cannot break out of a SQL string literal. Any
/// other value (an e-mail address) is bound in a second statement.
pub async fn begin(db: &Db, scope: &Scope) -> Result<Tx, sqlx::Error> {
    let settings = scope.settings();
    let inline = settings.iter().all(|(_, v)| is_plain(v));
    let mut statement = String::from("BEGIN");
    if inline {
        // Every setting, empty ones included: nothing of an earlier use of the connection counts.
        let calls: Vec<String> =
            settings.iter().map(|(name, v)| format!("set_config('{name}', '{v}', true)")).collect();
        statement.push_str("; SELECT ");
        statement.push_str(&calls.join(", "));
    }
    // The connection is inside a `Tx` before BEGIN is sent: if this future is dropped half-way,
    // `Tx`'s drop rolls back (or discards the connection) before anyone else gets it.
    let mut tx = Tx { conn: Some(db.conn().await?) };
    // A `&str` without arguments goes over the simple protocol, which allows several statements.
    let c: &mut PgConnection = &mut tx;
    c.execute(statement.as_str()).await?;
    if !inline {
        set_scope(&mut tx, scope).await?;
    }
    Ok(tx)
}

/// Whether a value can be written into a SQL string literal as it is.
fn is_plain(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Scope {
    /// The settings as (name, value) pairs; an unset value is empty.
    fn settings(&self) -> [(&'static str, String); 8] {
        let uuid = |u: Option<Uuid>| u.map(|u| u.hyphenated().to_string()).unwrap_or_default();
        [
            ("nimbus.tenant_id", uuid(self.tenant)),
            ("nimbus.user_id", uuid(self.user)),
            ("nimbus.lookup_email", self.lookup_email.clone().unwrap_or_default()),
            ("nimbus.api_key_prefix", self.api_key_prefix.clone().unwrap_or_default()),
            ("nimbus.refresh_token_hash", self.refresh_token_hash.clone().unwrap_or_default()),
            ("nimbus.node_id", uuid(self.node)),
            ("nimbus.platform", if self.platform { "on".to_owned() } else { String::new() }),
            ("nimbus.gateway", if self.gateway { "on".to_owned() } else { String::new() }),
        ]
    }
}

/// Replaces the scope settings of an open transaction (for example once a lookup has told
/// which user a token belongs to).
pub async fn set_scope(tx: &mut Tx, scope: &Scope) -> Result<(), sqlx::Error> {
    let [tenant, user, email, prefix, hash, node, platform, gateway] = scope.settings().map(|(_, v)| v);
    sqlx::query(
        "SELECT set_config('nimbus.tenant_id', $1, true), set_config('nimbus.user_id', $2, true), \
         set_config('nimbus.lookup_email', $3, true), set_config('nimbus.api_key_prefix', $4, true), \
         set_config('nimbus.refresh_token_hash', $5, true), set_config('nimbus.node_id', $6, true), \
         set_config('nimbus.platform', $7, true), set_config('nimbus.gateway', $8, true)",
    )
    .bind(tenant)
    .bind(user)
    .bind(email)
    .bind(prefix)
    .bind(hash)
    .bind(node)
    .bind(platform)
    .bind(gateway)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_values_are_written_into_statements() {
        assert!(is_plain("01a221eb-df66-743f-92f9-faf564fa7021"));
        assert!(is_plain("nmb_c2bc22437e7d"));
        assert!(is_plain(""));
        for bad in ["o'brien@example.com", "a\\b", "x; DROP TABLE users", "a b", "é"] {
            assert!(!is_plain(bad), "{bad}");
        }
    }
}
