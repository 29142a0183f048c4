//! Sessions: sign-up, sign-in, refresh-token rotation with reuse detection, sign-out.
//!
//! A sign-in starts a session: a family of refresh tokens. Each refresh marks the presented token
//! used and issues the next one in the family; presenting a used token again means it leaked, so
//! the whole family is revoked and the caller must sign in again.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{RequestContext, password, secret, throttle};
use crate::{
    audit::{self, Actor, Entry},
    authz::nrn,
    db::{self, Scope, Tx},
    error::{ApiError, ApiResult, on_constraint},
    extract,
    names::{DisplayName, Email, Name, NewPassword, SecretText},
    startup::AppState,
    tenants::{self, Tenant},
};

/// Tokens returned by sign-up, sign-in and refresh.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// The access token (a JWT verifiable with `/.well-known/jwks.json`).
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// When the access token expires.
    pub expires_at: DateTime<Utc>,
    /// Exchange at `/v1/auth/refresh` for new tokens; usable once.
    pub refresh_token: String,
    /// When the refresh token expires.
    pub refresh_expires_at: DateTime<Utc>,
}

/// Body of sign-up.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUpRequest {
    /// E-mail address (the login).
    pub email: Email,
    /// Password, 10–256 characters.
    pub password: NewPassword,
    /// The user's name.
    pub display_name: DisplayName,
    /// Name of the user's first tenant (a DNS label, unique).
    pub tenant_name: Name,
    /// Display name of the first tenant (defaults to its name).
    #[serde(default)]
    pub tenant_display_name: Option<DisplayName>,
}

/// Result of sign-up.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignUpResponse {
    /// The new user's id.
    pub user_id: Uuid,
    /// The first tenant, where the user is admin.
    pub tenant: Tenant,
    /// Tokens for the new session.
    pub tokens: TokenResponse,
}

/// Body of sign-in.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    /// E-mail address.
    pub email: Email,
    /// Password.
    pub password: SecretText,
}

/// Body of refresh and sign-out.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// A refresh token.
    pub refresh_token: SecretText,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(sign_up))
        .routes(routes!(sign_in))
        .routes(routes!(refresh))
        .routes(routes!(sign_out))
}

/// Creates a user, their first tenant (where they are admin) and a session, in one transaction.
/// Returns the user id, the tenant and the tokens.
pub async fn create_user_with_tenant(
    state: &AppState,
    ctx: &RequestContext,
    req: SignUpRequest,
    platform_admin: bool,
) -> ApiResult<SignUpResponse> {
    let password_hash = password::hash(req.password.expose()).await?;
    let user_id = Uuid::now_v7();
    let mut tx = db::begin(&state.pool, &Scope::user(user_id)).await?;
    sqlx::query(
        "INSERT INTO users (id, email, display_name, password_hash, is_platform_admin) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user_id)
    .bind(req.email.as_str())
    .bind(req.display_name.as_str())
    .bind(&password_hash)
    .bind(platform_admin)
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        on_constraint(
            e,
            [("users_email_key", ApiError::conflict("email_taken", "this e-mail address already has an account"))],
        )
    })?;
    let actor = Actor::Principal("user", user_id);
    audit::record(
        &mut tx,
        ctx,
        Entry {
            tenant: None,
            actor,
            action: "auth:SignUp",
            resource: nrn::user(user_id),
            success: true,
            details: json!({ "email": req.email.as_str() }),
        },
    )
    .await?;
    let display = req.tenant_display_name.unwrap_or_else(|| {
        DisplayName::try_from(req.tenant_name.as_str().to_owned()).expect("a name is a display name")
    });
    let tenant = tenants::insert_tenant(&mut tx, ctx, actor, user_id, &req.tenant_name, &display).await?;
    let tokens = start_session(state, &mut tx, user_id).await?;
    tx.commit().await?;
    Ok(SignUpResponse { user_id, tenant, tokens })
}

