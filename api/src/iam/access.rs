//! Least privilege from what principals actually did (the access log, `authz::activity`): the
//! access report — last used per action, and the actions its policies grant that it has not used
//! in N days — and policy generation — the smallest policy (actions on the concrete resources
//! used) that would have allowed the recorded activity, ready to review and attach.

use std::collections::{BTreeMap, BTreeSet};

use axum::{Json, extract::State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use super::{FindingOut, findings, simulate::Subject};
use crate::{
    auth::Principal,
    authz::{self, Action},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path, Query},
    startup::AppState,
};

/// Distinct resources of one action a generated statement lists; beyond, the statement names
/// every resource of that type (`.../<type>/*`).
pub const MAX_RESOURCES_PER_ACTION: usize = 20;

/// Routes.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(access_report)).routes(routes!(generate_policy))
}

/// Query of the access report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportParams {
    /// The member.
    pub user_id: Option<Uuid>,
    /// Or the API key.
    pub api_key_id: Option<Uuid>,
    /// Or the role, by name.
    pub role: Option<String>,
    /// Days to look back, 1–90 (default 90).
    pub days: Option<i32>,
}

/// One action used.
#[derive(Debug, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Used {
    /// The action.
    pub action: String,
    /// When it was last allowed.
    pub last_used_at: DateTime<Utc>,
    /// How often it was allowed in the period.
    pub count: i64,
    /// On how many distinct resources.
    pub resources: i64,
}

/// The access report of a principal.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccessReport {
    /// The principal.
    pub principal: String,
    /// The period, in days.
    pub days: i32,
    /// Actions used in the period, most recent first.
    pub used: Vec<Used>,
    /// Actions its policies grant (within its boundary) that it did not use in the period.
    pub unused: Vec<String>,
}

fn days(field: &str, d: Option<i32>) -> Result<i32, ApiError> {
    let d = d.unwrap_or(90);
    if !(1..=authz::activity::RETENTION_DAYS).contains(&d) {
        return Err(ApiError::Validation(vec![FieldError::new(
            field,
            "range",
            format!("1 to {} days", authz::activity::RETENTION_DAYS),
        )]));
    }
    Ok(d)
}

/// Last use per action of a member or API key, and what it is granted but did not use.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/iam/access-report",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ReportParams),
    responses(
        (status = 200, description = "The report", body = AccessReport),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, member or key", body = crate::error::Problem),
        (status = 422, description = "Bad principal or period", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn access_report(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    Query(q): Query<ReportParams>,
) -> ApiResult<Json<AccessReport>> {
    let subject = Subject { user_id: q.user_id, api_key_id: q.api_key_id, role: q.role.clone() };
    // Authorized first (on every member when no principal is named), so that a caller without
    // the permission learns nothing from the validation.
    let named = subject.nrn(tenant_id);
    let resource = named.clone().unwrap_or_else(|_| format!("nrn:nimbus:iam:{tenant_id}:user/*"));
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GetAccessReport, tenant_id, &resource).await?;
    let nrn = named.map_err(|e| ApiError::Validation(vec![e]))?;
    let days = days("days", q.days)?;
    let loaded = subject.load(&mut tx, tenant_id).await?;
    let used: Vec<Used> = sqlx::query_as(
        "SELECT action, max(last_at) AS last_used_at, sum(count)::bigint AS count, count(DISTINCT resource) AS resources \
         FROM iam_activity WHERE tenant_id = $1 AND principal_id = $2 AND day >= current_date - $3 \
         GROUP BY action ORDER BY max(last_at) DESC",
    )
    .bind(tenant_id)
    .bind(loaded.who.1)
    .bind(days)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut granted: BTreeSet<&'static str> = loaded.identity.iter().flat_map(|p| p.allowed_actions()).collect();
    if let Some(b) = &loaded.boundary {
        let within: BTreeSet<&'static str> = b.allowed_actions().into_iter().collect();
        granted.retain(|a| within.contains(a));
    }
    granted.retain(|a| nimbus_iam::lookup(a).is_some_and(|s| !s.platform));
    let seen: BTreeSet<&str> = used.iter().map(|u| u.action.as_str()).collect();
    let unused = granted.into_iter().filter(|a| !seen.contains(a)).map(str::to_owned).collect();
    Ok(Json(AccessReport { principal: nrn, days, used, unused }))
}

/// Body of `POST .../iam/generate-policy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The member or key whose activity to use.
    pub principal: Subject,
    /// Days to look back, 1–90 (default 90).
    pub days: Option<i32>,
}

/// A generated policy.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Generated {
    /// The document, ready for `POST .../policies`.
    #[schema(value_type = Object)]
    pub document: serde_json::Value,
    /// The activity it covers: distinct (action, resource) pairs.
    pub pairs: usize,
    /// The validator's findings on it.
    pub findings: Vec<FindingOut>,
}

