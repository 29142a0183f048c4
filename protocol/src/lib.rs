//! The agent protocol (DESIGN §5): the JSON documents a worker agent and the control plane
//! exchange. Every call is agent-initiated (agents work behind NAT) except invocations, which the
//! gateway sends to the agent's own listener. Both sides build against these types; nothing here
//! does I/O.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `POST /agent/v1/join` | [`JoinRequest`] (join token inside) | 201 [`JoinResponse`] |
//! | `POST /agent/v1/renew` | — | 200 [`Credential`] |
//! | `GET /agent/v1/desired-state?after=R&wait=S` | — | 200 [`DesiredState`] (waits up to `S` s for a revision above `R`) |
//! | `POST /agent/v1/reports` | [`Report`] (heartbeat + metrics) | 204 |
//! | `POST /agent/v1/usage` | [`UsageBatch`] | 200 [`UsageAck`] |
//! | `GET /agent/v1/code/{sha256}` | — | the package bytes (local store) |
//! | `POST /agent/v1/leave` | — | 204 |
//!
//! Every call but `join` carries `Authorization: Bearer <node credential>`.
//! The gateway calls the agent at `{invoke_url}/invoke/{version_id}[/{path}]` with
//! `Authorization: Bearer <invoke secret>`; the agent answers with the function's response and the
//! headers [`HEADER_INVOCATION_ID`] and [`HEADER_COLD_START`] (and [`HEADER_ERROR`] on failure).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Response header: the invocation's id (also accepted on the request, so the gateway can fix it).
pub const HEADER_INVOCATION_ID: &str = "x-nimbus-invocation-id";
/// Response header: `true` when the invocation had to start an instance first.
pub const HEADER_COLD_START: &str = "x-nimbus-cold-start";
/// Response header: the machine-readable reason of a failed invocation.
pub const HEADER_ERROR: &str = "x-nimbus-error";
/// Request header from the gateway: the invocation's credential for its function's execution
/// role, which the agent hands the function as `NIMBUS_TOKEN` (and never as an `HTTP_*`
/// variable). Callers cannot send it: the gateway forwards none of their `x-nimbus-*` headers.
pub const HEADER_CREDENTIAL: &str = "x-nimbus-credential";

/// Longest node name (a DNS label).
pub const MAX_NODE_NAME: usize = 63;
/// Most usage records in one batch.
pub const MAX_USAGE_RECORDS: usize = 5_000;
/// Most log lines in one batch.
pub const MAX_LOG_LINES: usize = 20_000;
/// Longest log line kept, bytes (longer lines are cut and marked).
pub const MAX_LOG_LINE: usize = 4_096;
/// Longest a desired-state long-poll may wait, seconds.
pub const MAX_WAIT_SECONDS: u64 = 30;

/// Upper bounds (inclusive, milliseconds) of the latency histogram buckets; one more bucket
/// counts everything slower than the last bound.
pub const LATENCY_BUCKETS_MS: [f64; 14] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0];

/// The bucket a latency falls into (an index into a histogram of `LATENCY_BUCKETS_MS.len() + 1`).
pub fn latency_bucket(ms: f64) -> usize {
    LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// What a node offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Memory for functions, MiB.
    pub memory_mb: u64,
    /// CPU for functions, thousandths of a core.
    pub cpu_millis: u32,
    /// Instances that can be warm at once.
    pub instance_slots: u32,
}

/// `POST /agent/v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join token a platform admin created.
    pub token: String,
    /// The node's name (a DNS label, unique). Joining again under the name of a node that left,
    /// went silent or was removed takes that node over (new credential, same id); the name of a
    /// node that is reporting is refused (409 `node_name_taken`).
    pub name: String,
    /// Its zone (a DNS label).
    pub zone: String,
    /// What it offers.
    pub capacity: Capacity,
    /// Where the gateway reaches its invocation listener (`http(s)://host:port`).
    pub invoke_url: String,
    /// Labels the node carries (`pool=spot`, `accelerator=gpu`, ...), which placement rules
    /// match. Stored at every join, replacing what the node had (an admin may change them in
    /// between). Keys: 1–63 letters, digits, `.`, `_`, `-`, `/`; values: 0–63 without `/`; both
    /// start with a letter or digit; at most 32.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A node credential: short-lived, renewed through `POST /agent/v1/renew` before it expires.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// The bearer token (`nnc_...`).
    pub token: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// The node's id.
    pub node_id: Uuid,
    /// Its credential.
    pub credential: Credential,
    /// The secret the gateway presents to the node's invocation listener.
    pub invoke_secret: String,
    /// How often the agent reports, milliseconds.
    pub report_interval_ms: u64,
}

