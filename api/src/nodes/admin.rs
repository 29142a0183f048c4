//! The platform admin's view of the fleet: nodes with state, zone, labels, capacity, load and
//! warm instances; changing a node's labels; draining and removing nodes; setting a node's
//! assignments (the desired state until the autoscaler and placement take that over).

use std::collections::BTreeMap;

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use nimbus_protocol::VersionStatus;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit::{self, Entry},
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    autoscaler::validate_labels,
    db::{self, Scope, Tx},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// Most assignments of one node.
pub const MAX_ASSIGNMENTS: usize = 1000;

/// What a node offers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeCapacity {
    /// Memory for functions, MiB.
    pub memory_mb: i64,
    /// CPU, thousandths of a core.
    pub cpu_millis: i32,
    /// Instances that can be warm at once.
    pub instance_slots: i32,
}

/// A version as a node reported it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeVersion {
    /// The version's id.
    pub version_id: Uuid,
    /// `loading`, `ready` or `failed`.
    pub state: String,
    /// Warm instances.
    pub instances: u32,
    /// Invocations running.
    pub in_flight: u32,
    /// Why it failed.
    pub error: Option<String>,
}

/// A worker node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Id.
    pub id: Uuid,
    /// Name (unique).
    pub name: String,
    /// Zone.
    pub zone: String,
    /// Labels (`pool=spot`, `accelerator=gpu`, ...) that placement rules match; the `pool` label
    /// names the node's pool.
    pub labels: BTreeMap<String, String>,
    /// `ready`, `lost`, `left` or `removed`.
    pub state: String,
    /// Drained by an admin: takes no new assignments, keeps serving what it has.
    pub draining: bool,
    /// Capacity.
    pub capacity: NodeCapacity,
    /// Where the gateway reaches it.
    pub invoke_url: String,
    /// Invocations running at its last report.
    pub in_flight: i32,
    /// Warm instances at its last report.
    pub warm_instances: u64,
    /// Each version it has, as last reported.
    pub versions: Vec<NodeVersion>,
    /// Desired-state revision.
    pub revision: i64,
    /// The revision it last reported to have reconciled to.
    pub reported_revision: Option<i64>,
    /// Last report.
    pub last_heartbeat_at: DateTime<Utc>,
    /// Joined (or last re-joined).
    pub joined_at: DateTime<Utc>,
    /// When its state last changed.
    pub state_changed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: Uuid,
    name: String,
    zone: String,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
    state: String,
    draining: bool,
    memory_mb: i64,
    cpu_millis: i32,
    instance_slots: i32,
    invoke_url: String,
    in_flight: i32,
    versions: sqlx::types::Json<Vec<VersionStatus>>,
    revision: i64,
    reported_revision: Option<i64>,
    last_heartbeat_at: DateTime<Utc>,
    joined_at: DateTime<Utc>,
    state_changed_at: DateTime<Utc>,
}

impl From<NodeRow> for Node {
    fn from(r: NodeRow) -> Node {
        let versions: Vec<NodeVersion> = r
            .versions
            .0
            .into_iter()
            .map(|v| NodeVersion {
                version_id: v.version_id,
                state: serde_json::to_value(v.state)
                    .ok()
                    .and_then(|s| s.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                instances: v.instances,
                in_flight: v.in_flight,
                error: v.error,
            })
            .collect();
        Node {
            id: r.id,
            name: r.name,
            zone: r.zone,
            labels: r.labels.0,
            state: r.state,
            draining: r.draining,
            capacity: NodeCapacity {
                memory_mb: r.memory_mb,
                cpu_millis: r.cpu_millis,
                instance_slots: r.instance_slots,
            },
            invoke_url: r.invoke_url,
            in_flight: r.in_flight,
            warm_instances: versions.iter().map(|v| u64::from(v.instances)).sum(),
            versions,
            revision: r.revision,
            reported_revision: r.reported_revision,
            last_heartbeat_at: r.last_heartbeat_at,
            joined_at: r.joined_at,
            state_changed_at: r.state_changed_at,
        }
    }
}

const NODE_COLUMNS: &str = "id, name, zone, labels, state, draining, memory_mb, cpu_millis, instance_slots, \
    invoke_url, in_flight, versions, revision, reported_revision, last_heartbeat_at, joined_at, state_changed_at";

/// Body of `PATCH /v1/nodes/{node_id}`: the fields given are replaced, the rest stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateNodeRequest {
    /// The node's labels (replace all; `{}` removes every label). At most 32; keys of 1–63
    /// letters, digits, `.`, `_`, `-` or `/`, values of up to 63 without `/`, both starting with
    /// a letter or digit.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// One version a node should keep.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentInput {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The function's name.
    pub function: Name,
    /// The version number.
    pub version: u32,
    /// Warm instances to keep (0: code cached, instance started on demand), at most 10,000.
    pub instances: u32,
}

