//! Code packages: uploaded by a streaming `PUT .../code` (spooled, hashed, validated, then
//! stored content-addressed), or — with S3 — by a presigned upload the client PUTs straight to
//! the bucket and then completes. Either way the package becomes the function's current code.
//!
//! A package row belongs to one function of one tenant; the same bytes uploaded elsewhere get
//! their own row (and share the stored object). References are by package id inside the tenant,
//! so knowing another tenant's SHA-256 gives no access to its package.

use axum::{
    Json,
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{
    FunctionRow, Runtime, check_if_match, etag, etag_header, load,
    validate::{self, Format},
};
use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    startup::AppState,
    store::{ObjectStore, S3Store, Spooled, StoreError, check_address},
};

/// A code package.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Package {
    /// Id.
    pub id: Uuid,
    /// Function it was uploaded to.
    pub function_id: Uuid,
    /// SHA-256 of the bytes (lowercase hex): the address in the store.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// How it is packed.
    #[sqlx(try_from = "String")]
    pub format: Format,
    /// Who uploaded it.
    pub created_by: Option<Uuid>,
    /// Uploaded at.
    pub created_at: DateTime<Utc>,
}

/// The result of an upload.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UploadedPackage {
    /// The package, now the function's current code.
    pub package: Package,
    /// The bytes were in the store already (uploaded before, by anyone): nothing new was stored.
    pub deduplicated: bool,
    /// The function's ETag after the change.
    pub function_etag: String,
}

/// Body of a presigned upload request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUploadRequest {
    /// Exact size of the package in bytes.
    pub size: u64,
    /// SHA-256 of the package (lowercase hex); checked when the upload completes.
    pub sha256: String,
    /// Media type: `application/wasm`, `application/zip` or `application/gzip`.
    pub content_type: String,
}

/// A presigned upload: PUT the bytes to `url` with `headers`, then complete it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Upload {
    /// Upload id.
    pub id: Uuid,
    /// Method to use.
    pub method: String,
    /// URL to send the bytes to.
    pub url: String,
    /// Headers to send as they are (they are signed).
    pub headers: std::collections::BTreeMap<String, String>,
    /// The URL stops working at.
    pub expires_at: DateTime<Utc>,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload_code))
        .routes(routes!(list_packages))
        .routes(routes!(get_package))
        .routes(routes!(create_upload))
        .routes(routes!(complete_upload))
}

const PACKAGE_COLUMNS: &str = "id, function_id, sha256, size, format, created_by, created_at";

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::TooLarge { limit } => ApiError::PayloadTooLarge { limit: limit as usize },
        StoreError::Body(m) => ApiError::field("body", "unreadable", format!("the upload broke off: {m}")),
        e => ApiError::Internal(anyhow::Error::new(e)),
    }
}

/// The format the body's media type names, checked against the runtime.
fn format_for(runtime: Runtime, content_type: Option<&str>) -> Result<Format, ApiError> {
    let allowed = match runtime {
        Runtime::Wasm => "application/wasm",
        Runtime::Process => "application/zip or application/gzip (a tar archive)",
    };
    let format = content_type.and_then(Format::from_media_type);
    match (runtime, format) {
        (Runtime::Wasm, Some(Format::Wasm)) => Ok(Format::Wasm),
        (Runtime::Process, Some(f @ (Format::Zip | Format::TarGz))) => Ok(f),
        _ => Err(ApiError::UnsupportedMediaType(format!("{} functions take {allowed}", runtime.as_str()))),
    }
}

/// Validates a spooled package on the blocking pool.
async fn check_package(spooled: &Spooled, format: Format, entry: Option<String>) -> Result<(), ApiError> {
    let path = spooled.path().to_owned();
    tokio::task::spawn_blocking(move || validate::validate(&path, format, entry.as_deref()))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(ApiError::InvalidPackage)
}

/// Validates a stored package again, for another entry (a process function whose entry or
/// package changes). 422 naming the problem when it does not hold.
pub(crate) async fn revalidate(state: &AppState, package: &super::PackageRef, entry: Option<&str>) -> ApiResult<()> {
    let bytes =
        state.store.get(&package.sha256).await.map_err(store_error)?.ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("package {} is missing from the store", package.sha256))
        })?;
    let chunk = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes)]);
    let spooled = crate::store::spool(state.store.spool_dir(), chunk, u64::MAX, false).await.map_err(store_error)?;
    check_package(&spooled, package.format, entry.map(str::to_owned)).await
}

