//! Function logs: the stderr lines agents shipped with their usage, newest first, optionally of
//! one invocation. Lines are kept for `--log-retention`.

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::Principal,
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, FieldError},
    extract::{Path, Query},
    names::Name,
    pagination::{Page, PageParams},
    startup::AppState,
};

/// A line a function wrote to stderr.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct LogEntry {
    /// Row id (UUIDv7).
    pub id: Uuid,
    /// The invocation that wrote it.
    pub invocation_id: Uuid,
    /// The version that ran.
    pub version: i32,
    /// Position in the invocation's log, from 0.
    pub seq: i32,
    /// When the invocation finished.
    pub time: DateTime<Utc>,
    /// The line (at most 4 KiB).
    pub line: String,
}

/// Query of the log listing.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Page size, 1 to 100.
    #[serde(default)]
    pub limit: Option<i64>,
    /// Cursor from the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Only lines of this invocation.
    #[serde(default)]
    pub invocation_id: Option<String>,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_logs))
}

/// Recent log lines of a function, newest first.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/logs",
    tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name"), LogQuery),
    responses(
        (status = 200, description = "A page of log lines", body = Page<LogEntry>),
        (status = 400, description = "Bad query", body = crate::error::Problem),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_logs(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Json<Page<LogEntry>>> {
    let (limit, after) = PageParams { limit: q.limit, after: q.after }.parse()?;
    let invocation =
        match &q.invocation_id {
            Some(s) => Some(s.parse::<Uuid>().map_err(|_| {
                ApiError::InvalidQuery(vec![FieldError::new("invocation_id", "uuid", "must be a UUID")])
            })?),
            None => None,
        };
    let (mut tx, _) =
        authz::begin(&state.pool, &principal, Action::GetFunctionLogs, tenant_id, &nrn::logs(tenant_id, name.as_str()))
            .await?;
    let function = super::load(&mut tx, tenant_id, name.as_str(), false).await?;
    let rows: Vec<LogEntry> = sqlx::query_as(
        "SELECT id, invocation_id, version, seq, time, line FROM function_logs \
         WHERE tenant_id = $1 AND function_id = $2 AND ($3::uuid IS NULL OR id < $3) \
         AND ($4::uuid IS NULL OR invocation_id = $4) ORDER BY id DESC LIMIT $5",
    )
    .bind(tenant_id)
    .bind(function.id)
    .bind(after)
    .bind(invocation)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(Page::from_rows(rows, limit, |l| l.id)))
}
