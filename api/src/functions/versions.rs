//! Versions: immutable snapshots of a function's code package and configuration, numbered per
//! function from 1. A number is never reused, even after its version is deleted; a version an
//! alias routes to cannot be deleted. The database enforces immutability: the application role
//! has no UPDATE privilege on `versions`.

use std::collections::BTreeMap;

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{FunctionConfig, MAX_DESCRIPTION, PackageRef, Runtime, env, load, package_ref};
use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, on_constraint},
    extract::{self, Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// A published version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Version {
    /// Id.
    pub id: Uuid,
    /// Function.
    pub function_id: Uuid,
    /// Number, from 1, per function.
    pub number: i32,
    /// The code.
    pub package: PackageRef,
    /// The configuration it was published with.
    pub config: FunctionConfig,
    /// Description given when publishing.
    pub description: String,
    /// Who published it: a user id, or an API key id (see `published_via`).
    pub published_by: Option<Uuid>,
    /// `user` or `api_key`.
    pub published_via: String,
    /// Published at.
    pub published_at: DateTime<Utc>,
}

/// Body of publishing.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishVersionRequest {
    /// What this version is about.
    #[serde(default)]
    pub description: Option<String>,
}

/// The configuration as frozen in a version (secrets stay sealed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredConfig {
    pub runtime: Runtime,
    pub entry: Option<String>,
    pub memory_mb: u32,
    pub timeout_ms: u32,
    pub concurrency: u32,
    pub min_scale: u32,
    pub max_scale: u32,
    pub reserved_concurrency: Option<u32>,
    pub tags: BTreeMap<String, String>,
    pub environment: BTreeMap<String, env::StoredVar>,
}

impl StoredConfig {
    fn present(&self) -> FunctionConfig {
        FunctionConfig {
            runtime: self.runtime,
            entry: self.entry.clone(),
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
            concurrency: self.concurrency,
            min_scale: self.min_scale,
            max_scale: self.max_scale,
            reserved_concurrency: self.reserved_concurrency,
            tags: self.tags.clone(),
            environment: env::present(&self.environment),
        }
    }
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    id: Uuid,
    function_id: Uuid,
    number: i32,
    package_id: Uuid,
    sha256: String,
    size: i64,
    #[sqlx(try_from = "String")]
    format: super::validate::Format,
    config: sqlx::types::Json<StoredConfig>,
    description: String,
    published_by: Option<Uuid>,
    published_via: String,
    published_at: DateTime<Utc>,
}

impl From<VersionRow> for Version {
    fn from(r: VersionRow) -> Version {
        Version {
            id: r.id,
            function_id: r.function_id,
            number: r.number,
            package: PackageRef { id: r.package_id, sha256: r.sha256, size: r.size, format: r.format },
            config: r.config.0.present(),
            description: r.description,
            published_by: r.published_by,
            published_via: r.published_via,
            published_at: r.published_at,
        }
    }
}

const VERSION_SELECT: &str = "SELECT v.id, v.function_id, v.number, v.package_id, v.sha256, p.size, p.format, v.config, \
     v.description, v.published_by, v.published_via, v.published_at \
     FROM versions v JOIN packages p ON p.tenant_id = v.tenant_id AND p.id = v.package_id";

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish_version, list_versions)).routes(routes!(get_version, delete_version))
}