fn uploader(principal: &Principal) -> Option<Uuid> {
    match principal {
        Principal::User { user_id, .. } => Some(*user_id),
        Principal::ApiKey { created_by, .. } => *created_by,
        Principal::Role { .. } => None,
    }
}

/// Records a stored package as the function's current code, provided the function still has
/// the runtime and entry the package was validated for.
#[allow(clippy::too_many_arguments)]
async fn record(
    state: &AppState,
    principal: &Principal,
    ctx: &RequestContext,
    tenant_id: Uuid,
    checked: &FunctionRow,
    sha256: &str,
    size: u64,
    format: Format,
    deduplicated: bool,
    if_match: Option<&HeaderMap>,
    completing: Option<Uuid>,
) -> ApiResult<(StatusCode, HeaderMap, Json<UploadedPackage>)> {
    let resource = nrn::function(tenant_id, &checked.name);
    let (mut tx, _) = authz::begin(&state.pool, principal, Action::UpdateFunctionCode, tenant_id, &resource).await?;
    let row = load(&mut tx, tenant_id, &checked.name, true).await?;
    if row.id != checked.id || row.entry != checked.entry {
        return Err(ApiError::conflict(
            "function_changed",
            "the function was replaced or its entry changed during the upload; upload again",
        ));
    }
    if let Some(headers) = if_match {
        check_if_match(headers, &etag(row.revision), false)?;
    }
    if let Some(upload) = completing {
        let done = sqlx::query(
            "UPDATE package_uploads SET state = 'completed', completed_at = now() WHERE id = $1 AND state = 'completing'",
        )
        .bind(upload)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(ApiError::conflict("upload_completed", "this upload was completed already"));
        }
    }
    let (package, inserted): (Package, bool) = {
        let row: (Uuid, Uuid, String, i64, String, Option<Uuid>, DateTime<Utc>, bool) = sqlx::query_as(
            "INSERT INTO packages (id, tenant_id, function_id, sha256, size, format, created_by) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (function_id, sha256) DO UPDATE SET sha256 = EXCLUDED.sha256 \
             RETURNING id, function_id, sha256, size, format, created_by, created_at, (xmax = 0)",
        )
        .bind(Uuid::now_v7())
        .bind(tenant_id)
        .bind(row.id)
        .bind(sha256)
        .bind(size as i64)
        .bind(format.as_str())
        .bind(uploader(principal))
        .fetch_one(&mut *tx)
        .await?;
        let (id, function_id, sha256, size, format, created_by, created_at, inserted) = row;
        (Package { id, function_id, sha256, size, format: Format::parse(&format)?, created_by, created_at }, inserted)
    };
    let revision: i64 = sqlx::query_scalar(
        "UPDATE functions SET package_id = $2, revision = revision + 1, updated_at = now() WHERE id = $1 RETURNING revision",
    )
    .bind(row.id)
    .bind(package.id)
    .fetch_one(&mut *tx)
    .await?;
    audit::record_action(
        &mut tx,
        ctx,
        principal,
        Action::UpdateFunctionCode,
        tenant_id,
        resource,
        json!({ "package_id": package.id, "sha256": package.sha256, "size": package.size, "format": format }),
    )
    .await?;
    tx.commit().await?;
    let function_etag = etag(revision);
    let status = if inserted { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, etag_header(&function_etag), Json(UploadedPackage { package, deduplicated, function_etag })))
}

/// Reads the function an upload is for, authorizing the upload; releases the connection before
/// any bytes are read.
async fn target(state: &AppState, principal: &Principal, tenant_id: Uuid, name: &Name) -> ApiResult<FunctionRow> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, principal, Action::UpdateFunctionCode, tenant_id, &resource).await?;
    let row = load(&mut tx, tenant_id, name.as_str(), false).await?;
    tx.commit().await?;
    Ok(row)
}

