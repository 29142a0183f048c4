//! `Idempotency-Key` on POSTs: the first response to a (principal, key) is stored; a retry
//! with the same key and the same request gets that response again (marked
//! `Idempotency-Replayed: true`), the same key with a different request gets 422, and a retry
//! while the first is still running gets 409 (a claim older than the request timeout is taken
//! over: its request died). Server errors are not stored, so they can be
//! retried. Only authenticated calls take part: sign-up, sign-in and token refresh ignore
//! the header (a refresh token must never be replayable). Records expire after the configured
//! TTL.

use axum::{
    body::{Body, to_bytes},
    extract::{FromRequestParts, Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::{
    auth::{Principal, secret},
    db::{self, Scope},
    error::ApiError,
    startup::AppState,
};

/// Request header naming the key.
pub const HEADER: &str = "idempotency-key";
/// Response header set on replays.
pub const REPLAYED: &str = "idempotency-replayed";
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

#[derive(sqlx::FromRow)]
struct Stored {
    request_hash: Vec<u8>,
    status_code: Option<i16>,
    content_type: Option<String>,
    response_body: Option<Vec<u8>>,
}

/// The middleware.
pub async fn middleware(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match handle(state, req, next).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    }
}

/// Put into a response's extensions by handlers whose response carries a secret shown once
/// (a new API key): such a response is not stored, and a retry with the same key gets 409
/// `idempotent_replay_unavailable` instead of a second copy of the secret.
#[derive(Debug, Clone, Copy)]
pub struct ContainsSecret;

async fn handle(state: AppState, req: Request, next: Next) -> Result<Response, ApiError> {
    // Sign-up, sign-in, refresh and sign-out never take part: their responses are credentials.
    if req.method() != Method::POST || req.uri().path().starts_with("/v1/auth/") {
        return Ok(next.run(req).await);
    }
    let Some(raw) = req.headers().get(HEADER) else {
        return Ok(next.run(req).await);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::field("Idempotency-Key", "format", format!("must be 1-{MAX_KEY_LEN} visible ASCII characters"))
        })?
        .to_owned();
    let (mut parts, body) = req.into_parts();
    let principal = match Principal::from_request_parts(&mut parts, &state).await {
        Ok(p) => p,
        // Unauthenticated calls pass through; the handler answers them.
        Err(_) => return Ok(next.run(Request::from_parts(parts, body)).await),
    };
    let body = to_bytes(body, state.settings.max_body_bytes)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit: state.settings.max_body_bytes })?;
    let mut fingerprint = Vec::with_capacity(body.len() + 64);
    fingerprint.extend_from_slice(parts.method.as_str().as_bytes());
    fingerprint.push(b'\n');
    fingerprint.extend_from_slice(parts.uri.path().as_bytes());
    fingerprint.push(b'\n');
    fingerprint.extend_from_slice(&body);
    let hash = secret::sha256(&fingerprint);
    let (kind, id) = principal.actor();
    let owner = format!("{kind}:{id}");
    let ttl = state.settings.idempotency_ttl.0.as_secs_f64();

    let mut tx = db::begin(&state.pool, &Scope::default()).await?;
    // An expired record is forgotten; so is a claim whose request cannot still be running (it
    // outlived the request timeout: the process died or the handler panicked before storing).
    let lease = (state.settings.request_timeout.0 + std::time::Duration::from_secs(5)).as_secs_f64();
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2 AND (created_at < now() - make_interval(secs => $3) \
         OR (status_code IS NULL AND created_at < now() - make_interval(secs => $4)))",
    )
    .bind(&owner)
    .bind(&key)
    .bind(ttl)
    .bind(lease)
    .execute(&mut *tx)
    .await?;
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (principal, key, request_hash) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(&owner)
    .bind(&key)
    .bind(&hash)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;

    let stored: Option<Stored> = if claimed {
        None
    } else {
        Some(
            sqlx::query_as(
                "SELECT request_hash, status_code, content_type, response_body FROM idempotency_keys \
                 WHERE principal = $1 AND key = $2",
            )
            .bind(&owner)
            .bind(&key)
            .fetch_one(&mut *tx)
            .await?,
        )
    };
    tx.commit().await?;

    if let Some(Stored { request_hash: stored_hash, status_code: status, content_type, response_body: stored_body }) =
        stored
    {
        if stored_hash != hash {
            return Err(ApiError::IdempotencyKeyReused);
        }
        let Some(status) = status else {
            return Err(ApiError::conflict(
                "idempotency_key_in_progress",
                "a request with this Idempotency-Key is still being processed",
            ));
        };
        metrics::counter!("nimbus_idempotent_replays_total").increment(1);
        let mut res = Response::new(Body::from(stored_body.unwrap_or_default()));
        *res.status_mut() = StatusCode::from_u16(status as u16).map_err(anyhow::Error::from)?;
        if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
            res.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        res.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
        return Ok(res);
    }

    parts.extensions.insert(principal);
    let res = next.run(Request::from_parts(parts, Body::from(body))).await;
    let release = || async {
        let mut tx = db::begin(&state.pool, &Scope::default()).await?;
        sqlx::query("DELETE FROM idempotency_keys WHERE principal = $1 AND key = $2")
            .bind(&owner)
            .bind(&key)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    };
    if res.status().is_server_error() {
        release().await?;
        return Ok(res);
    }
    let (res_parts, res_body) = res.into_parts();
    if res_parts.extensions.get::<ContainsSecret>().is_some() {
        let tombstone = ApiError::conflict(
            "idempotent_replay_unavailable",
            "the first response to this Idempotency-Key carried a secret that is shown only once; \
             the resource was created: find it in its list, and revoke it if the secret was lost",
        )
        .problem();
        store(
            &state,
            &owner,
            &key,
            StatusCode::CONFLICT,
            crate::error::PROBLEM_JSON,
            &serde_json::to_vec(&tombstone).map_err(anyhow::Error::from)?,
        )
        .await?;
        return Ok(Response::from_parts(res_parts, res_body));
    }
    let bytes = match to_bytes(res_body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            release().await?;
            return Err(ApiError::Internal(anyhow::anyhow!("buffering response: {e}")));
        }
    };
    let content_type = res_parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    store(&state, &owner, &key, res_parts.status, content_type, &bytes).await?;
    Ok(Response::from_parts(res_parts, Body::from(bytes)))
}

async fn store(
    state: &AppState,
    owner: &str,
    key: &str,
    status: StatusCode,
    content_type: &str,
    body: &[u8],
) -> Result<(), sqlx::Error> {
    let mut tx = db::begin(&state.pool, &Scope::default()).await?;
    sqlx::query(
        "UPDATE idempotency_keys SET status_code = $3, content_type = $4, response_body = $5 \
         WHERE principal = $1 AND key = $2",
    )
    .bind(owner)
    .bind(key)
    .bind(status.as_u16() as i16)
    .bind(content_type)
    .bind(body)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Deletes expired records (run by the maintenance loop).
pub async fn purge_expired(state: &AppState) -> Result<u64, sqlx::Error> {
    let mut tx = db::begin(&state.pool, &Scope::default()).await?;
    let r = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)")
        .bind(state.settings.idempotency_ttl.0.as_secs_f64())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(r.rows_affected())
}
