//! Functions: the deployable unit of a tenant. A function has a runtime, limits, scaling bounds,
//! tags and environment variables (secret ones sealed at rest), and a current code package.
//! Publishing freezes code + configuration into an immutable, numbered version; aliases route
//! traffic over versions by weight.
//!
//! Everything lives under `/v1/tenants/{tenant_id}/functions`. Updates of a function and of an
//! alias need `If-Match` with the ETag they are based on, so two editors never silently overwrite
//! each other.
//!
//! A function's scaling settings ([`Scaling`]) and placement rules ([`PlacementRules`]) are the
//! function's, not its versions': they are not frozen at publishing, and a change applies to every
//! version at the autoscaler's next tick.

pub mod aliases;
pub mod env;
pub mod logs;
pub mod metrics;
pub mod packages;
pub mod policy;
pub mod role;
pub mod validate;
pub mod versions;

use std::collections::BTreeMap;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    autoscaler::{PlacementRules, Scaling},
    db::Tx,
    error::{ApiError, ApiResult, FieldError, on_constraint},
    extract::{self, Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    startup::AppState,
};

pub use env::{EnvVar, EnvVarInput};

/// Memory per instance, MB.
pub const MEMORY_MB: std::ops::RangeInclusive<u32> = 16..=10_240;
/// Timeout of one invocation, ms.
pub const TIMEOUT_MS: std::ops::RangeInclusive<u32> = 100..=900_000;
/// Concurrent requests per instance.
pub const CONCURRENCY: std::ops::RangeInclusive<u32> = 1..=1_000;
/// Bounds of min/max scale (instances).
pub const SCALE: std::ops::RangeInclusive<u32> = 0..=1_000;
/// Reserved concurrency.
pub const RESERVED_CONCURRENCY: std::ops::RangeInclusive<u32> = 0..=100_000;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 256;
/// Most tags on a function.
pub const MAX_TAGS: usize = 50;
/// Longest tag key.
pub const MAX_TAG_KEY: usize = 128;
/// Longest tag value.
pub const MAX_TAG_VALUE: usize = 256;
/// Longest entry path.
pub const MAX_ENTRY: usize = 255;
/// Most functions per tenant.
pub const MAX_FUNCTIONS_PER_TENANT: i64 = 1_000;

/// How a function's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// A WebAssembly module (WASI preview 1) run by wasmtime.
    Wasm,
    /// A native executable from an archive, run per request.
    Process,
}

impl Runtime {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Wasm => "wasm",
            Runtime::Process => "process",
        }
    }
}

impl TryFrom<String> for Runtime {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<Runtime> {
        match s.as_str() {
            "wasm" => Ok(Runtime::Wasm),
            "process" => Ok(Runtime::Process),
            other => Err(anyhow::anyhow!("unknown runtime {other:?} in the database")),
        }
    }
}

/// The code package a function or version runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct PackageRef {
    /// Package id.
    pub id: Uuid,
    /// SHA-256 of the bytes (lowercase hex).
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// How it is packed.
    #[sqlx(try_from = "String")]
    pub format: validate::Format,
}

/// The settings a version freezes: everything about a function except its name and code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionConfig {
    /// Runtime.
    pub runtime: Runtime,
    /// For `process`: the executable inside the package.
    pub entry: Option<String>,
    /// Memory per instance, MB (16–10240).
    pub memory_mb: u32,
    /// Most wall-clock time one invocation may take, ms (100–900000); enforced by the agent.
    pub timeout_ms: u32,
    /// Concurrent requests one instance takes (1–1000).
    pub concurrency: u32,
    /// Instances kept warm at all times (0–1000).
    pub min_scale: u32,
    /// Most instances (0–1000, at least `min_scale`).
    pub max_scale: u32,
    /// Concurrency reserved for (and capping) this function; none when absent.
    pub reserved_concurrency: Option<u32>,
    /// Tags (key → value).
    pub tags: BTreeMap<String, String>,
    /// Environment variables; secret values are never shown, only whether they are set.
    pub environment: BTreeMap<String, EnvVar>,
}