/// Publish a version: freezes the function's current code package and configuration into the
/// next number. Versions never change afterwards.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/versions",
    tag = "versions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: a retry returns the same version"),
    ),
    request_body(content = PublishVersionRequest, example = json!({"description": "faster thumbnails"})),
    responses(
        (status = 201, description = "Published", body = Version),
        (status = 404, description = "No such function", body = crate::error::Problem),
        (status = 409, description = "The function has no code yet", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn publish_version(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<PublishVersionRequest>,
) -> ApiResult<(StatusCode, Json<Version>)> {
    let description = req.description.unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        return Err(ApiError::field(
            "description",
            "format",
            format!("at most {MAX_DESCRIPTION} characters without control characters"),
        ));
    }
    let resource = nrn::version(tenant_id, name.as_str(), "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreateVersion, tenant_id, &resource).await?;
    // The row lock serializes publishing per function: numbers are handed out in order, once.
    let row = load(&mut tx, tenant_id, name.as_str(), true).await?;
    let Some(package) = package_ref(&mut tx, tenant_id, row.package_id).await? else {
        return Err(ApiError::conflict("no_code", "upload a code package before publishing a version"));
    };
    let config = row.config();
    let stored = StoredConfig {
        runtime: config.runtime,
        entry: config.entry,
        memory_mb: config.memory_mb,
        timeout_ms: config.timeout_ms,
        concurrency: config.concurrency,
        min_scale: config.min_scale,
        max_scale: config.max_scale,
        reserved_concurrency: config.reserved_concurrency,
        tags: config.tags,
        environment: row.environment.0.clone(),
    };
    let number = row.next_version;
    sqlx::query("UPDATE functions SET next_version = next_version + 1 WHERE id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    let (via, by) = principal.actor();
    let id = Uuid::now_v7();
    let published_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO versions (id, tenant_id, function_id, number, package_id, sha256, config, description, \
         published_by, published_via) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING published_at",
    )
    .bind(id)
    .bind(tenant_id)
    .bind(row.id)
    .bind(number)
    .bind(package.id)
    .bind(&package.sha256)
    .bind(sqlx::types::Json(&stored))
    .bind(&description)
    .bind(by)
    .bind(via)
    .fetch_one(&mut *tx)
    .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::CreateVersion,
        tenant_id,
        nrn::version(tenant_id, name.as_str(), number),
        json!({ "number": number, "package_id": package.id, "sha256": package.sha256 }),
    )
    .await?;
    tx.commit().await?;
    let version = Version {
        id,
        function_id: row.id,
        number,
        package,
        config: stored.present(),
        description,
        published_by: Some(by),
        published_via: via.to_owned(),
        published_at,
    };
    Ok((StatusCode::CREATED, Json(version)))
}

/// List a function's versions, oldest first.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/versions",
    tag = "versions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name"), PageParams),
    responses(
        (status = 200, description = "A page of versions", body = Page<Version>),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_versions(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Version>>> {
    let (limit, after) = page.parse()?;
    let resource = nrn::version(tenant_id, name.as_str(), "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListVersions, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let rows: Vec<VersionRow> = sqlx::query_as(&format!(
        "{VERSION_SELECT} WHERE v.tenant_id = $1 AND v.function_id = $2 AND ($3::uuid IS NULL OR v.id > $3) \
         ORDER BY v.id LIMIT $4"
    ))
    .bind(tenant_id)
    .bind(function.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let page = Page::from_rows(rows, limit, |r| r.id);
    Ok(Json(Page { items: page.items.into_iter().map(Version::from).collect(), next_cursor: page.next_cursor }))
}

/// Read one version.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/versions/{version}",
    tag = "versions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("version" = u32, Path, description = "Version number"),
    ),
    responses(
        (status = 200, description = "The version", body = Version),
        (status = 404, description = "No such function or version", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_version(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name, number)): Path<(Uuid, Name, u32)>,
) -> ApiResult<Json<Version>> {
    let resource = nrn::version(tenant_id, name.as_str(), number);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListVersions, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let row: Option<VersionRow> =
        sqlx::query_as(&format!("{VERSION_SELECT} WHERE v.tenant_id = $1 AND v.function_id = $2 AND v.number = $3"))
            .bind(tenant_id)
            .bind(function.id)
            .bind(i32::try_from(number).unwrap_or(i32::MAX))
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    row.map(|r| Json(r.into())).ok_or(ApiError::NotFound("version"))
}

/// Delete a version. Refused (409) while an alias routes to it; its number is not reused.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/versions/{version}",
    tag = "versions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("version" = u32, Path, description = "Version number"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such function or version", body = crate::error::Problem),
        (status = 409, description = "An alias routes to it", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn delete_version(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, number)): Path<(Uuid, Name, u32)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::version(tenant_id, name.as_str(), number);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteVersion, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let in_use =
        || ApiError::conflict("version_in_use", format!("an alias routes to version {number}; change the alias first"));
    let deleted = sqlx::query("DELETE FROM versions WHERE tenant_id = $1 AND function_id = $2 AND number = $3")
        .bind(tenant_id)
        .bind(function.id)
        .bind(i32::try_from(number).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(|e| on_constraint(e, [("alias_routes_version_fkey", in_use())]))?;
    if deleted.rows_affected() == 0 {
        return Err(ApiError::NotFound("version"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::DeleteVersion,
        tenant_id,
        resource,
        json!({ "number": number }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