/// The runtime of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// WebAssembly (WASI preview 1) on wasmtime.
    Wasm,
    /// A native executable from the package.
    Process,
}

/// How a package is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PackageFormat {
    /// A WebAssembly module.
    #[serde(rename = "wasm")]
    Wasm,
    /// A zip archive.
    #[serde(rename = "zip")]
    Zip,
    /// A gzip-compressed tarball.
    #[serde(rename = "tar.gz")]
    TarGz,
}

/// Where a version's code package is and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageRef {
    /// Hex SHA-256 of the bytes; the agent refuses anything else.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// How it is packed.
    pub format: PackageFormat,
    /// Where to fetch it: an absolute, short-lived presigned S3 URL (send no credential), or a
    /// path starting with `/` (`/agent/v1/code/{sha256}`) to resolve against the control-plane
    /// URL and fetch with the node credential.
    pub url: String,
}

/// One version the node should serve. Its `Debug` names the environment's variables but never
/// prints their values (secrets are opened in it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The version's id (what invocations address).
    pub version_id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// Its function's id.
    pub function_id: Uuid,
    /// The function's name (`NIMBUS_FUNCTION`).
    pub function: String,
    /// The version number (`NIMBUS_VERSION`).
    pub version: u32,
    /// The runtime.
    pub runtime: Runtime,
    /// For `process`: the entry executable inside the package.
    pub entry: Option<String>,
    /// The code.
    pub package: PackageRef,
    /// Memory limit, MiB.
    pub memory_mb: u32,
    /// Wall-clock limit of one invocation, milliseconds.
    pub timeout_ms: u32,
    /// Invocations one instance runs at once.
    pub concurrency: u32,
    /// Warm instances to keep (0: keep the code cached, start an instance on demand).
    pub instances: u32,
    /// The function's environment, secrets opened (the channel is the node's authenticated one).
    pub env: BTreeMap<String, String>,
}

impl std::fmt::Debug for Assignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assignment")
            .field("version_id", &self.version_id)
            .field("tenant_id", &self.tenant_id)
            .field("function_id", &self.function_id)
            .field("function", &self.function)
            .field("version", &self.version)
            .field("runtime", &self.runtime)
            .field("entry", &self.entry)
            .field("package", &self.package)
            .field("memory_mb", &self.memory_mb)
            .field("timeout_ms", &self.timeout_ms)
            .field("concurrency", &self.concurrency)
            .field("instances", &self.instances)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The whole truth of what a node should run; level-triggered: each document replaces the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The node.
    pub node_id: Uuid,
    /// Grows with every change of the node's assignments or state.
    pub revision: i64,
    /// A draining node takes no new assignments; it keeps serving what it has.
    pub draining: bool,
    /// What to serve.
    pub assignments: Vec<Assignment>,
}

/// How far a version is on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Code being fetched or compiled.
    Loading,
    /// Code cached; warm instances as reported.
    Ready,
    /// It could not be made ready (see `error`).
    Failed,
}

/// A version as the node has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionStatus {
    /// The version.
    pub version_id: Uuid,
    /// How far it is.
    pub state: InstanceState,
    /// Warm instances.
    pub instances: u32,
    /// Invocations running now.
    pub in_flight: u32,
    /// Why it failed (for example `sha256 mismatch`).
    pub error: Option<String>,
}

/// One second of one version's traffic on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionMetrics {
    /// The version.
    pub version_id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// Start of the second (whole seconds).
    pub second: DateTime<Utc>,
    /// In-flight invocations averaged over the second.
    pub concurrency: f64,
    /// Invocations finished.
    pub requests: u64,
    /// Of which failed (a failure reason, or a 5xx from the function).
    pub errors: u64,
    /// Of which started an instance first.
    pub cold_starts: u64,
    /// Latency histogram over [`LATENCY_BUCKETS_MS`] (`len() + 1` counts).
    pub latency_buckets: Vec<u64>,
}

