//! Members of a tenant: list, add by e-mail, change role, tag (principal tags), remove. A
//! tenant always keeps at least one admin.

use std::collections::BTreeMap;

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, Role, nrn},
    db::{self, Scope, Tx},
    error::{ApiError, ApiResult},
    extract::{self, Path, Query},
    names::Email,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// A member of a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Member {
    /// The user id.
    pub user_id: Uuid,
    /// E-mail address.
    pub email: String,
    /// Name.
    pub display_name: String,
    /// Role in the tenant.
    pub role: Role,
    /// Member since.
    pub created_at: DateTime<Utc>,
    /// Principal tags in the tenant (`nimbus:PrincipalTag/<key>` in policies).
    pub tags: BTreeMap<String, String>,
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    user_id: Uuid,
    email: String,
    display_name: String,
    role: String,
    created_at: DateTime<Utc>,
    tags: sqlx::types::Json<BTreeMap<String, String>>,
}

impl TryFrom<MemberRow> for Member {
    type Error = anyhow::Error;
    fn try_from(r: MemberRow) -> anyhow::Result<Member> {
        Ok(Member {
            user_id: r.user_id,
            email: r.email,
            display_name: r.display_name,
            role: Role::parse(&r.role)?,
            created_at: r.created_at,
            tags: r.tags.0,
        })
    }
}

/// Body of adding a member.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    /// E-mail of an existing user.
    pub email: Email,
    /// Their role.
    pub role: Role,
}

/// Body of changing a member's role.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMemberRequest {
    /// The new role.
    pub role: Role,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_members, add_member))
        .routes(routes!(update_member, remove_member))
        .routes(routes!(put_member_tags))
        .routes(routes!(delete_member_tag))
}

/// Body of `PUT .../members/{user_id}/tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberTagsRequest {
    /// Every tag (replacing all): at most 50; keys of 1–128 letters, digits, spaces and
    /// `_.:/=+-@` (not `nimbus:`…), values of at most 256 characters.
    pub tags: BTreeMap<String, String>,
}

/// Set a member's principal tags in the tenant (replacing all): what `nimbus:PrincipalTag/<key>`
/// conditions and `${nimbus:PrincipalTag/<key>}` variables see.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant_id}/members/{user_id}/tags",
    tag = "members",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "User id")),
    request_body(content = MemberTagsRequest, example = json!({"tags": {"team": "payments"}})),
    responses(
        (status = 200, description = "The member with its tags", body = Member),
        (status = 403, description = "Not allowed (`iam:TagPrincipal`)", body = crate::error::Problem),
        (status = 404, description = "No such member", body = crate::error::Problem),
        (status = 422, description = "A tag breaks a rule", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn put_member_tags(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
    extract::Json(req): extract::Json<MemberTagsRequest>,
) -> ApiResult<Json<Member>> {
    let resource = nrn::tenant_user(tenant_id, user_id);
    let mut asked = nimbus_iam::Context::new(chrono::Utc::now());
    for (k, v) in &req.tags {
        asked.insert(&format!("nimbus:RequestTag/{k}"), v.as_str());
    }
    asked.insert("nimbus:TagKeys", req.tags.keys().cloned().collect::<Vec<String>>());
    let (mut tx, _) =
        authz::begin_with(&state.pool, &principal, Action::TagPrincipal, tenant_id, &resource, &asked).await?;
    let mut errors = Vec::new();
    crate::functions::check_tags(&req.tags, &mut errors);
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let r = sqlx::query("UPDATE memberships SET tags = $3 WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant_id)
        .bind(user_id)
        .bind(sqlx::types::Json(&req.tags))
        .execute(&mut *tx)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("member"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::TagPrincipal,
        tenant_id,
        resource,
        json!({"tags": req.tags.keys().collect::<Vec<_>>()}),
    )
    .await?;
    let member = fetch_member(&mut tx, tenant_id, user_id).await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok(Json(member))
}

/// Remove one of a member's principal tags.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/members/{user_id}/tags/{tag_key}",
    tag = "members",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "User id"),
        ("tag_key" = String, Path, description = "The tag's key")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not allowed (`iam:UntagPrincipal`)", body = crate::error::Problem),
        (status = 404, description = "No such member, or it has no such tag", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn delete_member_tag(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id, key)): Path<(Uuid, Uuid, String)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::tenant_user(tenant_id, user_id);
    let mut asked = nimbus_iam::Context::new(chrono::Utc::now());
    asked.insert("nimbus:TagKeys", vec![key.clone()]);
    let (mut tx, _) =
        authz::begin_with(&state.pool, &principal, Action::UntagPrincipal, tenant_id, &resource, &asked).await?;
    let r = sqlx::query("UPDATE memberships SET tags = tags - $3 WHERE tenant_id = $1 AND user_id = $2 AND tags ? $3")
        .bind(tenant_id)
        .bind(user_id)
        .bind(&key)
        .execute(&mut *tx)
        .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("member tag"));
    }
    audit::record_action(&mut tx, &ctx, &principal, Action::UntagPrincipal, tenant_id, resource, json!({"tag": key}))
        .await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

