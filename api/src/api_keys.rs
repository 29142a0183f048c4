//! API keys: tenant-bound machine credentials with a role. The secret is shown once at
//! creation and stored as a SHA-256 hash; the visible prefix identifies the key in lists and
//! logs. Keys can expire and be revoked; the last time a key was used is recorded (with one
//! minute resolution, so that authentication does not write on every request).

use axum::{Extension, Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit,
    auth::{Principal, RequestContext, secret},
    authz::{self, Action, Role, nrn},
    db::{self, Hot, Scope},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    idempotency::ContainsSecret,
    names::DisplayName,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// Every API key starts with this.
pub const KEY_PREFIX: &str = "nmb_";
/// Length of the visible prefix: `nmb_` and 12 hex digits.
const PREFIX_LEN: usize = 16;
/// How many unrevoked keys a tenant may have.
pub const MAX_ACTIVE_KEYS_PER_TENANT: i64 = 100;

/// An API key as listed (never with its secret).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct ApiKey {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: Uuid,
    /// Name.
    pub name: String,
    /// The visible start of the key, e.g. `nmb_1a2b3c4d5e6f`.
    pub prefix: String,
    /// Role the key acts with.
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// It acts with its creator's policies instead of its role and attachments.
    pub inherits: bool,
    /// Who created it.
    pub created_by: Option<Uuid>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Stops working at.
    pub expires_at: Option<DateTime<Utc>>,
    /// Revoked at.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Last used (one-minute resolution).
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A newly created key, with its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedApiKey {
    /// The key.
    #[serde(flatten)]
    pub key: ApiKey,
    /// The full secret: use as `Authorization: Bearer <secret>`. Shown only this once.
    pub secret: String,
}

/// Body of key creation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// A name to recognise the key by.
    pub name: DisplayName,
    /// Role of the key; at most the creator's own.
    pub role: Role,
    /// Optional expiry, in the future.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// Act with the creator's policies as they are at each request (role, attachments, groups),
    /// within the key's own boundary, instead of the key's role and attachments [default false].
    #[serde(default)]
    pub inherit: bool,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_api_key, list_api_keys)).routes(routes!(revoke_api_key))
}

const KEY_COLUMNS: &str =
    "id, tenant_id, name, prefix, role, inherits, created_by, created_at, expires_at, revoked_at, last_used_at";

#[derive(sqlx::FromRow)]
struct KeyAuthRow {
    id: Uuid,
    tenant_id: Uuid,
    secret_hash: Vec<u8>,
    #[sqlx(try_from = "String")]
    role: Role,
    created_by: Option<Uuid>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    stale: bool,
}

/// Authenticates a presented API key.
pub async fn authenticate(state: &AppState, presented: &str) -> Result<Principal, ApiError> {
    let invalid = ApiError::Unauthenticated("invalid API key");
    if presented.len() <= PREFIX_LEN + 1 || !presented.is_char_boundary(PREFIX_LEN) {
        return Err(invalid);
    }
    let prefix = &presented[..PREFIX_LEN];
    // Every prefix this server issued is `nmb_` and 12 lowercase hex digits; anything else is not
    // a key of ours and needs no lookup.
    if !prefix[KEY_PREFIX.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid);
    }
    let scope = Scope { api_key_prefix: Some(prefix.to_owned()), ..Scope::default() };
    let row: Option<KeyAuthRow> = db::read_hot(&state.pool, &scope, Hot::ApiKeyByPrefix, prefix).await?.pop();
    let Some(KeyAuthRow { id: key_id, tenant_id, secret_hash: hash, role, created_by, expires_at, revoked_at, stale }) =
        row
    else {
        return Err(invalid);
    };
    // Comparing SHA-256 digests: timing reveals nothing about the secret itself.
    if hash != secret::sha256(presented.as_bytes()) {
        return Err(invalid);
    }
    if revoked_at.is_some() {
        return Err(ApiError::Unauthenticated("API key revoked"));
    }
    if expires_at.is_some_and(|e| e <= Utc::now()) {
        return Err(ApiError::Unauthenticated("API key expired"));
    }
    if stale {
        let mut tx = db::begin(&state.pool, &Scope::tenant(tenant_id, None)).await?;
        sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = $1").bind(key_id).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(Principal::ApiKey { key_id, tenant_id, role, created_by })
}

