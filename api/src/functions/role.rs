//! A function's execution role: what its invocations act as when they call the API. Giving a
//! function a role needs `functions:UpdateFunction` on the function and `iam:PassRole` on the
//! role (as in AWS: whoever may change a function could otherwise act as any role through it).
//! The role is live, not frozen into versions: a change applies to every version's next
//! invocation, and the credentials invocations already hold stop working at once (the decision
//! point checks that the function still has the role).

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
    error::{ApiError, ApiResult},
    extract::{self, Path},
    names::Name,
    startup::AppState,
};

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(put_execution_role, delete_execution_role))
}

/// Body of `PUT .../execution-role`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecutionRoleRequest {
    /// The role's name.
    pub role: Name,
}

/// A function's execution role.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ExecutionRole {
    /// The function.
    pub function: String,
    /// The role's name.
    pub role: String,
    /// The role's NRN.
    pub nrn: String,
}

/// Give a function an execution role (replacing any).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/functions/{function_name}/execution-role", tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    request_body(content = ExecutionRoleRequest, example = json!({"role": "orders-worker"})),
    responses((status = 200, description = "Set", body = ExecutionRole),
        (status = 403, description = "Not allowed (`functions:UpdateFunction` on the function, `iam:PassRole` on the role)", body = crate::error::Problem),
        (status = 404, description = "No such tenant, function or role", body = crate::error::Problem),
        (status = 422, description = "Invalid role name", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_execution_role(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<ExecutionRoleRequest>,
) -> ApiResult<Json<ExecutionRole>> {
    let resource = nrn::function(tenant_id, name.as_str());
    let role_nrn = nrn::role(tenant_id, req.role.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::UpdateFunction, tenant_id, &resource).await?;
    authz::authorize(&mut tx, &principal, Action::PassRole, tenant_id, &role_nrn).await?;
    let role: Uuid = sqlx::query_scalar("SELECT id FROM roles WHERE tenant_id = $1 AND name = $2")
        .bind(tenant_id)
        .bind(req.role.as_str())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(ApiError::NotFound("role"))?;
    let r = sqlx::query(
        "UPDATE functions SET execution_role_id = $3, revision = revision + 1, updated_at = now() \
         WHERE tenant_id = $1 AND name = $2",
    )
    .bind(tenant_id)
    .bind(name.as_str())
    .bind(role)
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("function"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateFunction,
        tenant_id,
        resource,
        json!({"changed": ["execution_role"], "execution_role": req.role.as_str()}),
    )
    .await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(Json(ExecutionRole { function: name.as_str().to_owned(), role: req.role.as_str().to_owned(), nrn: role_nrn }))
}

/// Take a function's execution role away: its invocations get no credential.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/functions/{function_name}/execution-role", tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    responses((status = 204, description = "Removed"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or function, or it has no execution role", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_execution_role(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::UpdateFunction, tenant_id, &resource).await?;
    let r = sqlx::query(
        "UPDATE functions SET execution_role_id = NULL, revision = revision + 1, updated_at = now() \
         WHERE tenant_id = $1 AND name = $2 AND execution_role_id IS NOT NULL",
    )
    .bind(tenant_id)
    .bind(name.as_str())
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("execution role"));
    }
    audit::record_action(
        &mut tx,
        &ctx,
        &principal,
        Action::UpdateFunction,
        tenant_id,
        resource,
        json!({"changed": ["execution_role"], "execution_role": null}),
    )
    .await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}
