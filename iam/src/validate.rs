//! Policy validation for people writing policies: errors that reject a document (the grammar
//! and limits that compiling checks, plus the catalogue: unknown actions and condition keys,
//! operators that do not fit a key's type) and findings that warn about over-broad or probably
//! mistaken grants.

use std::fmt;

use crate::{
    catalogue::{self, ACTIONS, AccessLevel, KeyType},
    condition::{Qualifier, Values},
    policy::{
        CompiledPolicy, PolicyError, PolicyKind, PrincipalEntry, Rule, Statement, StatementEffect,
        error::{Errors, field, index},
    },
};

/// What a finding warns about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FindingCode {
    /// An Allow of `*` on `*`.
    AllowAll,
    /// An Allow with `NotAction`: it grants every action but the listed ones, new ones included.
    AllowNotAction,
    /// An Allow with `NotResource`: it grants on every resource but the listed ones.
    AllowNotResource,
    /// An Allow whose wildcard action pattern covers write, permissions or tagging actions.
    ServiceWildcardWrite,
    /// `ForAllValues:` in an Allow without a `Null: {key: false}` guard: an absent key passes.
    ForAllValuesWithoutNull,
    /// A negated operator in an Allow: it passes for every value but the listed ones, and when
    /// the key is absent.
    NegatedOperatorInAllow,
    /// `*` or `?` in a value of an exact string operator, where it is literal.
    WildcardInNonLike,
    /// A statement whose actions and resources another unconditional statement of the same
    /// effect already covers.
    RedundantStatement,
    /// A service condition key that none of the statement's actions supplies, so it is always
    /// absent.
    ConditionKeyNotApplicable,
}

impl FindingCode {
    /// A stable name, for API responses and tests.
    pub fn code(self) -> &'static str {
        match self {
            FindingCode::AllowAll => "allow_all",
            FindingCode::AllowNotAction => "allow_not_action",
            FindingCode::AllowNotResource => "allow_not_resource",
            FindingCode::ServiceWildcardWrite => "service_wildcard_write",
            FindingCode::ForAllValuesWithoutNull => "for_all_values_without_null",
            FindingCode::NegatedOperatorInAllow => "negated_operator_in_allow",
            FindingCode::WildcardInNonLike => "wildcard_in_non_like",
            FindingCode::RedundantStatement => "redundant_statement",
            FindingCode::ConditionKeyNotApplicable => "condition_key_not_applicable",
        }
    }
}

impl fmt::Display for FindingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A warning about a valid document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind.
    pub code: FindingCode,
    /// Where, as in [`PolicyError::path`].
    pub path: String,
    /// What to consider, for people.
    pub message: String,
}

/// What validation found: a document with errors must be rejected; findings are advice and are
/// only computed for documents without errors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Reasons to reject the document.
    pub errors: Vec<PolicyError>,
    /// Warnings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether the document may be stored.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Validates a document of `kind`.
pub fn validate(json: &str, kind: PolicyKind) -> Report {
    match CompiledPolicy::parse(json, kind) {
        Ok(policy) => check(&policy),
        Err(invalid) => Report { errors: invalid.0, findings: Vec::new() },
    }
}

/// The catalogue checks and findings for an already compiled document.
pub fn check(policy: &CompiledPolicy) -> Report {
    let mut errors = Errors::default();
    let covered: Vec<Vec<bool>> = policy.statements.iter().map(catalogued_actions).collect();
    for s in &policy.statements {
        catalogue_errors(s, &mut errors);
    }
    if !errors.0.is_empty() {
        return Report { errors: errors.0, findings: Vec::new() };
    }
    let mut findings = Vec::new();
    for (i, s) in policy.statements.iter().enumerate() {
        statement_findings(s, &covered[i], &mut findings);
        if let Some(t) = covering_statement(policy, &covered, i) {
            findings.push(Finding {
                code: FindingCode::RedundantStatement,
                path: s.path.to_string(),
                message: format!("{} already allows or denies everything this statement does", t.path),
            });
        }
    }
    Report { errors: Vec::new(), findings }
}

