//! Nimbus resource names, `nrn:nimbus:<service>:<tenant>:<type>/<path>`: parsing with errors that
//! name the wrong part, the pattern form policies use, and a builder for every resource shape.
//!
//! The tenant part is empty for resources outside any tenant (users as accounts, worker nodes,
//! join tokens, pools). Principals are names in the `iam` service: `user/<id>`, `role/<name>`,
//! `api-key/<prefix>`, and `root` for a whole tenant (`nrn:nimbus:iam:<tenant>:root`).

use std::fmt::{self, Display};

use crate::glob::Pattern;

/// The prefix of every resource name.
pub const PREFIX: &str = "nrn:nimbus:";

/// What is wrong with a resource name, naming the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NrnError {
    /// Fewer than the five `:`-separated parts.
    #[error("`{0}` has {1} of the 5 parts of nrn:nimbus:<service>:<tenant>:<type>/<path>")]
    MissingParts(String, usize),
    /// The first part is not `nrn`.
    #[error("`{0}` does not start with `nrn:`")]
    Prefix(String),
    /// The second part is not `nimbus`.
    #[error("`{0}`: the partition must be `nimbus`")]
    Partition(String),
    /// The service is empty or not lowercase letters, digits and `-`.
    #[error("`{0}`: the service `{1}` must be lowercase letters, digits and `-`")]
    Service(String, String),
    /// The tenant has characters a tenant id cannot have.
    #[error("`{0}`: the tenant `{1}` must be empty or letters, digits, `-` and `_`")]
    Tenant(String, String),
    /// The resource is not `<type>/<path>` (or `root`).
    #[error("`{0}`: the resource `{1}` must be `<type>/<path>` with a lowercase type, or `root`")]
    Resource(String, String),
    /// A policy variable in the name is malformed.
    #[error("`{0}`: {1}")]
    Variable(String, crate::glob::VariableError),
}

/// A parsed resource name. The path may contain `*` as text: requests for "every function"
/// name `function/*`, which only a policy pattern that matches the `*` character allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Nrn {
    text: String,
    service: (usize, usize),
    tenant: (usize, usize),
    resource: (usize, usize),
}

impl Nrn {
    /// Parses a concrete resource name.
    pub fn parse(s: &str) -> Result<Nrn, NrnError> {
        let parts = split(s);
        check_parts(s, &parts, false)?;
        let offset = |p: &str| p.as_ptr() as usize - s.as_ptr() as usize;
        let range = |p: &str| (offset(p), offset(p) + p.len());
        Ok(Nrn { text: s.to_owned(), service: range(parts[2]), tenant: range(parts[3]), resource: range(parts[4]) })
    }

    /// The whole name.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The service, e.g. `functions`.
    pub fn service(&self) -> &str {
        &self.text[self.service.0..self.service.1]
    }

    /// The tenant, `None` for resources outside any tenant.
    pub fn tenant(&self) -> Option<&str> {
        Some(&self.text[self.tenant.0..self.tenant.1]).filter(|t| !t.is_empty())
    }

    /// The resource type, e.g. `function` (`root` for a tenant root).
    pub fn resource_type(&self) -> &str {
        let r = &self.text[self.resource.0..self.resource.1];
        r.split_once('/').map_or(r, |(t, _)| t)
    }

    /// The path after the type, e.g. `hello/version/3`.
    pub fn path(&self) -> Option<&str> {
        self.text[self.resource.0..self.resource.1].split_once('/').map(|(_, p)| p)
    }
}

impl Display for Nrn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for Nrn {
    type Err = NrnError;
    fn from_str(s: &str) -> Result<Nrn, NrnError> {
        Nrn::parse(s)
    }
}

/// Checks a resource pattern as policies write it: `*` alone, or the five parts where any part
/// may contain `*`, `?` and policy variables (a part without them is checked as in [`Nrn::parse`]).
/// Returns the compiled pattern.
pub fn parse_pattern(s: &str) -> Result<Pattern, NrnError> {
    if s == "*" {
        return Ok(Pattern::new("*"));
    }
    let parts = split(s);
    check_parts(s, &parts, true)?;
    Pattern::with_vars(s).map_err(|e| NrnError::Variable(s.to_owned(), e))
}

