//! Groups of members: policies attached to a group apply to each of its members (never as a
//! boundary). Names are DNS labels, unique in the tenant; at most [`MAX_GROUPS`] per tenant.

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
    db::Tx,
    error::{ApiError, ApiResult, on_constraint},
    extract::{self, Path},
    names::Name,
    startup::AppState,
};

/// Groups a tenant may have.
pub const MAX_GROUPS: i64 = 100;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, delete_group))
        .routes(routes!(add_group_member, remove_group_member))
        .routes(routes!(attach_group_policy, detach_group_policy))
}

/// A group.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Group {
    /// Its name.
    pub name: String,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Its members' user ids (when read one by one).
    #[sqlx(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Uuid>>,
    /// The policies attached to it (when read one by one).
    #[sqlx(skip)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
}

/// Body of `POST .../groups`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// A DNS label, unique in the tenant.
    pub name: Name,
}

/// Groups of a tenant.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupList {
    /// By name.
    pub groups: Vec<Group>,
}

async fn find(tx: &mut Tx, tenant: Uuid, name: &str) -> ApiResult<Uuid> {
    sqlx::query_scalar("SELECT id FROM groups WHERE tenant_id = $1 AND name = $2")
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("group"))
}

/// Create a group.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/groups", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = CreateGroupRequest, example = json!({"name": "deployers"})),
    responses((status = 201, description = "Created", body = Group),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "The name is taken, or too many groups", body = crate::error::Problem),
        (status = 422, description = "Invalid name", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create_group(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<CreateGroupRequest>,
) -> ApiResult<(StatusCode, Json<Group>)> {
    let resource = nrn::group(tenant_id, req.name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreateGroup, tenant_id, &resource).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM groups WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if n >= MAX_GROUPS {
        return Err(ApiError::conflict("too_many_groups", format!("a tenant may have at most {MAX_GROUPS} groups")));
    }
    let group: Group =
        sqlx::query_as("INSERT INTO groups (id, tenant_id, name) VALUES ($1, $2, $3) RETURNING name, created_at")
            .bind(Uuid::now_v7())
            .bind(tenant_id)
            .bind(req.name.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                on_constraint(
                    e,
                    [("groups_name_key", ApiError::conflict("group_exists", "a group with this name exists"))],
                )
            })?;
    audit::record_action(&mut tx, &ctx, &principal, Action::CreateGroup, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(group)))
}

/// List a tenant's groups.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/groups", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses((status = 200, description = "The groups", body = GroupList),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list_groups(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<GroupList>> {
    let resource = nrn::group(tenant_id, "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListGroups, tenant_id, &resource).await?;
    let groups: Vec<Group> = sqlx::query_as("SELECT name, created_at FROM groups WHERE tenant_id = $1 ORDER BY name")
        .bind(tenant_id)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Json(GroupList { groups }))
}

/// Read a group with its members and policies.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/groups/{group_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name")),
    responses((status = 200, description = "The group", body = Group),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or group", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get_group(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<Json<Group>> {
    let resource = nrn::group(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetGroup, tenant_id, &resource).await?;
    let (id, created_at): (Uuid, DateTime<Utc>) =
        sqlx::query_as("SELECT id, created_at FROM groups WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(ApiError::NotFound("group"))?;
    let members: Vec<Uuid> =
        sqlx::query_scalar("SELECT user_id FROM group_members WHERE tenant_id = $1 AND group_id = $2 ORDER BY user_id")
            .bind(tenant_id)
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    let policies: Vec<String> = sqlx::query_scalar(
        "SELECT coalesce(a.managed_policy, p.name) FROM policy_attachments a LEFT JOIN policies p ON p.id = a.policy_id \
         WHERE a.tenant_id = $1 AND a.group_id = $2 ORDER BY a.id",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Group { name: name.as_str().to_owned(), created_at, members: Some(members), policies: Some(policies) }))
}

