//! The request context: the condition keys a request carries and the time it is made at.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

const CURRENT_TIME: &str = "nimbus:currenttime";
const EPOCH_TIME: &str = "nimbus:epochtime";

/// A condition key's value in a request: one string, or several for multi-valued keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextValue {
    /// A single value.
    One(String),
    /// Several values (possibly none) for a multi-valued key such as `nimbus:TagKeys`.
    Many(Vec<String>),
}

impl From<&str> for ContextValue {
    fn from(s: &str) -> Self {
        ContextValue::One(s.to_owned())
    }
}

impl From<String> for ContextValue {
    fn from(s: String) -> Self {
        ContextValue::One(s)
    }
}

impl From<bool> for ContextValue {
    fn from(b: bool) -> Self {
        ContextValue::One(b.to_string())
    }
}

impl From<Vec<String>> for ContextValue {
    fn from(v: Vec<String>) -> Self {
        ContextValue::Many(v)
    }
}

impl From<&[&str]> for ContextValue {
    fn from(v: &[&str]) -> Self {
        ContextValue::Many(v.iter().map(|s| (*s).to_owned()).collect())
    }
}

/// A borrowed view of a key's values, whichever way they are stored.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl<'a> Values<'a> {
    /// Iterates the values.
    pub(crate) fn iter(self) -> impl Iterator<Item = &'a str> {
        let (one, many) = match self {
            Values::One(s) => (Some(s), &[][..]),
            Values::Many(v) => (None, v),
        };
        one.into_iter().chain(many.iter().map(String::as_str))
    }

    /// Whether there is no value at all (an empty multi-valued key counts as absent).
    pub(crate) fn is_empty(self) -> bool {
        matches!(self, Values::Many(v) if v.is_empty())
    }

    /// The value when there is exactly one, as policy variables need.
    pub(crate) fn single(self) -> Option<&'a str> {
        match self {
            Values::One(s) => Some(s),
            Values::Many(_) => None,
        }
    }
}

/// The condition keys of one request. Key names are case-insensitive (stored lowercased), values
/// are case-sensitive. The time is always known: [`Context::new`] takes it and derives
/// `nimbus:CurrentTime` (RFC 3339) and `nimbus:EpochTime` (seconds) from it, for string
/// operators and variables; date operators on those keys use the time itself. [`Context::insert`]
/// ignores the two keys, so that the strings and the time cannot disagree: use
/// [`Context::set_now`].
///
/// `nimbus:PrincipalNrn`, `nimbus:PrincipalType` and `nimbus:TenantId` are not read from here:
/// the evaluator derives them from the request's principal, so a context cannot contradict it.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    now: DateTime<Utc>,
    values: BTreeMap<String, ContextValue>,
}

impl Context {
    /// A context for a request made at `now`, with no other keys.
    pub fn new(now: DateTime<Utc>) -> Context {
        let mut ctx = Context { now, values: BTreeMap::new() };
        ctx.set_now(now);
        ctx
    }

    /// Changes the time of the request, with the keys derived from it.
    pub fn set_now(&mut self, now: DateTime<Utc>) -> &mut Context {
        self.now = now;
        let text = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        self.values.insert(CURRENT_TIME.to_owned(), ContextValue::One(text));
        self.values.insert(EPOCH_TIME.to_owned(), ContextValue::One(now.timestamp().to_string()));
        self
    }

    /// The time of the request.
    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Sets a key (its name case-insensitively), replacing any value it had.
    pub fn insert(&mut self, key: &str, value: impl Into<ContextValue>) -> &mut Context {
        let key = key.to_ascii_lowercase();
        if key != CURRENT_TIME && key != EPOCH_TIME {
            self.values.insert(key, value.into());
        }
        self
    }

    /// [`Context::insert`], by value, for building a context in one expression.
    pub fn with(mut self, key: &str, value: impl Into<ContextValue>) -> Context {
        self.insert(key, value);
        self
    }

    /// Removes a key (not the time keys).
    pub fn remove(&mut self, key: &str) -> Option<ContextValue> {
        let key = key.to_ascii_lowercase();
        if key == CURRENT_TIME || key == EPOCH_TIME { None } else { self.values.remove(&key) }
    }

    /// A key's value, looked up case-insensitively.
    pub fn get(&self, key: &str) -> Option<&ContextValue> {
        if key.bytes().any(|b| b.is_ascii_uppercase()) {
            self.values.get(&key.to_ascii_lowercase())
        } else {
            self.values.get(key)
        }
    }

    /// A key's values by its lowercased name, as compiled policies hold it.
    pub(crate) fn get_lower(&self, key: &str) -> Option<Values<'_>> {
        self.values.get(key).map(|v| match v {
            ContextValue::One(s) => Values::One(s),
            ContextValue::Many(v) => Values::Many(v),
        })
    }

    /// The keys set, lowercased, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_case_insensitive_and_the_time_keys_follow_now() {
        let now: DateTime<Utc> = "2026-06-01T12:00:00Z".parse().unwrap();
        let mut ctx = Context::new(now).with("nimbus:PrincipalTag/Team", "Blue");
        assert_eq!(ctx.get("NIMBUS:principaltag/team"), Some(&ContextValue::from("Blue")));
        assert_eq!(ctx.get("nimbus:CurrentTime"), Some(&ContextValue::from("2026-06-01T12:00:00Z")));
        assert_eq!(ctx.get("nimbus:EpochTime"), Some(&ContextValue::from("1780315200")));
        // The time keys cannot be set apart from the time itself.
        ctx.insert("nimbus:CurrentTime", "1999-01-01T00:00:00Z");
        assert!(ctx.remove("nimbus:EpochTime").is_none());
        assert_eq!(ctx.get("nimbus:currenttime"), Some(&ContextValue::from("2026-06-01T12:00:00Z")));
        ctx.set_now("2027-01-01T00:00:00Z".parse().unwrap());
        assert_eq!(ctx.get("nimbus:EpochTime"), Some(&ContextValue::from("1798761600")));
        assert_eq!(
            ctx.keys().collect::<Vec<_>>(),
            ["nimbus:currenttime", "nimbus:epochtime", "nimbus:principaltag/team"]
        );
    }
}
