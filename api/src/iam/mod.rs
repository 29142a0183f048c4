//! IAM over REST: a tenant's own policies and their versions ([`policies`]), attaching policies
//! to members and API keys as identity policies or as their permissions boundary
//! ([`attachments`]), validating documents and simulating decisions ([`simulate`]), and the
//! guardrails platform operators set per tenant ([`guardrails`]), groups ([`groups`]) and roles
//! ([`roles`]), the access report and policy generation ([`access`]). The evaluation itself is
//! `nimbus_iam`'s; what a principal has is loaded by [`crate::authz::policies`].

pub mod access;
pub mod attachments;
pub mod groups;
pub mod guardrails;
pub mod policies;
pub mod roles;
pub mod simulate;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;

use crate::{error::FieldError, startup::AppState};

/// Every IAM route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .merge(policies::router())
        .merge(attachments::router())
        .merge(simulate::router())
        .merge(guardrails::router())
        .merge(access::router())
        .merge(groups::router())
        .merge(roles::router())
}

/// A policy document in a request: the JSON itself, or a string holding it (as the console's
/// text area sends it). What is stored is the text.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Document {
    /// The document as a string of JSON.
    Text(String),
    /// The document as JSON.
    #[schema(value_type = Object)]
    Json(serde_json::Value),
}

impl Document {
    /// The document's text.
    pub fn text(&self) -> String {
        match self {
            Document::Text(s) => s.clone(),
            Document::Json(v) => serde_json::to_string_pretty(v).unwrap_or_default(),
        }
    }
}

/// A validation finding: the document is accepted, but something in it deserves a second look.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FindingOut {
    /// A stable code, e.g. `allow_all`.
    pub code: String,
    /// Where in the document, e.g. `Statement[0].Action`.
    pub path: String,
    /// What and why.
    pub message: String,
}

/// Validates `text` as a policy of `kind`: the findings when it is valid, otherwise 422 naming
/// every error's JSON path (as the field, prefixed with `field.`) and rule.
pub fn checked(
    field: &str,
    text: &str,
    kind: nimbus_iam::PolicyKind,
) -> Result<Vec<FindingOut>, crate::error::ApiError> {
    let report = nimbus_iam::validate(text, kind);
    if !report.errors.is_empty() {
        return Err(crate::error::ApiError::Validation(
            report
                .errors
                .iter()
                .map(|e| {
                    let path = if e.path.is_empty() { field.to_owned() } else { format!("{field}.{}", e.path) };
                    FieldError::new(path, e.rule.code(), e.message.clone())
                })
                .collect(),
        ));
    }
    Ok(findings(&report))
}

/// The findings of a report.
pub fn findings(report: &nimbus_iam::Report) -> Vec<FindingOut> {
    report
        .findings
        .iter()
        .map(|f| FindingOut { code: f.code.code().to_owned(), path: f.path.clone(), message: f.message.clone() })
        .collect()
}

/// Policy names: 1 to 128 of letters, digits and `+=,.@_-` (as in AWS); a managed policy's name
/// is taken.
pub fn policy_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
    if !ok {
        return Err(FieldError::new(field, "policy_name", "1 to 128 letters, digits or any of + = , . @ _ -"));
    }
    if nimbus_iam::managed::managed(name).is_some() {
        return Err(FieldError::new(field, "reserved", "the name of a managed policy"));
    }
    Ok(())
}
