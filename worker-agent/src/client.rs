//! The agent's side of the agent protocol (`nimbus_protocol`): join, renew, desired state,
//! reports, usage, leave. It owns the node's identity: a 401 on any call re-joins once with the
//! join token and repeats the call, and every new credential is written to the identity file and
//! published to the rest of the agent (the listener needs the invoke secret of the last join).
//! A join the control plane refuses is [`CallError::JoinRefused`], never the status of the call
//! that led to it, so no caller mistakes it for a refusal of what it sent.
//!
//! Code URLs: a path (`/agent/v1/code/<sha256>`) is the control plane's own store, resolved
//! against the control-plane URL and the only kind of URL the node credential is sent to; an
//! absolute `http(s)://` URL (presigned S3) gets no credential ([`ControlPlane::code_download`]).

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use chrono::Utc;
use nimbus_protocol::{Capacity, Credential, DesiredState, JoinRequest, JoinResponse, Report, UsageAck, UsageBatch};
use reqwest::{Method, StatusCode};
use tokio::sync::{Mutex, watch};

use crate::{
    backoff::Backoff,
    config::Secret,
    identity::{self, Identity},
};

/// Longest ordinary call (the desired-state long poll gets its wait on top).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The control plane refused the node's credential (after one re-join).
    #[error("the control plane refused the node credential")]
    Unauthorized,
    /// No join token to join with.
    #[error("the node has no valid identity and no join token (--join-token / NIMBUS_AGENT_JOIN_TOKEN)")]
    NoJoinToken,
    /// The control plane refused to let the node join: the join token is unknown, revoked,
    /// expired or used up (401), or the join itself was refused (a 4xx). A new join token is
    /// needed (and, for a 409, the name may be in use by a live node).
    #[error("the control plane refused the join ({status}: {body}){}", join_hint(*status))]
    JoinRefused {
        /// The status of the join.
        status: u16,
        /// The start of its body.
        body: String,
    },
    /// The control plane answered with an error status.
    #[error("the control plane answered {status}: {body}")]
    Status {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The control plane could not be reached, or the answer did not arrive.
    #[error("the control plane is unreachable: {0}")]
    Transport(String),
    /// The answer was not the expected document.
    #[error("the control plane sent an unreadable answer: {0}")]
    Decode(String),
}

impl CallError {
    /// Whether trying again later can help (it cannot for a refused join).
    pub fn is_transient(&self) -> bool {
        match self {
            CallError::Transport(_) | CallError::Decode(_) => true,
            CallError::Status { status, .. } => transient_status(*status),
            CallError::Unauthorized | CallError::NoJoinToken | CallError::JoinRefused { .. } => false,
        }
    }

    /// Whether the node has no usable credential and cannot get one by itself (an operator must
    /// give it a join token). What it was sending is fine and must be kept for later.
    pub fn is_credential_problem(&self) -> bool {
        matches!(self, CallError::Unauthorized | CallError::NoJoinToken | CallError::JoinRefused { .. })
    }
}

/// A code download: where to fetch from and the credential to send, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeDownload {
    /// The absolute URL.
    pub url: String,
    /// Whether the node credential goes with it (only to the control plane's own store).
    pub with_credential: bool,
}

/// Resolves the code URL of a package reference against the control plane's `base` URL (no
/// trailing slash): a path (`/...`) is the control plane's and gets the credential; an absolute
/// `http(s)://` URL does not; anything else (`//host/...`, other schemes, relative paths) is
/// refused.
pub fn resolve_code_url(base: &str, url: &str) -> Result<CodeDownload, String> {
    if url.starts_with('/') && !url.starts_with("//") {
        return Ok(CodeDownload { url: format!("{base}{url}"), with_credential: true });
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(CodeDownload { url: url.to_owned(), with_credential: false });
    }
    // Never echo the URL: a presigned one is a credential until it expires.
    Err("the package URL is neither a path on the control plane nor an http(s) URL".into())
}

/// What an operator can do about a refused join.
fn join_hint(status: u16) -> &'static str {
    match status {
        401 => "; the node needs a new join token (--join-token / NIMBUS_AGENT_JOIN_TOKEN) and a restart",
        409 => "; a node that is still reporting has this name",
        _ => "",
    }
}

/// Whether an answer with `status` may be different later (server errors, throttling, timeouts).
fn transient_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

/// What a join says about the node, besides the token.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Its name.
    pub name: String,
    /// Its zone.
    pub zone: String,
    /// What it offers.
    pub capacity: Capacity,
    /// Where the gateway reaches it.
    pub invoke_url: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// A connection to the control plane on behalf of one node.
pub struct ControlPlane {
    base: String,
    http: reqwest::Client,
    token: Option<Secret>,
    node: NodeInfo,
    identity_file: PathBuf,
    identity: watch::Sender<Option<Arc<Identity>>>,
    /// Serializes joins and renewals, so that concurrent 401s re-join once.
    rejoin: Mutex<()>,
}

