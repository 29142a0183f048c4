//! The handler contract (DESIGN §5), shared by both runtimes: what goes into an invocation (the
//! request body on stdin, request metadata and the function's environment as CGI variables) and
//! what comes out (stdout as the response, with an optional CGI header block; stderr as the
//! function's log), and how failures become clear error responses.

pub mod cgi;
pub mod process;
pub mod stream;
pub mod wasm;

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

/// One request to run.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// Invocation id (becomes `NIMBUS_INVOCATION_ID`).
    pub id: String,
    /// Function name (`NIMBUS_FUNCTION`).
    pub function: String,
    /// Version number (`NIMBUS_VERSION`).
    pub version: u32,
    /// HTTP method (`REQUEST_METHOD`).
    pub method: String,
    /// Path after the function's prefix (`PATH_INFO`).
    pub path: String,
    /// Query string without `?` (`QUERY_STRING`).
    pub query: String,
    /// Request headers as the gateway forwards them (each becomes `HTTP_<NAME>`; `content-type`
    /// becomes `CONTENT_TYPE`; `CONTENT_LENGTH` is the body's length). The gateway strips the
    /// platform credentials it consumed before forwarding.
    pub headers: Vec<(String, String)>,
    /// Request body (stdin), or its start when the rest streams in (see [`stream::Io`]).
    pub body: Vec<u8>,
    /// The function's own environment.
    pub env: BTreeMap<String, String>,
    /// The control plane's URL (`NIMBUS_API_URL`), for functions that call the API.
    pub api_url: Option<String>,
    /// The credential of the function's execution role for this invocation (`NIMBUS_TOKEN`),
    /// when it has one.
    pub credential: Option<String>,
}

/// Limits of one invocation.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most memory the function may use.
    pub memory_bytes: u64,
    /// Most wall-clock time.
    pub timeout: Duration,
    /// Largest response (stdout) accepted.
    pub max_response_bytes: usize,
    /// Most log (stderr) bytes kept; the rest is dropped and the log marked truncated.
    pub max_log_bytes: usize,
    /// Largest file a process function may write (`RLIMIT_FSIZE`), so that one invocation cannot
    /// fill the disk with a single file.
    pub max_file_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 128 << 20,
            timeout: Duration::from_secs(10),
            max_response_bytes: 6 << 20,
            max_log_bytes: 64 << 10,
            max_file_bytes: 64 << 20,
        }
    }
}

/// Why an invocation did not produce a response. Stable, machine-readable names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// It ran longer than its timeout and was stopped.
    Timeout,
    /// It needed more memory than its limit.
    MemoryLimit,
    /// It trapped (wasm) or was killed by a signal (process).
    Crash,
    /// It exited with a non-zero code.
    ExitCode,
    /// Its response was larger than allowed.
    ResponseTooLarge,
    /// Its CGI header block was malformed.
    InvalidResponse,
    /// It could not be started (bad module, missing executable, out of slots).
    StartFailed,
}

impl FailureReason {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::MemoryLimit => "memory_limit",
            FailureReason::Crash => "crash",
            FailureReason::ExitCode => "exit_code",
            FailureReason::ResponseTooLarge => "response_too_large",
            FailureReason::InvalidResponse => "invalid_response",
            FailureReason::StartFailed => "start_failed",
        }
    }

    /// The HTTP status the caller sees: 504 for a timeout, 502 for everything else the
    /// function did wrong, 503 when it could not start.
    pub fn status(self) -> u16 {
        match self {
            FailureReason::Timeout => 504,
            FailureReason::StartFailed => 503,
            _ => 502,
        }
    }
}

/// A response, from the function or describing its failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Headers (from the CGI header block, or of the error).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Set when the invocation failed.
    pub failure: Option<FailureReason>,
}

impl Response {
    /// The error response of a failed invocation: JSON naming the reason, and the reason in the
    /// `x-nimbus-error` header.
    pub fn failed(reason: FailureReason, detail: impl Into<String>) -> Response {
        let body = serde_json::json!({
            "type": format!("https://nimbus.dev/problems/{}", reason.as_str().replace('_', "-")),
            "status": reason.status(),
            "code": reason.as_str(),
            "detail": detail.into(),
        });
        Response {
            status: reason.status(),
            headers: vec![
                ("content-type".into(), "application/problem+json".into()),
                ("x-nimbus-error".into(), reason.as_str().into()),
            ],
            body: body.to_string().into_bytes(),
            failure: Some(reason),
        }
    }
}

/// What one invocation produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The response.
    pub response: Response,
    /// The function's stderr (bounded).
    pub log: Vec<u8>,
    /// Whether stderr was cut at the bound.
    pub log_truncated: bool,
    /// Whether this invocation had to start an instance (load or compile) first.
    pub cold_start: bool,
    /// Wall-clock time the function ran.
    pub duration: Duration,
}

