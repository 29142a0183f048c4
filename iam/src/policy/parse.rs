//! Walking a document's JSON into compiled statements, recording every error with its path
//! rather than stopping at the first, so that an editor can show them all at once.

use std::sync::Arc;

use super::{
    MAX_DOCUMENT_BYTES, MAX_ENTRIES, MAX_PATTERN_BYTES, MAX_STATEMENTS, Patterns, PolicyKind, PrincipalEntry,
    Principals, Statement, StatementEffect, VERSION,
    error::{Errors, PolicyError, Rule, field, index},
    json::{self, Json},
};
use crate::{condition::compile_block, glob::Pattern, nrn};

/// The compiled document's `Id` and statements, or every error found.
pub(super) fn compile(text: &str, kind: PolicyKind) -> Result<(Option<String>, Vec<Statement>), Vec<PolicyError>> {
    let mut errors = Errors::default();
    if text.len() > MAX_DOCUMENT_BYTES {
        errors.push(
            "",
            Rule::TooLarge,
            format!("the document has {} bytes, more than {MAX_DOCUMENT_BYTES}", text.len()),
        );
        return Err(errors.0);
    }
    let doc = match json::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            errors.push("", Rule::Json, e.to_string());
            return Err(errors.0);
        }
    };
    let Json::Object(fields) = &doc else {
        errors.push("", Rule::WrongType, format!("a policy must be a JSON object, not {}", doc.kind()));
        return Err(errors.0);
    };
    let (mut version, mut doc_id, mut statement) = (None, None, None);
    for (name, value) in fields {
        match name.as_str() {
            "Version" => version = Some(value),
            "Id" => doc_id = Some(value),
            "Statement" => statement = Some(value),
            _ => errors.push(
                name,
                Rule::UnknownField,
                format!("`{name}` is not a policy field (Version, Id, Statement)"),
            ),
        }
    }
    match version {
        None => errors.push("Version", Rule::Missing, format!("Version is required: \"{VERSION}\"")),
        Some(Json::String(v)) if v == VERSION => {}
        Some(v) => errors.push("Version", Rule::Version, format!("Version must be \"{VERSION}\", not {}", show(v))),
    }
    let doc_id = match doc_id {
        None => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(v) => {
            errors.push("Id", Rule::WrongType, format!("Id must be a string, not {}", v.kind()));
            None
        }
    };
    let statements: Vec<(String, &Json)> = match statement {
        None => {
            errors.push("Statement", Rule::Missing, "Statement is required");
            Vec::new()
        }
        Some(Json::Array(items)) if items.is_empty() => {
            errors.push("Statement", Rule::Empty, "Statement needs at least one statement");
            Vec::new()
        }
        Some(Json::Array(items)) => items.iter().enumerate().map(|(i, s)| (index("Statement", i), s)).collect(),
        Some(s @ Json::Object(_)) => vec![("Statement".to_owned(), s)],
        Some(v) => {
            errors.push(
                "Statement",
                Rule::WrongType,
                format!("Statement must be an object or an array, not {}", v.kind()),
            );
            Vec::new()
        }
    };
    if statements.len() > MAX_STATEMENTS {
        errors.push("Statement", Rule::TooMany, format!("{} statements, more than {MAX_STATEMENTS}", statements.len()));
        return Err(errors.0);
    }
    let mut out = Vec::with_capacity(statements.len());
    let mut sids: Vec<String> = Vec::new();
    for (path, value) in statements {
        if let Some(s) = statement_of(value, &path, kind, &mut sids, &mut errors) {
            out.push(s);
        }
    }
    if errors.0.is_empty() { Ok((doc_id, out)) } else { Err(errors.0) }
}

/// A value as it appears in a message: strings quoted, others by kind.
fn show(v: &Json) -> String {
    match v {
        Json::String(s) => format!("\"{s}\""),
        other => other.kind().to_owned(),
    }
}