/// Upload a code package as the request body and make it the function's current code.
///
/// The body streams to a spool file while its SHA-256 is computed; it is refused (413) as soon as
/// it passes the size limit, validated (422 naming what is wrong), and only then stored under its
/// SHA-256. Nothing is stored when any step fails. The same bytes uploaded again are not stored
/// twice (`deduplicated`), and the same package is returned for the same function (200, not 201).
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/code",
    tag = "packages",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("If-Match" = Option<String>, Header, description = "Replace the code only if the function is still in this state"),
    ),
    request_body(
        description = "The package: a WebAssembly module for `wasm` functions, a zip or gzip tarball holding the entry for `process` functions",
        content(
            (Vec<u8> = "application/wasm"),
            (Vec<u8> = "application/zip"),
            (Vec<u8> = "application/gzip"),
        )
    ),
    responses(
        (status = 201, description = "A new package for this function", body = UploadedPackage),
        (status = 200, description = "This function had this package already; it is current again", body = UploadedPackage),
        (status = 404, description = "No such function", body = crate::error::Problem),
        (status = 409, description = "The function was replaced or its entry changed during the upload", body = crate::error::Problem),
        (status = 412, description = "ETag is stale", body = crate::error::Problem),
        (status = 413, description = "Larger than the package limit", body = crate::error::Problem),
        (status = 415, description = "Media type does not fit the runtime", body = crate::error::Problem),
        (status = 422, description = "Invalid package; `errors` names each problem", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn upload_code(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    headers: HeaderMap,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    body: Body,
) -> ApiResult<(StatusCode, HeaderMap, Json<UploadedPackage>)> {
    let function = target(&state, &principal, tenant_id, &name).await?;
    check_if_match(&headers, &etag(function.revision), false)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let format = format_for(function.runtime, content_type)?;
    let limit = state.settings.max_package_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit: limit as usize });
    }
    let spooled = state.store.spool(body.into_data_stream(), limit).await.map_err(store_error)?;
    check_package(&spooled, format, function.entry.clone()).await?;
    let (sha256, size) = (spooled.sha256.clone(), spooled.size);
    let created = state.store.put_spooled(spooled).await.map_err(store_error)?;
    record(&state, &principal, &ctx, tenant_id, &function, &sha256, size, format, !created, Some(&headers), None).await
}

/// List the packages uploaded to a function.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/packages",
    tag = "packages",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name"), PageParams),
    responses(
        (status = 200, description = "A page of packages", body = Page<Package>),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_packages(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Package>>> {
    let (limit, after) = page.parse()?;
    let resource = nrn::package(tenant_id, name.as_str(), "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListPackages, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let rows: Vec<Package> = sqlx::query_as(&format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE tenant_id = $1 AND function_id = $2 \
         AND ($3::uuid IS NULL OR id > $3) ORDER BY id LIMIT $4"
    ))
    .bind(tenant_id)
    .bind(function.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |p| p.id)))
}

/// Read one package of a function.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/packages/{package_id}",
    tag = "packages",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("package_id" = Uuid, Path, description = "Package id"),
    ),
    responses(
        (status = 200, description = "The package", body = Package),
        (status = 404, description = "No such function or package", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_package(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name, package_id)): Path<(Uuid, Name, Uuid)>,
) -> ApiResult<Json<Package>> {
    let resource = nrn::package(tenant_id, name.as_str(), package_id);
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListPackages, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let package: Option<Package> = sqlx::query_as(&format!(
        "SELECT {PACKAGE_COLUMNS} FROM packages WHERE tenant_id = $1 AND function_id = $2 AND id = $3"
    ))
    .bind(tenant_id)
    .bind(function.id)
    .bind(package_id)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    package.map(Json).ok_or(ApiError::NotFound("package"))
}

