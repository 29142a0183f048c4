//! A tenant's own policies: created with a first version, new versions added (at most
//! [`MAX_VERSIONS`]), one of them the default (the one in force), deleted only when nothing is
//! attached. Managed policies are listed and read beside them (read-only). Every document is
//! validated on save: errors reject it (422, naming each JSON path), findings come back with it.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Document, FindingOut, checked, policy_name};
use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    db::Tx,
    error::{ApiError, ApiResult, on_constraint},
    extract::{self, Path},
    startup::AppState,
};

/// Versions a policy keeps at most (as in AWS).
pub const MAX_VERSIONS: i64 = 5;
/// Policies a tenant may have.
pub const MAX_POLICIES_PER_TENANT: i64 = 200;
/// Characters of a description.
const MAX_DESCRIPTION: usize = 1000;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_policy, list_policies))
        .routes(routes!(get_policy, delete_policy))
        .routes(routes!(create_policy_version, list_policy_versions))
        .routes(routes!(get_policy_version))
        .routes(routes!(set_default_version))
}

/// A policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// Its NRN (managed policies: `nrn:nimbus:iam::policy/<name>`).
    pub nrn: String,
    /// Shipped with Nimbus (read-only), or the tenant's own.
    pub managed: bool,
    /// What it is for.
    pub description: String,
    /// The version in force.
    pub default_version: i32,
    /// The default version's document.
    pub document: String,
    /// Created at (tenant policies).
    pub created_at: Option<DateTime<Utc>>,
    /// Validation findings of the document (warnings), on create.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<FindingOut>,
}

/// Body of `POST .../policies`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePolicyRequest {
    /// 1 to 128 letters, digits or `+=,.@_-`, unique in the tenant, not a managed policy's name.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// The document (JSON, or a string of it).
    pub document: Document,
}

/// Body of `POST .../versions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVersionRequest {
    /// The document.
    pub document: Document,
    /// Make it the version in force (default: true).
    #[serde(default = "yes")]
    pub set_as_default: bool,
}

fn yes() -> bool {
    true
}

/// A policy version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PolicyVersion {
    /// Its number.
    pub version: i32,
    /// Whether it is the one in force.
    pub is_default: bool,
    /// The document as written.
    pub document: String,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Validation findings (on create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[sqlx(skip)]
    pub findings: Vec<FindingOut>,
}

/// Body of `PUT .../default-version`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDefaultRequest {
    /// The version to put in force.
    pub version: i32,
}

/// A list of policies.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PolicyList {
    /// Managed policies first, then the tenant's by name.
    pub policies: Vec<Policy>,
}

/// A list of versions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionList {
    /// Newest first.
    pub versions: Vec<PolicyVersion>,
}

fn managed_out(m: &nimbus_iam::managed::ManagedPolicy) -> Policy {
    Policy {
        name: m.name.to_owned(),
        nrn: m.nrn(),
        managed: true,
        description: m.description.to_owned(),
        default_version: 1,
        document: m.document.to_owned(),
        created_at: None,
        findings: Vec::new(),
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    name: String,
    description: String,
    default_version: i32,
    document: String,
    created_at: DateTime<Utc>,
}

impl Row {
    fn out(self, tenant: Uuid) -> Policy {
        Policy {
            nrn: nrn::policy(tenant, &self.name),
            name: self.name,
            managed: false,
            description: self.description,
            default_version: self.default_version,
            document: self.document,
            created_at: Some(self.created_at),
            findings: Vec::new(),
        }
    }
}

/// The tenant's policy `name`, locked for update when `lock`.
pub(crate) async fn find(tx: &mut Tx, tenant: Uuid, name: &str, lock: bool) -> ApiResult<Option<(Uuid, i32, i32)>> {
    let q = format!(
        "SELECT id, default_version, next_version FROM policies WHERE tenant_id = $1 AND name = $2{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    Ok(sqlx::query_as(&q).bind(tenant).bind(name).fetch_optional(&mut **tx).await?)
}

async fn read(tx: &mut Tx, tenant: Uuid, name: &str) -> ApiResult<Option<Row>> {
    Ok(sqlx::query_as(
        "SELECT p.id, p.name, p.description, p.default_version, p.next_version, v.document, p.created_at \
         FROM policies p JOIN policy_versions v ON v.policy_id = p.id AND v.version = p.default_version \
         WHERE p.tenant_id = $1 AND p.name = $2",
    )
    .bind(tenant)
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Create a policy with its first version.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/policies",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = CreatePolicyRequest, example = json!({"name": "deploy-web", "description": "CI deploys the web functions",
        "document": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": ["functions:CreateVersion", "functions:UpdateAlias"],
            "Resource": "nrn:nimbus:functions:*:function/web-*"}]}})),
    responses(
        (status = 201, description = "Created, with the validator's findings", body = Policy),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "The name is taken, or too many policies", body = crate::error::Problem),
        (status = 422, description = "Invalid name or document (each error's JSON path named)", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<CreatePolicyRequest>,
) -> ApiResult<(StatusCode, Json<Policy>)> {
    let resource = nrn::policy(tenant_id, &req.name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreatePolicy, tenant_id, &resource).await?;
    let mut errors = Vec::new();
    if let Err(e) = policy_name("name", &req.name) {
        errors.push(e);
    }
    if req.description.chars().count() > MAX_DESCRIPTION {
        errors.push(crate::error::FieldError::new(
            "description",
            "max_length",
            format!("at most {MAX_DESCRIPTION} characters"),
        ));
    }
    let text = req.document.text();
    let findings = match checked("document", &text, nimbus_iam::PolicyKind::Identity) {
        Ok(f) => f,
        Err(ApiError::Validation(mut e)) => {
            errors.append(&mut e);
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM policies WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if count >= MAX_POLICIES_PER_TENANT {
        return Err(ApiError::conflict(
            "too_many_policies",
            format!("a tenant may have at most {MAX_POLICIES_PER_TENANT} policies"),
        ));
    }
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO policies (id, tenant_id, name, description, default_version) VALUES ($1, $2, $3, $4, 1)")
        .bind(id)
        .bind(tenant_id)
        .bind(&req.name)
        .bind(&req.description)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            on_constraint(
                e,
                [("policies_name_key", ApiError::conflict("policy_exists", "a policy with this name exists"))],
            )
        })?;
    sqlx::query("INSERT INTO policy_versions (tenant_id, policy_id, version, document) VALUES ($1, $2, 1, $3)")
        .bind(tenant_id)
        .bind(id)
        .bind(&text)
        .execute(&mut *tx)
        .await?;
    audit::record_action(&mut tx, &ctx, &principal, Action::CreatePolicy, tenant_id, resource, json!({"version": 1}))
        .await?;
    let mut out = read(&mut tx, tenant_id, &req.name).await?.ok_or(ApiError::NotFound("policy"))?.out(tenant_id);
    tx.commit().await?;
    out.findings = findings;
    Ok((StatusCode::CREATED, Json(out)))
}