/// Create an API key. The response carries the secret, which is never shown again.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/api-keys",
    tag = "api-keys",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: a retry returns the same key"),
    ),
    request_body(content = CreateApiKeyRequest, example = json!({"name": "ci deploy", "role": "developer", "expires_at": "2027-01-01T00:00:00Z"})),
    responses(
        (status = 201, description = "Created; the secret is in the response", body = CreatedApiKey),
        (status = 403, description = "Role too low, or asking for a role above one's own", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "Too many active keys", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<CreateApiKeyRequest>,
) -> ApiResult<(StatusCode, Extension<ContainsSecret>, Json<CreatedApiKey>)> {
    if req.expires_at.is_some_and(|e| e <= Utc::now()) {
        return Err(ApiError::Validation(vec![FieldError::new("expires_at", "future", "must be in the future")]));
    }
    let resource = nrn::api_key(tenant_id, "*");
    let (mut tx, own) = authz::begin(&state.pool, &principal, Action::CreateApiKey, tenant_id, &resource).await?;
    // A short-lived role credential never mints a long-lived one, whatever its policies say.
    if req.role > own || matches!(principal, Principal::Role { .. }) {
        return Err(ApiError::Forbidden {
            action: format!("{} (role {})", Action::CreateApiKey.name(), req.role.as_str()),
            resource,
        });
    }
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE tenant_id = $1 AND revoked_at IS NULL")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if active >= MAX_ACTIVE_KEYS_PER_TENANT {
        return Err(ApiError::conflict(
            "too_many_api_keys",
            format!("a tenant may have at most {MAX_ACTIVE_KEYS_PER_TENANT} active API keys"),
        ));
    }
    let id = Uuid::now_v7();
    let prefix = format!("{KEY_PREFIX}{}", &secret::hex(&secret::random_bytes::<6>()));
    let full = format!("{prefix}_{}", secret::random_token());
    let (actor_type, actor_id) = principal.actor();
    let created_by = match &principal {
        Principal::User { user_id, .. } => Some(*user_id),
        Principal::ApiKey { created_by, .. } => *created_by,
        Principal::Role { .. } => None,
    };
    let key: ApiKey = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, tenant_id, name, prefix, secret_hash, role, created_by, expires_at, inherits) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {KEY_COLUMNS}"
    ))
    .bind(id)
    .bind(tenant_id)
    .bind(req.name.as_str())
    .bind(&prefix)
    .bind(secret::sha256(full.as_bytes()))
    .bind(req.role.as_str())
    .bind(created_by)
    .bind(req.expires_at)
    .bind(req.inherit)
    .fetch_one(&mut *tx)
    .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::CreateApiKey,
        tenant_id,
        nrn::api_key(tenant_id, &id.to_string()),
        json!({ "name": req.name.as_str(), "prefix": prefix, "role": req.role,
                             "expires_at": req.expires_at, "via": actor_type, "via_id": actor_id }),
    )
    .await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok((StatusCode::CREATED, Extension(ContainsSecret), Json(CreatedApiKey { key, secret: full })))
}

/// List a tenant's API keys (revoked ones included, marked).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/api-keys",
    tag = "api-keys",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), PageParams),
    responses(
        (status = 200, description = "A page of keys", body = Page<ApiKey>),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_api_keys(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<ApiKey>>> {
    let (limit, after) = page.parse()?;
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::ListApiKeys, tenant_id, &nrn::api_key(tenant_id, "*")).await?;
    let rows: Vec<ApiKey> = sqlx::query_as(&format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) \
         ORDER BY id LIMIT $3"
    ))
    .bind(tenant_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |k| k.id)))
}

/// Revoke an API key. It stops working at once; revoking a revoked key changes nothing.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/api-keys/{key_id}",
    tag = "api-keys",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "Key id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 403, description = "Role too low", body = crate::error::Problem),
        (status = 404, description = "No such key", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn revoke_api_key(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, key_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::api_key(tenant_id, &key_id.to_string());
    let (mut tx, own) = authz::begin(&state.pool, &principal, Action::RevokeApiKey, tenant_id, &resource).await?;
    let key: Option<(Option<DateTime<Utc>>, String)> =
        sqlx::query_as("SELECT revoked_at, role FROM api_keys WHERE tenant_id = $1 AND id = $2 FOR UPDATE")
            .bind(tenant_id)
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((revoked_at, role)) = key else {
        return Err(ApiError::NotFound("API key"));
    };
    // Keys are managed up to one's own role: a developer cannot revoke an admin's key.
    if Role::parse(&role)? > own {
        return Err(ApiError::Forbidden { action: format!("{} (role {role})", Action::RevokeApiKey.name()), resource });
    }
    if revoked_at.is_some() {
        return Ok(StatusCode::NO_CONTENT);
    }
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1").bind(key_id).execute(&mut *tx).await?;
    audit::record_action(&mut tx, &ctx, &principal, Action::RevokeApiKey, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}