/// Delete a group (its members keep their own policies).
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/groups/{group_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name")),
    responses((status = 204, description = "Deleted"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or group", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_group(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::group(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteGroup, tenant_id, &resource).await?;
    let id = find(&mut tx, tenant_id, name.as_str()).await?;
    sqlx::query("DELETE FROM groups WHERE tenant_id = $1 AND id = $2")
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit::record_action(&mut tx, &ctx, &principal, Action::DeleteGroup, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// Add a member to a group (idempotent).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/groups/{group_name}/members/{user_id}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name"),
        ("user_id" = Uuid, Path, description = "A member of the tenant")),
    responses((status = 204, description = "In the group"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, group or member", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn add_group_member(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, user_id)): Path<(Uuid, Name, Uuid)>,
) -> ApiResult<StatusCode> {
    membership(&state, &principal, &ctx, tenant_id, &name, user_id, true).await
}

/// Remove a member from a group.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/groups/{group_name}/members/{user_id}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name"),
        ("user_id" = Uuid, Path, description = "Member")),
    responses((status = 204, description = "Out of the group"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or group, or not in it", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn remove_group_member(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, user_id)): Path<(Uuid, Name, Uuid)>,
) -> ApiResult<StatusCode> {
    membership(&state, &principal, &ctx, tenant_id, &name, user_id, false).await
}

async fn membership(
    state: &AppState,
    principal: &Principal,
    ctx: &RequestContext,
    tenant: Uuid,
    name: &Name,
    user: Uuid,
    add: bool,
) -> ApiResult<StatusCode> {
    let action = if add { Action::AddUserToGroup } else { Action::RemoveUserFromGroup };
    let resource = nrn::group(tenant, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, principal, action, tenant, &resource).await?;
    let id = find(&mut tx, tenant, name.as_str()).await?;
    if add {
        sqlx::query(
            "INSERT INTO group_members (tenant_id, group_id, user_id) SELECT $1, $2, $3 \
             WHERE EXISTS (SELECT 1 FROM memberships WHERE tenant_id = $1 AND user_id = $3) ON CONFLICT DO NOTHING",
        )
        .bind(tenant)
        .bind(id)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        let member: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM group_members WHERE tenant_id = $1 AND group_id = $2 AND user_id = $3)",
        )
        .bind(tenant)
        .bind(id)
        .bind(user)
        .fetch_one(&mut *tx)
        .await?;
        if !member {
            return Err(ApiError::NotFound("member"));
        }
    } else {
        let r = sqlx::query("DELETE FROM group_members WHERE tenant_id = $1 AND group_id = $2 AND user_id = $3")
            .bind(tenant)
            .bind(id)
            .bind(user)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(ApiError::NotFound("group member"));
        }
    }
    audit::record_action(&mut tx, ctx, principal, action, tenant, resource, json!({"user_id": user})).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// Attach a policy to a group (idempotent): every member gets it.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/groups/{group_name}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name"),
        ("policy_name" = String, Path, description = "A managed policy's name or the tenant's")),
    responses((status = 204, description = "Attached"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, group or policy", body = crate::error::Problem),
        (status = 409, description = "Too many attached", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn attach_group_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, policy)): Path<(Uuid, Name, String)>,
) -> ApiResult<StatusCode> {
    let who = Who::Group(name.as_str().to_owned());
    attachments::attach(&state, &principal, &ctx, tenant_id, who, &policy, false).await
}

/// Detach a policy from a group.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/groups/{group_name}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("group_name" = String, Path, description = "Group name"),
        ("policy_name" = String, Path, description = "Policy name")),
    responses((status = 204, description = "Detached"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "Not attached, or no such tenant, group or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn detach_group_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, policy)): Path<(Uuid, Name, String)>,
) -> ApiResult<StatusCode> {
    let who = Who::Group(name.as_str().to_owned());
    attachments::detach(&state, &principal, &ctx, tenant_id, who, Some(&policy)).await
}