/// A function.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Function {
    /// Id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: Uuid,
    /// Name, unique in the tenant (a DNS label).
    pub name: String,
    /// Description.
    pub description: String,
    /// Configuration.
    #[serde(flatten)]
    pub config: FunctionConfig,
    /// Autoscaler settings beyond `min_scale`/`max_scale` (absent ones take the defaults). Not
    /// frozen into versions: they apply to every version, live.
    pub scaling: Scaling,
    /// Where instances may and should run. Not frozen into versions: they apply to every
    /// version, live.
    pub placement: PlacementRules,
    /// What the autoscaler last decided for each version it scales (read-only; empty until it
    /// has scaled one).
    pub scale: Vec<VersionScale>,
    /// The current code package, once one is uploaded.
    pub package: Option<PackageRef>,
    /// The execution role its invocations act as when they call the API (set with
    /// `PUT .../execution-role`); none: invocations get no credential.
    pub execution_role: Option<String>,
    /// The ETag of this state; send it as `If-Match` to update.
    pub etag: String,
    /// The number the next published version gets.
    pub next_version: i32,
    /// Who created it.
    pub created_by: Option<Uuid>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

/// Whether the autoscaler could place what it decided for a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScaleStatus {
    /// Every desired instance is placed.
    Ok,
    /// Some are not: the nodes that match have no room.
    Unplaced,
    /// No node matches the placement rules (or the tenant's dedicated pool) at all.
    Unschedulable,
}

impl TryFrom<String> for ScaleStatus {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<ScaleStatus> {
        match s.as_str() {
            "ok" => Ok(ScaleStatus::Ok),
            "unplaced" => Ok(ScaleStatus::Unplaced),
            "unschedulable" => Ok(ScaleStatus::Unschedulable),
            other => Err(anyhow::anyhow!("unknown autoscaler status {other:?} in the database")),
        }
    }
}

/// The autoscaler's last decision for one version.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct VersionScale {
    /// The version number.
    pub version: i32,
    /// Instances the autoscaler wants.
    pub desired: i32,
    /// Instances assigned to nodes.
    pub placed: i32,
    /// Instances the nodes report ready.
    pub ready: i32,
    /// Whether the version is in panic mode (scaling on the short window, never down).
    pub panicking: bool,
    /// Whether what it wants could be placed.
    #[sqlx(try_from = "String")]
    pub status: ScaleStatus,
    /// Why not, when it could not.
    pub reason: Option<String>,
}

/// Body of function creation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFunctionRequest {
    /// Name (DNS label), unique in the tenant.
    pub name: Name,
    /// Runtime.
    pub runtime: Runtime,
    /// For `process`: path of the executable inside the package (required); not for `wasm`.
    #[serde(default)]
    pub entry: Option<String>,
    /// Memory per instance, MB [default 128].
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Timeout, ms [default 10000].
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    /// Concurrent requests per instance [default 10].
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Minimum instances [default 0].
    #[serde(default)]
    pub min_scale: Option<u32>,
    /// Maximum instances [default 10].
    #[serde(default)]
    pub max_scale: Option<u32>,
    /// Reserved concurrency [default none].
    #[serde(default)]
    pub reserved_concurrency: Option<u32>,
    /// Description [default empty].
    #[serde(default)]
    pub description: Option<String>,
    /// Tags [default none].
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// Environment variables [default none].
    #[serde(default)]
    pub environment: Option<BTreeMap<String, EnvVarInput>>,
    /// Autoscaler settings [default: every one at its default].
    #[serde(default)]
    pub scaling: Option<Scaling>,
    /// Placement rules [default: no required or preferred labels, priority `normal`].
    #[serde(default)]
    pub placement: Option<PlacementRules>,
}

/// Body of a function update: the fields given are replaced, the rest stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateFunctionRequest {
    /// For `process`: the executable inside the package.
    #[serde(default)]
    pub entry: Option<String>,
    /// Memory per instance, MB.
    #[serde(default)]
    pub memory_mb: Option<u32>,
    /// Timeout, ms.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    /// Concurrent requests per instance.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Minimum instances.
    #[serde(default)]
    pub min_scale: Option<u32>,
    /// Maximum instances.
    #[serde(default)]
    pub max_scale: Option<u32>,
    /// Reserved concurrency; `null` removes it.
    #[serde(default, deserialize_with = "some_or_null")]
    #[schema(value_type = Option<u32>)]
    pub reserved_concurrency: Option<Option<u32>>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Tags (replace all).
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// Environment variables (replace all; a secret given without `value` keeps its stored value).
    #[serde(default)]
    pub environment: Option<BTreeMap<String, EnvVarInput>>,
    /// Switch the code to another package uploaded to this function.
    #[serde(default)]
    pub package_id: Option<Uuid>,
    /// Autoscaler settings (replace all: settings left out return to their defaults).
    #[serde(default)]
    pub scaling: Option<Scaling>,
    /// Placement rules (replace all).
    #[serde(default)]
    pub placement: Option<PlacementRules>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn some_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Routes of this module and its children.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_function, list_functions))
        .routes(routes!(get_function, update_function, delete_function))
        .merge(packages::router())
        .merge(versions::router())
        .merge(aliases::router())
        .merge(logs::router())
        .merge(metrics::router())
        .merge(policy::router())
        .merge(role::router())
}

