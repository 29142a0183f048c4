//! Attaching policies to principals: to members (`/members/{user_id}/policies`), to API keys
//! (`/api-keys/{key_id}/policies`) and (from [`super::groups`] and [`super::roles`]) to groups
//! and roles, as identity policies (any number, at most
//! [`MAX_ATTACHED`]) or as the one permissions boundary. A policy is named by its name: a
//! managed policy's or one of the tenant's. Attaching is idempotent (`PUT`).

use axum::{Json, extract::State, http::StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    db::Tx,
    error::{ApiError, ApiResult},
    extract::{self, Path},
    startup::AppState,
};

/// Identity policies one principal may have attached.
pub const MAX_ATTACHED: i64 = 20;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_member_policies))
        .routes(routes!(attach_member_policy, detach_member_policy))
        .routes(routes!(put_member_boundary, delete_member_boundary))
        .routes(routes!(list_key_policies))
        .routes(routes!(attach_key_policy, detach_key_policy))
        .routes(routes!(put_key_boundary, delete_key_boundary))
}

/// The policies attached to a principal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Attached {
    /// The policies the principal's role stands for (`admin`: TenantAdmin, ...).
    pub from_role: Vec<String>,
    /// Identity policies attached to it, by name.
    pub policies: Vec<String>,
    /// Its permissions boundary, by name.
    pub boundary: Option<String>,
}

/// Body of `PUT .../boundary`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BoundaryRequest {
    /// The policy's name (managed or the tenant's).
    pub policy: String,
}

/// A member, an API key (by id) or a group (by name) of the tenant.
#[derive(Clone)]
pub(super) enum Who {
    Member(Uuid),
    Key(Uuid),
    Group(String),
    Role(String),
}

impl Who {
    fn nrn(&self, tenant: Uuid) -> String {
        match self {
            Who::Member(u) => nrn::tenant_user(tenant, *u),
            Who::Key(k) => nrn::api_key_principal(tenant, *k),
            Who::Group(name) => nrn::group(tenant, name),
            Who::Role(name) => nrn::role(tenant, name),
        }
    }

    fn column(&self) -> &'static str {
        match self {
            Who::Member(_) => "user_id",
            Who::Key(_) => "api_key_id",
            Who::Group(_) => "group_id",
            Who::Role(_) => "role_id",
        }
    }

    /// Its id and role (a group has none), read in the caller's transaction after authorizing;
    /// 404 when it is not in the tenant.
    async fn resolve(&self, tx: &mut Tx, tenant: Uuid) -> ApiResult<(Uuid, authz::Role)> {
        let (id, role): (Uuid, Option<String>) = match self {
            Who::Group(name) => {
                let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM groups WHERE tenant_id = $1 AND name = $2")
                    .bind(tenant)
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?;
                return Ok((id.ok_or(ApiError::NotFound("group"))?, authz::Role::None));
            }
            Who::Role(name) => {
                let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM roles WHERE tenant_id = $1 AND name = $2")
                    .bind(tenant)
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?;
                return Ok((id.ok_or(ApiError::NotFound("role"))?, authz::Role::None));
            }
            Who::Member(u) => (
                *u,
                sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
                    .bind(tenant)
                    .bind(u)
                    .fetch_optional(&mut **tx)
                    .await?,
            ),
            Who::Key(k) => (
                *k,
                sqlx::query_scalar("SELECT role FROM api_keys WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant)
                    .bind(k)
                    .fetch_optional(&mut **tx)
                    .await?,
            ),
        };
        let role = role.ok_or(match self {
            Who::Key(_) => ApiError::NotFound("API key"),
            _ => ApiError::NotFound("member"),
        })?;
        Ok((id, authz::Role::parse(&role).map_err(ApiError::Internal)?))
    }
}

/// `iam:PolicyNrn` of the policy named `name` (a managed policy's NRN, or the tenant's).
pub(super) fn policy_context(tenant: Uuid, name: &str) -> nimbus_iam::Context {
    let policy = match nimbus_iam::managed::managed(name) {
        Some(m) => m.nrn(),
        None => nrn::policy(tenant, name),
    };
    let mut c = nimbus_iam::Context::new(chrono::Utc::now());
    c.insert("iam:PolicyNrn", policy);
    c
}

/// A policy by name: `(managed name, tenant policy id)`, exactly one set; 404 when neither.
async fn resolve(tx: &mut Tx, tenant: Uuid, name: &str) -> ApiResult<(Option<String>, Option<Uuid>)> {
    if nimbus_iam::managed::managed(name).is_some() {
        return Ok((Some(name.to_owned()), None));
    }
    let (id, ..) = super::policies::find(tx, tenant, name, false).await?.ok_or(ApiError::NotFound("policy"))?;
    Ok((None, Some(id)))
}

