//! Condition operators and their evaluation, with AWS semantics.
//!
//! - Several operators in a `Condition` block, and several keys under one operator, are ANDed.
//! - Several values for one key are ORed; for a negated operator (`StringNotEquals`,
//!   `NotIpAddress`, ...) they are NORed: the context value must match none of them.
//! - A key absent from the request makes the condition false, except for negated operators
//!   (true), `...IfExists` (true), and `ForAllValues:` (true on an absent or empty key);
//!   `ForAnyValue:` on an absent key is false. `Null: {key: true}` is true iff the key is absent.
//! - A value that cannot be used never makes a condition true: a policy value whose variable
//!   cannot be resolved matches nothing, and makes a negated operator false; so does a context
//!   value that is not a number, date, IP address or boolean where the operator needs one.

mod compile;

use std::net::IpAddr;

use ipnet::IpNet;

pub(crate) use compile::{compile_block, parse_date as parse_date_value};

use crate::{catalogue::KeyType, eval::Env, glob::Pattern};

/// A condition operator without its qualifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// Exact, case-sensitive string equality.
    StringEquals,
    /// Negated [`Operator::StringEquals`].
    StringNotEquals,
    /// String equality ignoring case.
    StringEqualsIgnoreCase,
    /// Negated [`Operator::StringEqualsIgnoreCase`].
    StringNotEqualsIgnoreCase,
    /// Case-sensitive match with `*` and `?` wildcards.
    StringLike,
    /// Negated [`Operator::StringLike`].
    StringNotLike,
    /// Numeric equality.
    NumericEquals,
    /// Negated [`Operator::NumericEquals`].
    NumericNotEquals,
    /// The context value is less than the policy value.
    NumericLessThan,
    /// The context value is at most the policy value.
    NumericLessThanEquals,
    /// The context value is greater than the policy value.
    NumericGreaterThan,
    /// The context value is at least the policy value.
    NumericGreaterThanEquals,
    /// The same instant.
    DateEquals,
    /// Negated [`Operator::DateEquals`].
    DateNotEquals,
    /// The context instant is before the policy instant.
    DateLessThan,
    /// The context instant is not after the policy instant.
    DateLessThanEquals,
    /// The context instant is after the policy instant.
    DateGreaterThan,
    /// The context instant is not before the policy instant.
    DateGreaterThanEquals,
    /// Boolean equality (`true`/`false`, case-insensitive).
    Bool,
    /// The address is in one of the CIDR ranges (a bare address is a /32 or /128).
    IpAddress,
    /// Negated [`Operator::IpAddress`].
    NotIpAddress,
    /// `true`: the key is absent; `false`: it is present.
    Null,
}

use Operator as O;

impl Operator {
    /// Every operator.
    pub const ALL: &'static [Operator] = &[
        O::StringEquals,
        O::StringNotEquals,
        O::StringEqualsIgnoreCase,
        O::StringNotEqualsIgnoreCase,
        O::StringLike,
        O::StringNotLike,
        O::NumericEquals,
        O::NumericNotEquals,
        O::NumericLessThan,
        O::NumericLessThanEquals,
        O::NumericGreaterThan,
        O::NumericGreaterThanEquals,
        O::DateEquals,
        O::DateNotEquals,
        O::DateLessThan,
        O::DateLessThanEquals,
        O::DateGreaterThan,
        O::DateGreaterThanEquals,
        O::Bool,
        O::IpAddress,
        O::NotIpAddress,
        O::Null,
    ];

    /// The name as policies write it.
    pub fn name(self) -> &'static str {
        match self {
            O::StringEquals => "StringEquals",
            O::StringNotEquals => "StringNotEquals",
            O::StringEqualsIgnoreCase => "StringEqualsIgnoreCase",
            O::StringNotEqualsIgnoreCase => "StringNotEqualsIgnoreCase",
            O::StringLike => "StringLike",
            O::StringNotLike => "StringNotLike",
            O::NumericEquals => "NumericEquals",
            O::NumericNotEquals => "NumericNotEquals",
            O::NumericLessThan => "NumericLessThan",
            O::NumericLessThanEquals => "NumericLessThanEquals",
            O::NumericGreaterThan => "NumericGreaterThan",
            O::NumericGreaterThanEquals => "NumericGreaterThanEquals",
            O::DateEquals => "DateEquals",
            O::DateNotEquals => "DateNotEquals",
            O::DateLessThan => "DateLessThan",
            O::DateLessThanEquals => "DateLessThanEquals",
            O::DateGreaterThan => "DateGreaterThan",
            O::DateGreaterThanEquals => "DateGreaterThanEquals",
            O::Bool => "Bool",
            O::IpAddress => "IpAddress",
            O::NotIpAddress => "NotIpAddress",
            O::Null => "Null",
        }
    }

    /// Whether the operator is negated: true when the context value matches none of the values.
    pub fn is_negated(self) -> bool {
        matches!(
            self,
            O::StringNotEquals
                | O::StringNotEqualsIgnoreCase
                | O::StringNotLike
                | O::NumericNotEquals
                | O::DateNotEquals
                | O::NotIpAddress
        )
    }

    /// The key type the operator compares as (`None` for `Null` and the string operators, which
    /// fit any key).
    pub fn key_type(self) -> Option<KeyType> {
        match self {
            O::NumericEquals
            | O::NumericNotEquals
            | O::NumericLessThan
            | O::NumericLessThanEquals
            | O::NumericGreaterThan
            | O::NumericGreaterThanEquals => Some(KeyType::Numeric),
            O::DateEquals
            | O::DateNotEquals
            | O::DateLessThan
            | O::DateLessThanEquals
            | O::DateGreaterThan
            | O::DateGreaterThanEquals => Some(KeyType::Date),
            O::Bool => Some(KeyType::Bool),
            O::IpAddress | O::NotIpAddress => Some(KeyType::Ip),
            _ => None,
        }
    }

    /// Whether the operator compares strings exactly (where `*` in a value is probably a
    /// mistake for the `Like` form).
    pub fn is_exact_string(self) -> bool {
        matches!(self, O::StringEquals | O::StringNotEquals | O::StringEqualsIgnoreCase | O::StringNotEqualsIgnoreCase)
    }
}