/// The ETag of a revision.
pub fn etag(revision: i64) -> String {
    format!("\"{revision}\"")
}

/// The response headers carrying an ETag.
pub fn etag_header(etag: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h
}

/// Checks `If-Match` against the current ETag: `*` or a list containing it passes (strong
/// comparison: weak tags never match). Without the header: 428 when `required`, else passes.
pub fn check_if_match(headers: &HeaderMap, current: &str, required: bool) -> Result<(), ApiError> {
    let values: Vec<&str> = headers.get_all(header::IF_MATCH).iter().filter_map(|v| v.to_str().ok()).collect();
    if values.is_empty() {
        return if required { Err(ApiError::PreconditionRequired) } else { Ok(()) };
    }
    let matches = values.iter().flat_map(|v| v.split(',')).map(str::trim).any(|tag| tag == "*" || tag == current);
    if matches { Ok(()) } else { Err(ApiError::PreconditionFailed { current: current.to_owned() }) }
}

/// A function row as stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct FunctionRow {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub runtime: Runtime,
    pub entry: Option<String>,
    pub memory_mb: i32,
    pub timeout_ms: i32,
    pub concurrency: i32,
    pub min_scale: i32,
    pub max_scale: i32,
    pub reserved_concurrency: Option<i32>,
    pub description: String,
    pub tags: sqlx::types::Json<BTreeMap<String, String>>,
    pub environment: sqlx::types::Json<BTreeMap<String, env::StoredVar>>,
    pub scaling: sqlx::types::Json<Scaling>,
    pub placement: sqlx::types::Json<PlacementRules>,
    pub package_id: Option<Uuid>,
    pub revision: i64,
    pub next_version: i32,
    pub created_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub execution_role: Option<String>,
}

pub(crate) const FUNCTION_COLUMNS: &str = "id, tenant_id, name, runtime, entry, memory_mb, timeout_ms, concurrency, \
     min_scale, max_scale, reserved_concurrency, description, tags, environment, scaling, placement, \
     package_id, revision, next_version, created_by, created_at, updated_at, \
     (SELECT r.name FROM roles r WHERE r.tenant_id = functions.tenant_id AND r.id = functions.execution_role_id) \
     AS execution_role";