fn statement_of(
    value: &Json,
    path: &str,
    kind: PolicyKind,
    sids: &mut Vec<String>,
    errors: &mut Errors,
) -> Option<Statement> {
    let Json::Object(fields) = value else {
        errors.push(path, Rule::WrongType, format!("a statement must be an object, not {}", value.kind()));
        return None;
    };
    let before = errors.0.len();
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    for (name, _) in fields {
        const KNOWN: &[&str] = &[
            "Sid",
            "Effect",
            "Action",
            "NotAction",
            "Resource",
            "NotResource",
            "Principal",
            "NotPrincipal",
            "Condition",
        ];
        if !KNOWN.contains(&name.as_str()) {
            errors.push(&field(path, name), Rule::UnknownField, format!("`{name}` is not a statement field"));
        }
    }
    let sid = match get("Sid") {
        None => None,
        Some(Json::String(s)) => {
            let p = field(path, "Sid");
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
                errors.push(&p, Rule::Sid, format!("Sid `{s}` must be ASCII letters and digits"));
            } else if sids.contains(s) {
                errors.push(&p, Rule::Sid, format!("Sid `{s}` is used by another statement"));
            } else {
                sids.push(s.clone());
            }
            Some(Arc::<str>::from(s.as_str()))
        }
        Some(v) => {
            errors.push(&field(path, "Sid"), Rule::WrongType, format!("Sid must be a string, not {}", v.kind()));
            None
        }
    };
    let effect = match get("Effect") {
        None => {
            errors.push(&field(path, "Effect"), Rule::Missing, "Effect is required: \"Allow\" or \"Deny\"");
            None
        }
        Some(Json::String(s)) if s == "Allow" => Some(StatementEffect::Allow),
        Some(Json::String(s)) if s == "Deny" => Some(StatementEffect::Deny),
        Some(v) => {
            errors.push(
                &field(path, "Effect"),
                Rule::Effect,
                format!("Effect must be \"Allow\" or \"Deny\", not {}", show(v)),
            );
            None
        }
    };
    let actions = pair(path, ("Action", get("Action")), ("NotAction", get("NotAction")), errors, |s, p, e| {
        action_pattern(s, p, e)
    });
    let resources =
        pair(path, ("Resource", get("Resource")), ("NotResource", get("NotResource")), errors, |s, p, e| {
            nrn::parse_pattern(s).map_err(|err| e.push(p, Rule::Resource, err.to_string())).ok()
        });
    let principals = principals_of(path, kind, get("Principal"), get("NotPrincipal"), errors);
    let conditions = match get("Condition") {
        Some(block) => compile_block(block, &field(path, "Condition"), errors),
        None => Vec::new(),
    };
    if errors.0.len() > before {
        return None;
    }
    Some(Statement {
        sid,
        effect: effect?,
        actions: actions?,
        resources: resources?,
        principals,
        conditions,
        path: path.into(),
    })
}

/// Compiles exactly one of `Action`/`NotAction` (or `Resource`/`NotResource`).
fn pair(
    path: &str,
    (name, plain): (&str, Option<&Json>),
    (not_name, not): (&str, Option<&Json>),
    errors: &mut Errors,
    compile: impl Fn(&str, &str, &mut Errors) -> Option<Pattern>,
) -> Option<Patterns> {
    let (negated, value, name) = match (plain, not) {
        (Some(_), Some(_)) => {
            errors.push(path, Rule::Conflict, format!("a statement has {name} or {not_name}, not both"));
            return None;
        }
        (None, None) => {
            errors.push(&field(path, name), Rule::Missing, format!("a statement needs {name} or {not_name}"));
            return None;
        }
        (Some(v), None) => (false, v, name),
        (None, Some(v)) => (true, v, not_name),
    };
    let element = field(path, name);
    let entries = strings(value, &element, errors)?;
    let listed = matches!(value, Json::Array(_));
    let mut patterns = Vec::with_capacity(entries.len());
    for (p, s) in entries {
        if s.len() > MAX_PATTERN_BYTES {
            errors.push(&p, Rule::TooMany, format!("{} bytes, more than {MAX_PATTERN_BYTES}", s.len()));
        } else if let Some(pattern) = compile(s, &p, errors) {
            patterns.push(pattern);
        }
    }
    Some(Patterns { negated, patterns, listed })
}

/// A string, or a non-empty array of strings, with each entry's path.
fn strings<'j>(value: &'j Json, path: &str, errors: &mut Errors) -> Option<Vec<(String, &'j str)>> {
    match value {
        Json::String(s) => Some(vec![(path.to_owned(), s.as_str())]),
        Json::Array(items) if items.is_empty() => {
            errors.push(path, Rule::Empty, "needs at least one entry");
            None
        }
        Json::Array(items) if items.len() > MAX_ENTRIES => {
            errors.push(path, Rule::TooMany, format!("{} entries, more than {MAX_ENTRIES}", items.len()));
            None
        }
        Json::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item {
                    Json::String(s) => out.push((index(path, i), s.as_str())),
                    other => {
                        errors.push(&index(path, i), Rule::WrongType, format!("must be a string, not {}", other.kind()))
                    }
                }
            }
            (out.len() == items.len()).then_some(out)
        }
        other => {
            errors.push(
                path,
                Rule::WrongType,
                format!("must be a string or an array of strings, not {}", other.kind()),
            );
            None
        }
    }
}

