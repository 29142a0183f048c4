//! Aliases: named routing configurations (`live`, `staging`, ...) over a function's versions,
//! with weights summing to 100, optional sticky routing and header rules (see
//! [`crate::routing`]). Updates need `If-Match`. Every routing change — creation, update,
//! deletion, and later every rollout step — is recorded as a routing event (who, from, to, when).
//! The versions an alias routes to are kept in `alias_routes`, whose foreign key to `versions`
//! is what refuses deleting a routed version, race-free.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{MAX_DESCRIPTION, check_if_match, etag, etag_header, load};
use crate::{
    audit,
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    db::Tx,
    error::{ApiError, ApiResult, FieldError, on_constraint},
    extract::{self, Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    routing::RoutingConfig,
    startup::AppState,
};

/// Most aliases per function.
pub const MAX_ALIASES: i64 = 100;

/// An alias.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Alias {
    /// Id.
    pub id: Uuid,
    /// Function.
    pub function_id: Uuid,
    /// Name (a DNS label that is not a number, so it never reads as a version).
    pub name: String,
    /// How it routes.
    pub routing: RoutingConfig,
    /// Description.
    pub description: String,
    /// The ETag of this state; send it as `If-Match` to update.
    pub etag: String,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

/// Body of alias creation.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAliasRequest {
    /// Name.
    pub name: Name,
    /// Routing.
    pub routing: RoutingConfig,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
}

/// Body of an alias update: the routing is replaced; the description when given.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAliasRequest {
    /// New routing.
    pub routing: RoutingConfig,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
}

/// One routing change of an alias.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct RoutingEvent {
    /// Id.
    pub id: Uuid,
    /// Alias name.
    pub alias_name: String,
    /// `user`, `api_key` or `system`.
    pub actor_type: String,
    /// The user or API key.
    pub actor_id: Option<Uuid>,
    /// `api` (a direct change) or `rollout`.
    pub source: String,
    /// Routing before (absent when the alias was created).
    #[schema(value_type = Option<RoutingConfig>)]
    pub from_routing: Option<sqlx::types::Json<RoutingConfig>>,
    /// Routing after (absent when the alias was deleted).
    #[schema(value_type = Option<RoutingConfig>)]
    pub to_routing: Option<sqlx::types::Json<RoutingConfig>>,
    /// When.
    pub created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct AliasRow {
    id: Uuid,
    function_id: Uuid,
    name: String,
    routing: sqlx::types::Json<RoutingConfig>,
    description: String,
    revision: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<AliasRow> for Alias {
    fn from(r: AliasRow) -> Alias {
        Alias {
            id: r.id,
            function_id: r.function_id,
            name: r.name,
            routing: r.routing.0,
            description: r.description,
            etag: etag(r.revision),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

const ALIAS_COLUMNS: &str = "id, function_id, name, routing, description, revision, created_at, updated_at";

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_alias, list_aliases))
        .routes(routes!(get_alias, update_alias, delete_alias))
        .routes(routes!(list_routing_events))
}

fn check_description(d: &str) -> Result<(), ApiError> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(ApiError::field(
            "description",
            "format",
            format!("at most {MAX_DESCRIPTION} characters without control characters"),
        ));
    }
    Ok(())
}

/// Validates a routing configuration and that every version it names exists; header rule
/// values are matched as given, header names lowercase.
async fn check_routing(tx: &mut Tx, tenant: Uuid, function: Uuid, routing: &mut RoutingConfig) -> Result<(), ApiError> {
    for rule in &mut routing.header_rules {
        rule.header = rule.header.to_ascii_lowercase();
    }
    let prefix = |errors: Vec<FieldError>| {
        errors.into_iter().map(|e| FieldError { field: format!("routing.{}", e.field), ..e }).collect::<Vec<_>>()
    };
    routing.validate().map_err(|e| ApiError::Validation(prefix(e)))?;
    let wanted: Vec<i32> = routing.versions().map(|v| i32::try_from(v).unwrap_or(i32::MAX)).collect();
    let existing: Vec<i32> = sqlx::query_scalar(
        "SELECT number FROM versions WHERE tenant_id = $1 AND function_id = $2 AND number = ANY($3)",
    )
    .bind(tenant)
    .bind(function)
    .bind(&wanted)
    .fetch_all(&mut **tx)
    .await?;
    let mut errors = Vec::new();
    for (i, w) in routing.weights.iter().enumerate() {
        if !existing.contains(&(w.version as i32)) {
            errors.push(FieldError::new(
                format!("weights[{i}].version"),
                "not_found",
                format!("no version {}", w.version),
            ));
        }
    }
    for (i, r) in routing.header_rules.iter().enumerate() {
        if !existing.contains(&(r.version as i32)) {
            errors.push(FieldError::new(
                format!("header_rules[{i}].version"),
                "not_found",
                format!("no version {}", r.version),
            ));
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(prefix(errors))) }
}

