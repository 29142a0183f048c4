//! Least privilege as features: validating a document before saving it (errors and findings),
//! and simulating what a member's or API key's policies decide for actions × resources in a
//! given context, with the statements that decided each pair.

use std::collections::BTreeMap;

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{Document, FindingOut, findings};
use crate::{
    auth::Principal,
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path},
    startup::AppState,
};

/// Actions and resources one simulation may ask about (each).
pub const MAX_SIMULATED: usize = 50;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(validate_policy)).routes(routes!(simulate))
}

/// What a policy document is for.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Attached to a principal (the default).
    #[default]
    Identity,
    /// On a resource (names principals).
    Resource,
    /// A permissions boundary.
    Boundary,
    /// A tenant guardrail.
    Guardrail,
}

impl From<Kind> for nimbus_iam::PolicyKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Identity => nimbus_iam::PolicyKind::Identity,
            Kind::Resource => nimbus_iam::PolicyKind::Resource,
            Kind::Boundary => nimbus_iam::PolicyKind::Boundary,
            Kind::Guardrail => nimbus_iam::PolicyKind::Guardrail,
        }
    }
}

/// Body of `POST .../iam/validate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// The document.
    pub document: Document,
    /// What it is for.
    #[serde(default)]
    pub kind: Kind,
}

/// One error of a document.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorOut {
    /// Where, e.g. `Statement[1].Condition.IpAddress.nimbus:SourceIp`.
    pub path: String,
    /// The rule broken, e.g. `unknown_action`.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

/// The validator's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Validation {
    /// No errors: it can be saved.
    pub valid: bool,
    /// What makes it invalid.
    pub errors: Vec<ErrorOut>,
    /// What deserves a second look.
    pub findings: Vec<FindingOut>,
}

/// Validate a policy document without saving it.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/iam/validate",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = ValidateRequest, example = json!({"kind": "identity", "document": {"Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}})),
    responses(
        (status = 200, description = "Errors and findings", body = Validation),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn validate_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<ValidateRequest>,
) -> ApiResult<Json<Validation>> {
    let resource = nrn::policy(tenant_id, "*");
    let (tx, _) = authz::begin(&state.pool, &principal, Action::ValidatePolicy, tenant_id, &resource).await?;
    tx.commit().await?;
    let report = nimbus_iam::validate(&req.document.text(), req.kind.into());
    Ok(Json(Validation {
        valid: report.errors.is_empty(),
        errors: report
            .errors
            .iter()
            .map(|e| ErrorOut { path: e.path.clone(), rule: e.rule.code().to_owned(), message: e.message.clone() })
            .collect(),
        findings: findings(&report),
    }))
}

/// Whose policies to simulate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    /// A member.
    pub user_id: Option<Uuid>,
    /// An API key.
    pub api_key_id: Option<Uuid>,
    /// A role, by name (as any function with it as its execution role would act).
    pub role: Option<String>,
}

impl Subject {
    /// Its NRN; 422 unless exactly one id is given.
    pub fn nrn(&self, tenant: Uuid) -> Result<String, FieldError> {
        match (self.user_id, self.api_key_id, self.role.as_deref()) {
            (Some(u), None, None) => Ok(nrn::tenant_user(tenant, u)),
            (None, Some(k), None) => Ok(nrn::api_key_principal(tenant, k)),
            (None, None, Some(r)) => Ok(nrn::role(tenant, r)),
            _ => Err(FieldError::new("principal", "one_of", "exactly one of user_id, api_key_id and role")),
        }
    }

    /// What the decision point holds of it in `tenant` (404 when it is not in the tenant).
    pub async fn load(
        &self,
        tx: &mut crate::db::Tx,
        tenant: Uuid,
    ) -> ApiResult<std::sync::Arc<authz::policies::Loaded>> {
        let subject = match (self.user_id, self.api_key_id, self.role.as_deref()) {
            (Some(user_id), ..) => Principal::User { user_id, session_id: Uuid::nil() },
            (_, _, Some(role)) => {
                let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM roles WHERE tenant_id = $1 AND name = $2")
                    .bind(tenant)
                    .bind(role)
                    .fetch_optional(&mut **tx)
                    .await?;
                // No function: the role as such, whichever function holds it.
                Principal::Role {
                    role_id: id.ok_or(ApiError::NotFound("role"))?,
                    tenant_id: tenant,
                    function_id: Uuid::nil(),
                }
            }
            (_, Some(key_id), _) => {
                let row: Option<(String, Option<Uuid>)> =
                    sqlx::query_as("SELECT role, created_by FROM api_keys WHERE tenant_id = $1 AND id = $2")
                        .bind(tenant)
                        .bind(key_id)
                        .fetch_optional(&mut **tx)
                        .await?;
                let (role, created_by) = row.ok_or(ApiError::NotFound("API key"))?;
                Principal::ApiKey {
                    key_id,
                    tenant_id: tenant,
                    role: authz::Role::parse(&role).map_err(ApiError::Internal)?,
                    created_by,
                }
            }
            _ => return Err(ApiError::NotFound("principal")),
        };
        let loaded = authz::policies::load(tx, &subject, tenant).await?;
        if loaded.role.is_none() {
            return Err(ApiError::NotFound("member"));
        }
        Ok(loaded)
    }
}