const MEMBER_SELECT: &str = "SELECT m.user_id, u.email, u.display_name, m.role, m.created_at, m.tags \
     FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.tenant_id = $1";

/// Serializes membership changes in a tenant: role checks (the last admin) then see a state no
/// concurrent change can alter before this transaction ends.
async fn lock_members(tx: &mut Tx, tenant: Uuid) -> ApiResult<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('nimbus.members:' || $1::text, 0))")
        .bind(tenant)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Revokes the member's API keys whose role is above `ceiling` (all of them when `None`), so that
/// no key keeps more authority than its creator has; returns how many.
async fn revoke_keys_above(tx: &mut Tx, tenant: Uuid, user: Uuid, ceiling: Option<Role>) -> ApiResult<u64> {
    let allowed: Vec<&str> = [Role::None, Role::Viewer, Role::Developer, Role::Admin]
        .into_iter()
        .filter(|r| ceiling.is_some_and(|c| *r <= c))
        .map(Role::as_str)
        .collect();
    let r = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1 AND created_by = $2 \
         AND revoked_at IS NULL AND NOT (role = ANY($3))",
    )
    .bind(tenant)
    .bind(user)
    .bind(&allowed)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}

async fn fetch_member(tx: &mut Tx, tenant: Uuid, user: Uuid) -> ApiResult<Member> {
    let row: MemberRow = sqlx::query_as(&format!("{MEMBER_SELECT} AND m.user_id = $2"))
        .bind(tenant)
        .bind(user)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("member"))?;
    Ok(row.try_into()?)
}

/// Locks the tenant's admin rows and fails if `user` is the only admin, so that two admins
/// removing each other at once cannot leave the tenant without one.
async fn ensure_not_last_admin(tx: &mut Tx, tenant: Uuid, user: Uuid) -> ApiResult<()> {
    let admins: Vec<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM memberships WHERE tenant_id = $1 AND role = 'admin' ORDER BY user_id FOR UPDATE",
    )
    .bind(tenant)
    .fetch_all(&mut **tx)
    .await?;
    if admins == [user] {
        return Err(ApiError::conflict("last_admin", "a tenant must keep at least one admin"));
    }
    Ok(())
}