/// A stored non-negative integer (the columns only ever hold checked values).
fn unsigned(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl FunctionRow {
    /// The configuration part, with secrets shown as set/unset.
    pub fn config(&self) -> FunctionConfig {
        FunctionConfig {
            runtime: self.runtime,
            entry: self.entry.clone(),
            memory_mb: unsigned(self.memory_mb),
            timeout_ms: unsigned(self.timeout_ms),
            concurrency: unsigned(self.concurrency),
            min_scale: unsigned(self.min_scale),
            max_scale: unsigned(self.max_scale),
            reserved_concurrency: self.reserved_concurrency.map(unsigned),
            tags: self.tags.0.clone(),
            environment: env::present(&self.environment.0),
        }
    }

    /// The API form, with the autoscaler's last decisions for its versions.
    pub fn into_function(self, package: Option<PackageRef>, scale: Vec<VersionScale>) -> Function {
        Function {
            id: self.id,
            tenant_id: self.tenant_id,
            config: self.config(),
            name: self.name,
            description: self.description,
            scaling: self.scaling.0,
            placement: self.placement.0,
            scale,
            package,
            execution_role: self.execution_role,
            etag: etag(self.revision),
            next_version: self.next_version,
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// Loads a function by name (optionally locking it for update); 404 when absent.
pub(crate) async fn load(tx: &mut Tx, tenant: Uuid, name: &str, lock: bool) -> Result<FunctionRow, ApiError> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    sqlx::query_as(&format!("SELECT {FUNCTION_COLUMNS} FROM functions WHERE tenant_id = $1 AND name = $2{lock}"))
        .bind(tenant)
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("function"))
}

/// The package a function points at.
pub(crate) async fn package_ref(tx: &mut Tx, tenant: Uuid, id: Option<Uuid>) -> Result<Option<PackageRef>, ApiError> {
    let Some(id) = id else { return Ok(None) };
    Ok(sqlx::query_as("SELECT id, sha256, size, format FROM packages WHERE tenant_id = $1 AND id = $2")
        .bind(tenant)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
}

/// The columns of a [`VersionScale`], from `autoscaler_state s` joined with `versions v`.
const SCALE_COLUMNS: &str = "v.number AS version, s.desired, s.placed, s.ready, s.panicking, s.status, s.reason";

/// A [`VersionScale`] with its function, for lists.
#[derive(sqlx::FromRow)]
struct ScaleRow {
    function_id: Uuid,
    #[sqlx(flatten)]
    scale: VersionScale,
}

/// What the autoscaler last decided for each version of a function, by version number (the
/// tenant scope reads its own rows).
async fn version_scale(tx: &mut Tx, tenant: Uuid, function: Uuid) -> Result<Vec<VersionScale>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {SCALE_COLUMNS} FROM autoscaler_state s JOIN versions v ON v.id = s.version_id \
         WHERE s.tenant_id = $1 AND s.function_id = $2 ORDER BY v.number"
    ))
    .bind(tenant)
    .bind(function)
    .fetch_all(&mut **tx)
    .await?)
}

/// Checks every limit of a configuration; every broken rule is named by its field.
fn check_config(c: &FunctionConfig, description: &str, errors: &mut Vec<FieldError>) {
    let mut range = |field: &str, v: u32, r: std::ops::RangeInclusive<u32>| {
        if !r.contains(&v) {
            errors.push(FieldError::new(field, "range", format!("must be between {} and {}", r.start(), r.end())));
        }
    };
    range("memory_mb", c.memory_mb, MEMORY_MB);
    range("timeout_ms", c.timeout_ms, TIMEOUT_MS);
    range("concurrency", c.concurrency, CONCURRENCY);
    range("min_scale", c.min_scale, SCALE);
    range("max_scale", c.max_scale, SCALE);
    if let Some(r) = c.reserved_concurrency {
        range("reserved_concurrency", r, RESERVED_CONCURRENCY);
    }
    if c.min_scale > c.max_scale {
        errors.push(FieldError::new("min_scale", "order", "must not exceed max_scale"));
    }
    match (c.runtime, &c.entry) {
        (Runtime::Process, None) => {
            errors.push(FieldError::new("entry", "required", "process functions name their executable"))
        }
        (Runtime::Wasm, Some(_)) => {
            errors.push(FieldError::new("entry", "not_allowed", "wasm functions start at the module's `_start`"))
        }
        (Runtime::Process, Some(entry)) => {
            let path = std::path::Path::new(entry);
            let relative = path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if entry.is_empty() || entry.len() > MAX_ENTRY || entry.contains('\0') || !relative {
                errors.push(FieldError::new(
                    "entry",
                    "format",
                    format!("must be a relative path inside the package of 1-{MAX_ENTRY} bytes, without `.` or `..`"),
                ));
            }
        }
        (Runtime::Wasm, None) => {}
    }
    if description.chars().count() > MAX_DESCRIPTION || description.chars().any(char::is_control) {
        errors.push(FieldError::new(
            "description",
            "format",
            format!("at most {MAX_DESCRIPTION} characters without control characters"),
        ));
    }
    check_tags(&c.tags, errors);
}

