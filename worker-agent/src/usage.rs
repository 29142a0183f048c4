//! What an invocation leaves for billing and logs: its [`UsageRecord`] and its stderr as
//! [`LogLine`]s (each at most [`MAX_LOG_LINE`] bytes, cut and marked beyond; a marker line when
//! the runtime cut the log at its bound).

use chrono::{DateTime, Utc};
use nimbus_protocol::{Assignment, LogLine, MAX_LOG_LINE, UsageRecord, UsageStatus, billed_ms};
use uuid::Uuid;

use crate::runtime::{FailureReason, Outcome};

/// Appended to a line cut at [`MAX_LOG_LINE`].
pub const CUT_MARK: &str = " [cut]";
/// The last line of a log the runtime cut at its bound.
pub const TRUNCATED_MARK: &str = "[log truncated]";

/// The usage status of a failure reason.
pub fn status(failure: Option<FailureReason>) -> UsageStatus {
    match failure {
        None => UsageStatus::Ok,
        Some(FailureReason::Timeout) => UsageStatus::Timeout,
        Some(FailureReason::MemoryLimit) => UsageStatus::MemoryLimit,
        Some(FailureReason::Crash) => UsageStatus::Crash,
        Some(FailureReason::ExitCode) => UsageStatus::ExitCode,
        Some(FailureReason::ResponseTooLarge) => UsageStatus::ResponseTooLarge,
        Some(FailureReason::InvalidResponse) => UsageStatus::InvalidResponse,
        Some(FailureReason::StartFailed) => UsageStatus::StartFailed,
    }
}

/// The usage record of one invocation of `a` that started at `started_at`.
pub fn record(a: &Assignment, invocation_id: Uuid, started_at: DateTime<Utc>, outcome: &Outcome) -> UsageRecord {
    let duration_us = u64::try_from(outcome.duration.as_micros()).unwrap_or(u64::MAX);
    UsageRecord {
        invocation_id,
        tenant_id: a.tenant_id,
        function_id: a.function_id,
        version_id: a.version_id,
        version: a.version,
        started_at,
        duration_us,
        billed_ms: billed_ms(duration_us),
        memory_mb: a.memory_mb,
        http_status: outcome.response.status,
        status: status(outcome.response.failure),
        cold_start: outcome.cold_start,
    }
}

/// Cuts `line` to at most [`MAX_LOG_LINE`] bytes on a character boundary, marking a cut.
fn bounded(line: &str) -> String {
    if line.len() <= MAX_LOG_LINE {
        return line.to_owned();
    }
    let mut end = MAX_LOG_LINE - CUT_MARK.len();
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT_MARK}", &line[..end])
}

/// The log lines of a stderr: split at newlines (a trailing `\r` is dropped, invalid UTF-8
/// replaced), numbered from 0, stamped with the invocation's end.
pub fn log_lines(
    a: &Assignment,
    invocation_id: Uuid,
    time: DateTime<Utc>,
    stderr: &[u8],
    truncated: bool,
) -> Vec<LogLine> {
    let mut pieces: Vec<&[u8]> = stderr.split(|b| *b == b'\n').collect();
    // A final newline ends the last line; it does not start an empty one.
    if pieces.last().is_some_and(|p| p.is_empty()) {
        pieces.pop();
    }
    let mut lines: Vec<String> =
        pieces.into_iter().map(|p| bounded(&String::from_utf8_lossy(p.strip_suffix(b"\r").unwrap_or(p)))).collect();
    if truncated {
        lines.push(TRUNCATED_MARK.to_owned());
    }
    lines
        .into_iter()
        .enumerate()
        .map(|(seq, line)| LogLine {
            invocation_id,
            tenant_id: a.tenant_id,
            function_id: a.function_id,
            version: a.version,
            seq: u32::try_from(seq).unwrap_or(u32::MAX),
            time,
            line,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use nimbus_protocol::{PackageFormat, PackageRef, Runtime};

    use super::*;
    use crate::runtime::Response;

    pub(crate) fn assignment() -> Assignment {
        Assignment {
            version_id: Uuid::now_v7(),
            tenant_id: Uuid::now_v7(),
            function_id: Uuid::now_v7(),
            function: "f".into(),
            version: 3,
            runtime: Runtime::Wasm,
            entry: None,
            package: PackageRef { sha256: "00".into(), size: 1, format: PackageFormat::Wasm, url: "http://x".into() },
            memory_mb: 128,
            timeout_ms: 1000,
            concurrency: 1,
            instances: 1,
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn stderr_becomes_numbered_bounded_lines() {
        let a = assignment();
        let id = Uuid::now_v7();
        let long = "é".repeat(MAX_LOG_LINE);
        let stderr = format!("one\r\ntwo\n\n{long}\nlast");
        let lines = log_lines(&a, id, Utc::now(), stderr.as_bytes(), true);
        let text: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(text[..3], ["one", "two", ""]);
        assert!(text[3].len() <= MAX_LOG_LINE && text[3].ends_with(CUT_MARK));
        assert_eq!(text[4..], ["last", TRUNCATED_MARK]);
        assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5]);
        assert!(log_lines(&a, id, Utc::now(), b"", false).is_empty());
        assert_eq!(log_lines(&a, id, Utc::now(), b"x\n", false).len(), 1);
    }

    #[test]
    fn records_bill_whole_milliseconds_and_name_the_failure() {
        let a = assignment();
        let outcome = Outcome {
            response: Response::failed(FailureReason::Timeout, "slow"),
            log: Vec::new(),
            log_truncated: false,
            cold_start: true,
            duration: Duration::from_micros(1500),
        };
        let r = record(&a, Uuid::now_v7(), Utc::now(), &outcome);
        assert_eq!((r.duration_us, r.billed_ms, r.http_status), (1500, 2, 504));
        assert_eq!(r.status, UsageStatus::Timeout);
        assert!(r.cold_start);
        assert_eq!((r.memory_mb, r.version), (128, 3));
    }
}