/// The path of an `Action`/`Resource` entry.
fn entry_path(s: &Statement, name: &str, listed: bool, i: usize) -> String {
    let element = field(&s.path, name);
    if listed { index(&element, i) } else { element }
}

/// Which catalogued actions (by index in [`ACTIONS`]) the statement applies to.
fn catalogued_actions(s: &Statement) -> Vec<bool> {
    ACTIONS
        .iter()
        .map(|a| s.actions.patterns.iter().any(|p| p.matches_ignore_ascii_case(a.name)) != s.actions.negated)
        .collect()
}

fn catalogue_errors(s: &Statement, errors: &mut Errors) {
    let name = if s.actions.negated { "NotAction" } else { "Action" };
    for (i, p) in s.actions.patterns.iter().enumerate() {
        if !ACTIONS.iter().any(|a| p.matches_ignore_ascii_case(a.name)) {
            let message = format!("`{p}` matches no Nimbus action");
            errors.push(&entry_path(s, name, s.actions.listed, i), Rule::UnknownAction, message);
        }
    }
    for c in &s.conditions {
        let Some(spec) = catalogue::condition_key(&c.key_name) else {
            errors.push(&c.path, Rule::UnknownConditionKey, format!("`{}` is not a Nimbus condition key", c.key_name));
            continue;
        };
        let fits = match c.op.op.key_type() {
            None => true,
            // Epoch seconds are a number as much as a date.
            Some(KeyType::Numeric) => matches!(spec.ty, KeyType::Numeric) || spec.name == "nimbus:EpochTime",
            Some(t) => t == spec.ty,
        };
        if !fits {
            let message = format!("{} does not fit `{}`, whose values are {:?}", c.op.op.name(), c.key_name, spec.ty);
            errors.push(&c.path, Rule::KeyType, message);
        }
    }
}

fn statement_findings(s: &Statement, actions: &[bool], out: &mut Vec<Finding>) {
    let mut push = |code, path: String, message: String| out.push(Finding { code, path, message });
    let allow = s.effect == StatementEffect::Allow;
    let all_actions = !s.actions.negated && s.actions.patterns.iter().any(|p| p.is_match_all());
    let all_resources = !s.resources.negated && s.resources.patterns.iter().any(|p| p.is_match_all());
    if allow && all_actions && all_resources {
        push(FindingCode::AllowAll, s.path.to_string(), "allows every action on every resource".into());
    }
    if allow && s.actions.negated {
        let message = "NotAction in an Allow grants every other action, including ones added later".into();
        push(FindingCode::AllowNotAction, field(&s.path, "NotAction"), message);
    }
    if allow && s.resources.negated {
        let message = "NotResource in an Allow grants on every other resource".into();
        push(FindingCode::AllowNotResource, field(&s.path, "NotResource"), message);
    }
    if allow && !s.actions.negated && !(all_actions && all_resources) {
        for (i, p) in s.actions.patterns.iter().enumerate().filter(|(_, p)| p.has_wildcards()) {
            let writes: Vec<&str> = ACTIONS
                .iter()
                .filter(|a| {
                    matches!(a.access, AccessLevel::Write | AccessLevel::Permissions | AccessLevel::Tagging)
                        && p.matches_ignore_ascii_case(a.name)
                })
                .map(|a| a.name)
                .collect();
            if let Some(first) = writes.first() {
                let message = format!(
                    "`{p}` allows {} write, permissions or tagging actions ({first}, ...): list the ones needed",
                    writes.len()
                );
                push(FindingCode::ServiceWildcardWrite, entry_path(s, "Action", s.actions.listed, i), message);
            }
        }
    }
    for c in &s.conditions {
        if allow && c.op.qualifier == Qualifier::ForAllValues {
            let guarded = s.conditions.iter().any(|g| matches!(g.values, Values::Null(false)) && g.key == c.key);
            if !guarded {
                let message = format!(
                    "ForAllValues is true when `{}` is absent or empty: add \"Null\": {{\"{}\": \"false\"}}",
                    c.key_name, c.key_name
                );
                push(FindingCode::ForAllValuesWithoutNull, c.path.to_string(), message);
            }
        }
        if allow && c.op.op.is_negated() {
            let message = format!(
                "{} in an Allow passes for every other value of `{}`, and when it is absent",
                c.op.op.name(),
                c.key_name
            );
            push(FindingCode::NegatedOperatorInAllow, c.path.to_string(), message);
        }
        if c.op.op.is_exact_string() && c.raw.iter().any(|v| has_bare_wildcard(v)) {
            let message = format!("`*` and `?` are literal in {}: did you mean StringLike?", c.op.op.name());
            push(FindingCode::WildcardInNonLike, c.path.to_string(), message);
        }
        let service_key = !c.key.starts_with("nimbus:");
        let supplied = ACTIONS
            .iter()
            .zip(actions)
            .any(|(a, &on)| on && a.condition_keys.iter().any(|k| k.eq_ignore_ascii_case(&c.key_name)));
        if service_key && !supplied {
            let message = format!("none of the statement's actions supplies `{}`, so it is always absent", c.key_name);
            push(FindingCode::ConditionKeyNotApplicable, c.path.to_string(), message);
        }
    }
}

