//! The crate's integration tests, in one binary: evaluation semantics as a table, validation
//! errors and findings, and the managed policies against the whole catalogue.

mod eval;
mod managed;
mod validate;

use chrono::{DateTime, Utc};

/// The time every test request is made at.
pub fn now() -> DateTime<Utc> {
    "2026-06-01T12:00:00Z".parse().expect("a valid time")
}

/// A document of one or more statements (an object or an array, as JSON text).
pub fn doc(statements: &str) -> String {
    format!(r#"{{"Version": "2012-10-17", "Statement": {statements}}}"#)
}