/// List the managed policies and the tenant's own.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/policies",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses(
        (status = 200, description = "Managed policies, then the tenant's", body = PolicyList),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_policies(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<PolicyList>> {
    let resource = nrn::policy(tenant_id, "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListPolicies, tenant_id, &resource).await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT p.id, p.name, p.description, p.default_version, p.next_version, v.document, p.created_at \
         FROM policies p JOIN policy_versions v ON v.policy_id = p.id AND v.version = p.default_version \
         WHERE p.tenant_id = $1 ORDER BY p.name",
    )
    .bind(tenant_id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut policies: Vec<Policy> = nimbus_iam::managed::MANAGED.iter().map(managed_out).collect();
    policies.extend(rows.into_iter().map(|r| r.out(tenant_id)));
    Ok(Json(PolicyList { policies }))
}

/// Read a policy (managed or the tenant's) with its default version's document.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name")),
    responses(
        (status = 200, description = "The policy", body = Policy),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or policy", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, String)>,
) -> ApiResult<Json<Policy>> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetPolicy, tenant_id, &resource).await?;
    if let Some(m) = nimbus_iam::managed::managed(&name) {
        return Ok(Json(managed_out(m)));
    }
    let row = read(&mut tx, tenant_id, &name).await?.ok_or(ApiError::NotFound("policy"))?;
    tx.commit().await?;
    Ok(Json(row.out(tenant_id)))
}

