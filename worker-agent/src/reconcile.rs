//! Reconciliation: the node follows the control plane's desired state. A poller long-polls
//! `GET /agent/v1/desired-state`; each document is the whole truth (level-triggered), and a pass
//! over the latest one runs whenever it changes and every [`REPASS`] besides, so that a version
//! that failed (a download, a sha256 mismatch, a compile error) is tried again.
//!
//! A failed version is tried again after [`REPASS`], doubling with each failure up to
//! [`MAX_RETRY_DELAY`], and at once when the desired state changes.
//!
//! A pass takes out versions no longer desired (invocations running keep their `Arc`), makes new
//! ones ready (fetch and verify through the code cache, compile or unpack, warm when the
//! assignment wants instances), adjusts instance counts and concurrency limits of the others,
//! cools versions warmed on demand that went idle, and lets the cache evict what no version needs.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use nimbus_protocol::{Assignment, DesiredState, PackageFormat, Runtime};
use tokio::{sync::watch, task::JoinSet};
use uuid::Uuid;

use crate::{
    backoff::Backoff,
    cache::{CacheError, CodeCache},
    client::ControlPlane,
    registry::{Code, Entry, Loader, ON_DEMAND_IDLE, Registry, Version},
    runtime::{process::ProcessPackage, wasm::WasmEngine},
};

/// How long one long poll waits for a change.
pub const POLL_WAIT: Duration = Duration::from_secs(25);
/// Least time between two polls that brought no change.
const MIN_POLL: Duration = Duration::from_secs(1);
/// A pass runs at least this often, to retry failures.
pub const REPASS: Duration = Duration::from_secs(10);
/// Versions made ready at once.
const PARALLEL_LOADS: usize = 4;

