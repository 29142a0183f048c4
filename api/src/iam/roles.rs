//! Roles: principals nobody signs in as. A function's execution role
//! (`PUT .../functions/{name}/execution-role`) is what its invocations act as when they call the
//! API with the short-lived credential the gateway gives each of them (`NIMBUS_TOKEN`). A role
//! has the policies attached to it (at most [`super::attachments::MAX_ATTACHED`]) within its
//! boundary, and nothing else (it stands for no managed policy). Names are DNS labels, unique in
//! the tenant; at most [`MAX_ROLES`] per tenant. A role some function uses cannot be deleted.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::attachments::{self, Who};
use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, FieldError, on_constraint},
    extract::{self, Path},
    names::Name,
    startup::AppState,
};

/// Roles a tenant may have.
pub const MAX_ROLES: i64 = 100;
/// Longest description, in characters.
pub const MAX_DESCRIPTION: usize = 1000;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_role, list_roles))
        .routes(routes!(get_role, delete_role))
        .routes(routes!(list_role_policies))
        .routes(routes!(attach_role_policy, detach_role_policy))
        .routes(routes!(put_role_boundary, delete_role_boundary))
}

/// A role.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct RoleOut {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Its NRN (what policies and `iam:PassRole` name it by).
    pub nrn: String,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// The functions that have it as their execution role (when read one by one).
    #[sqlx(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions: Option<Vec<String>>,
    /// The policies attached to it (when read one by one).
    #[sqlx(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
    /// Its permissions boundary (when read one by one).
    #[sqlx(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boundary: Option<String>,
}

/// Body of `POST .../roles`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoleRequest {
    /// A DNS label, unique in the tenant.
    pub name: Name,
    /// What it is for (at most 1000 characters) [default empty].
    #[serde(default)]
    pub description: Option<String>,
}

/// Roles of a tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RoleList {
    /// By name.
    pub roles: Vec<RoleOut>,
}

/// Create a role (with no policies: attach what its functions need).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/roles", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = CreateRoleRequest, example = json!({"name": "orders-worker", "description": "Invokes the billing functions"})),
    responses((status = 201, description = "Created", body = RoleOut),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "The name is taken, or too many roles", body = crate::error::Problem),
        (status = 422, description = "Invalid name or description", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create_role(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<CreateRoleRequest>,
) -> ApiResult<(StatusCode, Json<RoleOut>)> {
    let resource = nrn::role(tenant_id, req.name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreateRole, tenant_id, &resource).await?;
    let description = req.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION {
        return Err(ApiError::Validation(vec![FieldError::new(
            "description",
            "max_length",
            format!("at most {MAX_DESCRIPTION} characters"),
        )]));
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM roles WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if n >= MAX_ROLES {
        return Err(ApiError::conflict("too_many_roles", format!("a tenant may have at most {MAX_ROLES} roles")));
    }
    let mut role: RoleOut = sqlx::query_as(
        "INSERT INTO roles (id, tenant_id, name, description) VALUES ($1, $2, $3, $4) \
         RETURNING name, description, '' AS nrn, created_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant_id)
    .bind(req.name.as_str())
    .bind(&description)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        on_constraint(e, [("roles_name_key", ApiError::conflict("role_exists", "a role with this name exists"))])
    })?;
    role.nrn = resource.clone();
    audit::record_action(&mut tx, &ctx, &principal, Action::CreateRole, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(role)))
}

/// List a tenant's roles.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/roles", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses((status = 200, description = "The roles", body = RoleList),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list_roles(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<RoleList>> {
    let resource = nrn::role(tenant_id, "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListRoles, tenant_id, &resource).await?;
    let mut roles: Vec<RoleOut> =
        sqlx::query_as("SELECT name, description, '' AS nrn, created_at FROM roles WHERE tenant_id = $1 ORDER BY name")
            .bind(tenant_id)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    for r in &mut roles {
        r.nrn = nrn::role(tenant_id, &r.name);
    }
    Ok(Json(RoleList { roles }))
}