/// How a condition treats a multi-valued key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qualifier {
    /// No prefix: some context value must match (for negated operators: none may).
    Single,
    /// `ForAnyValue:`: some context value must match; false when the key is absent or empty.
    ForAnyValue,
    /// `ForAllValues:`: every context value must match; true when the key is absent or empty.
    ForAllValues,
}

/// A full operator name: qualifier, operator and `IfExists`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OperatorName {
    /// `ForAnyValue:`/`ForAllValues:` or neither.
    pub qualifier: Qualifier,
    /// The operator.
    pub op: Operator,
    /// `...IfExists`: true when the key is absent.
    pub if_exists: bool,
}

impl OperatorName {
    /// Parses a name such as `ForAllValues:StringLikeIfExists` (case-sensitive, as AWS).
    /// `Null` takes neither qualifier nor `IfExists`.
    pub fn parse(s: &str) -> Option<OperatorName> {
        let (qualifier, rest) = if let Some(r) = s.strip_prefix("ForAnyValue:") {
            (Qualifier::ForAnyValue, r)
        } else if let Some(r) = s.strip_prefix("ForAllValues:") {
            (Qualifier::ForAllValues, r)
        } else {
            (Qualifier::Single, s)
        };
        let (base, if_exists) = match rest.strip_suffix("IfExists") {
            Some(b) => (b, true),
            None => (rest, false),
        };
        let op = *Operator::ALL.iter().find(|o| o.name() == base)?;
        if op == O::Null && (if_exists || qualifier != Qualifier::Single) {
            return None;
        }
        Some(OperatorName { qualifier, op, if_exists })
    }
}

/// A case-insensitive string value: lowercased when literal, a pattern to render otherwise.
#[derive(Debug, Clone)]
pub(crate) enum CiValue {
    Plain(Box<str>),
    Vars(Pattern),
}

/// A condition's values, parsed once for its operator.
#[derive(Debug, Clone)]
pub(crate) enum Values {
    /// Exact (literal patterns) or `Like` (wildcard patterns) string values.
    Str(Vec<Pattern>),
    IgnoreCase(Vec<CiValue>),
    Num(Vec<f64>),
    /// Milliseconds since the epoch.
    Date(Vec<i64>),
    Bool(Vec<bool>),
    Ip(Vec<IpNet>),
    /// `true`: the key must be absent.
    Null(bool),
}

/// One compiled condition: an operator on one key.
#[derive(Debug, Clone)]
pub(crate) struct Condition {
    pub(crate) op: OperatorName,
    /// The key as written, for findings.
    pub(crate) key_name: Box<str>,
    /// Lowercased, as contexts store keys.
    pub(crate) key: Box<str>,
    pub(crate) values: Values,
    /// The values as written, for findings.
    pub(crate) raw: Vec<String>,
    /// Where the key is in the document, for findings.
    pub(crate) path: Box<str>,
}