/// Long-polls the desired state forever, publishing each document; errors are retried with
/// backoff.
pub async fn poll(client: Arc<ControlPlane>, latest: watch::Sender<Option<Arc<DesiredState>>>) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut after = 0;
    let mut node = None;
    loop {
        // After a re-join as another node, revisions start again.
        let now_node = client.identity().map(|i| i.node_id);
        if now_node != node {
            (node, after) = (now_node, 0);
        }
        let asked = std::time::Instant::now();
        match client.desired_state(after, POLL_WAIT).await {
            Ok(doc) => {
                if Some(doc.node_id) != node {
                    tracing::warn!(node_id = %doc.node_id, "ignoring a desired state for another node");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                backoff.reset();
                after = doc.revision;
                let changed = latest.borrow().as_deref() != Some(&doc);
                if changed {
                    tracing::debug!(revision = doc.revision, assignments = doc.assignments.len(), "new desired state");
                    latest.send_replace(Some(Arc::new(doc)));
                } else if let Some(rest) = MIN_POLL.checked_sub(asked.elapsed()) {
                    // A control plane that answers at once without a change must not be polled
                    // in a tight loop.
                    tokio::time::sleep(rest).await;
                }
            }
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "polling the desired state failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Makes the registry match the desired state.
pub struct Reconciler {
    client: Arc<ControlPlane>,
    cache: Arc<CodeCache>,
    engine: Arc<WasmEngine>,
    registry: Arc<Registry>,
    max_queued: usize,
    reconciled: Arc<crate::report::Reconciled>,
    /// Versions taken out while invocations still ran; their code stays cached until those end.
    retired: std::sync::Mutex<Vec<Arc<Version>>>,
    /// Failed versions and when they may be tried again.
    failures: std::sync::Mutex<HashMap<Uuid, Retry>>,
    /// The revision of the last pass (a new one retries every failed version at once).
    last_revision: AtomicI64,
}

/// When a failed version is tried again: after [`REPASS`], doubling with every failure up to
/// [`MAX_RETRY_DELAY`], so a broken package is not downloaded every ten seconds forever.
#[derive(Debug, Clone, Copy)]
struct Retry {
    failures: u32,
    not_before: Instant,
}

/// Longest wait before a failed version is tried again.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

impl Retry {
    fn after(previous: Option<Retry>) -> Retry {
        let failures = previous.map_or(1, |r| r.failures.saturating_add(1));
        let delay = REPASS.saturating_mul(1 << (failures - 1).min(8)).min(MAX_RETRY_DELAY);
        // A little early, so that the pass due at that time does not just miss it.
        Retry { failures, not_before: Instant::now() + delay.saturating_sub(Duration::from_millis(500)) }
    }
}

impl Reconciler {
    /// A reconciler of `registry`; `reconciled` receives the revision of each finished pass.
    pub fn new(
        client: Arc<ControlPlane>,
        cache: Arc<CodeCache>,
        engine: Arc<WasmEngine>,
        registry: Arc<Registry>,
        max_queued: usize,
        reconciled: Arc<crate::report::Reconciled>,
    ) -> Arc<Reconciler> {
        Arc::new(Reconciler {
            client,
            cache,
            engine,
            registry,
            max_queued,
            reconciled,
            retired: Default::default(),
            failures: Default::default(),
            last_revision: AtomicI64::new(i64::MIN),
        })
    }

    /// Runs a pass on every new document and every [`REPASS`], forever.
    pub async fn run(self: Arc<Self>, mut latest: watch::Receiver<Option<Arc<DesiredState>>>) {
        loop {
            let doc = latest.borrow_and_update().clone();
            if let Some(doc) = doc {
                self.pass(&doc).await;
            }
            tokio::select! {
                changed = latest.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(REPASS) => {}
            }
        }
    }

    /// One pass over `doc`.
    pub async fn pass(self: &Arc<Self>, doc: &DesiredState) {
        let desired: HashSet<Uuid> = doc.assignments.iter().map(|a| a.version_id).collect();
        let removed = self.registry.retain(&desired);
        for entry in removed {
            if let Entry::Ready(v) = entry {
                tracing::info!(version_id = %v.id(), "version no longer assigned");
                self.retired.lock().unwrap_or_else(|p| p.into_inner()).push(v);
            }
        }

        let failures = {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            failures.retain(|id, _| desired.contains(id));
            if self.last_revision.swap(doc.revision, Ordering::Relaxed) != doc.revision {
                failures.clear();
            }
            failures.clone()
        };
        let now = Instant::now();
        let mut loads = JoinSet::new();
        let mut pending: Vec<&Assignment> = Vec::new();
        for a in &doc.assignments {
            match self.registry.entry(a.version_id) {
                Some(Entry::Ready(v)) if same_code(&v.assignment, a) => self.adjust(&v, a).await,
                Some(Entry::Ready(old)) => {
                    self.retired.lock().unwrap_or_else(|p| p.into_inner()).push(old);
                    pending.push(a);
                }
                // A draining node takes no new versions; it keeps serving what it has.
                None | Some(Entry::Failed(_)) | Some(Entry::Loading) if doc.draining => {}
                Some(Entry::Failed(_)) if failures.get(&a.version_id).is_some_and(|r| r.not_before > now) => {}
                None | Some(Entry::Failed(_)) | Some(Entry::Loading) => {
                    self.registry.set(a.version_id, Entry::Loading);
                    pending.push(a);
                }
            }
        }
        for a in pending {
            if loads.len() >= PARALLEL_LOADS {
                let _ = loads.join_next().await;
            }
            let (this, a) = (self.clone(), a.clone());
            loads.spawn(async move { this.load(a).await });
        }
        while loads.join_next().await.is_some() {}

        self.evict(doc).await;
        self.reconciled.revision.store(doc.revision, Ordering::Relaxed);
        self.reconciled.changed.notify_one();
    }

    /// Brings a ready version to the wanted instance count.
    async fn adjust(&self, v: &Arc<Version>, a: &Assignment) {
        if v.instances() != a.instances {
            v.set_instances(a.instances);
        }
        if a.instances > 0 && !v.is_warm() {
            if let Err(e) = v.warm_up().await {
                let error = format!("{e:#}");
                tracing::error!(version_id = %a.version_id, %error, "warming the version failed");
                self.registry.set(a.version_id, Entry::Failed(error));
            }
        } else if v.cool_if_idle(ON_DEMAND_IDLE) {
            tracing::debug!(version_id = %a.version_id, "cooled an idle on-demand version");
        }
    }

    /// Makes one version ready, or records why it cannot be.
    async fn load(&self, a: Assignment) {
        let id = a.version_id;
        match self.prepare(a).await {
            Ok(version) => {
                tracing::info!(version_id = %id, warm = version.is_warm(), "version ready");
                self.registry.insert(version);
                self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }
            Err(error) => {
                let retry = {
                    let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                    let retry = Retry::after(failures.get(&id).copied());
                    failures.insert(id, retry);
                    retry
                };
                let retry_in_s = retry.not_before.saturating_duration_since(Instant::now()).as_secs();
                tracing::warn!(version_id = %id, %error, retry_in_s, "version failed");
                self.registry.set(id, Entry::Failed(error));
            }
        }
    }

    async fn prepare(&self, a: Assignment) -> Result<Arc<Version>, String> {
        let loader = self.loader(&a)?;
        let (url, credential) = self.client.code_download(&a.package.url)?;
        let package = nimbus_protocol::PackageRef { url, ..a.package.clone() };
        self.cache.fetch(self.client.http(), &package, credential.as_deref()).await.map_err(describe)?;
        // Compiling (or unpacking) now also for versions without instances: their first
        // invocation then only loads what is ready on disk.
        let load = loader.clone();
        let code = tokio::task::spawn_blocking(move || load())
            .await
            .map_err(|e| format!("loading the code failed: {e}"))?
            .map_err(|e| format!("{e:#}"))?;
        let warm = (a.instances > 0).then_some(code);
        Ok(Version::new(a, loader, warm, self.max_queued))
    }

    /// How a version's code becomes warm.
    fn loader(&self, a: &Assignment) -> Result<Loader, String> {
        let (cache, sha256) = (self.cache.clone(), a.package.sha256.clone());
        match (a.runtime, a.package.format) {
            (Runtime::Wasm, PackageFormat::Wasm) => {
                let engine = self.engine.clone();
                Ok(Arc::new(move || {
                    let started = std::time::Instant::now();
                    let (module, compiled) = cache.wasm_module(&engine, &sha256)?;
                    if compiled {
                        tracing::info!(sha256, ms = started.elapsed().as_millis() as u64, "compiled a wasm module");
                    }
                    cache.touch(&sha256);
                    Ok(Code::Wasm(engine.prepare(&module)?))
                }))
            }
            (Runtime::Process, format @ (PackageFormat::Zip | PackageFormat::TarGz)) => {
                let entry = a.entry.clone().filter(|e| entry_is_inside(e)).ok_or_else(|| {
                    format!("the process entry {:?} is missing or leaves the package", a.entry.as_deref().unwrap_or(""))
                })?;
                Ok(Arc::new(move || {
                    let dir = cache.unpacked(&sha256, format)?;
                    cache.touch(&sha256);
                    Ok(Code::Process(ProcessPackage { dir, entry: entry.clone().into() }))
                }))
            }
            (runtime, format) => Err(format!("a {runtime:?} function cannot run a {format:?} package")),
        }
    }

    /// Lets the cache drop what neither a desired version nor a still-running retired one needs.
    async fn evict(&self, doc: &DesiredState) {
        let mut keep: HashSet<String> = doc.assignments.iter().map(|a| a.package.sha256.clone()).collect();
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            retired.retain(|v| v.in_flight() > 0);
            keep.extend(retired.iter().map(|v| v.assignment.package.sha256.clone()));
        }
        let cache = self.cache.clone();
        match tokio::task::spawn_blocking(move || cache.evict(&keep)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(freed)) => tracing::info!(freed_bytes = freed, "evicted unused code from the cache"),
            Ok(Err(e)) => tracing::warn!(error = format!("{e:#}"), "evicting from the code cache failed"),
            Err(e) => tracing::warn!(error = %e, "evicting from the code cache failed"),
        }
    }
}

/// Whether two assignments run the same code the same way (the instance count and the package
/// URL, which is presigned afresh for every document, may differ).
fn same_code(a: &Assignment, b: &Assignment) -> bool {
    a.package.sha256 == b.package.sha256
        && a.package.format == b.package.format
        && a.runtime == b.runtime
        && a.entry == b.entry
        && a.memory_mb == b.memory_mb
        && a.timeout_ms == b.timeout_ms
        && a.concurrency == b.concurrency
        && a.env == b.env
        && a.function == b.function
        && a.version == b.version
        && a.tenant_id == b.tenant_id
        && a.function_id == b.function_id
}

/// Whether a process entry is a relative path that stays inside its package.
fn entry_is_inside(entry: &str) -> bool {
    let path = std::path::Path::new(entry);
    !entry.is_empty()
        && path.components().all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
}

/// The reason a version failed, as reports show it.
pub fn describe(e: CacheError) -> String {
    match e {
        // The cache names sizes as "<n> bytes" when the download came up short.
        CacheError::Mismatch { expected, actual } if expected.ends_with(" bytes") => {
            format!("size mismatch: expected {expected} got {actual}")
        }
        CacheError::Mismatch { expected, actual } => format!("sha256 mismatch: expected {expected} got {actual}"),
        CacheError::TooLarge { limit } => format!("the package is larger than the cache allows ({limit} bytes)"),
        CacheError::Fetch(e) => format!("fetching the package failed: {e}"),
        CacheError::Io(e) => format!("the code cache failed: {e}"),
        CacheError::Other(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_versions_wait_longer_after_each_failure() {
        let delay = |r: Retry| r.not_before.saturating_duration_since(Instant::now()).as_secs_f64().ceil() as u64;
        let mut r = Retry::after(None);
        let mut delays = vec![delay(r)];
        for _ in 0..8 {
            r = Retry::after(Some(r));
            delays.push(delay(r));
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300, 300]);
    }

    #[test]
    fn entries_must_stay_inside_the_package() {
        for (entry, ok) in
            [("handler", true), ("bin/run", true), ("./run", true), ("../x", false), ("/bin/sh", false), ("", false)]
        {
            assert_eq!(entry_is_inside(entry), ok, "{entry:?}");
        }
    }

    #[test]
    fn mismatches_are_named_as_reports_show_them() {
        let e = CacheError::Mismatch { expected: "aa".into(), actual: "bb".into() };
        assert_eq!(describe(e), "sha256 mismatch: expected aa got bb");
        let e = CacheError::Mismatch { expected: "10 bytes".into(), actual: "5 bytes".into() };
        assert_eq!(describe(e), "size mismatch: expected 10 bytes got 5 bytes");
    }
}