/// Replaces the versions an alias routes to.
async fn set_routes(
    tx: &mut Tx,
    tenant: Uuid,
    function: Uuid,
    alias: Uuid,
    routing: &RoutingConfig,
) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM alias_routes WHERE alias_id = $1").bind(alias).execute(&mut **tx).await?;
    let mut versions: Vec<i32> = routing.versions().map(|v| v as i32).collect();
    versions.sort_unstable();
    versions.dedup();
    sqlx::query(
        "INSERT INTO alias_routes (tenant_id, alias_id, function_id, version) SELECT $1, $2, $3, unnest($4::integer[])",
    )
    .bind(tenant)
    .bind(alias)
    .bind(function)
    .bind(&versions)
    .execute(&mut **tx)
    .await
    .map_err(|e| {
        // A version deleted between the check and here.
        on_constraint(e, [("alias_routes_version_fkey", ApiError::field("routing", "not_found", "a version is gone"))])
    })?;
    Ok(())
}

/// Records a routing change.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record_event(
    tx: &mut Tx,
    tenant: Uuid,
    function: Uuid,
    alias: &str,
    actor: (&str, Option<Uuid>),
    source: &str,
    from: Option<&RoutingConfig>,
    to: Option<&RoutingConfig>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO routing_events (id, tenant_id, function_id, alias_name, actor_type, actor_id, source, from_routing, \
         to_routing) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(function)
    .bind(alias)
    .bind(actor.0)
    .bind(actor.1)
    .bind(source)
    .bind(from.map(sqlx::types::Json))
    .bind(to.map(sqlx::types::Json))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn load_alias(tx: &mut Tx, tenant: Uuid, function: Uuid, name: &str, lock: bool) -> Result<AliasRow, ApiError> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    sqlx::query_as(&format!(
        "SELECT {ALIAS_COLUMNS} FROM aliases WHERE tenant_id = $1 AND function_id = $2 AND name = $3{lock}"
    ))
    .bind(tenant)
    .bind(function)
    .bind(name)
    .fetch_optional(&mut **tx)
    .await?
    .ok_or(ApiError::NotFound("alias"))
}

/// Create an alias routing over published versions.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases",
    tag = "aliases",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe"),
    ),
    request_body(content = CreateAliasRequest, example = json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}})),
    responses(
        (status = 201, description = "Created", body = Alias, headers(("ETag" = String, description = "Current state"))),
        (status = 404, description = "No such function", body = crate::error::Problem),
        (status = 409, description = "Name taken, or too many aliases", body = crate::error::Problem),
        (status = 422, description = "Invalid routing, or a version that does not exist", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create_alias(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, function_name)): Path<(Uuid, Name)>,
    extract::Json(mut req): extract::Json<CreateAliasRequest>,
) -> ApiResult<(StatusCode, HeaderMap, Json<Alias>)> {
    if req.name.as_str().chars().all(|c| c.is_ascii_digit()) {
        return Err(ApiError::field(
            "name",
            "not_numeric",
            "alias names must not be numbers (they would read as versions)",
        ));
    }
    let description = req.description.unwrap_or_default();
    check_description(&description)?;
    let resource = nrn::alias(tenant_id, function_name.as_str(), req.name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::CreateAlias, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    check_routing(&mut tx, tenant_id, function.id, &mut req.routing).await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM aliases WHERE tenant_id = $1 AND function_id = $2")
        .bind(tenant_id)
        .bind(function.id)
        .fetch_one(&mut *tx)
        .await?;
    if count >= MAX_ALIASES {
        return Err(ApiError::conflict(
            "too_many_aliases",
            format!("a function may have at most {MAX_ALIASES} aliases"),
        ));
    }
    let id = Uuid::now_v7();
    let row: AliasRow = sqlx::query_as(&format!(
        "INSERT INTO aliases (id, tenant_id, function_id, name, routing, description) VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING {ALIAS_COLUMNS}"
    ))
    .bind(id)
    .bind(tenant_id)
    .bind(function.id)
    .bind(req.name.as_str())
    .bind(sqlx::types::Json(&req.routing))
    .bind(&description)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        on_constraint(
            e,
            [(
                "aliases_function_name_key",
                ApiError::conflict("alias_name_taken", format!("the function has an alias named {}", req.name)),
            )],
        )
    })?;
    set_routes(&mut tx, tenant_id, function.id, id, &req.routing).await?;
    let (actor_type, actor_id) = principal.actor();
    record_event(
        &mut tx,
        tenant_id,
        function.id,
        req.name.as_str(),
        (actor_type, Some(actor_id)),
        "api",
        None,
        Some(&req.routing),
    )
    .await?;
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::CreateAlias,
        tenant_id,
        resource,
        json!({ "routing": req.routing }),
    )
    .await?;
    tx.commit().await?;
    let alias = Alias::from(row);
    Ok((StatusCode::CREATED, etag_header(&alias.etag), Json(alias)))
}