/// `POST /agent/v1/reports`: heartbeat, state, and the metrics of the seconds since the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The desired-state revision the node has reconciled to.
    pub revision: i64,
    /// Invocations running now, all versions.
    pub in_flight: u32,
    /// Each version the node has.
    pub versions: Vec<VersionStatus>,
    /// Per-second metrics not yet reported.
    pub metrics: Vec<VersionMetrics>,
}

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageStatus {
    /// The function answered (any HTTP status it chose).
    Ok,
    /// It ran longer than its timeout.
    Timeout,
    /// It needed more memory than its limit.
    MemoryLimit,
    /// It trapped or was killed by a signal.
    Crash,
    /// It exited with a non-zero code.
    ExitCode,
    /// Its response was too large.
    ResponseTooLarge,
    /// Its CGI header block was malformed.
    InvalidResponse,
    /// It could not be started.
    StartFailed,
}

/// One invocation, for billing. Idempotent by `invocation_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRecord {
    /// The invocation (UUIDv7).
    pub invocation_id: Uuid,
    /// Tenant.
    pub tenant_id: Uuid,
    /// Function.
    pub function_id: Uuid,
    /// Version id.
    pub version_id: Uuid,
    /// Version number.
    pub version: u32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long it ran, microseconds.
    pub duration_us: u64,
    /// Billed duration: the duration rounded up to whole milliseconds, at least 1.
    pub billed_ms: u64,
    /// The memory the function is configured with, MiB.
    pub memory_mb: u32,
    /// The HTTP status the caller got.
    pub http_status: u16,
    /// How it ended.
    pub status: UsageStatus,
    /// Whether it started an instance first.
    pub cold_start: bool,
}

/// A line of a function's stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// The invocation that wrote it.
    pub invocation_id: Uuid,
    /// Tenant.
    pub tenant_id: Uuid,
    /// Function.
    pub function_id: Uuid,
    /// Version number.
    pub version: u32,
    /// Position in the invocation's log (from 0); (invocation, seq) is unique.
    pub seq: u32,
    /// When the invocation finished.
    pub time: DateTime<Utc>,
    /// The line, without its newline, at most [`MAX_LOG_LINE`] bytes.
    pub line: String,
}

/// `POST /agent/v1/usage`. At-least-once: the agent resends a batch until it is acknowledged;
/// the control plane stores each invocation and log line once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// Invocations.
    pub records: Vec<UsageRecord>,
    /// Log lines.
    #[serde(default)]
    pub logs: Vec<LogLine>,
}

/// The answer to a usage batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageAck {
    /// Records stored now.
    pub accepted: u64,
    /// Records already stored by an earlier delivery.
    pub duplicates: u64,
}

/// The billed duration of a run of `duration_us` microseconds: whole milliseconds, rounded up,
/// at least one.
pub fn billed_ms(duration_us: u64) -> u64 {
    duration_us.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_inclusive_upper_bounds() {
        assert_eq!(latency_bucket(0.1), 0);
        assert_eq!(latency_bucket(0.5), 0);
        assert_eq!(latency_bucket(0.51), 1);
        assert_eq!(latency_bucket(10_000.0), 13);
        assert_eq!(latency_bucket(10_000.1), 14);
    }

    #[test]
    fn billing_rounds_up_to_whole_milliseconds() {
        assert_eq!(billed_ms(0), 1);
        assert_eq!(billed_ms(1), 1);
        assert_eq!(billed_ms(1000), 1);
        assert_eq!(billed_ms(1001), 2);
        assert_eq!(billed_ms(2_500_000), 2500);
    }

    #[test]
    fn an_assignments_debug_never_prints_environment_values() {
        let a = Assignment {
            version_id: Uuid::nil(),
            tenant_id: Uuid::nil(),
            function_id: Uuid::nil(),
            function: "f".into(),
            version: 1,
            runtime: Runtime::Wasm,
            entry: None,
            package: PackageRef { sha256: "0".repeat(64), size: 1, format: PackageFormat::Wasm, url: "/x".into() },
            memory_mb: 128,
            timeout_ms: 1000,
            concurrency: 1,
            instances: 1,
            env: BTreeMap::from([("TOKEN".to_owned(), "hunter2-secret".to_owned())]),
        };
        let shown = format!("{a:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn formats_and_statuses_have_their_wire_names() {
        assert_eq!(serde_json::to_string(&PackageFormat::TarGz).unwrap(), "\"tar.gz\"");
        assert_eq!(serde_json::to_string(&UsageStatus::MemoryLimit).unwrap(), "\"memory_limit\"");
        assert_eq!(serde_json::to_string(&Runtime::Process).unwrap(), "\"process\"");
        let batch: UsageBatch = serde_json::from_str(r#"{"records":[]}"#).unwrap();
        assert!(batch.logs.is_empty());
    }
}