impl ControlPlane {
    /// A client of the control plane at `base` (no trailing slash) for `node`, keeping its
    /// identity in `identity_file`.
    pub fn new(base: String, token: Option<Secret>, node: NodeInfo, identity_file: PathBuf) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("nimbus-worker-agent/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let (identity, _) = watch::channel(None);
        Ok(ControlPlane { base, http, token, node, identity_file, identity, rejoin: Mutex::new(()) })
    }

    /// The HTTP client (shared with the code cache's downloads).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The control plane's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The current identity, once the node has one.
    pub fn identity(&self) -> Option<Arc<Identity>> {
        self.identity.borrow().clone()
    }

    /// Changes of the identity (joins and renewals).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Identity>>> {
        self.identity.subscribe()
    }

    /// Where to download a package from, and the credential to send: the node credential only
    /// for a path on the control plane (see [`resolve_code_url`]), never to a presigned URL.
    pub fn code_download(&self, url: &str) -> Result<(String, Option<String>), String> {
        let download = resolve_code_url(&self.base, url)?;
        let credential = if download.with_credential { self.identity().map(|i| i.credential.clone()) } else { None };
        Ok((download.url, credential))
    }

    /// Gets the node an identity at startup: renews the stored one, or joins when there is none,
    /// it belongs to another control plane, or it is refused. Transient failures are retried
    /// until they pass; a refusal is returned.
    pub async fn establish(&self) -> Result<Arc<Identity>, CallError> {
        let stored = identity::load(&self.identity_file).filter(|i| i.control_plane_url == self.base);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        if let Some(stored) = stored {
            self.publish(Arc::new(stored.clone()));
            loop {
                match self.renew_once(&stored).await {
                    Ok(identity) => return Ok(identity),
                    Err(CallError::Unauthorized) => break,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(error = %e, "renewing the node credential failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            tracing::info!("the stored node credential was refused; joining again");
        }
        backoff.reset();
        loop {
            match self.join().await {
                Ok(identity) => return Ok(identity),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "joining the control plane failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Renews the credential whenever half of its remaining lifetime has passed, forever.
    pub async fn keep_renewed(&self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let Some(current) = self.identity() else { return };
            let remaining = (current.expires_at - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(remaining / 2).await;
            loop {
                let Some(current) = self.identity() else { return };
                let result = match self.renew_once(&current).await {
                    Err(CallError::Unauthorized) => self.rejoin(&current).await,
                    other => other.map(|_| ()),
                };
                match result {
                    Ok(()) => {
                        backoff.reset();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the node credential failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    }

    /// `GET /agent/v1/desired-state?after=R&wait=S`.
    pub async fn desired_state(&self, after: i64, wait: Duration) -> Result<DesiredState, CallError> {
        let path = format!("/agent/v1/desired-state?after={after}&wait={}", wait.as_secs());
        let response = self.authed(Method::GET, &path, None, CALL_TIMEOUT + wait).await?;
        decode(response).await
    }

    /// `POST /agent/v1/reports`.
    pub async fn report(&self, report: &Report) -> Result<(), CallError> {
        let body = serde_json::to_vec(report).map_err(|e| CallError::Decode(e.to_string()))?;
        self.authed(Method::POST, "/agent/v1/reports", Some(body), CALL_TIMEOUT).await.map(drop)
    }

    /// `POST /agent/v1/usage`.
    pub async fn usage(&self, batch: &UsageBatch) -> Result<UsageAck, CallError> {
        let body = serde_json::to_vec(batch).map_err(|e| CallError::Decode(e.to_string()))?;
        decode(self.authed(Method::POST, "/agent/v1/usage", Some(body), CALL_TIMEOUT).await?).await
    }

    /// `POST /agent/v1/leave`.
    pub async fn leave(&self) -> Result<(), CallError> {
        self.authed(Method::POST, "/agent/v1/leave", None, CALL_TIMEOUT).await.map(drop)
    }

    /// Sends an authenticated call; on 401 re-joins once and sends it again.
    async fn authed(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<reqwest::Response, CallError> {
        let mut rejoined = false;
        loop {
            let Some(identity) = self.identity() else { return Err(CallError::Unauthorized) };
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(&identity.credential)
                .timeout(timeout);
            if let Some(body) = &body {
                request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.clone());
            }
            let response = request.send().await.map_err(transport)?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return check(response).await;
            }
            if rejoined {
                return Err(CallError::Unauthorized);
            }
            rejoined = true;
            self.rejoin(&identity).await?;
        }
    }

    /// Joins again unless someone else already replaced the credential `refused`.
    async fn rejoin(&self, refused: &Identity) -> Result<(), CallError> {
        let _one_at_a_time = self.rejoin.lock().await;
        if self.identity().is_some_and(|now| now.credential != refused.credential) {
            return Ok(());
        }
        tracing::warn!(node_id = %refused.node_id, "the control plane refused the node credential; joining again");
        self.join_locked().await.map(drop)
    }

    async fn join(&self) -> Result<Arc<Identity>, CallError> {
        let _one_at_a_time = self.rejoin.lock().await;
        self.join_locked().await
    }

    /// `POST /agent/v1/join`; the caller holds `rejoin`.
    async fn join_locked(&self) -> Result<Arc<Identity>, CallError> {
        let Some(token) = &self.token else { return Err(CallError::NoJoinToken) };
        let request = JoinRequest {
            token: token.expose().to_owned(),
            name: self.node.name.clone(),
            zone: self.node.zone.clone(),
            capacity: self.node.capacity,
            invoke_url: self.node.invoke_url.clone(),
            labels: self.node.labels.clone(),
        };
        let response = self
            .http
            .post(format!("{}/agent/v1/join", self.base))
            .json(&request)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(transport)?;
        // A refused join token is a 401 too, but re-joining cannot help it; and no refusal of the
        // join may pass for a refusal of the call that needed it (a usage batch, a report).
        let joined: JoinResponse = decode(check(response).await.map_err(|e| match e {
            CallError::Unauthorized => CallError::JoinRefused {
                status: 401,
                body: "the join token is unknown, revoked, expired or used up".into(),
            },
            CallError::Status { status, body } if !transient_status(status) => CallError::JoinRefused { status, body },
            other => other,
        })?)
        .await?;
        let identity = Arc::new(Identity::from_join(&self.base, joined));
        self.persist(&identity);
        self.publish(identity.clone());
        Ok(identity)
    }

    /// `POST /agent/v1/renew` with `current`'s credential.
    async fn renew_once(&self, current: &Identity) -> Result<Arc<Identity>, CallError> {
        let _one_at_a_time = self.rejoin.lock().await;
        let response = self
            .http
            .post(format!("{}/agent/v1/renew", self.base))
            .bearer_auth(&current.credential)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(transport)?;
        let credential: Credential = decode(check(response).await?).await?;
        let identity = Arc::new(current.renewed(credential));
        self.persist(&identity);
        self.publish(identity.clone());
        tracing::debug!(expires_at = %identity.expires_at, "renewed the node credential");
        Ok(identity)
    }

    fn persist(&self, identity: &Identity) {
        // The credential works without the file; losing it only means a re-join after a restart.
        if let Err(e) = identity::save(&self.identity_file, identity) {
            tracing::error!(error = format!("{e:#}"), "cannot write the node identity");
        }
    }

    fn publish(&self, identity: Arc<Identity>) {
        self.identity.send_replace(Some(identity));
    }
}

fn transport(e: reqwest::Error) -> CallError {
    CallError::Transport(format!("{e}"))
}

/// Passes a 2xx answer through; turns anything else into its error.
async fn check(response: reqwest::Response) -> Result<reqwest::Response, CallError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == StatusCode::UNAUTHORIZED {
        return Err(CallError::Unauthorized);
    }
    let body = response.text().await.unwrap_or_default();
    Err(CallError::Status { status: status.as_u16(), body: body.chars().take(500).collect() })
}

async fn decode<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> Result<T, CallError> {
    let bytes = response.bytes().await.map_err(transport)?;
    serde_json::from_slice(&bytes).map_err(|e| CallError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_on_the_control_plane_get_the_credential() {
        let base = "http://10.0.0.1:8080";
        let sha = "ab".repeat(32);
        assert_eq!(
            resolve_code_url(base, &format!("/agent/v1/code/{sha}")).unwrap(),
            CodeDownload { url: format!("{base}/agent/v1/code/{sha}"), with_credential: true }
        );
        // Presigned S3, and even an absolute URL naming the control plane itself: no credential.
        for url in [
            "https://bucket.s3.amazonaws.com/packages/sha256/ab?X-Amz-Signature=x".to_owned(),
            "HTTP://minio:9000/p".to_owned(),
            format!("{base}/agent/v1/code/{sha}"),
        ] {
            assert_eq!(
                resolve_code_url(base, &url).unwrap(),
                CodeDownload { url: url.clone(), with_credential: false }
            );
        }
        for bad in ["//evil.example/agent/v1/code/x", "agent/v1/code/x", "ftp://x/y", "", "file:///etc/passwd"] {
            let err = resolve_code_url(base, bad).expect_err(bad);
            assert!(bad.is_empty() || !err.contains(bad), "the URL is not echoed: {err}");
        }
    }

    #[test]
    fn credential_problems_are_not_transient_and_not_refusals_of_what_was_sent() {
        let refused = CallError::JoinRefused { status: 401, body: "x".into() };
        assert!(!refused.is_transient() && refused.is_credential_problem());
        assert!(refused.to_string().contains("join token"), "{refused}");
        assert!(CallError::Unauthorized.is_credential_problem() && CallError::NoJoinToken.is_credential_problem());
        let invalid = CallError::Status { status: 422, body: String::new() };
        assert!(!invalid.is_transient() && !invalid.is_credential_problem());
        assert!(CallError::Status { status: 503, body: String::new() }.is_transient());
    }
}