/// List a function's aliases.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases",
    tag = "aliases",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name"), PageParams),
    responses(
        (status = 200, description = "A page of aliases", body = Page<Alias>),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_aliases(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, function_name)): Path<(Uuid, Name)>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Alias>>> {
    let (limit, after) = page.parse()?;
    let resource = nrn::alias(tenant_id, function_name.as_str(), "*");
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListAliases, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    let rows: Vec<AliasRow> = sqlx::query_as(&format!(
        "SELECT {ALIAS_COLUMNS} FROM aliases WHERE tenant_id = $1 AND function_id = $2 \
         AND ($3::uuid IS NULL OR id > $3) ORDER BY id LIMIT $4"
    ))
    .bind(tenant_id)
    .bind(function.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let page = Page::from_rows(rows, limit, |r| r.id);
    Ok(Json(Page { items: page.items.into_iter().map(Alias::from).collect(), next_cursor: page.next_cursor }))
}

/// Read an alias. The `ETag` header carries the state to base an update on.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases/{alias_name}",
    tag = "aliases",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("alias_name" = String, Path, description = "Alias name"),
    ),
    responses(
        (status = 200, description = "The alias", body = Alias, headers(("ETag" = String, description = "Current state"))),
        (status = 404, description = "No such function or alias", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_alias(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, function_name, alias_name)): Path<(Uuid, Name, Name)>,
) -> ApiResult<(HeaderMap, Json<Alias>)> {
    let resource = nrn::alias(tenant_id, function_name.as_str(), alias_name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListAliases, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    let row = load_alias(&mut tx, tenant_id, function.id, alias_name.as_str(), false).await?;
    tx.commit().await?;
    let alias = Alias::from(row);
    Ok((etag_header(&alias.etag), Json(alias)))
}

/// Change an alias's routing. Needs `If-Match` with the ETag the change is based on (or `*`).
/// The change is recorded as a routing event.
#[utoipa::path(
    put,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases/{alias_name}",
    tag = "aliases",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("alias_name" = String, Path, description = "Alias name"),
        ("If-Match" = String, Header, description = "ETag the change is based on, or `*`"),
    ),
    request_body(content = UpdateAliasRequest, example = json!({"routing": {"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}], "sticky": true, "header_rules": [{"header": "x-canary", "value": "1", "version": 2}]}})),
    responses(
        (status = 200, description = "Updated", body = Alias, headers(("ETag" = String, description = "New state"))),
        (status = 404, description = "No such function or alias", body = crate::error::Problem),
        (status = 412, description = "ETag is stale", body = crate::error::Problem),
        (status = 422, description = "Invalid routing, or a version that does not exist", body = crate::error::Problem),
        (status = 428, description = "If-Match missing", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_alias(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    headers: HeaderMap,
    Path((tenant_id, function_name, alias_name)): Path<(Uuid, Name, Name)>,
    extract::Json(mut req): extract::Json<UpdateAliasRequest>,
) -> ApiResult<(HeaderMap, Json<Alias>)> {
    let resource = nrn::alias(tenant_id, function_name.as_str(), alias_name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::UpdateAlias, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    let current = load_alias(&mut tx, tenant_id, function.id, alias_name.as_str(), true).await?;
    check_if_match(&headers, &etag(current.revision), true)?;
    check_routing(&mut tx, tenant_id, function.id, &mut req.routing).await?;
    let description = req.description.unwrap_or_else(|| current.description.clone());
    check_description(&description)?;
    let row: AliasRow = sqlx::query_as(&format!(
        "UPDATE aliases SET routing = $2, description = $3, revision = revision + 1, updated_at = now() \
         WHERE id = $1 RETURNING {ALIAS_COLUMNS}"
    ))
    .bind(current.id)
    .bind(sqlx::types::Json(&req.routing))
    .bind(&description)
    .fetch_one(&mut *tx)
    .await?;
    if current.routing.0 != req.routing {
        set_routes(&mut tx, tenant_id, function.id, current.id, &req.routing).await?;
        let (actor_type, actor_id) = principal.actor();
        record_event(
            &mut tx,
            tenant_id,
            function.id,
            alias_name.as_str(),
            (actor_type, Some(actor_id)),
            "api",
            Some(&current.routing.0),
            Some(&req.routing),
        )
        .await?;
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateAlias,
        tenant_id,
        resource,
        json!({ "from": current.routing.0, "to": req.routing }),
    )
    .await?;
    tx.commit().await?;
    let alias = Alias::from(row);
    Ok((etag_header(&alias.etag), Json(alias)))
}

/// Delete an alias (recorded as a routing event). `If-Match` is honoured when given.
#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases/{alias_name}",
    tag = "aliases",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("alias_name" = String, Path, description = "Alias name"),
        ("If-Match" = Option<String>, Header, description = "Delete only if still in this state"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such function or alias", body = crate::error::Problem),
        (status = 412, description = "ETag is stale", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn delete_alias(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    headers: HeaderMap,
    Path((tenant_id, function_name, alias_name)): Path<(Uuid, Name, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::alias(tenant_id, function_name.as_str(), alias_name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteAlias, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    let current = load_alias(&mut tx, tenant_id, function.id, alias_name.as_str(), true).await?;
    check_if_match(&headers, &etag(current.revision), false)?;
    sqlx::query("DELETE FROM aliases WHERE id = $1").bind(current.id).execute(&mut *tx).await?;
    let (actor_type, actor_id) = principal.actor();
    record_event(
        &mut tx,
        tenant_id,
        function.id,
        alias_name.as_str(),
        (actor_type, Some(actor_id)),
        "api",
        Some(&current.routing.0),
        None,
    )
    .await?;
    audit::record_action(&mut tx, &ctx, &principal, Action::DeleteAlias, tenant_id, resource, json!({})).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The routing history of an alias, oldest first (kept after the alias is deleted).
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/aliases/{alias_name}/events",
    tag = "aliases",
    params(
        ("tenant_id" = Uuid, Path, description = "Tenant id"),
        ("function_name" = String, Path, description = "Function name"),
        ("alias_name" = String, Path, description = "Alias name"),
        PageParams,
    ),
    responses(
        (status = 200, description = "A page of routing events", body = Page<RoutingEvent>),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_routing_events(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, function_name, alias_name)): Path<(Uuid, Name, Name)>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<RoutingEvent>>> {
    let (limit, after) = page.parse()?;
    let resource = nrn::alias(tenant_id, function_name.as_str(), alias_name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::ListAliases, tenant_id, &resource).await?;
    let function = load(&mut tx, tenant_id, function_name.as_str(), false).await?;
    let rows: Vec<RoutingEvent> = sqlx::query_as(
        "SELECT id, alias_name, actor_type, actor_id, source, from_routing, to_routing, created_at FROM routing_events \
         WHERE tenant_id = $1 AND function_id = $2 AND alias_name = $3 AND ($4::uuid IS NULL OR id > $4) \
         ORDER BY id LIMIT $5",
    )
    .bind(tenant_id)
    .bind(function.id)
    .bind(alias_name.as_str())
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |e| e.id)))
}
