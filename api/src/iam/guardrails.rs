//! Tenant guardrails, set by platform operators: a policy every request in the tenant must also
//! be allowed by (like an organization's service control policy), whatever the tenant's own
//! policies grant. One per tenant; none means no limit beyond the tenant's policies.

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Document, FindingOut, checked};
use crate::{
    audit::{self, Entry},
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult},
    extract::{self, Path},
    startup::AppState,
};

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_guardrail, put_guardrail, delete_guardrail))
}

/// A tenant's guardrail.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Guardrail {
    /// The tenant.
    pub tenant_id: Uuid,
    /// The document.
    pub document: String,
    /// Set at.
    pub updated_at: DateTime<Utc>,
    /// Validation findings (on save).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[sqlx(skip)]
    pub findings: Vec<FindingOut>,
}

/// Body of `PUT .../guardrails`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardrailRequest {
    /// The document: Allow statements bound what the tenant may do; Deny statements forbid.
    pub document: Document,
}

/// Read a tenant's guardrail (platform admins).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/guardrails", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses((status = 200, description = "The guardrail", body = Guardrail),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No guardrail", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get_guardrail(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<Json<Guardrail>> {
    let mut tx =
        authz::begin_platform(&state.pool, &principal, Action::GetGuardrails, &nrn::guardrail(tenant_id)).await?;
    let g: Option<Guardrail> =
        sqlx::query_as("SELECT tenant_id, document, updated_at FROM tenant_guardrails WHERE tenant_id = $1")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(Json(g.ok_or(ApiError::NotFound("guardrail"))?))
}

/// Set a tenant's guardrail (platform admins), replacing any.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/guardrails", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = GuardrailRequest, example = json!({"document": {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["functions:*", "tenants:*", "iam:*"], "Resource": "*"},
        {"Effect": "Deny", "Action": "functions:InvokeFunction", "Resource": "*",
         "Condition": {"NotIpAddress": {"nimbus:SourceIp": "10.0.0.0/8"}}}]}})),
    responses((status = 200, description = "Set, with the validator's findings", body = Guardrail),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
        (status = 422, description = "Invalid document", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put_guardrail(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<GuardrailRequest>,
) -> ApiResult<Json<Guardrail>> {
    let mut tx =
        authz::begin_platform(&state.pool, &principal, Action::PutGuardrails, &nrn::guardrail(tenant_id)).await?;
    let text = req.document.text();
    let findings = checked("document", &text, nimbus_iam::PolicyKind::Guardrail)?;
    let g: Guardrail = sqlx::query_as(
        "INSERT INTO tenant_guardrails (tenant_id, document, updated_by) VALUES ($1, $2, $3) \
         ON CONFLICT (tenant_id) DO UPDATE SET document = EXCLUDED.document, updated_by = EXCLUDED.updated_by, \
         updated_at = now() RETURNING tenant_id, document, updated_at",
    )
    .bind(tenant_id)
    .bind(&text)
    .bind(principal.user_id())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        crate::error::on_constraint(e, [("tenant_guardrails_tenant_id_fkey", ApiError::NotFound("tenant"))])
    })?;
    let entry = Entry {
        tenant: None,
        actor: (&principal).into(),
        action: Action::PutGuardrails.name(),
        resource: nrn::guardrail(tenant_id),
        success: true,
        details: json!({}),
    };
    audit::record(&mut tx, &ctx, entry).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(Json(Guardrail { findings, ..g }))
}

/// Remove a tenant's guardrail (platform admins).
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/guardrails", tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    responses((status = 204, description = "Removed"),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "No guardrail", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete_guardrail(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(tenant_id): Path<Uuid>,
) -> ApiResult<StatusCode> {
    let mut tx =
        authz::begin_platform(&state.pool, &principal, Action::PutGuardrails, &nrn::guardrail(tenant_id)).await?;
    let r = sqlx::query("DELETE FROM tenant_guardrails WHERE tenant_id = $1").bind(tenant_id).execute(&mut *tx).await?;
    if r.rows_affected() == 0 {
        return Err(ApiError::NotFound("guardrail"));
    }
    let entry = Entry {
        tenant: None,
        actor: (&principal).into(),
        action: Action::PutGuardrails.name(),
        resource: nrn::guardrail(tenant_id),
        success: true,
        details: json!({"removed": true}),
    };
    audit::record(&mut tx, &ctx, entry).await?;
    tx.commit().await?;
    authz::policies::invalidate();
    Ok(StatusCode::NO_CONTENT)
}
