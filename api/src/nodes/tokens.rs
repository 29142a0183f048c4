//! Join tokens: what a platform admin hands to a new worker node so that it can join. Shown
//! once at creation, stored as a SHA-256 hash, with an optional expiry and use limit, revocable.

use axum::{Extension, Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit::{self, Entry},
    auth::{Principal, RequestContext, secret},
    authz::{self, Action, nrn},
    db::Tx,
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    idempotency::ContainsSecret,
    names::DisplayName,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// Every join token starts with this.
pub const TOKEN_PREFIX: &str = "njt_";
/// Most unrevoked join tokens at once.
pub const MAX_ACTIVE_TOKENS: i64 = 100;
/// Highest use limit of one token.
pub const MAX_USES: i32 = 100_000;

/// A join token as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct JoinToken {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// The visible start of the token, e.g. `njt_1a2b3c4d5e6f`.
    pub prefix: String,
    /// Who created it.
    pub created_by: Option<Uuid>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Stops working at.
    pub expires_at: Option<DateTime<Utc>>,
    /// How many joins it allows (none: unlimited).
    pub max_uses: Option<i32>,
    /// How many joins it was used for.
    pub uses: i32,
    /// Revoked at.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A newly created join token, with its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedJoinToken {
    /// The token.
    #[serde(flatten)]
    pub token: JoinToken,
    /// The full token, for the agent's `--join-token`. Shown only this once.
    pub secret: String,
}

/// Body of join-token creation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinTokenRequest {
    /// A name to recognise the token by.
    pub name: DisplayName,
    /// Optional expiry, in the future.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Optional use limit, 1 to 100,000.
    #[serde(default)]
    pub max_uses: Option<i32>,
}

const COLUMNS: &str = "id, name, prefix, created_by, created_at, expires_at, max_uses, uses, revoked_at";

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_join_token, list_join_tokens)).routes(routes!(revoke_join_token))
}

/// Create a join token (platform admins). The response carries the secret, shown once.
#[utoipa::path(
    post,
    path = "/v1/join-tokens",
    tag = "nodes",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body(content = CreateJoinTokenRequest, example = json!({"name": "rack 3", "max_uses": 10, "expires_at": "2027-01-01T00:00:00Z"})),
    responses(
        (status = 201, description = "Created; the secret is in the response", body = CreatedJoinToken),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 409, description = "Too many active tokens", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_join_token(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    extract::Json(req): extract::Json<CreateJoinTokenRequest>,
) -> ApiResult<(StatusCode, Extension<ContainsSecret>, Json<CreatedJoinToken>)> {
    let resource = nrn::join_token("*");
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::CreateJoinToken, &resource).await?;
    let mut errors = Vec::new();
    if req.expires_at.is_some_and(|e| e <= Utc::now()) {
        errors.push(FieldError::new("expires_at", "future", "must be in the future"));
    }
    if req.max_uses.is_some_and(|n| !(1..=MAX_USES).contains(&n)) {
        errors.push(FieldError::new("max_uses", "range", format!("must be 1 to {MAX_USES}")));
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM join_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
    )
    .fetch_one(&mut *tx)
    .await?;
    if active >= MAX_ACTIVE_TOKENS {
        return Err(ApiError::conflict(
            "too_many_join_tokens",
            format!("at most {MAX_ACTIVE_TOKENS} join tokens can be active; revoke some first"),
        ));
    }
    let (token, full) = issue(&mut tx, req.name.as_str(), principal.user_id(), req.expires_at, req.max_uses).await?;
    let (id, prefix) = (token.id, token.prefix.clone());
    audit::record(
        &mut tx,
        &ctx,
        Entry {
            tenant: None,
            actor: (&principal).into(),
            action: Action::CreateJoinToken.name(),
            resource: nrn::join_token(id),
            success: true,
            details: json!({ "name": req.name.as_str(), "prefix": prefix, "max_uses": req.max_uses, "expires_at": req.expires_at }),
        },
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Extension(ContainsSecret), Json(CreatedJoinToken { token, secret: full })))
}

/// Stores a new join token; returns it and its secret (the only time the secret exists).
pub async fn issue(
    tx: &mut Tx,
    name: &str,
    created_by: Option<Uuid>,
    expires_at: Option<DateTime<Utc>>,
    max_uses: Option<i32>,
) -> Result<(JoinToken, String), sqlx::Error> {
    let id = Uuid::now_v7();
    let prefix = format!("{TOKEN_PREFIX}{}", secret::hex(&secret::random_bytes::<6>()));
    let full = format!("{prefix}_{}", secret::random_token());
    let token: JoinToken = sqlx::query_as(&format!(
        "INSERT INTO join_tokens (id, name, prefix, token_hash, created_by, expires_at, max_uses) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(name)
    .bind(&prefix)
    .bind(secret::sha256(full.as_bytes()))
    .bind(created_by)
    .bind(expires_at)
    .bind(max_uses)
    .fetch_one(&mut **tx)
    .await?;
    Ok((token, full))
}

/// List join tokens (platform admins), revoked and expired ones included.
#[utoipa::path(
    get,
    path = "/v1/join-tokens",
    tag = "nodes",
    params(PageParams),
    responses(
        (status = 200, description = "A page of join tokens", body = Page<JoinToken>),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_join_tokens(
    State(state): State<AppState>,
    principal: Principal,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<JoinToken>>> {
    let (limit, after) = page.parse()?;
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::ListJoinTokens, &nrn::join_token("*")).await?;
    let rows: Vec<JoinToken> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM join_tokens WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |t| t.id)))
}

/// Revoke a join token (platform admins). Nodes that joined with it stay joined.
#[utoipa::path(
    delete,
    path = "/v1/join-tokens/{token_id}",
    tag = "nodes",
    params(("token_id" = Uuid, Path, description = "Join token id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such token", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_join_token(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(token_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    let resource = nrn::join_token(token_id);
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::RevokeJoinToken, &resource).await?;
    let revoked: Option<Option<DateTime<Utc>>> =
        sqlx::query_scalar("SELECT revoked_at FROM join_tokens WHERE id = $1 FOR UPDATE")
            .bind(token_id)
            .fetch_optional(&mut *tx)
            .await?;
    match revoked {
        None => return Err(ApiError::NotFound("join token")),
        Some(Some(_)) => return Ok(StatusCode::NO_CONTENT),
        Some(None) => {}
    }
    sqlx::query("UPDATE join_tokens SET revoked_at = now() WHERE id = $1").bind(token_id).execute(&mut *tx).await?;
    audit::record(
        &mut tx,
        &ctx,
        Entry {
            tenant: None,
            actor: (&principal).into(),
            action: Action::RevokeJoinToken.name(),
            resource,
            success: true,
            details: json!({}),
        },
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