/// Whether a value has `*` or `?` outside a `${...}` escape.
fn has_bare_wildcard(v: &str) -> bool {
    let mut rest = v;
    while let Some(i) = rest.find(['*', '?', '$']) {
        if rest[i..].starts_with("${") {
            match rest[i..].find('}') {
                Some(end) => rest = &rest[i + end + 1..],
                None => return false,
            }
        } else if rest.as_bytes()[i] == b'$' {
            rest = &rest[i + 1..];
        } else {
            return true;
        }
    }
    false
}

/// The principal entries as comparable text.
fn principal_key(s: &Statement) -> Option<(bool, Vec<String>)> {
    s.principals.as_ref().map(|p| {
        let mut keys: Vec<String> = p
            .entries
            .iter()
            .map(|e| match e {
                PrincipalEntry::Any => "*".to_owned(),
                PrincipalEntry::TenantRoot(t) => format!("root:{t}"),
                PrincipalEntry::Nrn(n) => n.to_string(),
            })
            .collect();
        keys.sort();
        (p.negated, keys)
    })
}

/// Whether `t`'s actions and resources include all of `s`'s (`ts` and `ss` their catalogued
/// actions). Resource coverage is checked soundly but not completely: `t` covers an entry of `s`
/// when it is `*`, the same pattern, or `<literal>*` with `s` starting with that literal.
fn covers(t: &Statement, ts: &[bool], s: &Statement, ss: &[bool]) -> bool {
    if t.actions.negated || s.actions.negated || t.resources.negated || s.resources.negated {
        return false;
    }
    if principal_key(t) != principal_key(s) || !ss.iter().any(|&on| on) {
        return false;
    }
    if ss.iter().zip(ts).any(|(&in_s, &in_t)| in_s && !in_t) {
        return false;
    }
    s.resources.patterns.iter().all(|sp| {
        t.resources.patterns.iter().any(|tp| {
            tp.is_match_all()
                || tp.as_str() == sp.as_str()
                || tp.literal_then_star().is_some_and(|prefix| sp.literal_prefix().0.starts_with(&prefix))
        })
    })
}

/// Another statement that makes statement `i` redundant. When two unconditional statements cover
/// each other, only the later one is reported.
fn covering_statement<'p>(policy: &'p CompiledPolicy, covered: &[Vec<bool>], i: usize) -> Option<&'p Statement> {
    let s = &policy.statements[i];
    policy.statements.iter().enumerate().find_map(|(j, t)| {
        let candidate = j != i && t.effect == s.effect && t.conditions.is_empty();
        let covering = candidate && covers(t, &covered[j], s, &covered[i]);
        let mutual = s.conditions.is_empty() && covering && covers(s, &covered[i], t, &covered[j]);
        (covering && !(mutual && i < j)).then_some(t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_wildcards_ignore_escapes_and_variables() {
        assert!(has_bare_wildcard("a*"));
        assert!(has_bare_wildcard("a?b"));
        assert!(!has_bare_wildcard("a${*}b${?}"));
        assert!(!has_bare_wildcard("${nimbus:username}"));
        assert!(!has_bare_wildcard("$5"));
        assert!(has_bare_wildcard("${nimbus:username}*"));
    }
}