/// Read a role with its policies, its boundary and the functions that use it.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/roles/{role_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name")),
    responses((status = 200, description = "The role", body = RoleOut),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or role", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get_role(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<Json<RoleOut>> {
    let resource = nrn::role(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetRole, tenant_id, &resource).await?;
    let (id, description, created_at): (Uuid, String, DateTime<Utc>) =
        sqlx::query_as("SELECT id, description, created_at FROM roles WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::NotFound("role"))?;
    let functions: Vec<String> =
        sqlx::query_scalar("SELECT name FROM functions WHERE tenant_id = $1 AND execution_role_id = $2 ORDER BY name")
            .bind(tenant_id)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    let attached: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.purpose, coalesce(a.managed_policy, p.name) FROM policy_attachments a \
         LEFT JOIN policies p ON p.id = a.policy_id WHERE a.tenant_id = $1 AND a.role_id = $2 ORDER BY a.id",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(RoleOut {
        name: name.as_str().to_owned(),
        description,
        nrn: resource,
        created_at,
        functions: Some(functions),
        policies: Some(attached.iter().filter(|(p, _)| p == "identity").map(|(_, n)| n.clone()).collect()),
        boundary: attached.into_iter().find(|(p, _)| p == "boundary").map(|(_, n)| n),
    }))
}

/// Delete a role that no function uses (its attachments go with it).
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/roles/{role_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or role", body = crate::error::Problem),
        (status = 409, description = "A function uses it as its execution role", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_role(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::role(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteRole, tenant_id, &resource).await?;
    let deleted = sqlx::query("DELETE FROM roles WHERE tenant_id = $1 AND name = $2")
        .bind(tenant_id)
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(
                e,
                [(
                    "functions_execution_role_fkey",
                    ApiError::conflict(
                        "role_in_use",
                        "a function has this role as its execution role; give it another role or none first",
                    ),
                )],
            )
        })?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("role"));
    }
    audit::record_action(&mut tx, &ctx, &principal, Action::DeleteRole, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// List the policies a role has: attached, and its boundary.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/roles/{role_name}/policies", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name")),
    responses((status = 200, description = "Its policies", body = attachments::Attached),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or role", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list_role_policies(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<Json<attachments::Attached>> {
    attachments::list(&state, &principal, tenant_id, Who::Role(name.as_str().to_owned())).await
}

/// Attach a policy to a role (idempotent).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/roles/{role_name}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name"),
        ("policy_name" = String, Path, description = "A managed policy's name or the tenant's")),
    responses((status = 204, description = "Attached"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, role or policy", body = crate::error::Problem),
        (status = 409, description = "Too many attached", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn attach_role_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, policy)): Path<(Uuid, Name, String)>,
) -> ApiResult<StatusCode> {
    let who = Who::Role(name.as_str().to_owned());
    attachments::attach(&state, &principal, &ctx, tenant_id, who, &policy, false).await
}

/// Detach a policy from a role.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/roles/{role_name}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name"),
        ("policy_name" = String, Path, description = "Policy name")),
    responses((status = 204, description = "Detached"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "Not attached, or no such tenant, role or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn detach_role_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, policy)): Path<(Uuid, Name, String)>,
) -> ApiResult<StatusCode> {
    let who = Who::Role(name.as_str().to_owned());
    attachments::detach(&state, &principal, &ctx, tenant_id, who, Some(&policy)).await
}

/// Set a role's permissions boundary (replacing any).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/roles/{role_name}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name")),
    request_body(content = attachments::BoundaryRequest, example = json!({"policy": "Invoker"})),
    responses((status = 204, description = "Set"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, role or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_role_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<attachments::BoundaryRequest>,
) -> ApiResult<StatusCode> {
    let who = Who::Role(name.as_str().to_owned());
    attachments::attach(&state, &principal, &ctx, tenant_id, who, &req.policy, true).await
}

/// Remove a role's permissions boundary.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/roles/{role_name}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("role_name" = String, Path, description = "Role name")),
    responses((status = 204, description = "Removed"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No boundary, or no such tenant or role", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_role_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let who = Who::Role(name.as_str().to_owned());
    attachments::detach(&state, &principal, &ctx, tenant_id, who, None).await
}