impl Condition {
    /// Evaluates the condition for a request.
    pub(crate) fn holds(&self, env: &Env<'_>) -> bool {
        let found = env.lookup(&self.key);
        if let Values::Null(absent) = self.values {
            return found.is_none_or(|v| v.is_empty()) == absent;
        }
        let Some(values) = found.filter(|v| !v.is_empty()) else {
            return self.op.if_exists
                || match self.op.qualifier {
                    Qualifier::ForAllValues => true,
                    Qualifier::ForAnyValue => false,
                    Qualifier::Single => self.op.op.is_negated(),
                };
        };
        let negated = self.op.op.is_negated();
        // For a negated operator, a context value "passes" when it matches none of the values.
        let passes = |v: &str| {
            let m = self.any_value_matches(v, env);
            if negated { m == Some(false) } else { m == Some(true) }
        };
        match (self.op.qualifier, negated) {
            (Qualifier::Single, true) | (Qualifier::ForAllValues, _) => values.iter().all(passes),
            (Qualifier::Single, false) | (Qualifier::ForAnyValue, _) => values.iter().any(passes),
        }
    }

    /// Whether one context value matches any of the values under the operator's positive form;
    /// `None` when it matches none and some value (or the context value) could not be used.
    fn any_value_matches(&self, v: &str, env: &Env<'_>) -> Option<bool> {
        let mut unusable = false;
        let mut fold = |m: Option<bool>| match m {
            Some(true) => true,
            Some(false) => false,
            None => {
                unusable = true;
                false
            }
        };
        let op = self.op.op;
        let hit = match &self.values {
            Values::Str(ps) => ps.iter().any(|p| fold(p.matches_with(v, false, env))),
            Values::IgnoreCase(vs) => vs.iter().any(|c| {
                fold(match c {
                    CiValue::Plain(s) => Some(eq_lowercase(v, s)),
                    CiValue::Vars(p) => p.render(env).map(|r| eq_lowercase(v, &r.to_lowercase())),
                })
            }),
            Values::Num(ns) => match v.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => ns.iter().any(|&n| compare(op, x.total_cmp(&n))),
                _ => return None,
            },
            Values::Date(ds) => match env.instant(&self.key, v) {
                Some(t) => ds.iter().any(|&d| compare(op, t.cmp(&d))),
                None => return None,
            },
            Values::Bool(bs) => match parse_bool(v) {
                Some(b) => bs.contains(&b),
                None => return None,
            },
            Values::Ip(nets) => match v.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = unmap(ip);
                    nets.iter().any(|n| n.contains(&ip))
                }
                Err(_) => return None,
            },
            Values::Null(_) => unreachable!("Null is decided before values are compared"),
        };
        if hit {
            Some(true)
        } else if unusable {
            None
        } else {
            Some(false)
        }
    }
}

/// Whether `v` lowercased equals `lower` (already lowercase), without allocating.
fn eq_lowercase(v: &str, lower: &str) -> bool {
    v.chars().flat_map(char::to_lowercase).eq(lower.chars())
}

/// Whether an ordering satisfies a numeric or date operator's positive form.
fn compare(op: Operator, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        O::NumericEquals | O::NumericNotEquals | O::DateEquals | O::DateNotEquals => ord == Equal,
        O::NumericLessThan | O::DateLessThan => ord == Less,
        O::NumericLessThanEquals | O::DateLessThanEquals => ord != Greater,
        O::NumericGreaterThan | O::DateGreaterThan => ord == Greater,
        O::NumericGreaterThanEquals | O::DateGreaterThanEquals => ord != Less,
        _ => false,
    }
}

pub(crate) fn parse_bool(v: &str) -> Option<bool> {
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`) compares as the IPv4 address, so that a
/// dual-stack listener's peer addresses still fall in IPv4 ranges.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_names_parse_with_qualifiers() {
        let p = OperatorName::parse("ForAllValues:StringLikeIfExists").unwrap();
        assert_eq!((p.qualifier, p.op, p.if_exists), (Qualifier::ForAllValues, O::StringLike, true));
        assert_eq!(OperatorName::parse("Null").unwrap().op, O::Null);
        assert!(OperatorName::parse("NullIfExists").is_none());
        assert!(OperatorName::parse("ForAnyValue:Null").is_none());
        assert!(OperatorName::parse("stringequals").is_none());
        assert!(OperatorName::parse("StringEqualz").is_none());
        assert!(OperatorName::parse("ForSomeValues:StringEquals").is_none());
        for op in Operator::ALL {
            assert_eq!(OperatorName::parse(op.name()).unwrap().op, *op);
        }
    }

    #[test]
    fn compare_and_helpers() {
        assert!(eq_lowercase("ÄbC", "äbc"));
        assert!(!eq_lowercase("abcd", "abc"));
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(unmap("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