/// Sign up: create a user and their first tenant.
#[utoipa::path(
    post,
    path = "/v1/auth/signup",
    tag = "auth",
    request_body(content = SignUpRequest, example = json!({
        "email": "ada@example.com", "password": "correct horse battery",
        "display_name": "Ada Lovelace", "tenant_name": "analytical"
    })),
    responses(
        (status = 201, description = "User, first tenant and session created", body = SignUpResponse),
        (status = 403, description = "Self-service sign-up is disabled", body = crate::error::Problem),
        (status = 409, description = "E-mail or tenant name taken", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    )
)]
pub async fn sign_up(
    State(state): State<AppState>,
    ctx: RequestContext,
    extract::Json(req): extract::Json<SignUpRequest>,
) -> ApiResult<(StatusCode, Json<SignUpResponse>)> {
    if !state.settings.allow_signup {
        return Err(ApiError::Forbidden { action: "auth:SignUp".into(), resource: "nrn:nimbus:iam::user/*".into() });
    }
    let res = create_user_with_tenant(&state, &ctx, req, false).await?;
    Ok((StatusCode::CREATED, Json(res)))
}

/// Sign in with e-mail and password.
#[utoipa::path(
    post,
    path = "/v1/auth/signin",
    tag = "auth",
    request_body(content = SignInRequest, example = json!({"email": "ada@example.com", "password": "correct horse battery"})),
    responses(
        (status = 200, description = "Signed in", body = TokenResponse),
        (status = 401, description = "Wrong e-mail or password", body = crate::error::Problem),
        (status = 429, description = "Too many failed attempts; see Retry-After", body = crate::error::Problem),
    )
)]
pub async fn sign_in(
    State(state): State<AppState>,
    ctx: RequestContext,
    extract::Json(req): extract::Json<SignInRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let email = req.email.as_str();
    throttle::attempt(&state.pool, &state.settings, email, ctx.source_ip).await?;
    if req.password.expose().len() > crate::names::PASSWORD_MAX * 4 {
        return Err(ApiError::field("password", "length", "is longer than any valid password"));
    }
    // Look the user up and let go of the connection before the deliberately slow hash check.
    let lookup = Scope { lookup_email: Some(email.to_owned()), ..Scope::default() };
    let mut tx = db::begin(&state.pool, &lookup).await?;
    let user: Option<(Uuid, String)> = sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1")
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    let ok = password::verify(req.password.expose().to_owned(), user.as_ref().map(|u| u.1.clone())).await?;
    let Some((user_id, _)) = user.filter(|_| ok) else {
        let mut tx = db::begin(&state.pool, &Scope::default()).await?;
        audit::record(
            &mut tx,
            &ctx,
            Entry {
                tenant: None,
                actor: Actor::Anonymous,
                action: "auth:SignIn",
                resource: "nrn:nimbus:iam::user/*".into(),
                success: false,
                details: json!({ "email": email }),
            },
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("nimbus_signin_total", "outcome" => "failure").increment(1);
        return Err(ApiError::InvalidCredentials);
    };
    let mut tx = db::begin(&state.pool, &Scope::user(user_id)).await?;
    let tokens = start_session(&state, &mut tx, user_id).await?;
    user_event(&mut tx, &ctx, user_id, "auth:SignIn", true, json!({})).await?;
    tx.commit().await?;
    throttle::succeeded(&state.pool, email, ctx.source_ip).await?;
    metrics::counter!("nimbus_signin_total", "outcome" => "success").increment(1);
    Ok(Json(tokens))
}

/// Exchange a refresh token for new tokens. The presented token is used up; presenting it
/// again revokes the session.
#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens", body = TokenResponse),
        (status = 401, description = "Unknown, expired or revoked token; `refresh_token_reused` when a used token came back", body = crate::error::Problem),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    ctx: RequestContext,
    extract::Json(req): extract::Json<RefreshRequest>,
) -> ApiResult<Json<TokenResponse>> {
    let hash = secret::sha256(req.refresh_token.expose().as_bytes());
    let scope = Scope { refresh_token_hash: Some(secret::hex(&hash)), ..Scope::default() };
    let mut tx = db::begin(&state.pool, &scope).await?;
    let owner: Option<(Uuid, Uuid)> =
        sqlx::query_as("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((family, user_id)) = owner else {
        return Err(ApiError::Unauthenticated("unknown refresh token"));
    };
    db::set_scope(&mut tx, &Scope::user(user_id)).await?;
    // One exchange per session at a time: a reuse that revokes the family and a sibling refresh
    // cannot interleave, so no token of a revoked family is ever issued.
    lock_family(&mut tx, family).await?;
    let row: RefreshRow = sqlx::query_as(
        "SELECT id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(&hash)
    .fetch_one(&mut *tx)
    .await?;
    let RefreshRow { id, expires_at, used_at, revoked_at } = row;
    if revoked_at.is_some() {
        return Err(ApiError::Unauthenticated("refresh token revoked"));
    }
    if used_at.is_some() {
        revoke_family(&mut tx, family).await?;
        user_event(
            &mut tx,
            &ctx,
            user_id,
            "auth:RefreshToken",
            false,
            json!({ "reason": "reuse_detected", "session": family }),
        )
        .await?;
        tx.commit().await?;
        metrics::counter!("nimbus_refresh_reuse_total").increment(1);
        tracing::warn!(user = %user_id, session = %family, "refresh token reuse: session revoked");
        return Err(ApiError::RefreshTokenReused);
    }
    if expires_at <= Utc::now() {
        return Err(ApiError::Unauthenticated("refresh token expired"));
    }
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1").bind(id).execute(&mut *tx).await?;
    let tokens = issue_tokens(&state, &mut tx, user_id, family).await?;
    user_event(&mut tx, &ctx, user_id, "auth:RefreshToken", true, json!({ "session": family })).await?;
    tx.commit().await?;
    Ok(Json(tokens))
}

/// Sign out: revoke the session the refresh token belongs to. Access tokens already issued
/// stay valid until they expire (at most the access-token lifetime).
#[utoipa::path(
    post,
    path = "/v1/auth/signout",
    tag = "auth",
    request_body = RefreshRequest,
    responses((status = 204, description = "Session revoked (or already gone)"))
)]
pub async fn sign_out(
    State(state): State<AppState>,
    ctx: RequestContext,
    extract::Json(req): extract::Json<RefreshRequest>,
) -> ApiResult<StatusCode> {
    let hash = secret::sha256(req.refresh_token.expose().as_bytes());
    let scope = Scope { refresh_token_hash: Some(secret::hex(&hash)), ..Scope::default() };
    let mut tx = db::begin(&state.pool, &scope).await?;
    let row: Option<(Uuid, Uuid)> =
        sqlx::query_as("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some((family, user_id)) = row {
        db::set_scope(&mut tx, &Scope::user(user_id)).await?;
        lock_family(&mut tx, family).await?;
        revoke_family(&mut tx, family).await?;
        user_event(&mut tx, &ctx, user_id, "auth:SignOut", true, json!({ "session": family })).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(sqlx::FromRow)]
struct RefreshRow {
    id: Uuid,
    expires_at: DateTime<Utc>,
    used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

/// Audits an action of a user on their own account (outside any tenant).
async fn user_event(
    tx: &mut Tx,
    ctx: &RequestContext,
    user_id: Uuid,
    action: &str,
    success: bool,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let entry = Entry {
        tenant: None,
        actor: Actor::Principal("user", user_id),
        action,
        resource: nrn::user(user_id),
        success,
        details,
    };
    audit::record(tx, ctx, entry).await
}

async fn lock_family(tx: &mut Tx, family: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))").bind(family).execute(&mut **tx).await?;
    Ok(())
}

async fn revoke_family(tx: &mut Tx, family: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL")
        .bind(family)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Starts a new session (refresh-token family) for a user; the transaction must be scoped to them.
pub async fn start_session(state: &AppState, tx: &mut Tx, user_id: Uuid) -> ApiResult<TokenResponse> {
    issue_tokens(state, tx, user_id, Uuid::now_v7()).await
}

async fn issue_tokens(state: &AppState, tx: &mut Tx, user_id: Uuid, family: Uuid) -> ApiResult<TokenResponse> {
    let refresh_token = format!("nmr_{}", secret::random_token());
    let refresh_expires_at =
        Utc::now() + chrono::Duration::from_std(state.settings.refresh_token_ttl.0).map_err(anyhow::Error::from)?;
    sqlx::query(
        "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(family)
    .bind(user_id)
    .bind(secret::sha256(refresh_token.as_bytes()))
    .bind(refresh_expires_at)
    .execute(&mut **tx)
    .await?;
    let (access_token, expires_at) = state.keys.issue(user_id, family)?;
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".into(),
        expires_in: state.keys.access_ttl().as_secs(),
        expires_at,
        refresh_token,
        refresh_expires_at,
    })
}
