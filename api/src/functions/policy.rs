//! A function's resource policy: who else may act on the function — anyone (`Principal: "*"`,
//! e.g. public invocation through the gateway), or principals of other tenants (named by NRN or
//! by their tenant's root `nrn:nimbus:iam:<tenant>:root`; they need an identity policy of their
//! own that allows it too). Validated as a resource policy on save; the gateway's routing table
//! holds it compiled.

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
    iam::{Document, FindingOut, checked},
    names::Name,
    startup::AppState,
};

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_function_policy, put_function_policy, delete_function_policy))
}

/// A function's resource policy.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FunctionPolicy {
    /// The function's NRN.
    pub resource: String,
    /// The document.
    pub document: String,
    /// Validation findings (on save).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<FindingOut>,
}

/// Body of `PUT .../policy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionPolicyRequest {
    /// A resource policy (statements name a `Principal`).
    pub document: Document,
}

/// Read a function's resource policy.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/functions/{function_name}/policy", tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    responses((status = 200, description = "The policy", body = FunctionPolicy),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or function, or it has no policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get_function_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<Json<FunctionPolicy>> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetFunctionPolicy, tenant_id, &resource).await?;
    let row: Option<Option<String>> =
        sqlx::query_scalar("SELECT resource_policy FROM functions WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    let document = row.ok_or(ApiError::NotFound("function"))?.ok_or(ApiError::NotFound("function policy"))?;
    Ok(Json(FunctionPolicy { resource, document, findings: Vec::new() }))
}

/// Set a function's resource policy (replacing any).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/functions/{function_name}/policy", tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    request_body(content = FunctionPolicyRequest, example = json!({"document": {"Version": "2012-10-17", "Statement": [
        {"Sid": "PublicInvoke", "Effect": "Allow", "Principal": "*", "Action": "functions:InvokeFunction",
         "Resource": "nrn:nimbus:functions:01930000-0000-7000-8000-000000000002:function/web"}]}})),
    responses((status = 200, description = "Set, with the validator's findings", body = FunctionPolicy),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or function", body = crate::error::Problem),
        (status = 422, description = "Invalid document", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_function_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    extract::Json(req): extract::Json<FunctionPolicyRequest>,
) -> ApiResult<Json<FunctionPolicy>> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::PutFunctionPolicy, tenant_id, &resource).await?;
    let text = req.document.text();
    let findings = checked("document", &text, nimbus_iam::PolicyKind::Resource)?;
    let r =
        sqlx::query("UPDATE functions SET resource_policy = $3, updated_at = now() WHERE tenant_id = $1 AND name = $2")
            .bind(tenant_id)
            .bind(name.as_str())
            .bind(&text)
            .execute(&mut *tx)
            .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("function"));
    }
    audit::record_action(&mut tx, &ctx, &principal, Action::PutFunctionPolicy, tenant_id, resource.clone(), json!({}))
        .await?;
    tx.commit().await?;
    Ok(Json(FunctionPolicy { resource, document: text, findings }))
}

/// Remove a function's resource policy.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/functions/{function_name}/policy", tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name")),
    responses((status = 204, description = "Removed"),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant or function, or it has no policy", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_function_policy(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
) -> ApiResult<StatusCode> {
    let resource = nrn::function(tenant_id, name.as_str());
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::DeleteFunctionPolicy, tenant_id, &resource).await?;
    let r = sqlx::query(
        "UPDATE functions SET resource_policy = NULL, updated_at = now() \
         WHERE tenant_id = $1 AND name = $2 AND resource_policy IS NOT NULL",
    )
    .bind(tenant_id)
    .bind(name.as_str())
    .execute(&mut *tx)
    .await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("function policy"));
    }
    audit::record_action(&mut tx, &ctx, &principal, Action::DeleteFunctionPolicy, tenant_id, resource, json!({}))
        .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