/// Body of `PUT /v1/nodes/{node_id}/assignments`: the node's whole desired state.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutAssignmentsRequest {
    /// Every version the node should keep (replaces what it had).
    pub assignments: Vec<AssignmentInput>,
}

/// An assignment as stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct NodeAssignment {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The function's name.
    pub function: String,
    /// The version's id.
    pub version_id: Uuid,
    /// The version number.
    pub version: i32,
    /// Warm instances.
    pub instances: i32,
}

/// The assignments of a node, with the desired-state revision they make up.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeAssignments {
    /// The node.
    pub node_id: Uuid,
    /// Its desired-state revision.
    pub revision: i64,
    /// What it should keep.
    pub assignments: Vec<NodeAssignment>,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node, update_node, remove_node))
        .routes(routes!(drain_node))
        .routes(routes!(get_assignments, put_assignments))
}

async fn load_node(tx: &mut Tx, id: Uuid, lock: bool) -> ApiResult<NodeRow> {
    let lock = if lock { " FOR UPDATE" } else { "" };
    sqlx::query_as(&format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = $1{lock}"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("node"))
}

/// List worker nodes (platform admins).
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "nodes",
    params(PageParams),
    responses(
        (status = 200, description = "A page of nodes", body = Page<Node>),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_nodes(
    State(state): State<AppState>,
    principal: Principal,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<Node>>> {
    let (limit, after) = page.parse()?;
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::ListNodes, &nrn::node("*")).await?;
    let rows: Vec<NodeRow> = sqlx::query_as(&format!(
        "SELECT {NODE_COLUMNS} FROM nodes WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    ))
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let nodes: Vec<Node> = rows.into_iter().map(Node::from).collect();
    Ok(Json(Page::from_rows(nodes, limit, |n| n.id)))
}

/// Read a node (platform admins).
#[utoipa::path(
    get,
    path = "/v1/nodes/{node_id}",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_node(
    State(state): State<AppState>,
    principal: Principal,
    Path(node_id): Path<Uuid>,
) -> ApiResult<Json<Node>> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::ListNodes, &nrn::node(node_id)).await?;
    let row = load_node(&mut tx, node_id, false).await?;
    tx.commit().await?;
    Ok(Json(row.into()))
}

async fn audit_node(
    tx: &mut Tx,
    ctx: &RequestContext,
    principal: &Principal,
    action: Action,
    node: Uuid,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    audit::record(
        tx,
        ctx,
        Entry {
            tenant: None,
            actor: principal.into(),
            action: action.name(),
            resource: nrn::node(node),
            success: true,
            details,
        },
    )
    .await
}

/// Change a node (platform admins): its labels, which the autoscaler's placement reads at its
/// next tick. The labels an agent joins with replace these when it joins again.
#[utoipa::path(
    patch,
    path = "/v1/nodes/{node_id}",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    request_body(content = UpdateNodeRequest, example = json!({"labels": {"pool": "reserved", "accelerator": "gpu"}})),
    responses(
        (status = 200, description = "The changed node", body = Node),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
        (status = 409, description = "The node was removed", body = crate::error::Problem),
        (status = 422, description = "Invalid field", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn update_node(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(node_id): Path<Uuid>,
    extract::Json(req): extract::Json<UpdateNodeRequest>,
) -> ApiResult<Json<Node>> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::UpdateNode, &nrn::node(node_id)).await?;
    if let Some(labels) = &req.labels {
        let errors = validate_labels(labels, "labels");
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
    }
    let node = load_node(&mut tx, node_id, true).await?;
    if node.state == "removed" {
        return Err(ApiError::conflict("node_gone", "the node was removed"));
    }
    let mut changed = Vec::new();
    if let Some(labels) = &req.labels {
        changed.push("labels");
        // Labels are not part of the desired state: no revision bump, the autoscaler reads them
        // every tick.
        sqlx::query("UPDATE nodes SET labels = $2 WHERE id = $1")
            .bind(node_id)
            .bind(sqlx::types::Json(labels))
            .execute(&mut *tx)
            .await?;
    }
    audit_node(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateNode,
        node_id,
        json!({ "changed": changed, "labels": req.labels, "previous_labels": node.labels.0 }),
    )
    .await?;
    let row = load_node(&mut tx, node_id, false).await?;
    tx.commit().await?;
    Ok(Json(row.into()))
}

/// Drain a node (platform admins): it takes no new assignments and keeps serving what it has.
#[utoipa::path(
    post,
    path = "/v1/nodes/{node_id}/drain",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    responses(
        (status = 200, description = "The draining node", body = Node),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
        (status = 409, description = "The node was removed", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn drain_node(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(node_id): Path<Uuid>,
) -> ApiResult<Json<Node>> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::DrainNode, &nrn::node(node_id)).await?;
    let node = load_node(&mut tx, node_id, true).await?;
    if node.draining {
        tx.commit().await?;
        return Ok(Json(node.into()));
    }
    if node.state == "removed" {
        return Err(ApiError::conflict("node_gone", "the node was removed"));
    }
    sqlx::query("UPDATE nodes SET draining = true, revision = revision + 1 WHERE id = $1")
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_notify('nimbus_desired_state', $1)").bind(node_id.to_string()).execute(&mut *tx).await?;
    audit_node(&mut tx, &ctx, &principal, Action::DrainNode, node_id, json!({ "state": node.state })).await?;
    let row = load_node(&mut tx, node_id, false).await?;
    tx.commit().await?;
    state.hub.notify(node_id);
    Ok(Json(row.into()))
}

/// Remove a node (platform admins): its assignments are dropped and its credential stops
/// working; its usage history stays. The agent can join again with a join token.
#[utoipa::path(
    delete,
    path = "/v1/nodes/{node_id}",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn remove_node(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(node_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::RemoveNode, &nrn::node(node_id)).await?;
    let node = load_node(&mut tx, node_id, true).await?;
    if node.state == "removed" {
        return Ok(StatusCode::NO_CONTENT);
    }
    sqlx::query("DELETE FROM assignments WHERE node_id = $1").bind(node_id).execute(&mut *tx).await?;
    sqlx::query(
        "UPDATE nodes SET state = 'removed', state_changed_at = now(), credential_hash = NULL, \
         previous_credential_hash = NULL, previous_valid_until = NULL, revision = revision + 1 WHERE id = $1",
    )
    .bind(node_id)
    .execute(&mut *tx)
    .await?;
    audit_node(&mut tx, &ctx, &principal, Action::RemoveNode, node_id, json!({ "from": node.state })).await?;
    tx.commit().await?;
    state.hub.notify(node_id);
    Ok(StatusCode::NO_CONTENT)
}

async fn read_assignments(tx: &mut Tx, node_id: Uuid) -> Result<NodeAssignments, ApiError> {
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM nodes WHERE id = $1")
        .bind(node_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(ApiError::NotFound("node"))?;
    // The platform scope sees assignments, not the tenants' functions; each tenant's names are
    // read in that tenant's scope.
    let rows: Vec<(Uuid, Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, version_id, instances FROM assignments WHERE node_id = $1 ORDER BY version_id",
    )
    .bind(node_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut assignments = Vec::with_capacity(rows.len());
    for (tenant_id, version_id, instances) in rows {
        db::set_scope(tx, &Scope { tenant: Some(tenant_id), platform: true, ..Scope::default() }).await?;
        let named: Option<(String, i32)> = sqlx::query_as(
            "SELECT f.name, v.number FROM versions v JOIN functions f ON f.id = v.function_id WHERE v.id = $1",
        )
        .bind(version_id)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some((function, version)) = named {
            assignments.push(NodeAssignment { tenant_id, function, version_id, version, instances });
        }
    }
    Ok(NodeAssignments { node_id, revision, assignments })
}

/// The versions a node should keep (platform admins).
#[utoipa::path(
    get,
    path = "/v1/nodes/{node_id}/assignments",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    responses(
        (status = 200, description = "The node's assignments", body = NodeAssignments),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_assignments(
    State(state): State<AppState>,
    principal: Principal,
    Path(node_id): Path<Uuid>,
) -> ApiResult<Json<NodeAssignments>> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::ListNodes, &nrn::node(node_id)).await?;
    let out = read_assignments(&mut tx, node_id).await?;
    tx.commit().await?;
    Ok(Json(out))
}

/// Replace the versions a node should keep (platform admins). This is the desired state the
/// agent reconciles to; the autoscaler will set it later. A draining, left or removed node takes
/// no assignments (an empty list is always accepted).
#[utoipa::path(
    put,
    path = "/v1/nodes/{node_id}/assignments",
    tag = "nodes",
    params(("node_id" = Uuid, Path, description = "Node id")),
    request_body(content = PutAssignmentsRequest, example = json!({"assignments": [
        {"tenant_id": "0190f0e0-0000-7000-8000-000000000001", "function": "thumbs", "version": 3, "instances": 1}]})),
    responses(
        (status = 200, description = "The node's assignments", body = NodeAssignments),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such node", body = crate::error::Problem),
        (status = 409, description = "The node is draining, left or removed", body = crate::error::Problem),
        (status = 422, description = "Invalid field or unknown version", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn put_assignments(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(node_id): Path<Uuid>,
    extract::Json(req): extract::Json<PutAssignmentsRequest>,
) -> ApiResult<Json<NodeAssignments>> {
    if req.assignments.len() > MAX_ASSIGNMENTS {
        return Err(ApiError::field("assignments", "max_items", format!("at most {MAX_ASSIGNMENTS} assignments")));
    }
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::PutAssignments, &nrn::node(node_id)).await?;
    let node = load_node(&mut tx, node_id, true).await?;
    if !req.assignments.is_empty() && (node.draining || node.state == "left" || node.state == "removed") {
        let why = if node.draining { "draining".to_owned() } else { node.state.clone() };
        return Err(ApiError::conflict("node_not_schedulable", format!("the node is {why}; it takes no assignments")));
    }
    // Resolve every (tenant, function, version) in that tenant's scope: the platform scope does
    // not see tenants' functions.
    let mut errors = Vec::new();
    let mut resolved: Vec<(Uuid, Uuid, i32)> = Vec::with_capacity(req.assignments.len());
    for (i, a) in req.assignments.iter().enumerate() {
        if a.instances > 10_000 {
            errors.push(FieldError::new(format!("assignments[{i}].instances"), "range", "must be 0 to 10000"));
            continue;
        }
        db::set_scope(
            &mut tx,
            &Scope { tenant: Some(a.tenant_id), platform: true, user: principal.user_id(), ..Scope::default() },
        )
        .await?;
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT v.id FROM versions v JOIN functions f ON f.id = v.function_id \
             WHERE v.tenant_id = $1 AND f.name = $2 AND v.number = $3",
        )
        .bind(a.tenant_id)
        .bind(a.function.as_str())
        .bind(i32::try_from(a.version).unwrap_or(i32::MAX))
        .fetch_optional(&mut *tx)
        .await?;
        match id {
            Some(id) if resolved.iter().any(|(_, v, _)| *v == id) => {
                errors.push(FieldError::new(format!("assignments[{i}]"), "unique", "names the same version twice"))
            }
            Some(id) => resolved.push((a.tenant_id, id, a.instances as i32)),
            None => errors.push(FieldError::new(
                format!("assignments[{i}].version"),
                "exists",
                format!("tenant {} has no version {} of function {}", a.tenant_id, a.version, a.function),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    db::set_scope(&mut tx, &Scope::platform(principal.user_id())).await?;
    // Only real changes touch rows, so an unchanged assignment does not bump the revision.
    sqlx::query("DELETE FROM assignments WHERE node_id = $1 AND NOT (version_id = ANY($2))")
        .bind(node_id)
        .bind(resolved.iter().map(|r| r.1).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    for (tenant, version, instances) in &resolved {
        sqlx::query(
            "INSERT INTO assignments (node_id, tenant_id, version_id, instances) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (node_id, version_id) DO UPDATE SET instances = EXCLUDED.instances \
             WHERE assignments.instances IS DISTINCT FROM EXCLUDED.instances",
        )
        .bind(node_id)
        .bind(tenant)
        .bind(version)
        .bind(instances)
        .execute(&mut *tx)
        .await?;
    }
    audit_node(
        &mut tx,
        &ctx,
        &principal,
        Action::PutAssignments,
        node_id,
        json!({ "assignments": resolved.iter().map(|(t, v, n)| json!({"tenant_id": t, "version_id": v, "instances": n})).collect::<Vec<_>>() }),
    )
    .await?;
    let out = read_assignments(&mut tx, node_id).await?;
    tx.commit().await?;
    state.hub.notify(node_id);
    Ok(Json(out))
}