/// List a tenant's members.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/members",
    tag = "members",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), PageParams),
    responses(
        (status = 200, description = "A page of members", body = Page<Member>),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_members(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Member>>> {
    let (limit, after) = page.parse()?;
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::ListMembers, tenant_id, &nrn::member(tenant_id, "*")).await?;
    let rows: Vec<MemberRow> = sqlx::query_as(&format!(
        "{MEMBER_SELECT} AND ($2::uuid IS NULL OR m.user_id > $2) ORDER BY m.user_id LIMIT $3"
    ))
    .bind(tenant_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let items = rows.into_iter().map(Member::try_from).collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Json(Page::from_rows(items, limit, |m| m.user_id)))
}

/// Add an existing user to the tenant by e-mail.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/members",
    tag = "members",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body(content = AddMemberRequest, example = json!({"email": "grace@example.com", "role": "developer"})),
    responses(
        (status = 201, description = "Added", body = Member),
        (status = 403, description = "Not an admin", body = crate::error::Problem),
        (status = 404, description = "No such tenant, or no user with that e-mail", body = crate::error::Problem),
        (status = 409, description = "Already a member", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn add_member(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<AddMemberRequest>,
) -> ApiResult<(StatusCode, Json<Member>)> {
    let scope =
        Scope { lookup_email: Some(req.email.as_str().to_owned()), ..Scope::tenant(tenant_id, principal.user_id()) };
    let mut tx = db::begin(&state.pool, &scope).await?;
    authz::authorize(&mut tx, &principal, Action::AddMember, tenant_id, &nrn::member(tenant_id, "*")).await?;
    let user: Uuid = sqlx::query_scalar("SELECT id FROM users WHERE email = $1")
        .bind(req.email.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::NotFound("user with this e-mail"))?;
    let inserted =
        sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(tenant_id)
            .bind(user)
            .bind(req.role.as_str())
            .execute(&mut *tx)
            .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::conflict("already_member", "that user is already a member"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::AddMember,
        tenant_id,
        nrn::member(tenant_id, user),
        json!({ "email": req.email.as_str(), "role": req.role }),
    )
    .await?;
    let member = fetch_member(&mut tx, tenant_id, user).await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok((StatusCode::CREATED, Json(member)))
}

/// Change a member's role. Demoting the last admin is refused.
#[utoipa::path(
    patch,
    path = "/v1/tenants/{tenant_id}/members/{user_id}",
    tag = "members",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "User id")),
    request_body(content = UpdateMemberRequest, example = json!({"role": "viewer"})),
    responses(
        (status = 200, description = "Updated", body = Member),
        (status = 403, description = "Not an admin", body = crate::error::Problem),
        (status = 404, description = "No such member", body = crate::error::Problem),
        (status = 409, description = "Would leave the tenant without an admin", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_member(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
    extract::Json(req): extract::Json<UpdateMemberRequest>,
) -> ApiResult<Json<Member>> {
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::UpdateMember, tenant_id, &nrn::member(tenant_id, user_id))
            .await?;
    lock_members(&mut tx, tenant_id).await?;
    let before = fetch_member(&mut tx, tenant_id, user_id).await?;
    if before.role == Role::Admin && req.role != Role::Admin {
        ensure_not_last_admin(&mut tx, tenant_id, user_id).await?;
    }
    let keys_revoked = revoke_keys_above(&mut tx, tenant_id, user_id, Some(req.role)).await?;
    sqlx::query("UPDATE memberships SET role = $3, updated_at = now() WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant_id)
        .bind(user_id)
        .bind(req.role.as_str())
        .execute(&mut *tx)
        .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateMember,
        tenant_id,
        nrn::member(tenant_id, user_id),
        json!({ "from": before.role, "to": req.role, "api_keys_revoked": keys_revoked }),
    )
    .await?;
    let after = fetch_member(&mut tx, tenant_id, user_id).await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok(Json(after))
}

/// Remove a member. Removing the last admin is refused.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/members/{user_id}",
    tag = "members",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("user_id" = Uuid, Path, description = "User id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not an admin", body = crate::error::Problem),
        (status = 404, description = "No such member", body = crate::error::Problem),
        (status = 409, description = "Would leave the tenant without an admin", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn remove_member(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, user_id)): Path<(Uuid, Uuid)>,
) -> ApiResult<StatusCode> {
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::RemoveMember, tenant_id, &nrn::member(tenant_id, user_id))
            .await?;
    lock_members(&mut tx, tenant_id).await?;
    let before = fetch_member(&mut tx, tenant_id, user_id).await?;
    if before.role == Role::Admin {
        ensure_not_last_admin(&mut tx, tenant_id, user_id).await?;
    }
    let keys_revoked = revoke_keys_above(&mut tx, tenant_id, user_id, None).await?;
    sqlx::query("DELETE FROM memberships WHERE tenant_id = $1 AND user_id = $2")
        .bind(tenant_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::RemoveMember,
        tenant_id,
        nrn::member(tenant_id, user_id),
        json!({ "email": before.email, "role": before.role, "api_keys_revoked": keys_revoked }),
    )
    .await?;
    tx.commit().await?;
    crate::authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}