/// Start a presigned upload (S3 store only): returns a URL the client PUTs the package to
/// directly, with exactly the declared size; then complete the upload.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/uploads",
    tag = "packages",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body(content = CreateUploadRequest, example = json!({"size": 1048576, "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "content_type": "application/wasm"})),
    responses(
        (status = 201, description = "PUT the bytes to `url` with `headers`", body = Upload),
        (status = 404, description = "No such function", body = crate::error::Problem),
        (status = 409, description = "Too many open uploads", body = crate::error::Problem),
        (status = 413, description = "Larger than the package limit", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
        (status = 501, description = "The package store is not S3", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_upload(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<CreateUploadRequest>,
) -> ApiResult<(StatusCode, Json<Upload>)> {
    let function = target(&state, &principal, tenant_id, &name).await?;
    let Some(s3) = state.store.s3() else {
        return Err(ApiError::NotSupported {
            code: "presigned_uploads_unavailable",
            message: "presigned uploads need the S3 package store; upload with PUT .../code instead".into(),
        });
    };
    let format = format_for(function.runtime, Some(&req.content_type))
        .map_err(|_| ApiError::field("content_type", "runtime_mismatch", "does not fit the function's runtime"))?;
    if check_address(&req.sha256).is_err() {
        return Err(ApiError::field("sha256", "format", "must be 64 lowercase hex digits"));
    }
    if req.size == 0 {
        return Err(ApiError::field("size", "range", "must be at least 1"));
    }
    if req.size > state.settings.max_package_bytes {
        return Err(ApiError::PayloadTooLarge { limit: state.settings.max_package_bytes as usize });
    }
    let id = Uuid::now_v7();
    let staging_key = format!("uploads/{tenant_id}/{id}");
    {
        let mut tx = crate::db::begin(&state.pool, &crate::db::Scope::tenant(tenant_id, principal.user_id())).await?;
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM package_uploads WHERE tenant_id = $1 AND function_id = $2 \
             AND state IN ('pending', 'completing') AND expires_at > now()",
        )
        .bind(tenant_id)
        .bind(function.id)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        if open >= MAX_OPEN_UPLOADS {
            return Err(ApiError::conflict(
                "too_many_uploads",
                format!("a function may have at most {MAX_OPEN_UPLOADS} open uploads; complete or let some expire"),
            ));
        }
    }
    let ttl = state.settings.upload_url_ttl.0;
    let presigned = s3.presign_put(&staging_key, req.size, ttl).await.map_err(store_error)?;
    let expires_at = Utc::now() + chrono::Duration::from_std(ttl).map_err(|e| ApiError::Internal(e.into()))?;
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::UpdateFunctionCode, tenant_id, &resource).await?;
    sqlx::query(
        "INSERT INTO package_uploads (id, tenant_id, function_id, staging_key, sha256, size, format, created_by, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(tenant_id)
    .bind(function.id)
    .bind(&staging_key)
    .bind(&req.sha256)
    .bind(req.size as i64)
    .bind(format.as_str())
    .bind(uploader(&principal))
    .bind(expires_at)
    .execute(&mut *tx)
    .await
    .map_err(|e| crate::error::on_constraint(e, [("package_uploads_function_fkey", ApiError::NotFound("function"))]))?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateFunctionCode,
        tenant_id,
        resource,
        json!({ "upload_id": id, "sha256": req.sha256, "size": req.size, "presigned": true }),
    )
    .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(Upload {
            id,
            method: "PUT".into(),
            url: presigned.url,
            headers: presigned.headers.into_iter().collect(),
            expires_at,
        }),
    ))
}

#[derive(sqlx::FromRow)]
struct UploadRow {
    function_id: Uuid,
    staging_key: String,
    sha256: String,
    size: i64,
    #[sqlx(try_from = "String")]
    format: Format,
    expires_at: DateTime<Utc>,
    state: String,
    claimed_at: Option<DateTime<Utc>>,
}

/// Most uploads a function may have open (pending or completing) at once.
pub const MAX_OPEN_UPLOADS: i64 = 10;

/// Claims an upload for completion: one completion at a time, and only once. An expired upload
/// is marked so and its staging object deleted.
async fn claim(
    state: &AppState,
    s3: &S3Store,
    principal: &Principal,
    tenant_id: Uuid,
    function: &FunctionRow,
    upload_id: Uuid,
) -> ApiResult<UploadRow> {
    let resource = nrn::function(tenant_id, &function.name);
    let (mut tx, _) = authz::begin(&state.pool, principal, Action::UpdateFunctionCode, tenant_id, &resource).await?;
    let row: Option<UploadRow> = sqlx::query_as(
        "SELECT function_id, staging_key, sha256, size, format, expires_at, state, claimed_at FROM package_uploads \
         WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
    )
    .bind(tenant_id)
    .bind(upload_id)
    .fetch_optional(&mut *tx)
    .await?;
    let upload = row.filter(|u| u.function_id == function.id).ok_or(ApiError::NotFound("upload"))?;
    // A completion whose process died is taken over once the request timeout has passed.
    let lease = chrono::Duration::from_std(state.settings.upload_timeout.0).unwrap_or(chrono::Duration::MAX);
    match upload.state.as_str() {
        "completed" => return Err(ApiError::conflict("upload_completed", "this upload was completed already")),
        "refused" | "expired" => {
            return Err(ApiError::conflict("upload_spent", "this upload was refused or expired; start a new one"));
        }
        "completing" if upload.claimed_at.is_some_and(|c| c + lease > Utc::now()) => {
            return Err(ApiError::conflict("upload_in_progress", "this upload is being completed"));
        }
        _ => {}
    }
    if upload.expires_at <= Utc::now() {
        sqlx::query("UPDATE package_uploads SET state = 'expired' WHERE id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        discard(s3, &upload.staging_key).await;
        return Err(ApiError::conflict("upload_expired", "this upload expired; start a new one"));
    }
    sqlx::query("UPDATE package_uploads SET state = 'completing', claimed_at = now() WHERE id = $1")
        .bind(upload_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(upload)
}

/// Deletes a staging object, logging (not failing) when that does not work.
async fn discard(s3: &S3Store, key: &str) {
    if let Err(e) = s3.delete_key(key).await {
        tracing::warn!(error = %e, key, "could not delete a staging object");
    }
}

/// Sets an upload's state (after a claim), best effort.
async fn set_upload_state(state: &AppState, principal: &Principal, tenant_id: Uuid, upload_id: Uuid, to: &str) {
    let result = async {
        let mut tx = crate::db::begin(&state.pool, &crate::db::Scope::tenant(tenant_id, principal.user_id())).await?;
        sqlx::query("UPDATE package_uploads SET state = $2 WHERE id = $1 AND state = 'completing'")
            .bind(upload_id)
            .bind(to)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, %upload_id, "could not record the state of an upload");
    }
}

/// Complete a presigned upload: the uploaded object is read back, its size and SHA-256 checked
/// against what was declared, the package validated, and it becomes the function's current code.
/// A mismatch or an invalid package is refused (422) and the uploaded object deleted.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/uploads/{upload_id}/complete",
    tag = "packages",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("upload_id" = Uuid, Path, description = "Upload id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    responses(
        (status = 201, description = "A new package for this function", body = UploadedPackage),
        (status = 200, description = "This function had this package already; it is current again", body = UploadedPackage),
        (status = 404, description = "No such function or upload", body = crate::error::Problem),
        (status = 409, description = "Nothing was uploaded yet; or the upload is being completed, was completed, expired or refused; or the function changed meanwhile", body = crate::error::Problem),
        (status = 413, description = "The uploaded object is larger than the package limit", body = crate::error::Problem),
        (status = 422, description = "Size or SHA-256 differ from the declared ones, or the package is invalid", body = crate::error::Problem),
        (status = 501, description = "The package store is not S3", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn complete_upload(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name, upload_id)): Path<(Uuid, Name, Uuid)>,
) -> ApiResult<(StatusCode, HeaderMap, Json<UploadedPackage>)> {
    let function = target(&state, &principal, tenant_id, &name).await?;
    let Some(s3) = state.store.s3() else {
        return Err(ApiError::NotSupported {
            code: "presigned_uploads_unavailable",
            message: "presigned uploads need the S3 package store".into(),
        });
    };
    let upload = claim(&state, s3, &principal, tenant_id, &function, upload_id).await?;
    let Some(object) = s3.stream(&upload.staging_key).await.map_err(store_error)? else {
        // Nothing uploaded yet: give the claim back, the client may still PUT and complete.
        set_upload_state(&state, &principal, tenant_id, upload_id, "pending").await;
        return Err(ApiError::conflict("upload_not_received", "nothing was uploaded to the presigned URL yet"));
    };
    let result = async {
        let spooled = state.store.spool(object, state.settings.max_package_bytes).await.map_err(store_error)?;
        let mut mismatch = Vec::new();
        if spooled.size != upload.size as u64 {
            mismatch.push(FieldError::new(
                "size",
                "mismatch",
                format!("{} bytes were uploaded, {} declared", spooled.size, upload.size),
            ));
        }
        if spooled.sha256 != upload.sha256 {
            mismatch.push(FieldError::new("sha256", "mismatch", format!("the upload's SHA-256 is {}", spooled.sha256)));
        }
        if !mismatch.is_empty() {
            return Err(ApiError::InvalidPackage(mismatch));
        }
        check_package(&spooled, upload.format, function.entry.clone()).await?;
        // The verified bytes are the spool file: store those, never the staging object, which
        // the presigned URL can still overwrite.
        let created = state.store.put_spooled(spooled).await.map_err(store_error)?;
        record(
            &state,
            &principal,
            &ctx,
            tenant_id,
            &function,
            &upload.sha256,
            upload.size as u64,
            upload.format,
            !created,
            None,
            Some(upload_id),
        )
        .await
    }
    .await;
    // Whatever happened, the staging object has served its purpose; a refused upload is spent.
    discard(s3, &upload.staging_key).await;
    if result.is_err() {
        set_upload_state(&state, &principal, tenant_id, upload_id, "refused").await;
    }
    result
}
