//! The audit log: every state-changing call writes a row (who, what, on which resource, when,
//! from where) in the same transaction as the change, and admins read their tenant's log.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    db::Tx,
    error::ApiResult,
    extract::{Path, Query},
    pagination::{Page, PageParams},
    startup::AppState,
};

/// Who performed an audited action.
#[derive(Debug, Clone, Copy)]
pub enum Actor {
    /// A principal.
    Principal(&'static str, Uuid),
    /// Somebody not (yet) identified, e.g. a failed sign-in for an unknown e-mail.
    Anonymous,
    /// Nimbus itself.
    System,
}

impl From<&Principal> for Actor {
    fn from(p: &Principal) -> Self {
        let (kind, id) = p.actor();
        Actor::Principal(kind, id)
    }
}

/// One audited action.
#[derive(Debug)]
pub struct Entry<'a> {
    /// The tenant it happened in, if any.
    pub tenant: Option<Uuid>,
    /// Who did it.
    pub actor: Actor,
    /// The action name.
    pub action: &'a str,
    /// The resource name.
    pub resource: String,
    /// Whether it succeeded.
    pub success: bool,
    /// Anything else worth keeping (never secrets).
    pub details: Value,
}

/// Writes an audit row inside the caller's transaction.
pub async fn record(tx: &mut Tx, ctx: &RequestContext, entry: Entry<'_>) -> Result<(), sqlx::Error> {
    let (actor_type, actor_id) = match entry.actor {
        Actor::Principal(kind, id) => (kind, Some(id)),
        Actor::Anonymous => ("anonymous", None),
        Actor::System => ("system", None),
    };
    sqlx::query(
        "INSERT INTO audit_log (id, tenant_id, actor_type, actor_id, action, resource, outcome, \
         source_ip, user_agent, request_id, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(Uuid::now_v7())
    .bind(entry.tenant)
    .bind(actor_type)
    .bind(actor_id)
    .bind(entry.action)
    .bind(&entry.resource)
    .bind(if entry.success { "success" } else { "failure" })
    .bind(ctx.source_ip.map(|ip| ip.to_string()))
    .bind(&ctx.user_agent)
    .bind(&ctx.request_id)
    .bind(&entry.details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Writes the audit row of a successful action of `principal` in `tenant`.
pub async fn record_action(
    tx: &mut Tx,
    ctx: &RequestContext,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: String,
    details: Value,
) -> Result<(), sqlx::Error> {
    let entry = Entry {
        tenant: Some(tenant),
        actor: principal.into(),
        action: action.name(),
        resource,
        success: true,
        details,
    };
    record(tx, ctx, entry).await
}

/// An audit log row.
#[derive(Debug, Serialize, ToSchema, sqlx::FromRow)]
pub struct AuditEvent {
    /// Row id (UUIDv7, time-ordered).
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: Option<Uuid>,
    /// `user`, `api_key`, `anonymous` or `system`.
    pub actor_type: String,
    /// The user or API key id.
    pub actor_id: Option<Uuid>,
    /// Action name.
    pub action: String,
    /// Resource name.
    pub resource: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// Client address.
    pub source_ip: Option<String>,
    /// Client user agent.
    pub user_agent: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Extra details.
    pub details: Value,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit_events))
}

/// List a tenant's audit log, oldest first.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/audit-log",
    tag = "audit",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), PageParams),
    responses(
        (status = 200, description = "A page of audit events", body = Page<AuditEvent>),
        (status = 403, description = "Not an admin", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_audit_events(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> ApiResult<Json<Page<AuditEvent>>> {
    let (limit, after) = page.parse()?;
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::ListAuditEvents, tenant_id, &nrn::audit_log(tenant_id)).await?;
    let rows: Vec<AuditEvent> = sqlx::query_as(
        "SELECT id, tenant_id, actor_type, actor_id, action, resource, outcome, source_ip, user_agent, \
         request_id, details, created_at FROM audit_log \
         WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3",
    )
    .bind(tenant_id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |r| r.id)))
}