pub(super) async fn list(state: &AppState, principal: &Principal, tenant: Uuid, who: Who) -> ApiResult<Json<Attached>> {
    let (mut tx, _) =
        authz::begin(&state.pool, principal, Action::ListAttachedPolicies, tenant, &who.nrn(tenant)).await?;
    let (id, role) = who.resolve(&mut tx, tenant).await?;
    let rows: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT a.purpose, coalesce(a.managed_policy, p.name) FROM policy_attachments a \
         LEFT JOIN policies p ON p.id = a.policy_id WHERE a.tenant_id = $1 AND a.{} = $2 ORDER BY a.id",
        who.column()
    ))
    .bind(tenant)
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Attached {
        from_role: role.managed().iter().map(|s| (*s).to_owned()).collect(),
        policies: rows.iter().filter(|(p, _)| p == "identity").map(|(_, n)| n.clone()).collect(),
        boundary: rows.into_iter().find(|(p, _)| p == "boundary").map(|(_, n)| n),
    }))
}

pub(super) async fn attach(
    state: &AppState,
    principal: &Principal,
    ctx: &RequestContext,
    tenant: Uuid,
    who: Who,
    name: &str,
    boundary: bool,
) -> ApiResult<StatusCode> {
    let action = match (&who, boundary) {
        (_, true) => Action::PutPermissionsBoundary,
        (Who::Member(_), false) => Action::AttachUserPolicy,
        (Who::Key(_), false) => Action::AttachApiKeyPolicy,
        (Who::Group(_), false) => Action::AttachGroupPolicy,
        (Who::Role(_), false) => Action::AttachRolePolicy,
    };
    let resource = who.nrn(tenant);
    // Which policy, for conditions on it (delegating "may attach only Viewer").
    let asked = policy_context(tenant, name);
    let (mut tx, _) = authz::begin_with(&state.pool, principal, action, tenant, &resource, &asked).await?;
    let (id, _) = who.resolve(&mut tx, tenant).await?;
    let (managed, policy_id) = resolve(&mut tx, tenant, name).await?;
    let purpose = if boundary { "boundary" } else { "identity" };
    if boundary {
        sqlx::query(&format!(
            "DELETE FROM policy_attachments WHERE tenant_id = $1 AND {} = $2 AND purpose = 'boundary'",
            who.column()
        ))
        .bind(tenant)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    } else {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM policy_attachments WHERE tenant_id = $1 AND {} = $2 AND purpose = 'identity'",
            who.column()
        ))
        .bind(tenant)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if n >= MAX_ATTACHED {
            return Err(ApiError::conflict(
                "too_many_attached_policies",
                format!("a principal may have at most {MAX_ATTACHED} policies attached"),
            ));
        }
    }
    let inserted = sqlx::query(&format!(
        "INSERT INTO policy_attachments (id, tenant_id, {}, purpose, managed_policy, policy_id) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        who.column()
    ))
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(id)
    .bind(purpose)
    .bind(&managed)
    .bind(policy_id)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() > 0 {
        audit::record_action(&mut tx, ctx, principal, action, tenant, resource, json!({"policy": name})).await?;
    }
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn detach(
    state: &AppState,
    principal: &Principal,
    ctx: &RequestContext,
    tenant: Uuid,
    who: Who,
    name: Option<&str>,
) -> ApiResult<StatusCode> {
    let action = match (&who, name) {
        (_, None) => Action::DeletePermissionsBoundary,
        (Who::Member(_), Some(_)) => Action::DetachUserPolicy,
        (Who::Key(_), Some(_)) => Action::DetachApiKeyPolicy,
        (Who::Group(_), Some(_)) => Action::DetachGroupPolicy,
        (Who::Role(_), Some(_)) => Action::DetachRolePolicy,
    };
    let resource = who.nrn(tenant);
    let asked = name.map(|n| policy_context(tenant, n)).unwrap_or_else(|| nimbus_iam::Context::new(chrono::Utc::now()));
    let (mut tx, _) = authz::begin_with(&state.pool, principal, action, tenant, &resource, &asked).await?;
    let (id, _) = who.resolve(&mut tx, tenant).await?;
    let removed = match name {
        Some(name) => {
            let (managed, policy_id) = resolve(&mut tx, tenant, name).await?;
            sqlx::query(&format!(
                "DELETE FROM policy_attachments WHERE tenant_id = $1 AND {} = $2 AND purpose = 'identity' \
                 AND managed_policy IS NOT DISTINCT FROM $3 AND policy_id IS NOT DISTINCT FROM $4",
                who.column()
            ))
            .bind(tenant)
            .bind(id)
            .bind(&managed)
            .bind(policy_id)
            .execute(&mut *tx)
            .await?
        }
        None => {
            sqlx::query(&format!(
                "DELETE FROM policy_attachments WHERE tenant_id = $1 AND {} = $2 AND purpose = 'boundary'",
                who.column()
            ))
            .bind(tenant)
            .bind(id)
            .execute(&mut *tx)
            .await?
        }
    };
    if removed.rows_affected() == 0 {
        return Err(ApiError::NotFound(if name.is_some() { "attached policy" } else { "permissions boundary" }));
    }
    audit::record_action(&mut tx, ctx, principal, action, tenant, resource, json!({"policy": name})).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// List the policies a member has: from its role, attached, and its boundary.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/members/{user_id}/policies", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "Member")),
    responses((status = 200, description = "Its policies", body = Attached), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or member", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list_member_policies(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Json<Attached>> {
    list(&state, &principal, tenant_id, Who::Member(user_id)).await
}

/// Attach a policy to a member (idempotent).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/members/{user_id}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "Member"),
        ("policy_name" = String, Path, description = "A managed policy's name or the tenant's")),
    responses((status = 204, description = "Attached"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, member or policy", body = crate::error::Problem),
        (status = 409, description = "Too many attached", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn attach_member_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id, name)): Path<(Uuid, Uuid, String)>,
) -> ApiResult<StatusCode> {
    attach(&state, &principal, &ctx, tenant_id, Who::Member(user_id), &name, false).await
}

