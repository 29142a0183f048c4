//! Tenants: create, list mine, get, rename. The creator becomes the tenant's first admin.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit::{self, Actor, Entry},
    auth::{Principal, RequestContext},
    authz::{self, Action, Role, nrn},
    db::{self, Scope, Tx},
    error::{ApiError, ApiResult, on_constraint},
    extract::{self, Path, Query},
    names::{DisplayName, Name},
    pagination::{Page, PageParams},
    startup::AppState,
};

/// How many tenants one user may belong to.
pub const MAX_TENANTS_PER_USER: i64 = 100;

/// A tenant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Tenant {
    /// Id.
    pub id: Uuid,
    /// Unique name (a DNS label), used in invocation URLs.
    pub name: String,
    /// Display name.
    pub display_name: String,
    /// The caller's role in the tenant.
    pub role: Role,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct TenantRow {
    id: Uuid,
    name: String,
    display_name: String,
    role: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = anyhow::Error;
    fn try_from(r: TenantRow) -> anyhow::Result<Tenant> {
        Ok(Tenant {
            id: r.id,
            name: r.name,
            display_name: r.display_name,
            role: Role::parse(&r.role)?,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// Body of tenant creation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// Unique name (a DNS label).
    pub name: Name,
    /// Display name (defaults to the name).
    #[serde(default)]
    pub display_name: Option<DisplayName>,
}

/// Body of a tenant update; absent fields are left as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenantRequest {
    /// New unique name.
    #[serde(default)]
    pub name: Option<Name>,
    /// New display name.
    #[serde(default)]
    pub display_name: Option<DisplayName>,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create_tenant, list_tenants)).routes(routes!(get_tenant, update_tenant))
}

fn name_taken() -> ApiError {
    ApiError::conflict("tenant_name_taken", "a tenant with this name already exists")
}

/// Inserts a tenant with `user` as its admin. Leaves the transaction scoped to the new tenant.
pub async fn insert_tenant(
    tx: &mut Tx,
    ctx: &RequestContext,
    actor: Actor,
    user: Uuid,
    name: &Name,
    display_name: &DisplayName,
) -> ApiResult<Tenant> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM memberships WHERE user_id = $1")
        .bind(user)
        .fetch_one(&mut **tx)
        .await?;
    if count >= MAX_TENANTS_PER_USER {
        return Err(ApiError::conflict(
            "too_many_tenants",
            format!("a user may belong to at most {MAX_TENANTS_PER_USER} tenants"),
        ));
    }
    let id = Uuid::now_v7();
    db::set_scope(tx, &Scope::tenant(id, Some(user))).await?;
    let (created_at, updated_at): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO tenants (id, name, display_name) VALUES ($1, $2, $3) RETURNING created_at, updated_at",
    )
    .bind(id)
    .bind(name.as_str())
    .bind(display_name.as_str())
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| on_constraint(e, [("tenants_name_key", name_taken())]))?;
    sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'admin')")
        .bind(id)
        .bind(user)
        .execute(&mut **tx)
        .await?;
    audit::record(
        tx,
        ctx,
        Entry {
            tenant: Some(id),
            actor,
            action: "tenants:CreateTenant",
            resource: nrn::tenant(id),
            success: true,
            details: json!({ "name": name.as_str() }),
        },
    )
    .await?;
    Ok(Tenant {
        id,
        name: name.to_string(),
        display_name: display_name.as_str().to_owned(),
        role: Role::Admin,
        created_at,
        updated_at,
    })
}

