//! Compiling a `Condition` block: operators resolved, keys lowercased, values parsed as the
//! operator needs them (patterns, numbers, instants, CIDR ranges), so evaluation parses nothing
//! of the policy.

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use ipnet::IpNet;

use super::{CiValue, Condition, Operator as O, OperatorName, Values, parse_bool};
use crate::{
    glob::Pattern,
    policy::{
        MAX_CONDITION_VALUES,
        error::{Errors, Rule, field, index},
        json::Json,
    },
};

/// Compiles `{operator: {key: value | [values]}}` at `path`, recording every error.
pub(crate) fn compile_block(block: &Json, path: &str, errors: &mut Errors) -> Vec<Condition> {
    let Json::Object(ops) = block else {
        errors.push(path, Rule::WrongType, format!("Condition must be an object, not {}", block.kind()));
        return Vec::new();
    };
    let mut out = Vec::new();
    for (op_name, keys) in ops {
        let op_path = field(path, op_name);
        let Some(op) = OperatorName::parse(op_name) else {
            errors.push(&op_path, Rule::Operator, format!("`{op_name}` is not a condition operator"));
            continue;
        };
        let Json::Object(keys) = keys else {
            errors.push(&op_path, Rule::WrongType, format!("must be an object of keys, not {}", keys.kind()));
            continue;
        };
        if keys.is_empty() {
            errors.push(&op_path, Rule::Empty, "names no condition key");
        }
        for (key, value) in keys {
            let key_path = field(&op_path, key);
            if !valid_key(key) {
                errors.push(
                    &key_path,
                    Rule::ConditionKey,
                    format!("`{key}` is not a condition key (`<service>:<Name>`)"),
                );
                continue;
            }
            if let Some(c) = compile_one(op, key, value, &key_path, errors) {
                out.push(c);
            }
        }
    }
    out
}

/// A condition key's syntax: `<prefix>:<name>`, tag families with a `/`.
fn valid_key(key: &str) -> bool {
    key.split_once(':').is_some_and(|(prefix, name)| {
        !prefix.is_empty()
            && !name.is_empty()
            && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.' | ':' | '@' | '+' | '='))
    })
}

fn compile_one(op: OperatorName, key: &str, value: &Json, path: &str, errors: &mut Errors) -> Option<Condition> {
    let items: Vec<(String, &Json)> = match value {
        Json::Array(vs) if vs.is_empty() => {
            errors.push(path, Rule::Empty, "needs at least one value");
            return None;
        }
        Json::Array(vs) => vs.iter().enumerate().map(|(i, v)| (index(path, i), v)).collect(),
        v => vec![(path.to_owned(), v)],
    };
    if items.len() > MAX_CONDITION_VALUES {
        errors.push(path, Rule::TooMany, format!("has {} values, more than {MAX_CONDITION_VALUES}", items.len()));
        return None;
    }
    let before = errors.0.len();
    let mut raw = Vec::with_capacity(items.len());
    for (p, v) in &items {
        match v {
            Json::String(s) => raw.push(s.clone()),
            Json::Number(n) => raw.push(n.to_string()),
            Json::Bool(b) => raw.push(b.to_string()),
            other => errors.push(
                p,
                Rule::WrongType,
                format!("a condition value must be a string, number or boolean, not {}", other.kind()),
            ),
        }
    }
    if errors.0.len() > before {
        return None;
    }
    let paths = items.iter().map(|(p, _)| p.as_str());
    let values = compile_values(op.op, &raw, paths, errors)?;
    if errors.0.len() > before {
        return None;
    }
    Some(Condition { op, key_name: key.into(), key: key.to_ascii_lowercase().into(), values, raw, path: path.into() })
}

