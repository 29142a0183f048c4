//! Sign-in brute-force throttling per account and per source address, kept in PostgreSQL so
//! that every replica counts the same failures. A fixed window: after N failures within the
//! window, further attempts for that account (or from that address) get 429 with Retry-After
//! until the window ends; a successful sign-in clears the account's count.

use std::{net::IpAddr, time::Duration};

use crate::db::{self, Db, Scope};

use crate::{config::ServerArgs, error::ApiError};

/// Refuses the attempt if the account or the address is over its limit.
pub async fn check(db: &Db, cfg: &ServerArgs, email: &str, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let window = cfg.signin_throttle_window.0.as_secs_f64();
    let mut tx = db::begin(db, &Scope::default()).await?;
    let wait: Option<f64> = sqlx::query_scalar(
        "SELECT max(extract(epoch FROM window_start + make_interval(secs => $3) - now()))::float8 \
         FROM signin_throttle WHERE window_start > now() - make_interval(secs => $3) AND ( \
           (scope = 'account' AND key = $1 AND failures >= $4) OR \
           (scope = 'address' AND key = $2 AND failures >= $5))",
    )
    .bind(email)
    .bind(ip.map(|i| i.to_string()).unwrap_or_default())
    .bind(window)
    .bind(cfg.signin_max_failures_per_account as i32)
    .bind(cfg.signin_max_failures_per_address as i32)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    match wait {
        Some(secs) => {
            metrics::counter!("nimbus_signin_throttled_total").increment(1);
            Err(ApiError::TooManyRequests {
                code: "signin_throttled",
                retry_after: Duration::from_secs_f64(secs.max(1.0).ceil()),
            })
        }
        None => Ok(()),
    }
}

/// Counts a failed attempt against the account and the address.
pub async fn record_failure(db: &Db, cfg: &ServerArgs, email: &str, ip: Option<IpAddr>) -> Result<(), sqlx::Error> {
    let mut keys = vec![("account", email.to_owned())];
    if let Some(ip) = ip {
        keys.push(("address", ip.to_string()));
    }
    let mut tx = db::begin(db, &Scope::default()).await?;
    for (scope, key) in keys {
        sqlx::query(
            "INSERT INTO signin_throttle (scope, key, window_start, failures) VALUES ($1, $2, now(), 1) \
             ON CONFLICT (scope, key) DO UPDATE SET \
               failures = CASE WHEN signin_throttle.window_start <= now() - make_interval(secs => $3) \
                               THEN 1 ELSE signin_throttle.failures + 1 END, \
               window_start = CASE WHEN signin_throttle.window_start <= now() - make_interval(secs => $3) \
                               THEN now() ELSE signin_throttle.window_start END",
        )
        .bind(scope)
        .bind(key)
        .bind(cfg.signin_throttle_window.0.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Forgets an account's failures after a successful sign-in.
pub async fn clear_account(db: &Db, email: &str) -> Result<(), sqlx::Error> {
    let mut tx = db::begin(db, &Scope::default()).await?;
    sqlx::query("DELETE FROM signin_throttle WHERE scope = 'account' AND key = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Deletes expired windows (run by the maintenance loop).
pub async fn purge_expired(db: &Db, window: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = db::begin(db, &Scope::default()).await?;
    let r = sqlx::query("DELETE FROM signin_throttle WHERE window_start <= now() - make_interval(secs => $1)")
        .bind(window.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(r.rows_affected())
}