/// Tag rules (functions' and principals'): at most [`MAX_TAGS`], keys of 1–[`MAX_TAG_KEY`]
/// letters, digits, spaces and `_.:/=+-@` outside the reserved `nimbus:` prefix, values of at
/// most [`MAX_TAG_VALUE`] characters without control characters. Errors name `tags.<key>`.
pub fn check_tags(tags: &BTreeMap<String, String>, errors: &mut Vec<FieldError>) {
    if tags.len() > MAX_TAGS {
        errors.push(FieldError::new("tags", "max_items", format!("at most {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.chars().count() <= MAX_TAG_KEY
            && k.chars().all(|ch| ch.is_alphanumeric() || " _.:/=+-@".contains(ch));
        if !key_ok {
            errors.push(FieldError::new(
                format!("tags.{k}"),
                "format",
                format!("keys are 1-{MAX_TAG_KEY} letters, digits, spaces and _.:/=+-@"),
            ));
        } else if k.to_ascii_lowercase().starts_with("nimbus:") {
            errors.push(FieldError::new(format!("tags.{k}"), "reserved", "the nimbus: prefix is reserved"));
        }
        if v.chars().count() > MAX_TAG_VALUE || v.chars().any(char::is_control) {
            errors.push(FieldError::new(
                format!("tags.{k}"),
                "format",
                format!("values are at most {MAX_TAG_VALUE} characters without control characters"),
            ));
        }
    }
}

/// Create a function. It has no code until a package is uploaded.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/functions",
    tag = "functions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body(content = CreateFunctionRequest, example = json!({
        "name": "resize-image", "runtime": "wasm", "memory_mb": 256, "timeout_ms": 5000,
        "tags": {"team": "media"},
        "environment": {"LOG_LEVEL": {"value": "info"}, "API_TOKEN": {"value": "s3cr3t", "secret": true}},
        "scaling": {"target_utilization": 0.8, "scale_down_delay_s": 60},
        "placement": {"preferred": {"region": "eu"}, "priority": "critical"}
    })),
    responses(
        (status = 201, description = "Created; the ETag header carries its version", body = Function),
        (status = 403, description = "Role too low", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 409, description = "Name taken, or too many functions", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
        (status = 501, description = "Secret values given but no secrets keys configured", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_function(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<CreateFunctionRequest>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Function>)> {
    let id = Uuid::now_v7();
    let config = FunctionConfig {
        runtime: req.runtime,
        entry: req.entry,
        memory_mb: req.memory_mb.unwrap_or(128),
        timeout_ms: req.timeout_ms.unwrap_or(10_000),
        concurrency: req.concurrency.unwrap_or(10),
        min_scale: req.min_scale.unwrap_or(0),
        max_scale: req.max_scale.unwrap_or(10),
        reserved_concurrency: req.reserved_concurrency,
        tags: req.tags.unwrap_or_default(),
        environment: BTreeMap::new(),
    };
    let description = req.description.unwrap_or_default();
    let scaling = req.scaling.unwrap_or_default();
    let placement = req.placement.unwrap_or_default();
    let mut errors = Vec::new();
    check_config(&config, &description, &mut errors);
    errors.extend(scaling.validate("scaling"));
    errors.extend(placement.validate("placement"));
    let environment =
        env::apply(&state, tenant_id, id, &BTreeMap::new(), req.environment.unwrap_or_default(), &mut errors)?;
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let resource = nrn::function(tenant_id, req.name.as_str());
    // What the request asks for, for conditions on it (e.g. only wasm, at most 256 MiB, only
    // with a `team` tag).
    let mut asked = nimbus_iam::Context::new(chrono::Utc::now());
    asked.insert("functions:Runtime", config.runtime.as_str());
    asked.insert("functions:MemorySize", config.memory_mb.to_string());
    for (k, v) in &config.tags {
        asked.insert(&format!("nimbus:RequestTag/{k}"), v.as_str());
    }
    asked.insert("nimbus:TagKeys", config.tags.keys().cloned().collect::<Vec<String>>());
    let (mut tx, _) =
        authz::begin_with(&state.pool, &principal, Action::CreateFunction, tenant_id, &resource, &asked).await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM functions WHERE tenant_id = $1")
        .bind(tenant_id)
        .fetch_one(&mut *tx)
        .await?;
    if count >= MAX_FUNCTIONS_PER_TENANT {
        return Err(ApiError::conflict(
            "too_many_functions",
            format!("a tenant may have at most {MAX_FUNCTIONS_PER_TENANT} functions"),
        ));
    }
    let row: FunctionRow = sqlx::query_as(&format!(
        "INSERT INTO functions (id, tenant_id, name, runtime, entry, memory_mb, timeout_ms, concurrency, min_scale, \
         max_scale, reserved_concurrency, description, tags, environment, created_by, scaling, \
         placement) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
         RETURNING {FUNCTION_COLUMNS}"
    ))
    .bind(id)
    .bind(tenant_id)
    .bind(req.name.as_str())
    .bind(config.runtime.as_str())
    .bind(&config.entry)
    .bind(config.memory_mb as i32)
    .bind(config.timeout_ms as i32)
    .bind(config.concurrency as i32)
    .bind(config.min_scale as i32)
    .bind(config.max_scale as i32)
    .bind(config.reserved_concurrency.map(|r| r as i32))
    .bind(&description)
    .bind(sqlx::types::Json(&config.tags))
    .bind(sqlx::types::Json(&environment))
    .bind(principal.user_id().or(match &principal {
        Principal::ApiKey { created_by, .. } => *created_by,
        Principal::User { .. } | Principal::Role { .. } => None,
    }))
    .bind(sqlx::types::Json(&scaling))
    .bind(sqlx::types::Json(&placement))
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        on_constraint(
            e,
            [(
                "functions_name_key",
                ApiError::conflict("function_name_taken", format!("a function named {} exists", req.name)),
            )],
        )
    })?;
    let function = row.into_function(None, Vec::new());
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::CreateFunction,
        tenant_id,
        resource,
        json!({ "id": id, "runtime": config.runtime, "environment": function.config.environment.keys().collect::<Vec<_>>() }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, etag_header(&function.etag), Json(function)))
}