/// Delete one of the tenant's policies with its versions; refused while it is attached.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or policy", body = crate::error::Problem),
        (status = 409, description = "Still attached, or a managed policy", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn delete_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, String)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeletePolicy, tenant_id, &resource).await?;
    if nimbus_iam::managed::managed(&name).is_some() {
        return Err(ApiError::conflict("managed_policy", "managed policies cannot be changed"));
    }
    let (id, ..) = find(&mut tx, tenant_id, &name, true).await?.ok_or(ApiError::NotFound("policy"))?;
    let attached: i64 =
        sqlx::query_scalar("SELECT count(*) FROM policy_attachments WHERE tenant_id = $1 AND policy_id = $2")
            .bind(tenant_id)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
    if attached > 0 {
        return Err(ApiError::conflict(
            "policy_attached",
            format!("the policy is attached to {attached} principal(s); detach it first"),
        ));
    }
    sqlx::query("DELETE FROM policies WHERE tenant_id = $1 AND id = $2")
        .bind(tenant_id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit::record_action(&mut tx, &ctx, &principal, Action::DeletePolicy, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}

/// Add a version to a policy (at most five; delete the policy or reuse older numbers by
/// recreating it otherwise), by default putting it in force.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}/versions",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name")),
    request_body(content = CreateVersionRequest, example = json!({"document": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"}]}, "set_as_default": true})),
    responses(
        (status = 201, description = "The new version, with the validator's findings", body = PolicyVersion),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or policy", body = crate::error::Problem),
        (status = 409, description = "Five versions already, or a managed policy", body = crate::error::Problem),
        (status = 422, description = "Invalid document", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_policy_version(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, String)>,
    extract::Json(req): extract::Json<CreateVersionRequest>,
) -> ApiResult<(StatusCode, Json<PolicyVersion>)> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreatePolicyVersion, tenant_id, &resource).await?;
    if nimbus_iam::managed::managed(&name).is_some() {
        return Err(ApiError::conflict("managed_policy", "managed policies cannot be changed"));
    }
    let text = req.document.text();
    let findings = checked("document", &text, nimbus_iam::PolicyKind::Identity)?;
    let (id, _, next) = find(&mut tx, tenant_id, &name, true).await?.ok_or(ApiError::NotFound("policy"))?;
    let versions: i64 = sqlx::query_scalar("SELECT count(*) FROM policy_versions WHERE policy_id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    if versions >= MAX_VERSIONS {
        return Err(ApiError::conflict(
            "too_many_versions",
            format!("a policy keeps at most {MAX_VERSIONS} versions; delete one first"),
        ));
    }
    let created: PolicyVersion = sqlx::query_as(
        "INSERT INTO policy_versions (tenant_id, policy_id, version, document) VALUES ($1, $2, $3, $4) \
         RETURNING version, false AS is_default, document, created_at",
    )
    .bind(tenant_id)
    .bind(id)
    .bind(next)
    .bind(&text)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE policies SET next_version = next_version + 1, updated_at = now(), \
         default_version = CASE WHEN $3 THEN $2 ELSE default_version END WHERE id = $1",
    )
    .bind(id)
    .bind(next)
    .bind(req.set_as_default)
    .execute(&mut *tx)
    .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::CreatePolicyVersion,
        tenant_id,
        resource,
        json!({"version": next, "default": req.set_as_default}),
    )
    .await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok((StatusCode::CREATED, Json(PolicyVersion { is_default: req.set_as_default, findings, ..created })))
}

/// List a policy's versions.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}/versions",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name")),
    responses(
        (status = 200, description = "Newest first", body = VersionList),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or policy", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_policy_versions(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, String)>,
) -> ApiResult<Json<VersionList>> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListPolicyVersions, tenant_id, &resource).await?;
    let (id, ..) = find(&mut tx, tenant_id, &name, false).await?.ok_or(ApiError::NotFound("policy"))?;
    let versions: Vec<PolicyVersion> = sqlx::query_as(
        "SELECT v.version, v.version = p.default_version AS is_default, v.document, v.created_at \
         FROM policy_versions v JOIN policies p ON p.id = v.policy_id WHERE v.policy_id = $1 ORDER BY v.version DESC",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(VersionList { versions }))
}

/// Read one version of a policy.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}/versions/{version}",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name"),
        ("version" = i32, Path, description = "Version number")),
    responses(
        (status = 200, description = "The version", body = PolicyVersion),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, policy or version", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_policy_version(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name, version)): Path<(Uuid, String, i32)>,
) -> ApiResult<Json<PolicyVersion>> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListPolicyVersions, tenant_id, &resource).await?;
    let (id, ..) = find(&mut tx, tenant_id, &name, false).await?.ok_or(ApiError::NotFound("policy"))?;
    let v: Option<PolicyVersion> = sqlx::query_as(
        "SELECT v.version, v.version = p.default_version AS is_default, v.document, v.created_at \
         FROM policy_versions v JOIN policies p ON p.id = v.policy_id WHERE v.policy_id = $1 AND v.version = $2",
    )
    .bind(id)
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(v.ok_or(ApiError::NotFound("policy version"))?))
}

/// Put another version of a policy in force.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant_id}/policies/{policy_name}/default-version",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("policy_name" = String, Path, description = "Policy name")),
    request_body(content = SetDefaultRequest, example = json!({"version": 1})),
    responses(
        (status = 200, description = "The policy, with that version in force", body = Policy),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, policy or version", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn set_default_version(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, String)>,
    extract::Json(req): extract::Json<SetDefaultRequest>,
) -> ApiResult<Json<Policy>> {
    let resource = nrn::policy(tenant_id, &name);
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::SetDefaultPolicyVersion, tenant_id, &resource).await?;
    let (id, ..) = find(&mut tx, tenant_id, &name, true).await?.ok_or(ApiError::NotFound("policy"))?;
    let moved = sqlx::query(
        "UPDATE policies SET default_version = $2, updated_at = now() WHERE id = $1 \
         AND EXISTS (SELECT 1 FROM policy_versions WHERE policy_id = $1 AND version = $2)",
    )
    .bind(id)
    .bind(req.version)
    .execute(&mut *tx)
    .await?;
    if moved.rows_affected() == 0 {
        return Err(ApiError::NotFound("policy version"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::SetDefaultPolicyVersion,
        tenant_id,
        resource,
        json!({"version": req.version}),
    )
    .await?;
    let out = read(&mut tx, tenant_id, &name).await?.ok_or(ApiError::NotFound("policy"))?.out(tenant_id);
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    #[test]
    fn policy_names_follow_the_rules() {
        assert!(super::policy_name("name", "deploy-web_1.v2@ci").is_ok());
        for bad in ["", "has space", "Developer", &"x".repeat(129)] {
            assert!(super::policy_name("name", bad).is_err(), "{bad:?}");
        }
    }
}