/// Detach a policy from a member.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/members/{user_id}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "Member"),
        ("policy_name" = String, Path, description = "Policy name")),
    responses((status = 204, description = "Detached"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "Not attached, or no such tenant, member or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn detach_member_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id, name)): Path<(Uuid, Uuid, String)>,
) -> ApiResult<StatusCode> {
    detach(&state, &principal, &ctx, tenant_id, Who::Member(user_id), Some(&name)).await
}

/// Set a member's permissions boundary (replacing any).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/members/{user_id}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "Member")),
    request_body(content = BoundaryRequest, example = json!({"policy": "Viewer"})),
    responses((status = 204, description = "Set"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, member or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_member_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
    extract::Json(req): extract::Json<BoundaryRequest>,
) -> ApiResult<StatusCode> {
    attach(&state, &principal, &ctx, tenant_id, Who::Member(user_id), &req.policy, true).await
}

/// Remove a member's permissions boundary.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/members/{user_id}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "Member")),
    responses((status = 204, description = "Removed"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No boundary, or no such tenant or member", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_member_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    detach(&state, &principal, &ctx, tenant_id, Who::Member(user_id), None).await
}

/// List the policies an API key has: from its role, attached, and its boundary.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/api-keys/{key_id}/policies", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key")),
    responses((status = 200, description = "Its policies", body = Attached), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or key", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list_key_policies(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, key_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<Json<Attached>> {
    list(&state, &principal, tenant_id, Who::Key(key_id)).await
}

/// Attach a policy to an API key (idempotent).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/api-keys/{key_id}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key"),
        ("policy_name" = String, Path, description = "A managed policy's name or the tenant's")),
    responses((status = 204, description = "Attached"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, key or policy", body = crate::error::Problem),
        (status = 409, description = "Too many attached", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn attach_key_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, key_id, name)): Path<(Uuid, Uuid, String)>,
) -> ApiResult<StatusCode> {
    attach(&state, &principal, &ctx, tenant_id, Who::Key(key_id), &name, false).await
}

/// Detach a policy from an API key.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/api-keys/{key_id}/policies/{policy_name}", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key"),
        ("policy_name" = String, Path, description = "Policy name")),
    responses((status = 204, description = "Detached"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "Not attached, or no such tenant, key or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn detach_key_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, key_id, name)): Path<(Uuid, Uuid, String)>,
) -> ApiResult<StatusCode> {
    detach(&state, &principal, &ctx, tenant_id, Who::Key(key_id), Some(&name)).await
}

/// Set an API key's permissions boundary (replacing any).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/api-keys/{key_id}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key")),
    request_body(content = BoundaryRequest, example = json!({"policy": "Invoker"})),
    responses((status = 204, description = "Set"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, key or policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_key_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, key_id)): Path<(Uuid, Uuid)>,
    extract::Json(req): extract::Json<BoundaryRequest>,
) -> ApiResult<StatusCode> {
    attach(&state, &principal, &ctx, tenant_id, Who::Key(key_id), &req.policy, true).await
}

/// Remove an API key's permissions boundary.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/api-keys/{key_id}/boundary", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("key_id" = Uuid, Path, description = "API key")),
    responses((status = 204, description = "Removed"), (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No boundary, or no such tenant or key", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_key_boundary(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, key_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    detach(&state, &principal, &ctx, tenant_id, Who::Key(key_id), None).await
}