/// List a tenant's functions, by creation.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions",
    tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), PageParams),
    responses(
        (status = 200, description = "A page of functions", body = Page<Function>),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_functions(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Function>>> {
    let (limit, after) = page.parse()?;
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::ListFunctions, tenant_id, &nrn::function(tenant_id, "*")).await?;
    let rows: Vec<FunctionRow> = sqlx::query_as(&format!(
        "SELECT {FUNCTION_COLUMNS} FROM functions WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) \
         ORDER BY id LIMIT $3"
    ))
    .bind(tenant_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<Uuid> = rows.iter().filter_map(|r| r.package_id).collect();
    let packages: Vec<PackageRef> =
        sqlx::query_as("SELECT id, sha256, size, format FROM packages WHERE tenant_id = $1 AND id = ANY($2)")
            .bind(tenant_id)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
    let function_ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let scales: Vec<ScaleRow> = sqlx::query_as(&format!(
        "SELECT s.function_id, {SCALE_COLUMNS} FROM autoscaler_state s JOIN versions v ON v.id = s.version_id \
         WHERE s.tenant_id = $1 AND s.function_id = ANY($2) ORDER BY v.number"
    ))
    .bind(tenant_id)
    .bind(&function_ids)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let page = Page::from_rows(rows, limit, |r| r.id);
    Ok(Json(Page {
        items: page
            .items
            .into_iter()
            .map(|r| {
                let package = packages.iter().find(|p| Some(p.id) == r.package_id).cloned();
                let scale = scales.iter().filter(|s| s.function_id == r.id).map(|s| s.scale.clone()).collect();
                r.into_function(package, scale)
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Read a function. The `ETag` header carries the state to base an update on.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}",
    tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    responses(
        (status = 200, description = "The function", body = Function, headers(("ETag" = String, description = "Current state"))),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_function(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<(HeaderMap, Json<Function>)> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetFunction, tenant_id, &resource).await?;
    let row = load(&mut tx, tenant_id, name.as_str(), false).await?;
    let package = package_ref(&mut tx, tenant_id, row.package_id).await?;
    let scale = version_scale(&mut tx, tenant_id, row.id).await?;
    tx.commit().await?;
    let function = row.into_function(package, scale);
    Ok((etag_header(&function.etag), Json(function)))
}

/// Update a function's configuration. Needs `If-Match` with the ETag the change is based on
/// (or `*`); a stale ETag gets 412 and changes nothing.
#[utoipa::path(
    patch,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}",
    tag = "functions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("If-Match" = String, Header, description = "ETag the change is based on, or `*`"),
    ),
    request_body(content = UpdateFunctionRequest, example = json!({"memory_mb": 512, "environment": {"LOG_LEVEL": {"value": "debug"}, "API_TOKEN": {"secret": true}}})),
    responses(
        (status = 200, description = "Updated", body = Function, headers(("ETag" = String, description = "New state"))),
        (status = 404, description = "No such function or package", body = crate::error::Problem),
        (status = 412, description = "ETag is stale", body = crate::error::Problem),
        (status = 422, description = "Invalid field, or the package does not hold the new entry", body = crate::error::Problem),
        (status = 428, description = "If-Match missing", body = crate::error::Problem),
        (status = 501, description = "Secret values given but no secrets keys configured", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_function(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    headers: HeaderMap,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<UpdateFunctionRequest>,
) -> ApiResult<(HeaderMap, Json<Function>)> {
    let resource = nrn::function(tenant_id, name.as_str());
    // What the change asks for, for conditions on it (the keys it does not change are absent).
    let mut asked = nimbus_iam::Context::new(chrono::Utc::now());
    if let Some(m) = req.memory_mb {
        asked.insert("functions:MemorySize", m.to_string());
    }
    if let Some(tags) = &req.tags {
        for (k, v) in tags {
            asked.insert(&format!("nimbus:RequestTag/{k}"), v.as_str());
        }
        asked.insert("nimbus:TagKeys", tags.keys().cloned().collect::<Vec<String>>());
    }
    let (mut tx, _) =
        authz::begin_with(&state.pool, &principal, Action::UpdateFunction, tenant_id, &resource, &asked).await?;
    let row = load(&mut tx, tenant_id, name.as_str(), true).await?;
    check_if_match(&headers, &etag(row.revision), true)?;
    let mut config = row.config();
    let mut description = row.description.clone();
    let mut changed = Vec::new();
    macro_rules! set {
        ($field:ident) => {
            if let Some(v) = req.$field {
                config.$field = v;
                changed.push(stringify!($field));
            }
        };
    }
    set!(memory_mb);
    set!(timeout_ms);
    set!(concurrency);
    set!(min_scale);
    set!(max_scale);
    set!(reserved_concurrency);
    set!(tags);
    if let Some(entry) = req.entry {
        config.entry = Some(entry);
        changed.push("entry");
    }
    if let Some(d) = req.description {
        description = d;
        changed.push("description");
    }
    let mut errors = Vec::new();
    check_config(&config, &description, &mut errors);
    let scaling = match req.scaling {
        Some(s) => {
            changed.push("scaling");
            errors.extend(s.validate("scaling"));
            s
        }
        None => row.scaling.0.clone(),
    };
    let placement = match req.placement {
        Some(p) => {
            changed.push("placement");
            errors.extend(p.validate("placement"));
            p
        }
        None => row.placement.0.clone(),
    };
    let environment = match req.environment {
        Some(input) => {
            changed.push("environment");
            env::apply(&state, tenant_id, row.id, &row.environment.0, input, &mut errors)?
        }
        None => row.environment.0.clone(),
    };
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let package_id = match req.package_id {
        Some(p) => {
            let owned: Option<Uuid> =
                sqlx::query_scalar("SELECT id FROM packages WHERE tenant_id = $1 AND function_id = $2 AND id = $3")
                    .bind(tenant_id)
                    .bind(row.id)
                    .bind(p)
                    .fetch_optional(&mut *tx)
                    .await?;
            owned.ok_or(ApiError::NotFound("package"))?;
            changed.push("package_id");
            Some(p)
        }
        None => row.package_id,
    };
    // A process function's package must hold its entry: check the pair again when either side
    // changes (a wasm package does not depend on anything that can change).
    if config.runtime == Runtime::Process && (config.entry != row.entry || package_id != row.package_id) {
        if let Some(package) = package_ref(&mut tx, tenant_id, package_id).await? {
            packages::revalidate(&state, &package, config.entry.as_deref()).await?;
        }
    }
    let updated: FunctionRow = sqlx::query_as(&format!(
        "UPDATE functions SET entry = $2, memory_mb = $3, timeout_ms = $4, concurrency = $5, min_scale = $6, \
         max_scale = $7, reserved_concurrency = $8, description = $9, tags = $10, environment = $11, package_id = $12, \
         scaling = $13, placement = $14, revision = revision + 1, updated_at = now() \
         WHERE id = $1 RETURNING {FUNCTION_COLUMNS}"
    ))
    .bind(row.id)
    .bind(&config.entry)
    .bind(config.memory_mb as i32)
    .bind(config.timeout_ms as i32)
    .bind(config.concurrency as i32)
    .bind(config.min_scale as i32)
    .bind(config.max_scale as i32)
    .bind(config.reserved_concurrency.map(|r| r as i32))
    .bind(&description)
    .bind(sqlx::types::Json(&config.tags))
    .bind(sqlx::types::Json(&environment))
    .bind(package_id)
    .bind(sqlx::types::Json(&scaling))
    .bind(sqlx::types::Json(&placement))
    .fetch_one(&mut *tx)
    .await?;
    let package = package_ref(&mut tx, tenant_id, updated.package_id).await?;
    let scale = version_scale(&mut tx, tenant_id, updated.id).await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateFunction,
        tenant_id,
        resource,
        json!({ "changed": changed }),
    )
    .await?;
    tx.commit().await?;
    let function = updated.into_function(package, scale);
    Ok((etag_header(&function.etag), Json(function)))
}

/// Delete a function with its versions, aliases and routing history. Its packages' bytes stay in
/// the store while other functions use them. `If-Match` is honoured when given.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}",
    tag = "functions",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("If-Match" = Option<String>, Header, description = "Delete only if still in this state"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such function", body = crate::error::Problem),
        (status = 412, description = "ETag is stale", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn delete_function(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    headers: HeaderMap,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteFunction, tenant_id, &resource).await?;
    let row = load(&mut tx, tenant_id, name.as_str(), true).await?;
    check_if_match(&headers, &etag(row.revision), false)?;
    // Routes first, so no foreign-key check between routes and versions depends on the order in
    // which the cascade reaches them.
    sqlx::query("DELETE FROM aliases WHERE tenant_id = $1 AND function_id = $2")
        .bind(tenant_id)
        .bind(row.id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM functions WHERE id = $1").bind(row.id).execute(&mut *tx).await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::DeleteFunction,
        tenant_id,
        resource,
        json!({ "id": row.id }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_is_strong_and_lists_are_accepted() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::IF_MATCH, HeaderValue::from_str(v).unwrap());
            h
        };
        assert!(check_if_match(&with("\"3\""), "\"3\"", true).is_ok());
        assert!(check_if_match(&with("*"), "\"3\"", true).is_ok());
        assert!(check_if_match(&with("\"1\", \"3\""), "\"3\"", true).is_ok());
        assert!(matches!(check_if_match(&with("\"2\""), "\"3\"", true), Err(ApiError::PreconditionFailed { .. })));
        assert!(matches!(check_if_match(&with("W/\"3\""), "\"3\"", true), Err(ApiError::PreconditionFailed { .. })));
        assert!(matches!(check_if_match(&HeaderMap::new(), "\"3\"", true), Err(ApiError::PreconditionRequired)));
        assert!(check_if_match(&HeaderMap::new(), "\"3\"", false).is_ok());
    }

    fn config() -> FunctionConfig {
        FunctionConfig {
            runtime: Runtime::Process,
            entry: Some("bin/handler".into()),
            memory_mb: 128,
            timeout_ms: 1000,
            concurrency: 1,
            min_scale: 0,
            max_scale: 1,
            reserved_concurrency: None,
            tags: BTreeMap::new(),
            environment: BTreeMap::new(),
        }
    }

    fn fields(c: &FunctionConfig, description: &str) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        check_config(c, description, &mut errors);
        errors.into_iter().map(|e| (e.field, e.rule)).collect()
    }

    #[test]
    fn every_limit_is_checked_and_named() {
        assert!(fields(&config(), "").is_empty());
        let bad = FunctionConfig {
            memory_mb: 8,
            timeout_ms: 1_000_000,
            concurrency: 0,
            min_scale: 5,
            max_scale: 2,
            reserved_concurrency: Some(200_000),
            entry: Some("../etc/passwd".into()),
            tags: [("nimbus:owner".to_owned(), "x".to_owned())].into(),
            ..config()
        };
        assert_eq!(
            fields(&bad, &"x".repeat(300)),
            [
                ("memory_mb", "range"),
                ("timeout_ms", "range"),
                ("concurrency", "range"),
                ("reserved_concurrency", "range"),
                ("min_scale", "order"),
                ("entry", "format"),
                ("description", "format"),
                ("tags.nimbus:owner", "reserved"),
            ]
            .map(|(f, r)| (f.to_owned(), r.to_owned()))
        );
        let wasm_with_entry = FunctionConfig { runtime: Runtime::Wasm, ..config() };
        assert_eq!(fields(&wasm_with_entry, ""), vec![("entry".to_owned(), "not_allowed".to_owned())]);
        let process_without = FunctionConfig { entry: None, ..config() };
        assert_eq!(fields(&process_without, ""), vec![("entry".to_owned(), "required".to_owned())]);
    }
}
