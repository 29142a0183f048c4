//! Sign-in brute-force throttling per account and per source address, kept in PostgreSQL so
//! that every replica counts the same failures. A fixed window: after N failures within the
//! window, further attempts for that account (or from that address) get 429 with Retry-After
//! until the window ends; a successful sign-in clears the account's count. Attempts are counted
//! before the password is checked, so parallel guesses cannot slip past the limit.

use std::{net::IpAddr, time::Duration};

use crate::db::{self, Db, Scope};

use crate::{config::ServerArgs, error::ApiError};

/// Counts a sign-in attempt against the account and the address *before* the password is
/// checked, and refuses it (429) if either is now over its limit. Counting first makes the limit
/// hold for attempts sent in parallel too. A successful sign-in then takes its attempt back
/// ([`succeeded`]), so only failures accumulate.
pub async fn attempt(db: &Db, cfg: &ServerArgs, email: &str, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let window = cfg.signin_throttle_window.0.as_secs_f64();
    let mut keys = vec![("account", email.to_owned(), cfg.signin_max_failures_per_account)];
    if let Some(ip) = ip {
        keys.push(("address", ip.to_string(), cfg.signin_max_failures_per_address));
    }
    let mut tx = db::begin(db, &Scope::default()).await?;
    let mut wait: Option<f64> = None;
    for (scope, key, limit) in keys {
        let (count, left): (i32, f64) = sqlx::query_as(
            "INSERT INTO signin_throttle (scope, key, window_start, failures) VALUES ($1, $2, now(), 1) \
             ON CONFLICT (scope, key) DO UPDATE SET \
               failures = CASE WHEN signin_throttle.window_start <= now() - make_interval(secs => $3) \
                               THEN 1 ELSE signin_throttle.failures + 1 END, \
               window_start = CASE WHEN signin_throttle.window_start <= now() - make_interval(secs => $3) \
                               THEN now() ELSE signin_throttle.window_start END \
             RETURNING failures, extract(epoch FROM window_start + make_interval(secs => $3) - now())::float8",
        )
        .bind(scope)
        .bind(key)
        .bind(window)
        .fetch_one(&mut *tx)
        .await?;
        if count > limit as i32 {
            wait = Some(wait.unwrap_or(0.0).max(left));
        }
    }
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

/// After a successful sign-in: forgets the account's count and takes the attempt back from the
/// address's count.
pub async fn succeeded(db: &Db, email: &str, ip: Option<IpAddr>) -> Result<(), sqlx::Error> {
    let mut tx = db::begin(db, &Scope::default()).await?;
    sqlx::query("DELETE FROM signin_throttle WHERE scope = 'account' AND key = $1")
        .bind(email)
        .execute(&mut *tx)
        .await?;
    if let Some(ip) = ip {
        sqlx::query(
            "UPDATE signin_throttle SET failures = greatest(failures - 1, 0) WHERE scope = 'address' AND key = $1",
        )
        .bind(ip.to_string())
        .execute(&mut *tx)
        .await?;
    }
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