/// Body of `POST .../iam/simulate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulateRequest {
    /// The member or key.
    pub principal: Subject,
    /// Catalogued action names (at most 50).
    pub actions: Vec<String>,
    /// Resource NRNs (at most 50).
    pub resources: Vec<String>,
    /// Context keys to assume, e.g. `{"nimbus:SourceIp": "10.0.0.7"}` (a string or a list).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub context: BTreeMap<String, serde_json::Value>,
}

/// A statement that decided.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MatchedOut {
    /// The policy (a managed policy's NRN or the tenant policy's name).
    pub policy: String,
    /// Its version.
    pub version: u32,
    /// `identity`, `boundary`, `guardrail` or `resource`.
    pub kind: String,
    /// The statement's `Sid`.
    pub sid: Option<String>,
    /// The statement's index in the document.
    pub statement: usize,
    /// `Allow` or `Deny`.
    pub effect: String,
}

/// The decision for one action on one resource.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Simulated {
    /// The action.
    pub action: String,
    /// The resource.
    pub resource: String,
    /// `allowed`, `explicit_deny` or `implicit_deny`.
    pub decision: String,
    /// Why, as a sentence.
    pub reason: String,
    /// The statements that decided.
    pub matched: Vec<MatchedOut>,
}

/// The simulator's answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Simulation {
    /// One per (action, resource), actions outer.
    pub results: Vec<Simulated>,
}

/// Simulate what a member's or API key's policies decide, and which statements decide it.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/iam/simulate",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = SimulateRequest, example = json!({"principal": {"user_id": "01930000-0000-7000-8000-000000000001"},
        "actions": ["functions:UpdateAlias"], "resources": ["nrn:nimbus:functions:01930000-0000-7000-8000-000000000002:function/web/alias/live"],
        "context": {"nimbus:SourceIp": "10.0.0.7"}})),
    responses(
        (status = 200, description = "A decision per pair", body = Simulation),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, member or key", body = crate::error::Problem),
        (status = 422, description = "Unknown action, too many pairs, bad context value", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn simulate(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<SimulateRequest>,
) -> ApiResult<Json<Simulation>> {
    let mut errors = Vec::new();
    let subject_nrn = req.principal.nrn(tenant_id).unwrap_or_else(|e| {
        errors.push(e);
        String::new()
    });
    for (field, list) in [("actions", &req.actions), ("resources", &req.resources)] {
        if list.is_empty() || list.len() > MAX_SIMULATED {
            errors.push(FieldError::new(field, "length", format!("1 to {MAX_SIMULATED} entries")));
        }
    }
    for (i, a) in req.actions.iter().enumerate() {
        if nimbus_iam::lookup(a).is_none() {
            errors.push(FieldError::new(
                format!("actions[{i}]"),
                "unknown_action",
                format!("{a} is not a Nimbus action"),
            ));
        }
    }
    let mut extra = nimbus_iam::Context::new(chrono::Utc::now());
    for (k, v) in &req.context {
        let value: Option<nimbus_iam::ContextValue> = match v {
            serde_json::Value::String(s) => Some(s.as_str().into()),
            serde_json::Value::Bool(b) => Some((*b).into()),
            serde_json::Value::Number(n) => Some(n.to_string().into()),
            serde_json::Value::Array(xs) => {
                xs.iter().map(|x| x.as_str().map(str::to_owned)).collect::<Option<Vec<String>>>().map(Into::into)
            }
            _ => None,
        };
        match value {
            Some(v) => {
                extra.insert(k, v);
            }
            None => errors.push(FieldError::new(
                format!("context.{k}"),
                "context_value",
                "a string, number, boolean or list of strings",
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::SimulatePolicy, tenant_id, &subject_nrn).await?;
    let loaded = req.principal.load(&mut tx, tenant_id).await?;
    tx.commit().await?;
    let mut results = Vec::new();
    for action in &req.actions {
        for resource in &req.resources {
            let d = loaded.evaluate_with(action, resource, Some(&extra));
            results.push(Simulated {
                action: action.clone(),
                resource: resource.clone(),
                decision: match d.effect {
                    nimbus_iam::Effect::Allow => "allowed",
                    nimbus_iam::Effect::ExplicitDeny => "explicit_deny",
                    nimbus_iam::Effect::ImplicitDeny => "implicit_deny",
                }
                .to_owned(),
                reason: d.reason.to_string(),
                matched: d
                    .matched
                    .iter()
                    .map(|m| MatchedOut {
                        policy: m.policy.to_string(),
                        version: m.version,
                        kind: m.kind.as_str().to_owned(),
                        sid: m.sid.as_deref().map(str::to_owned),
                        statement: m.index,
                        effect: format!("{:?}", m.effect),
                    })
                    .collect(),
            });
        }
    }
    Ok(Json(Simulation { results }))
}