/// Names the handler contract reserves; a function's own environment cannot set them.
pub fn reserved_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    upper.starts_with("NIMBUS_")
        || upper.starts_with("HTTP_")
        || matches!(
            upper.as_str(),
            "REQUEST_METHOD"
                | "PATH_INFO"
                | "QUERY_STRING"
                | "CONTENT_TYPE"
                | "CONTENT_LENGTH"
                | "SERVER_NAME"
                | "SERVER_PORT"
                | "SERVER_PROTOCOL"
                | "GATEWAY_INTERFACE"
                | "SCRIPT_NAME"
                | "REMOTE_ADDR"
        )
}

/// The environment of an invocation: the function's own variables, then the contract's (which
/// win). Header names become `HTTP_<UPPER_SNAKE>`.
pub fn contract_env(inv: &Invocation) -> Vec<(String, String)> {
    contract_env_with_length(inv, inv.body.len() as u64)
}

/// [`contract_env`] for a body of `content_length` bytes (one that streams in).
pub fn contract_env_with_length(inv: &Invocation, content_length: u64) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> =
        inv.env.iter().filter(|(k, _)| !reserved_env(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    env.push(("GATEWAY_INTERFACE".into(), "CGI/1.1".into()));
    env.push(("SERVER_PROTOCOL".into(), "HTTP/1.1".into()));
    env.push(("REQUEST_METHOD".into(), inv.method.clone()));
    env.push(("PATH_INFO".into(), inv.path.clone()));
    env.push(("QUERY_STRING".into(), inv.query.clone()));
    env.push(("CONTENT_LENGTH".into(), content_length.to_string()));
    for (name, value) in &inv.headers {
        let lower = name.to_ascii_lowercase();
        if lower == "content-length" {
            continue;
        }
        if lower == "content-type" {
            env.push(("CONTENT_TYPE".into(), value.clone()));
            continue;
        }
        let key: String =
            lower.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
        // httpoxy: a `Proxy` request header would become `HTTP_PROXY`, which many HTTP clients
        // take as their proxy. The listener drops the header already; this holds for any caller.
        if key == "PROXY" {
            continue;
        }
        env.push((format!("HTTP_{key}"), value.clone()));
    }
    env.push(("NIMBUS_FUNCTION".into(), inv.function.clone()));
    env.push(("NIMBUS_VERSION".into(), inv.version.to_string()));
    env.push(("NIMBUS_INVOCATION_ID".into(), inv.id.clone()));
    if let Some(url) = &inv.api_url {
        env.push(("NIMBUS_API_URL".into(), url.clone()));
    }
    if let Some(token) = &inv.credential {
        env.push(("NIMBUS_TOKEN".into(), token.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_env_has_cgi_names_and_wins_over_the_functions_own() {
        let inv = Invocation {
            id: "inv-1".into(),
            function: "hello".into(),
            version: 3,
            method: "POST".into(),
            path: "/a/b".into(),
            query: "x=1".into(),
            headers: vec![
                ("Content-Type".into(), "text/plain".into()),
                ("X-Request-Id".into(), "r1".into()),
                ("Proxy".into(), "http://evil:3128".into()),
            ],
            body: b"hello".to_vec(),
            env: [
                ("GREETING".to_owned(), "hi".to_owned()),
                ("NIMBUS_VERSION".to_owned(), "999".to_owned()),
                ("NIMBUS_TOKEN".to_owned(), "nrc_mine".to_owned()),
            ]
            .into(),
            api_url: Some("http://cp.test".into()),
            credential: Some("nrc_role".into()),
        };
        let env: BTreeMap<String, String> = contract_env(&inv).into_iter().collect();
        assert_eq!(env["REQUEST_METHOD"], "POST");
        assert_eq!(env["PATH_INFO"], "/a/b");
        assert_eq!(env["QUERY_STRING"], "x=1");
        assert_eq!(env["CONTENT_TYPE"], "text/plain");
        assert_eq!(env["CONTENT_LENGTH"], "5");
        assert_eq!(env["HTTP_X_REQUEST_ID"], "r1");
        assert!(!env.contains_key("HTTP_PROXY"), "httpoxy: no header becomes HTTP_PROXY");
        assert_eq!(env["GREETING"], "hi");
        assert_eq!(env["NIMBUS_VERSION"], "3", "the function's own env cannot override the contract");
        assert_eq!(env["NIMBUS_INVOCATION_ID"], "inv-1");
        assert_eq!(env["NIMBUS_API_URL"], "http://cp.test");
        assert_eq!(env["NIMBUS_TOKEN"], "nrc_role", "the role credential, never the function's own variable");
        let without = Invocation { credential: None, ..inv };
        let env: BTreeMap<String, String> = contract_env(&without).into_iter().collect();
        assert!(!env.contains_key("NIMBUS_TOKEN"), "no execution role, no credential");
    }

    #[test]
    fn failures_are_problem_documents_with_their_reason() {
        let r = Response::failed(FailureReason::Timeout, "ran longer than 100 ms");
        assert_eq!(r.status, 504);
        assert!(r.headers.contains(&("x-nimbus-error".into(), "timeout".into())));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["code"], "timeout");
        assert_eq!(FailureReason::MemoryLimit.status(), 502);
        assert_eq!(FailureReason::StartFailed.status(), 503);
    }
}
