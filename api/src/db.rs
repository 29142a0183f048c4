//! Database access: the migrator, the application pool (connected as the `nimbus_app` role, to
//! which row-level security applies) and scoped transactions that tell the RLS policies who is
//! asking.

use std::{str::FromStr, time::Duration};

use anyhow::Context;
use sqlx::{
    PgPool, Postgres, Transaction,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

/// The role every application connection acts as.
pub const APP_ROLE: &str = "nimbus_app";

/// The migrations of `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

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

/// Opens the application pool. Every connection starts with the session role `nimbus_app`
/// (a startup option, so even `RESET ROLE` returns to it).
pub async fn connect_app(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)
        .context("parsing the database URL")?
        .options([("role", APP_ROLE)])
        .application_name("nimbus-api");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await
        .context("connecting to PostgreSQL as the application role")
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
}

/// A transaction on the application pool.
pub type Tx = Transaction<'static, Postgres>;

/// Begins a transaction with the scope's settings in place.
pub async fn begin(pool: &PgPool, scope: &Scope) -> Result<Tx, sqlx::Error> {
    let mut tx = pool.begin().await?;
    set_scope(&mut tx, scope).await?;
    Ok(tx)
}

/// Replaces the scope settings of an open transaction (for example once a lookup has told
/// which user a token belongs to).
pub async fn set_scope(tx: &mut Tx, scope: &Scope) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('nimbus.tenant_id', $1, true), set_config('nimbus.user_id', $2, true), \
         set_config('nimbus.lookup_email', $3, true), set_config('nimbus.api_key_prefix', $4, true), \
         set_config('nimbus.refresh_token_hash', $5, true)",
    )
    .bind(scope.tenant.map(|t| t.to_string()).unwrap_or_default())
    .bind(scope.user.map(|u| u.to_string()).unwrap_or_default())
    .bind(scope.lookup_email.clone().unwrap_or_default())
    .bind(scope.api_key_prefix.clone().unwrap_or_default())
    .bind(scope.refresh_token_hash.clone().unwrap_or_default())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