/// Generate the least policy that allows what a member or key did in the period.
#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant_id}/iam/generate-policy",
    tag = "iam",
    params(("tenant_id" = Uuid, Path, description = "Tenant id")),
    request_body(content = GenerateRequest, example = json!({"principal": {"user_id": "01930000-0000-7000-8000-000000000001"}, "days": 30})),
    responses(
        (status = 200, description = "The generated document", body = Generated),
        (status = 403, description = "Not allowed", body = crate::error::Problem),
        (status = 404, description = "No such tenant, member or key", body = crate::error::Problem),
        (status = 409, description = "No activity in the period", body = crate::error::Problem),
        (status = 422, description = "Bad principal or period", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn generate_policy(
    State(state): State<AppState>,
    principal: Principal,
    Path(tenant_id): Path<Uuid>,
    extract::Json(req): extract::Json<GenerateRequest>,
) -> ApiResult<Json<Generated>> {
    let named = req.principal.nrn(tenant_id);
    let resource = named.clone().unwrap_or_else(|_| format!("nrn:nimbus:iam:{tenant_id}:user/*"));
    let (mut tx, _) = authz::begin(&state.pool, &principal, Action::GeneratePolicy, tenant_id, &resource).await?;
    named.map_err(|e| ApiError::Validation(vec![e]))?;
    let days = days("days", req.days)?;
    let loaded = req.principal.load(&mut tx, tenant_id).await?;
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT action, resource FROM iam_activity \
         WHERE tenant_id = $1 AND principal_id = $2 AND day >= current_date - $3 ORDER BY action, resource",
    )
    .bind(tenant_id)
    .bind(loaded.who.1)
    .bind(days)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if pairs.is_empty() {
        return Err(ApiError::conflict("no_activity", format!("no recorded activity in the last {days} days")));
    }
    let document = generate(&pairs);
    let report = nimbus_iam::validate(&document.to_string(), nimbus_iam::PolicyKind::Identity);
    if !report.errors.is_empty() {
        return Err(ApiError::Internal(anyhow::anyhow!("a generated policy does not validate: {:?}", report.errors)));
    }
    Ok(Json(Generated { document, pairs: pairs.len(), findings: findings(&report) }))
}

/// The document for `(action, resource)` pairs: per action its resources (or, past
/// [`MAX_RESOURCES_PER_ACTION`], every resource of their types), and one statement per distinct
/// resource list with the actions that share it.
pub fn generate(pairs: &[(String, String)]) -> serde_json::Value {
    let mut by_action: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (action, resource) in pairs {
        by_action.entry(action).or_default().insert(resource.clone());
    }
    let mut by_resources: BTreeMap<Vec<String>, Vec<&str>> = BTreeMap::new();
    for (action, resources) in by_action {
        let resources: Vec<String> = if resources.len() > MAX_RESOURCES_PER_ACTION {
            // `nrn:nimbus:<service>:<tenant>:<type>/...` → `.../<type>/*`.
            resources
                .iter()
                .map(|r| match r.split_once('/') {
                    Some((head, _)) => format!("{head}/*"),
                    None => r.clone(),
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            resources.into_iter().collect()
        };
        by_resources.entry(resources).or_default().push(action);
    }
    let statements: Vec<serde_json::Value> = by_resources
        .into_iter()
        .enumerate()
        .map(|(i, (resources, actions))| {
            json!({"Sid": format!("Used{}", i + 1), "Effect": "Allow", "Action": actions, "Resource": resources})
        })
        .collect();
    json!({"Version": nimbus_iam::policy::VERSION, "Statement": statements})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_sharing_resources_share_a_statement_and_many_resources_become_a_type() {
        let t = "01930000-0000-7000-8000-000000000002";
        let f = |n: &str| format!("nrn:nimbus:functions:{t}:function/{n}");
        let mut pairs = vec![
            ("functions:GetFunction".to_owned(), f("web")),
            ("functions:UpdateFunction".to_owned(), f("web")),
            ("functions:ListFunctions".to_owned(), f("*")),
        ];
        for i in 0..=MAX_RESOURCES_PER_ACTION {
            pairs.push(("functions:InvokeFunction".to_owned(), f(&format!("f{i}"))));
        }
        let doc = generate(&pairs);
        let s = doc["Statement"].as_array().unwrap();
        assert_eq!(s.len(), 2, "{doc}");
        let web = s.iter().find(|s| s["Resource"] == json!([f("web")])).unwrap();
        assert_eq!(web["Action"], json!(["functions:GetFunction", "functions:UpdateFunction"]));
        // Past the limit, invoking names every function, and so shares listing's statement.
        let every = s.iter().find(|s| s["Resource"] == json!([f("*")])).unwrap();
        assert_eq!(every["Action"], json!(["functions:InvokeFunction", "functions:ListFunctions"]), "{doc}");
        let report = nimbus_iam::validate(&doc.to_string(), nimbus_iam::PolicyKind::Identity);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
}