fn compile_values<'p>(
    op: O,
    raw: &[String],
    paths: impl Iterator<Item = &'p str>,
    errors: &mut Errors,
) -> Option<Values> {
    let pairs = raw.iter().zip(paths);
    let bad = |errors: &mut Errors, p: &str, what: &str, v: &str| {
        errors.push(p, Rule::Value, format!("`{v}` is not {what}, as {} needs", op.name()));
    };
    Some(match op {
        O::StringEquals | O::StringNotEquals | O::StringLike | O::StringNotLike => {
            let like = matches!(op, O::StringLike | O::StringNotLike);
            let mut out = Vec::new();
            for (v, p) in pairs {
                let compiled = if like { Pattern::with_vars(v) } else { Pattern::literal_with_vars(v) };
                match compiled {
                    Ok(pattern) => out.push(pattern),
                    Err(e) => errors.push(p, Rule::Variable, e.to_string()),
                }
            }
            Values::Str(out)
        }
        O::StringEqualsIgnoreCase | O::StringNotEqualsIgnoreCase => {
            let mut out = Vec::new();
            for (v, p) in pairs {
                match Pattern::literal_with_vars(v) {
                    Ok(pattern) if pattern.has_vars() => out.push(CiValue::Vars(pattern)),
                    Ok(pattern) => {
                        // Escapes such as `${*}` are already resolved in the rendered text.
                        let text = pattern.render(&crate::glob::NoVars).unwrap_or_default();
                        out.push(CiValue::Plain(text.to_lowercase().into()));
                    }
                    Err(e) => errors.push(p, Rule::Variable, e.to_string()),
                }
            }
            Values::IgnoreCase(out)
        }
        O::NumericEquals
        | O::NumericNotEquals
        | O::NumericLessThan
        | O::NumericLessThanEquals
        | O::NumericGreaterThan
        | O::NumericGreaterThanEquals => {
            let mut out = Vec::new();
            for (v, p) in pairs {
                match v.trim().parse::<f64>() {
                    Ok(n) if n.is_finite() => out.push(n),
                    _ => bad(errors, p, "a number", v),
                }
            }
            Values::Num(out)
        }
        O::DateEquals
        | O::DateNotEquals
        | O::DateLessThan
        | O::DateLessThanEquals
        | O::DateGreaterThan
        | O::DateGreaterThanEquals => {
            let mut out = Vec::new();
            for (v, p) in pairs {
                match parse_date(v) {
                    Some(t) => out.push(t),
                    None => bad(errors, p, "an ISO 8601 date or epoch seconds", v),
                }
            }
            Values::Date(out)
        }
        O::Bool => {
            let mut out = Vec::new();
            for (v, p) in pairs {
                match parse_bool(v) {
                    Some(b) => out.push(b),
                    None => bad(errors, p, "true or false", v),
                }
            }
            Values::Bool(out)
        }
        O::IpAddress | O::NotIpAddress => {
            let mut out = Vec::new();
            for (v, p) in pairs {
                match parse_net(v) {
                    Some(n) => out.push(n),
                    None => bad(errors, p, "a CIDR range or an IP address", v),
                }
            }
            Values::Ip(out)
        }
        O::Null => {
            let mut pairs = pairs;
            let (v, p) = pairs.next()?;
            if raw.len() > 1 {
                errors.push(p, Rule::Value, "Null takes exactly one value, true or false");
                return None;
            }
            match parse_bool(v) {
                Some(b) => Values::Null(b),
                None => {
                    bad(errors, p, "true or false", v);
                    return None;
                }
            }
        }
    })
}

/// A CIDR range, or a bare address as its own /32 or /128. IPv4-mapped IPv6 ranges are not
/// rewritten: write IPv4 ranges in IPv4 form.
fn parse_net(v: &str) -> Option<IpNet> {
    let v = v.trim();
    if let Ok(net) = v.parse::<IpNet>() {
        return Some(net.trunc());
    }
    v.parse::<std::net::IpAddr>().ok().map(IpNet::from)
}

/// An instant in milliseconds since the epoch: integer epoch seconds, RFC 3339 (`2026-01-01T00:00:00Z`,
/// with any offset), a date-time without an offset (UTC), or a date (UTC midnight).
pub(crate) fn parse_date(v: &str) -> Option<i64> {
    let v = v.trim();
    if !v.is_empty() && v.strip_prefix('-').unwrap_or(v).bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<i64>().ok()?.checked_mul(1000);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Some(t.timestamp_millis());
    }
    if let Ok(t) = NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc().timestamp_millis());
    }
    NaiveDate::parse_from_str(v, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_every_accepted_form() {
        assert_eq!(parse_date("0"), Some(0));
        assert_eq!(parse_date("1767225600"), Some(1_767_225_600_000));
        assert_eq!(parse_date("2026-01-01T00:00:00Z"), Some(1_767_225_600_000));
        assert_eq!(parse_date("2026-01-01T01:00:00+01:00"), Some(1_767_225_600_000));
        assert_eq!(parse_date("2026-01-01T00:00:00"), Some(1_767_225_600_000));
        assert_eq!(parse_date("2026-01-01"), Some(1_767_225_600_000));
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("tomorrow"), None);
        assert_eq!(parse_date(""), None);
    }

    #[test]
    fn networks_and_bare_addresses() {
        assert!(parse_net("10.0.0.0/8").unwrap().contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(parse_net("10.1.2.3").unwrap().prefix_len(), 32);
        assert_eq!(parse_net("2001:db8::1").unwrap().prefix_len(), 128);
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_net("10.0.0.0/33").is_none());
        assert!(parse_net("not-an-ip").is_none());
    }
}
