//! Alias routing: the routing configuration of an alias (weighted versions, sticky routing,
//! header rules), its validation, and the pure decision function the gateway will call for
//! every invocation: `(config, request key, headers) -> version`.
//!
//! The decision is deterministic in its inputs. The gateway chooses the key: with sticky routing
//! a key from the request (so the same caller keeps its version through a rollout), otherwise the
//! invocation id (so requests spread by weight). The key is hashed into one of 10,000 buckets,
//! and weights (whole percent) own contiguous bucket ranges in the order they are listed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::FieldError;

/// Header that pins a request to one of the alias's versions.
pub const PIN_HEADER: &str = "x-nimbus-version";
/// Most versions one alias routes to at once.
pub const MAX_VERSIONS: usize = 8;
/// Most header rules on one alias.
pub const MAX_HEADER_RULES: usize = 16;
/// Longest header name in a rule.
pub const MAX_HEADER_NAME: usize = 64;
/// Longest header value in a rule.
pub const MAX_HEADER_VALUE: usize = 256;
const BUCKETS: u64 = 10_000;

/// A version and the share of traffic it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedVersion {
    /// Version number.
    pub version: u32,
    /// Percent of requests, 1–100; the weights of an alias sum to 100.
    pub weight: u8,
}

/// Requests whose header `header` equals `value` go to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    /// Header name (case-insensitive; stored lowercase).
    pub header: String,
    /// Exact value to match.
    pub value: String,
    /// Version to route to.
    pub version: u32,
}

/// How an alias routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Versions and weights, in bucket order.
    pub weights: Vec<WeightedVersion>,
    /// Keep a caller on the same version (the gateway keys on the request's sticky key).
    #[serde(default)]
    pub sticky: bool,
    /// Header rules, checked in order before the weights.
    #[serde(default)]
    pub header_rules: Vec<HeaderRule>,
}

/// Why a version was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The request pinned it with `x-nimbus-version`.
    Pinned,
    /// Header rule number `n` (0-based) matched.
    Rule(usize),
    /// By weight.
    Weighted,
}

/// The routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The version to invoke.
    pub version: u32,
    /// Why.
    pub reason: Reason,
}

impl RoutingConfig {
    /// Routes everything to one version.
    pub fn single(version: u32) -> Self {
        RoutingConfig { weights: vec![WeightedVersion { version, weight: 100 }], sticky: false, header_rules: vec![] }
    }

