//! The policy document model: AWS IAM's grammar, compiled once into a form that evaluation reads
//! without parsing.
//!
//! ```json
//! {"Version": "2012-10-17", "Id": "optional",
//!  "Statement": [{"Sid": "Optional1", "Effect": "Allow" | "Deny",
//!                 "Action" | "NotAction": "svc:Name" | ["..."],
//!                 "Resource" | "NotResource": "nrn:..." | ["..."],
//!                 "Principal" | "NotPrincipal": "*" | {"Nimbus": "nrn:..." | ["..."]},
//!                 "Condition": {"Operator": {"key": "value" | ["values"]}}}]}
//! ```
//!
//! `Statement` may be one object or an array. `Principal`/`NotPrincipal` appear in resource
//! policies only (and there in every statement); their one key is `Nimbus`, as AWS's is `AWS`,
//! and its values are `*`, a tenant root `nrn:nimbus:iam:<tenant>:root`, or user, role and
//! API key NRNs (wildcards allowed; groups are not principals, as in AWS). Field names, `Allow`,
//! `Deny` and operator names are case-sensitive.
//!
//! Compiling lowercases action patterns (actions match case-insensitively), splits every
//! pattern at its wildcards, resolves operators to an enum and parses condition values as the
//! operator needs them. It checks the grammar and the limits below; the catalogue checks (unknown
//! actions and condition keys) are the validator's, run when a policy is written, so that a
//! stored policy keeps compiling — and its Denies keep applying — whatever the catalogue becomes.

pub(crate) mod error;
pub(crate) mod json;
mod parse;

use std::sync::Arc;

pub use error::{InvalidPolicy, PolicyError, Rule};

use crate::{condition::Condition, glob::Pattern};

/// The largest document accepted, in bytes of JSON as given (whitespace included, so that the
/// limit is what the caller sees). AWS allows 6,144 characters for a managed policy and 10,240
/// for a role's inline policies; one limit for every kind keeps it simple.
pub const MAX_DOCUMENT_BYTES: usize = 10_240;
/// The most statements in one document.
pub const MAX_STATEMENTS: usize = 100;
/// The most entries in one `Action`, `Resource` or `Principal` element (and their `Not` forms).
pub const MAX_ENTRIES: usize = 100;
/// The most values for one condition key.
pub const MAX_CONDITION_VALUES: usize = 100;
/// The longest action, resource or principal pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 1_024;
/// The only policy language version accepted (the one with policy variables).
pub const VERSION: &str = "2012-10-17";

/// What a document is for, which decides what it may contain and how it combines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Attached to a user, group, role or API key: what the principal may do.
    Identity,
    /// Attached to a resource (a function): who may act on it; the only kind with `Principal`.
    Resource,
    /// A permissions boundary: the most a principal's identity policies can grant.
    Boundary,
    /// A tenant guardrail (like an AWS SCP): the most anyone in the tenant can be granted.
    Guardrail,
}

impl PolicyKind {
    /// The name, for explanations.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Identity => "identity",
            PolicyKind::Resource => "resource",
            PolicyKind::Boundary => "boundary",
            PolicyKind::Guardrail => "guardrail",
        }
    }
}

/// A statement's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatementEffect {
    /// Grants.
    Allow,
    /// Forbids, whatever else grants.
    Deny,
}

/// Compiled `Action`/`NotAction` or `Resource`/`NotResource` entries.
#[derive(Debug, Clone)]
pub(crate) struct Patterns {
    /// The `Not` form: the statement applies to what matches none of the patterns.
    pub(crate) negated: bool,
    pub(crate) patterns: Vec<Pattern>,
    /// Whether the element was an array, for paths in findings.
    pub(crate) listed: bool,
}

/// One compiled `Principal`/`NotPrincipal` entry.
#[derive(Debug, Clone)]
pub(crate) enum PrincipalEntry {
    /// `*`: anyone, anonymous callers included.
    Any,
    /// `nrn:nimbus:iam:<tenant pattern>:root`: every principal of a matching tenant.
    TenantRoot(Pattern),
    /// A user, role or API key NRN pattern, matched against the principal's NRN.
    Nrn(Pattern),
}

/// Compiled `Principal`/`NotPrincipal`.
#[derive(Debug, Clone)]
pub(crate) struct Principals {
    pub(crate) negated: bool,
    pub(crate) entries: Vec<PrincipalEntry>,
}

/// One compiled statement.
#[derive(Debug, Clone)]
pub struct Statement {
    pub(crate) sid: Option<Arc<str>>,
    pub(crate) effect: StatementEffect,
    pub(crate) actions: Patterns,
    pub(crate) resources: Patterns,
    pub(crate) principals: Option<Principals>,
    pub(crate) conditions: Vec<Condition>,
    /// Where the statement is in the document, e.g. `Statement[2]`.
    pub(crate) path: Box<str>,
}

impl Statement {
    /// The `Sid`, if it has one.
    pub fn sid(&self) -> Option<&str> {
        self.sid.as_deref()
    }

    /// `Allow` or `Deny`.
    pub fn effect(&self) -> StatementEffect {
        self.effect
    }

    /// Whether it has a `Condition` block.
    pub fn has_conditions(&self) -> bool {
        !self.conditions.is_empty()
    }

    /// Whether its `Action`/`NotAction` covers `action` (case-insensitively), whatever its
    /// resources and conditions say: what access reports count as granted.
    pub fn names_action(&self, action: &str) -> bool {
        self.actions.patterns.iter().any(|p| p.matches_ignore_ascii_case(action)) != self.actions.negated
    }
}

impl CompiledPolicy {
    /// The catalogued actions an Allow statement of the policy names (on some resource, under
    /// some conditions). Deny statements are not subtracted: they may apply to only some
    /// resources.
    pub fn allowed_actions(&self) -> Vec<&'static str> {
        crate::catalogue::ACTIONS
            .iter()
            .filter(|a| {
                self.statements().iter().any(|s| s.effect() == StatementEffect::Allow && s.names_action(a.name))
            })
            .map(|a| a.name)
            .collect()
    }
}

/// A compiled policy document with the identity evaluation reports it by: an id (a policy name
/// or NRN) and a version number.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub(crate) id: Arc<str>,
    pub(crate) version: u32,
    pub(crate) kind: PolicyKind,
    pub(crate) doc_id: Option<String>,
    pub(crate) statements: Vec<Statement>,
}

impl CompiledPolicy {
    /// Compiles a document of `kind`, reporting it as `id` at `version`; every error found is
    /// returned, each with its JSON path.
    pub fn compile(
        json: &str,
        kind: PolicyKind,
        id: impl Into<Arc<str>>,
        version: u32,
    ) -> Result<CompiledPolicy, InvalidPolicy> {
        let (doc_id, statements) = parse::compile(json, kind).map_err(InvalidPolicy)?;
        Ok(CompiledPolicy { id: id.into(), version, kind, doc_id, statements })
    }

    /// [`CompiledPolicy::compile`] for a document without an identity yet (id empty, version 0),
    /// as the validator and the simulator use.
    pub fn parse(json: &str, kind: PolicyKind) -> Result<CompiledPolicy, InvalidPolicy> {
        Self::compile(json, kind, "", 0)
    }

    /// The id it is reported by.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The version it is reported by.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Its kind.
    pub fn kind(&self) -> PolicyKind {
        self.kind
    }

    /// The document's own `Id` element, if any.
    pub fn document_id(&self) -> Option<&str> {
        self.doc_id.as_deref()
    }

    /// Its statements in document order.
    pub fn statements(&self) -> &[Statement] {
        &self.statements
    }
}
