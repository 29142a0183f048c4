//! Why a policy document is rejected: each error names the JSON path and the rule it breaks.

use std::fmt;

/// The rule a document breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Not JSON, or a duplicate key.
    Json,
    /// Larger than [`super::MAX_DOCUMENT_BYTES`].
    TooLarge,
    /// More statements, entries or values than the limits allow.
    TooMany,
    /// A field the grammar does not have.
    UnknownField,
    /// A value of the wrong JSON type.
    WrongType,
    /// A required field is absent.
    Missing,
    /// Two fields that exclude each other (`Action` and `NotAction`).
    Conflict,
    /// `Version` is not `2012-10-17`.
    Version,
    /// `Effect` is not `Allow` or `Deny`.
    Effect,
    /// An empty array or string where something is needed.
    Empty,
    /// A `Sid` that is not letters and digits, or one used twice.
    Sid,
    /// An action pattern that is not `*` or `<service>:<pattern>`.
    Action,
    /// An action pattern that matches no catalogued action.
    UnknownAction,
    /// A resource that is not `*` or an NRN pattern.
    Resource,
    /// A principal that is not `*` or `{"Nimbus": <principal NRN>}`.
    Principal,
    /// `Principal` or `NotPrincipal` in a policy that is not a resource policy.
    PrincipalNotAllowed,
    /// A resource policy statement without `Principal` or `NotPrincipal`.
    PrincipalRequired,
    /// An unknown condition operator.
    Operator,
    /// A malformed condition key.
    ConditionKey,
    /// A condition key that is not catalogued.
    UnknownConditionKey,
    /// An operator that does not fit the key's type (`IpAddress` on a string key).
    KeyType,
    /// A condition value that the operator cannot use (a bad CIDR, date or number).
    Value,
    /// A malformed policy variable.
    Variable,
}

impl Rule {
    /// A stable name, for API responses and tests.
    pub fn code(self) -> &'static str {
        match self {
            Rule::Json => "json",
            Rule::TooLarge => "too_large",
            Rule::TooMany => "too_many",
            Rule::UnknownField => "unknown_field",
            Rule::WrongType => "wrong_type",
            Rule::Missing => "missing",
            Rule::Conflict => "conflict",
            Rule::Version => "version",
            Rule::Effect => "effect",
            Rule::Empty => "empty",
            Rule::Sid => "sid",
            Rule::Action => "action",
            Rule::UnknownAction => "unknown_action",
            Rule::Resource => "resource",
            Rule::Principal => "principal",
            Rule::PrincipalNotAllowed => "principal_not_allowed",
            Rule::PrincipalRequired => "principal_required",
            Rule::Operator => "operator",
            Rule::ConditionKey => "condition_key",
            Rule::UnknownConditionKey => "unknown_condition_key",
            Rule::KeyType => "key_type",
            Rule::Value => "value",
            Rule::Variable => "variable",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One reason a document is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// Where in the document, e.g. `Statement[1].Condition.IpAddress.nimbus:SourceIp`; empty for
    /// the document as a whole.
    pub path: String,
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong, for people.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "document" } else { &self.path };
        write!(f, "{path}: {} ({})", self.message, self.rule)
    }
}

impl std::error::Error for PolicyError {}

/// A document that does not compile, with every error found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct InvalidPolicy(pub Vec<PolicyError>);

/// Collects errors while a document is walked.
#[derive(Debug, Default)]
pub(crate) struct Errors(pub(crate) Vec<PolicyError>);

impl Errors {
    pub(crate) fn push(&mut self, path: &str, rule: Rule, message: impl Into<String>) {
        self.0.push(PolicyError { path: path.to_owned(), rule, message: message.into() });
    }
}

/// Joins a JSON path and a field name.
pub(crate) fn field(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") }
}

/// Joins a JSON path and an array index.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}