    /// Checks the rules of a routing configuration; every problem is named by its field.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errors = Vec::new();
        if self.weights.is_empty() {
            errors.push(FieldError::new("weights", "required", "must name at least one version"));
        }
        if self.weights.len() > MAX_VERSIONS {
            errors.push(FieldError::new("weights", "max_items", format!("at most {MAX_VERSIONS} versions")));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, w) in self.weights.iter().enumerate() {
            if w.version == 0 {
                errors.push(FieldError::new(format!("weights[{i}].version"), "range", "versions start at 1"));
            }
            if !(1..=100).contains(&w.weight) {
                errors.push(FieldError::new(format!("weights[{i}].weight"), "range", "must be between 1 and 100"));
            }
            if !seen.insert(w.version) {
                errors.push(FieldError::new(format!("weights[{i}].version"), "unique", "each version may appear once"));
            }
        }
        let sum: u32 = self.weights.iter().map(|w| u32::from(w.weight)).sum();
        if !self.weights.is_empty() && sum != 100 {
            errors.push(FieldError::new("weights", "sum", format!("weights must sum to 100, not {sum}")));
        }
        if self.header_rules.len() > MAX_HEADER_RULES {
            errors.push(FieldError::new("header_rules", "max_items", format!("at most {MAX_HEADER_RULES} rules")));
        }
        for (i, r) in self.header_rules.iter().enumerate() {
            let token = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
            if r.header.is_empty() || r.header.len() > MAX_HEADER_NAME || !r.header.chars().all(token) {
                errors.push(FieldError::new(
                    format!("header_rules[{i}].header"),
                    "format",
                    format!("must be a lowercase header name of 1-{MAX_HEADER_NAME} characters (a-z, 0-9, -, _)"),
                ));
            }
            if r.header == PIN_HEADER {
                errors.push(FieldError::new(
                    format!("header_rules[{i}].header"),
                    "reserved",
                    format!("{PIN_HEADER} is reserved for pinning a version"),
                ));
            }
            if r.value.len() > MAX_HEADER_VALUE || r.value.chars().any(char::is_control) {
                errors.push(FieldError::new(
                    format!("header_rules[{i}].value"),
                    "format",
                    format!("must be at most {MAX_HEADER_VALUE} characters without control characters"),
                ));
            }
            if r.version == 0 {
                errors.push(FieldError::new(format!("header_rules[{i}].version"), "range", "versions start at 1"));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    /// Every version the alias can route to (weights and rule targets).
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.weights.iter().map(|w| w.version).chain(self.header_rules.iter().map(|r| r.version))
    }

    /// Chooses the version for one request. `header` looks a header up by lowercase name.
    /// A `x-nimbus-version` pin counts only for a version this alias routes to, so an alias
    /// cannot be used to reach versions it does not serve.
    pub fn decide<'h>(&self, key: &[u8], header: impl Fn(&str) -> Option<&'h str>) -> Decision {
        if let Some(pinned) = header(PIN_HEADER).and_then(|v| v.trim().parse::<u32>().ok()) {
            if self.versions().any(|v| v == pinned) {
                return Decision { version: pinned, reason: Reason::Pinned };
            }
        }
        for (i, rule) in self.header_rules.iter().enumerate() {
            if header(&rule.header) == Some(rule.value.as_str()) {
                return Decision { version: rule.version, reason: Reason::Rule(i) };
            }
        }
        let bucket = bucket(key);
        let mut upper = 0;
        for w in &self.weights {
            upper += u64::from(w.weight) * (BUCKETS / 100);
            if bucket < upper {
                return Decision { version: w.version, reason: Reason::Weighted };
            }
        }
        // Only reachable with weights that do not sum to 100 (an unvalidated config): fall back
        // to the last version rather than fail a request.
        Decision { version: self.weights.last().map_or(0, |w| w.version), reason: Reason::Weighted }
    }
}