/// Splits at `:` outside `${...}` into at most five parts (the last keeps its `:`s).
fn split(s: &str) -> Vec<&str> {
    let mut parts = Vec::with_capacity(5);
    let (mut start, mut depth) = (0, false);
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() && parts.len() < 4 {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => depth = true,
            b'}' => depth = false,
            b':' if !depth => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

fn is_free(part: &str) -> bool {
    part.contains(['*', '?']) || part.contains("${")
}

fn check_parts(s: &str, parts: &[&str], pattern: bool) -> Result<(), NrnError> {
    if parts.len() < 5 {
        return Err(NrnError::MissingParts(s.to_owned(), parts.len()));
    }
    let free = |p: &str| pattern && is_free(p);
    if parts[0] != "nrn" && !free(parts[0]) {
        return Err(NrnError::Prefix(s.to_owned()));
    }
    if parts[1] != "nimbus" && !free(parts[1]) {
        return Err(NrnError::Partition(s.to_owned()));
    }
    let service_ok = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if !free(parts[2]) && !service_ok(parts[2]) {
        return Err(NrnError::Service(s.to_owned(), parts[2].to_owned()));
    }
    if !free(parts[3]) && !parts[3].chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(NrnError::Tenant(s.to_owned(), parts[3].to_owned()));
    }
    let resource = parts[4];
    let type_ok =
        |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let resource_ok = match resource.split_once('/') {
        _ if free(resource) => true,
        None => resource == "root",
        Some((t, path)) => type_ok(t) && !path.is_empty() && !path.chars().any(char::is_control),
    };
    if !resource_ok {
        return Err(NrnError::Resource(s.to_owned(), resource.to_owned()));
    }
    Ok(())
}

/// A tenant.
pub fn tenant(t: impl Display) -> String {
    format!("nrn:nimbus:tenants:{t}:tenant/{t}")
}
/// A member of a tenant, or every member with `*`.
pub fn member(t: impl Display, user: impl Display) -> String {
    format!("nrn:nimbus:tenants:{t}:member/{user}")
}
/// An API key (by prefix) as a resource and as a principal, or every key with `*`.
pub fn api_key(t: impl Display, key: &str) -> String {
    format!("nrn:nimbus:iam:{t}:api-key/{key}")
}
/// A tenant's audit log.
pub fn audit_log(t: impl Display) -> String {
    format!("nrn:nimbus:audit:{t}:audit-log/*")
}
/// A function, or every function with `*`.
pub fn function(t: impl Display, name: &str) -> String {
    format!("nrn:nimbus:functions:{t}:function/{name}")
}
/// A version of a function, or every version with `*`.
pub fn version(t: impl Display, function: &str, version: impl Display) -> String {
    format!("nrn:nimbus:functions:{t}:function/{function}/version/{version}")
}
/// An alias of a function, or every alias with `*`.
pub fn alias(t: impl Display, function: &str, alias: &str) -> String {
    format!("nrn:nimbus:functions:{t}:function/{function}/alias/{alias}")
}
/// A code package of a function, or every package with `*`.
pub fn package(t: impl Display, function: &str, package: impl Display) -> String {
    format!("nrn:nimbus:functions:{t}:function/{function}/package/{package}")
}
/// A function's logs.
pub fn logs(t: impl Display, function: &str) -> String {
    format!("nrn:nimbus:functions:{t}:function/{function}/logs")
}
/// A user as an account, outside any tenant.
pub fn user(u: impl Display) -> String {
    format!("nrn:nimbus:iam::user/{u}")
}
/// A user as a principal (and IAM resource) in a tenant.
pub fn tenant_user(t: impl Display, u: impl Display) -> String {
    format!("nrn:nimbus:iam:{t}:user/{u}")
}
/// A whole tenant as a principal: in a resource policy it stands for every principal there.
pub fn tenant_root(t: impl Display) -> String {
    format!("nrn:nimbus:iam:{t}:root")
}
/// A customer-managed policy, or every policy with `*`.
pub fn policy(t: impl Display, name: &str) -> String {
    format!("nrn:nimbus:iam:{t}:policy/{name}")
}
/// A group, or every group with `*`.
pub fn group(t: impl Display, name: &str) -> String {
    format!("nrn:nimbus:iam:{t}:group/{name}")
}
/// A role, or every role with `*`.
pub fn role(t: impl Display, name: &str) -> String {
    format!("nrn:nimbus:iam:{t}:role/{name}")
}
/// A tenant's usage records.
pub fn usage(t: impl Display) -> String {
    format!("nrn:nimbus:billing:{t}:usage/*")
}
/// An invoice, or every invoice with `*`.
pub fn invoice(t: impl Display, id: impl Display) -> String {
    format!("nrn:nimbus:billing:{t}:invoice/{id}")
}
/// A tenant's billing settings.
pub fn billing_settings(t: impl Display) -> String {
    format!("nrn:nimbus:billing:{t}:billing-settings/default")
}
/// A worker node (a platform resource, outside any tenant), or every node with `*`.
pub fn node(node: impl Display) -> String {
    format!("nrn:nimbus:nodes::node/{node}")
}
/// A join token, or every token with `*`.
pub fn join_token(token: impl Display) -> String {
    format!("nrn:nimbus:nodes::join-token/{token}")
}
/// A pool of nodes (the value of their `pool` label), or every pool with `*`.
pub fn pool(pool: &str) -> String {
    format!("nrn:nimbus:nodes::pool/{pool}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0190f2c4-7d1e-7000-8000-000000000001";

    #[test]
    fn parses_every_builder_shape() {
        for s in [
            tenant(T),
            member(T, "*"),
            api_key(T, "nk_ab12"),
            audit_log(T),
            function(T, "hello"),
            version(T, "hello", 3),
            alias(T, "hello", "live"),
            package(T, "hello", "*"),
            logs(T, "hello"),
            user("u1"),
            tenant_user(T, "u1"),
            tenant_root(T),
            policy(T, "ops"),
            group(T, "devs"),
            role(T, "deploy"),
            usage(T),
            invoice(T, "2026-01"),
            billing_settings(T),
            node("n1"),
            join_token("*"),
            pool("spot"),
        ] {
            let n = Nrn::parse(&s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(n.as_str(), s);
        }
    }

    #[test]
    fn exposes_the_parts() {
        let n = Nrn::parse(&version(T, "hello", 3)).unwrap();
        assert_eq!((n.service(), n.tenant(), n.resource_type()), ("functions", Some(T), "function"));
        assert_eq!(n.path(), Some("hello/version/3"));
        let n = Nrn::parse(&node("n1")).unwrap();
        assert_eq!((n.tenant(), n.resource_type(), n.path()), (None, "node", Some("n1")));
        let n = Nrn::parse(&tenant_root(T)).unwrap();
        assert_eq!((n.resource_type(), n.path()), ("root", None));
    }

    #[test]
    fn errors_name_the_wrong_part() {
        let err = |s: &str| Nrn::parse(s).unwrap_err();
        assert!(matches!(err("nrn:nimbus:functions"), NrnError::MissingParts(_, 3)));
        assert!(matches!(err("arn:nimbus:functions:t:function/x"), NrnError::Prefix(_)));
        assert!(matches!(err("nrn:aws:functions:t:function/x"), NrnError::Partition(_)));
        assert!(matches!(err("nrn:nimbus:Functions:t:function/x"), NrnError::Service(..)));
        assert!(matches!(err("nrn:nimbus::t:function/x"), NrnError::Service(..)));
        assert!(matches!(err("nrn:nimbus:functions:t t:function/x"), NrnError::Tenant(..)));
        assert!(matches!(err("nrn:nimbus:functions:t:function"), NrnError::Resource(..)));
        assert!(matches!(err("nrn:nimbus:functions:t:function/"), NrnError::Resource(..)));
        assert!(matches!(err("nrn:nimbus:functions:t:Function/x"), NrnError::Resource(..)));
        // Concrete names take no wildcards outside the path.
        assert!(matches!(err("nrn:nimbus:func*:t:function/x"), NrnError::Service(..)));
        assert!(err("nrn:nimbus:functions:t:function").to_string().contains("resource `function`"));
    }

    #[test]
    fn patterns_allow_wildcards_and_variables_anywhere() {
        for ok in [
            "*",
            "nrn:nimbus:*:*:*",
            "nrn:nimbus:func*:t:function/*",
            "nrn:nimbus:functions:${nimbus:TenantId}:function/${nimbus:username}-*",
            "nrn:nimbus:functions:?:function/a",
            "nrn:nimbus:iam:t:root",
        ] {
            parse_pattern(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(matches!(parse_pattern("nrn:nimbus:*"), Err(NrnError::MissingParts(_, 3))));
        assert!(matches!(parse_pattern("nrn:nimbus:Functions:*:*"), Err(NrnError::Service(..))));
        assert!(matches!(parse_pattern("nrn:nimbus:functions:*:${x"), Err(NrnError::Variable(..))));
        let p = parse_pattern("nrn:nimbus:functions:${nimbus:TenantId}:function/*").unwrap();
        assert!(p.has_vars());
    }
}