/// `*`, or `<service>:<name>` with `*`/`?` anywhere; lowercased, as actions match without case.
fn action_pattern(s: &str, path: &str, errors: &mut Errors) -> Option<Pattern> {
    let ok = s == "*"
        || s.split_once(':').is_some_and(|(service, name)| {
            !service.is_empty()
                && !name.is_empty()
                && service.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '*' | '?'))
                && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '?'))
        });
    if !ok {
        errors.push(path, Rule::Action, format!("`{s}` is not an action: write `<service>:<Action>` or `*`"));
        return None;
    }
    Some(Pattern::new(&s.to_ascii_lowercase()))
}

fn principals_of(
    path: &str,
    kind: PolicyKind,
    plain: Option<&Json>,
    not: Option<&Json>,
    errors: &mut Errors,
) -> Option<Principals> {
    if kind != PolicyKind::Resource {
        for (name, v) in [("Principal", plain), ("NotPrincipal", not)] {
            if v.is_some() {
                let message = format!("{name} is only allowed in resource policies, not in a {} policy", kind.as_str());
                errors.push(&field(path, name), Rule::PrincipalNotAllowed, message);
            }
        }
        return None;
    }
    let (negated, value, name) = match (plain, not) {
        (Some(_), Some(_)) => {
            errors.push(path, Rule::Conflict, "a statement has Principal or NotPrincipal, not both");
            return None;
        }
        (None, None) => {
            errors.push(
                &field(path, "Principal"),
                Rule::PrincipalRequired,
                "a resource policy statement needs Principal",
            );
            return None;
        }
        (Some(v), None) => (false, v, "Principal"),
        (None, Some(v)) => (true, v, "NotPrincipal"),
    };
    let element = field(path, name);
    let entries: Vec<(String, &str)> = match value {
        Json::String(s) if s == "*" => vec![(element.clone(), "*")],
        Json::Object(fields) => {
            let mut out = Vec::new();
            for (k, v) in fields {
                if k == "Nimbus" {
                    out.extend(strings(v, &field(&element, k), errors)?);
                } else {
                    let message = format!("`{k}` is not a principal type: write {{\"Nimbus\": <principal NRN>}}");
                    errors.push(&field(&element, k), Rule::Principal, message);
                }
            }
            if fields.is_empty() {
                errors.push(&element, Rule::Empty, "names no principal");
            }
            out
        }
        other => {
            let message = format!("must be \"*\" or {{\"Nimbus\": <principal NRN>}}, not {}", show(other));
            errors.push(&element, Rule::Principal, message);
            return None;
        }
    };
    let mut out = Vec::with_capacity(entries.len());
    for (p, s) in entries {
        match principal_entry(s) {
            Ok(e) => out.push(e),
            Err(message) => errors.push(&p, Rule::Principal, message),
        }
    }
    Some(Principals { negated, entries: out })
}

fn principal_entry(s: &str) -> Result<PrincipalEntry, String> {
    if s == "*" {
        return Ok(PrincipalEntry::Any);
    }
    if s.contains("${") {
        return Err(format!("`{s}`: a principal cannot use policy variables"));
    }
    nrn::parse_pattern(s).map_err(|e| e.to_string())?;
    let parts: Vec<&str> = s.splitn(5, ':').collect();
    if parts[2] != "iam" {
        return Err(format!("`{s}` is not a principal: principals are in the `iam` service"));
    }
    let resource = parts[4];
    if resource == "root" {
        if parts[3].is_empty() {
            return Err(format!("`{s}`: a tenant root names its tenant"));
        }
        return Ok(PrincipalEntry::TenantRoot(Pattern::new(parts[3])));
    }
    match resource.split_once('/') {
        Some(("user" | "role" | "api-key", _)) => Ok(PrincipalEntry::Nrn(Pattern::new(s))),
        Some(("group", _)) => Err(format!("`{s}`: a group is not a principal; name its users or the tenant root")),
        _ => Err(format!("`{s}` is not a principal: write a user/, role/ or api-key/ NRN, or <tenant>:root")),
    }
}