/// Create a tenant; the caller becomes its admin. Only users (not API keys) create tenants.
#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and body return the first response")),
    request_body(content = CreateTenantRequest, example = json!({"name": "acme", "display_name": "Acme Corp"})),
    responses(
        (status = 201, description = "Created", body = Tenant),
        (status = 403, description = "API keys cannot create tenants", body = crate::error::Problem),
        (status = 409, description = "Name taken", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_tenant(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    extract::Json(req): extract::Json<CreateTenantRequest>,
) -> ApiResult<(StatusCode, Json<Tenant>)> {
    let Some(user) = principal.user_id() else {
        return Err(ApiError::Forbidden {
            action: "tenants:CreateTenant".into(),
            resource: "nrn:nimbus:tenants:*:tenant/*".into(),
        });
    };
    let display = req
        .display_name
        .unwrap_or_else(|| DisplayName::try_from(req.name.to_string()).expect("a name is a display name"));
    let mut tx = db::begin(&state.pool, &Scope::user(user)).await?;
    let tenant = insert_tenant(&mut tx, &ctx, (&principal).into(), user, &req.name, &display).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// List the tenants the caller belongs to (an API key: its own tenant).
#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    params(PageParams),
    responses((status = 200, description = "A page of tenants", body = Page<Tenant>)),
    security(("bearer" = []))
)]
pub async fn list_tenants(
    State(state): State<AppState>,
    principal: Principal,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Tenant>>> {
    let (limit, after) = page.parse()?;
    let (scope, rows) = match &principal {
        Principal::User { user_id, .. } => (
            Scope::user(*user_id),
            "SELECT t.id, t.name, t.display_name, m.role, t.created_at, t.updated_at \
             FROM tenants t JOIN memberships m ON m.tenant_id = t.id \
             WHERE m.user_id = $1 AND ($2::uuid IS NULL OR t.id > $2) ORDER BY t.id LIMIT $3",
        ),
        Principal::ApiKey { tenant_id, .. } => (
            Scope::tenant(*tenant_id, None),
            "SELECT t.id, t.name, t.display_name, k.role, t.created_at, t.updated_at \
             FROM tenants t JOIN api_keys k ON k.tenant_id = t.id \
             WHERE k.id = $1 AND ($2::uuid IS NULL OR t.id > $2) ORDER BY t.id LIMIT $3",
        ),
        // A role's tenant, with the role `none` (what it may do is its attached policies).
        Principal::Role { tenant_id, .. } => (
            Scope::tenant(*tenant_id, None),
            "SELECT t.id, t.name, t.display_name, 'none' AS role, t.created_at, t.updated_at \
             FROM tenants t JOIN roles r ON r.tenant_id = t.id \
             WHERE r.id = $1 AND ($2::uuid IS NULL OR t.id > $2) ORDER BY t.id LIMIT $3",
        ),
    };
    let subject = principal.actor().1;
    let mut tx = db::begin(&state.pool, &scope).await?;
    let rows: Vec<TenantRow> =
        sqlx::query_as(rows).bind(subject).bind(after).bind(limit + 1).fetch_all(&mut *tx).await?;
    tx.commit().await?;
    let items = rows.into_iter().map(Tenant::try_from).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Json(Page::from_rows(items, limit, |t| t.id)))
}

async fn fetch_tenant(tx: &mut Tx, id: Uuid, role: Role) -> ApiResult<Tenant> {
    let (name, display_name, created_at, updated_at): (String, String, DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT name, display_name, created_at, updated_at FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(ApiError::NotFound("tenant"))?;
    Ok(Tenant { id, name, display_name, role, created_at, updated_at })
}

/// Get a tenant.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}",
    tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "The tenant", body = Tenant),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_tenant(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<Tenant>> {
    let (mut tx, role) =
        authz::begin(&state.pool, &principal, Action::GetTenant, tenant_id, &nrn::tenant(tenant_id)).await?;
    let tenant = fetch_tenant(&mut tx, tenant_id, role).await?;
    tx.commit().await?;
    Ok(Json(tenant))
}

/// Rename a tenant (its name, its display name, or both).
#[utoipa::path(
    patch,
    path = "/v1/tenants/{tenant_id}",
    tag = "tenants",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = UpdateTenantRequest, example = json!({"display_name": "Acme Corporation"})),
    responses(
        (status = 200, description = "The updated tenant", body = Tenant),
        (status = 403, description = "Not an admin", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "Name taken", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_tenant(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<UpdateTenantRequest>,
) -> ApiResult<Json<Tenant>> {
    let (mut tx, role) =
        authz::begin(&state.pool, &principal, Action::UpdateTenant, tenant_id, &nrn::tenant(tenant_id)).await?;
    let before = fetch_tenant(&mut tx, tenant_id, role).await?;
    sqlx::query(
        "UPDATE tenants SET name = coalesce($2, name), display_name = coalesce($3, display_name), \
         updated_at = now() WHERE id = $1",
    )
    .bind(tenant_id)
    .bind(req.name.as_ref().map(Name::as_str))
    .bind(req.display_name.as_ref().map(DisplayName::as_str))
    .execute(&mut *tx)
    .await
    .map_err(|e| on_constraint(e, [("tenants_name_key", name_taken())]))?;
    let after = fetch_tenant(&mut tx, tenant_id, role).await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateTenant,
        tenant_id,
        nrn::tenant(tenant_id),
        json!({
            "from": { "name": before.name, "display_name": before.display_name },
            "to": { "name": after.name, "display_name": after.display_name },
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(after))
}