/// The key's bucket in `0..BUCKETS`, from the first 8 bytes of its SHA-256: stable across
/// processes, versions and machines, so every gateway replica decides alike.
fn bucket(key: &[u8]) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first) % BUCKETS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(weights: &[(u32, u8)]) -> RoutingConfig {
        RoutingConfig {
            weights: weights.iter().map(|&(version, weight)| WeightedVersion { version, weight }).collect(),
            sticky: false,
            header_rules: vec![],
        }
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    #[test]
    fn weights_split_traffic_within_one_percent() {
        let check = |weights: &[(u32, u8)]| {
            let c = config(weights);
            let n = 100_000u32;
            let mut counts = std::collections::HashMap::new();
            for i in 0..n {
                *counts.entry(c.decide(i.to_string().as_bytes(), no_headers).version).or_insert(0u32) += 1;
            }
            for &(version, weight) in weights {
                let share = f64::from(counts.get(&version).copied().unwrap_or(0)) / f64::from(n) * 100.0;
                assert!((share - f64::from(weight)).abs() <= 1.0, "{weights:?}: v{version} got {share:.2}%");
            }
        };
        check(&[(1, 90), (2, 10)]);
        check(&[(1, 50), (2, 50)]);
        check(&[(3, 1), (4, 99)]);
        check(&[(1, 34), (2, 33), (3, 33)]);
    }

    #[test]
    fn the_same_key_always_gets_the_same_version() {
        let c = config(&[(1, 50), (2, 50)]);
        for key in ["alice", "bob", "carol", ""] {
            let first = c.decide(key.as_bytes(), no_headers);
            for _ in 0..10 {
                assert_eq!(c.decide(key.as_bytes(), no_headers), first);
            }
        }
        // Growing the new version's share only moves keys towards it (buckets are contiguous).
        let before = config(&[(2, 10), (1, 90)]);
        let after = config(&[(2, 30), (1, 70)]);
        for i in 0..10_000u32 {
            let k = i.to_string();
            if before.decide(k.as_bytes(), no_headers).version == 2 {
                assert_eq!(after.decide(k.as_bytes(), no_headers).version, 2, "key {k} moved back");
            }
        }
    }

    #[test]
    fn pins_and_header_rules_come_before_weights() {
        let mut c = config(&[(1, 90), (2, 10)]);
        c.header_rules = vec![
            HeaderRule { header: "x-beta".into(), value: "yes".into(), version: 2 },
            HeaderRule { header: "x-canary-group".into(), value: "internal".into(), version: 3 },
        ];
        let decide = |headers: &[(&'static str, &'static str)]| {
            c.decide(b"k", |name| headers.iter().find(|(h, _)| *h == name).map(|(_, v)| *v))
        };
        let check = |headers: &[(&'static str, &'static str)], version: u32, reason: Reason| {
            assert_eq!(decide(headers), Decision { version, reason }, "{headers:?}");
        };
        check(&[("x-nimbus-version", "2")], 2, Reason::Pinned);
        check(&[("x-nimbus-version", " 3 ")], 3, Reason::Pinned);
        check(&[("x-beta", "yes")], 2, Reason::Rule(0));
        check(&[("x-canary-group", "internal"), ("x-beta", "yes")], 2, Reason::Rule(0));
        check(&[("x-canary-group", "internal")], 3, Reason::Rule(1));
        check(&[("x-beta", "YES")], decide(&[]).version, Reason::Weighted);
        // A pin to a version the alias does not serve is ignored.
        check(&[("x-nimbus-version", "7")], decide(&[]).version, Reason::Weighted);
        check(&[("x-nimbus-version", "two")], decide(&[]).version, Reason::Weighted);
    }

    #[test]
    fn validation_names_each_broken_rule() {
        let fields = |c: RoutingConfig| -> Vec<(String, String)> {
            c.validate().err().unwrap_or_default().into_iter().map(|e| (e.field, e.rule)).collect()
        };
        let pair = |f: &str, r: &str| (f.to_owned(), r.to_owned());
        assert!(config(&[(1, 100)]).validate().is_ok());
        assert!(config(&[(1, 90), (2, 10)]).validate().is_ok());
        assert_eq!(fields(config(&[])), [pair("weights", "required")]);
        assert_eq!(fields(config(&[(1, 90), (2, 5)])), [pair("weights", "sum")]);
        assert_eq!(fields(config(&[(1, 50), (1, 50)])), [pair("weights[1].version", "unique")]);
        assert_eq!(fields(config(&[(0, 100)])), [pair("weights[0].version", "range")]);
        assert_eq!(fields(config(&[(1, 0), (2, 100)])), [pair("weights[0].weight", "range")]);
        let nine: Vec<(u32, u8)> = (1..=9).map(|v| (v, if v == 1 { 92 } else { 1 })).collect();
        assert_eq!(fields(config(&nine)), [pair("weights", "max_items")]);
        let mut c = config(&[(1, 100)]);
        c.header_rules = vec![
            HeaderRule { header: "X-Beta".into(), value: "yes".into(), version: 1 },
            HeaderRule { header: "x-nimbus-version".into(), value: "1".into(), version: 1 },
            HeaderRule { header: "x-ok".into(), value: "a\nb".into(), version: 0 },
        ];
        assert_eq!(
            fields(c),
            [
                pair("header_rules[0].header", "format"),
                pair("header_rules[1].header", "reserved"),
                pair("header_rules[2].value", "format"),
                pair("header_rules[2].version", "range"),
            ]
        );
    }

    #[test]
    fn configs_deserialize_strictly() {
        let c: RoutingConfig =
            serde_json::from_str(r#"{"weights":[{"version":1,"weight":90},{"version":2,"weight":10}],"sticky":true}"#)
                .unwrap();
        assert!(c.sticky && c.header_rules.is_empty());
        assert!(serde_json::from_str::<RoutingConfig>(r#"{"weights":[],"extra":1}"#).is_err());
        assert_eq!(
            RoutingConfig::single(4).decide(b"any", no_headers),
            Decision { version: 4, reason: Reason::Weighted }
        );
    }
}
