//! The agent's lifecycle: open the data directory, bind the listener, get an identity (renew the
//! stored one or join), then run the listener, the credential renewal, reconciliation, reports
//! and usage shipping until told to stop; then drain: refuse new invocations, let running ones
//! finish (bounded by the drain timeout), ship all usage (bounded too), leave, and return.
//!
//! Printed on standard output for supervisors and tests: `listening on http://<addr>` once the
//! listener is bound, and `joined as node <uuid>` once the node has its identity.

use std::{
    future::Future,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    cache::CodeCache,
    client::{ControlPlane, NodeInfo},
    config::Settings,
    identity,
    invoke::Invoker,
    listener::{InvokeAuth, Listener, router},
    reconcile::{Reconciler, poll},
    registry::Registry,
    report::Reporter,
    runtime::{
        process::{Host, Isolation, ProcessRuntime},
        wasm::{WasmEngine, WasmSettings},
    },
    shipper::Shipper,
    spool::Spool,
    stats::Stats,
};

/// Report interval when neither the settings nor the control plane name one.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Longest the final `leave` call may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the node's state lives inside its data directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `identity.json`: node id, credential, invoke secret.
    pub identity: PathBuf,
    /// `cache/`: the code cache.
    pub cache: PathBuf,
    /// `usage/`: the usage spool.
    pub usage: PathBuf,
    /// `scratch/`: working directories of process invocations.
    pub scratch: PathBuf,
}

impl Paths {
    /// The layout under `data_dir`.
    pub fn new(data_dir: &Path) -> Paths {
        Paths {
            identity: identity::path(data_dir),
            cache: data_dir.join("cache"),
            usage: data_dir.join("usage"),
            scratch: data_dir.join("scratch"),
        }
    }

    /// Creates the data directory if needed and gives it and the identity file their modes: the
    /// directory `0711` (functions running as other users must pass through it to their working
    /// directories and packages, but cannot list it; everything in it is private but those),
    /// `identity.json` `0600`. A data directory others could write to is refused: it holds the
    /// node's credentials.
    pub fn prepare(data_dir: &Path) -> anyhow::Result<Paths> {
        if !data_dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(data_dir)
                .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
        }
        let meta = std::fs::metadata(data_dir).with_context(|| format!("reading {}", data_dir.display()))?;
        anyhow::ensure!(meta.is_dir(), "the data directory {} is not a directory", data_dir.display());
        let mode = meta.permissions().mode() & 0o7777;
        anyhow::ensure!(
            mode & 0o022 == 0,
            "the data directory {} can be written by others (mode {mode:04o}); it holds the node's credentials: use a \
             directory of the agent's own",
            data_dir.display()
        );
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("setting the mode of {}", data_dir.display()))?;
        let paths = Paths::new(data_dir);
        match std::fs::set_permissions(&paths.identity, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::Error::new(e).context(format!("setting the mode of {}", paths.identity.display())));
            }
            _ => {}
        }
        Ok(paths)
    }
}

/// The first directory on the way to `dir` (itself included) that users other than the agent's
/// cannot pass through, if any: process functions running under their own uids could not reach
/// their packages and working directories below it.
pub fn closed_to_others(dir: &Path) -> Option<PathBuf> {
    let dir = dir.canonicalize().ok()?;
    dir.ancestors()
        .find(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        .map(Path::to_path_buf)
}

/// Decides how process functions are isolated, checks that it works, and says so in the log.
async fn process_isolation(settings: &Settings) -> Isolation {
    let decided =
        Isolation::decide(settings.process_isolation, settings.process_uid_base, settings.process_uids, &Host::probe());
    let isolation = match decided {
        Isolation::Uid(pool) => match pool.check().await {
            Ok(()) => Isolation::Uid(pool),
            Err(e) => Isolation::Unavailable(format!("process isolation `uid` does not work on this host: {e}")),
        },
        other => other,
    };
    match &isolation {
        Isolation::Uid(pool) => {
            let uids = pool.uids();
            tracing::info!(
                first_uid = uids.start(),
                last_uid = uids.end(),
                "process functions run under uids of their own"
            );
            if let Some(closed) = closed_to_others(&settings.data_dir) {
                tracing::warn!(
                    directory = %closed.display(),
                    data_dir = %settings.data_dir.display(),
                    "process functions run as other users and cannot pass through this directory to reach their \
                     packages: give it o+x (chmod o+x), or move the data directory"
                );
            }
        }
        Isolation::Unavailable(why) => {
            tracing::warn!(reason = %why, "process functions cannot run: every process invocation fails with start_failed");
        }
        Isolation::None => {
            tracing::warn!(
                "PROCESS FUNCTIONS ARE NOT ISOLATED (--process-isolation none): they run as the agent's own user and \
                 can read its node credential and invoke secret, every tenant's usage and logs in the spool, each \
                 other's environment (secrets) and files, and change cached packages; use this only when every \
                 function on this node is trusted"
            );
        }
    }
    isolation
}

/// Runs the agent until `shutdown` resolves, then drains and returns. An error means the node
/// could not start (settings, data directory, a refused join); once running it never gives up.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let name = settings.validate().map_err(anyhow::Error::msg)?;
    let base = settings.control_plane();
    let paths = Paths::prepare(&settings.data_dir)?;
    // Scratch directories of invocations a killed agent left behind are of no use to anyone.
    let _ = std::fs::remove_dir_all(&paths.scratch);
    let isolation = process_isolation(&settings).await;

    let engine = Arc::new(WasmEngine::new(&WasmSettings {
        instance_slots: settings.wasm_pool_slots,
        max_memory_mb: settings.wasm_max_memory_mb,
        pooling: settings.wasm_pooling,
    })?);
    let cache = Arc::new(CodeCache::open(&paths.cache, settings.cache_budget_bytes)?);
    let spool = Arc::new(Spool::open(&paths.usage, settings.usage_batch_size)?);
    let process = ProcessRuntime::new(&paths.scratch, isolation)?;
    let registry = Registry::new();
    let stats = Arc::new(Stats::new());

    let tcp = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the invocation listener to {}", settings.listen))?;
    let bound = tcp.local_addr()?;
    let invoke_url = settings.invoke_url(bound);
    println!("listening on http://{bound}");
    tracing::info!(%bound, %invoke_url, pooled = engine.pooled(), "invocation listener bound");

    let node = NodeInfo {
        name,
        zone: settings.zone.clone(),
        capacity: settings.capacity(),
        invoke_url,
        labels: settings.labels(),
    };
    let client = Arc::new(ControlPlane::new(base, settings.join_token.clone(), node, paths.identity.clone())?);
    tokio::pin!(shutdown);
    let identity = tokio::select! {
        identity = client.establish() => identity.context("the node could not join the control plane")?,
        () = &mut shutdown => {
            tracing::info!("stopped before the node had joined");
            spool.close();
            return Ok(());
        }
    };
    println!("joined as node {}", identity.node_id);
    tracing::info!(node_id = %identity.node_id, expires_at = %identity.expires_at, "joined the control plane");

    let auth = Arc::new(InvokeAuth::default());
    auth.set(&identity.invoke_secret);
    let report_interval = settings
        .report_interval
        .map(|d| d.0)
        .or_else(|| (identity.report_interval_ms > 0).then(|| Duration::from_millis(identity.report_interval_ms)))
        .unwrap_or(DEFAULT_REPORT_INTERVAL)
        .max(Duration::from_millis(100));

    let draining = Arc::new(AtomicBool::new(false));
    let invoker = Arc::new(Invoker::new(registry.clone(), stats.clone(), engine.clone(), process, spool.clone()));
    let app = router(Arc::new(Listener {
        invoker,
        auth: auth.clone(),
        draining: draining.clone(),
        max_body_bytes: settings.max_body_bytes,
        api_url: Some(settings.control_plane()),
    }));
    let (stop_serving, serving_stopped) = watch::channel(false);
    let server = tokio::spawn(async move {
        let mut stopped = serving_stopped;
        let graceful = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        // No Nagle delay on responses written in pieces (the CGI head, then the body).
        let tcp = axum::serve::ListenerExt::tap_io(tcp, |s| {
            let _ = s.set_nodelay(true);
        });
        if let Err(e) = axum::serve(tcp, app).with_graceful_shutdown(graceful).await {
            tracing::error!(error = %e, "the invocation listener failed");
        }
    });

    let reconciled = Arc::new(crate::report::Reconciled::default());
    let (latest, desired) = watch::channel(None);
    let shipper = Shipper::new(spool.clone(), client.clone());
    let reporter = Arc::new(Reporter {
        client: client.clone(),
        registry: registry.clone(),
        stats,
        reconciled: reconciled.clone(),
    });
    let reconciler = Reconciler::new(client.clone(), cache, engine, registry.clone(), settings.max_queued, reconciled);
    let tasks: Vec<JoinHandle<()>> = vec![
        tokio::spawn(follow_invoke_secret(client.clone(), auth)),
        tokio::spawn({
            let client = client.clone();
            async move { client.keep_renewed().await }
        }),
        tokio::spawn(poll(client.clone(), latest)),
        tokio::spawn(reconciler.run(desired)),
        tokio::spawn(reporter.clone().run(report_interval)),
        // Segments an earlier run left are sealed already, so the first round ships them.
        tokio::spawn(shipper.clone().run(settings.usage_flush_interval.0)),
    ];

    shutdown.await;
    tracing::info!(in_flight = registry.in_flight(), "draining");
    let deadline = Instant::now() + settings.drain_timeout.0;
    draining.store(true, Ordering::Relaxed);
    let _ = stop_serving.send(true);
    let mut server = server;
    let finish = async {
        // The server ends once every connection is answered; invocations whose caller went
        // away run on their own tasks and are counted by the registry.
        let _ = (&mut server).await;
        wait_idle(&registry).await;
    };
    if tokio::time::timeout_at(deadline.into(), finish).await.is_err() {
        tracing::warn!(in_flight = registry.in_flight(), "invocations still running at the drain timeout");
    }
    server.abort();
    for task in &tasks {
        task.abort();
    }
    for task in tasks {
        let _ = task.await;
    }

    let ship_deadline = Instant::now() + settings.drain_timeout.0;
    match tokio::time::timeout_at(ship_deadline.into(), shipper.ship_all()).await {
        Ok(Ok(())) => tracing::info!("all usage shipped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "usage not shipped; it stays spooled for the next run"),
        Err(_) => tracing::warn!("shipping usage timed out; it stays spooled for the next run"),
    }
    spool.close();
    match tokio::time::timeout(LEAVE_TIMEOUT, reporter.last()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the last report failed"),
        Err(_) => tracing::warn!("the last report timed out"),
    }
    match tokio::time::timeout(LEAVE_TIMEOUT, client.leave()).await {
        Ok(Ok(())) => tracing::info!("left the control plane"),
        Ok(Err(e)) => tracing::warn!(error = %e, "leaving the control plane failed"),
        Err(_) => tracing::warn!("leaving the control plane timed out"),
    }
    Ok(())
}

/// Waits until no invocation runs.
async fn wait_idle(registry: &Registry) {
    while registry.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Keeps the listener's secret that of the latest join.
async fn follow_invoke_secret(client: Arc<ControlPlane>, auth: Arc<InvokeAuth>) {
    let mut changes = client.subscribe();
    while changes.changed().await.is_ok() {
        let secret = changes.borrow_and_update().as_ref().map(|i| i.invoke_secret.clone());
        if let Some(secret) = secret {
            auth.set(&secret);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_data_directory_is_passable_not_listable_and_refused_when_others_can_write_it() {
        let root = std::env::temp_dir().join(format!("nimbus-agent-paths-{}", uuid::Uuid::now_v7()));
        let data = root.join("a/data");
        let paths = Paths::prepare(&data).unwrap();
        assert_eq!(mode(&data), 0o711);
        assert_eq!(paths.identity, data.join("identity.json"));
        // An older agent's 0700 directory and an identity someone made readable are fixed.
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&paths.identity, b"{}").unwrap();
        std::fs::set_permissions(&paths.identity, std::fs::Permissions::from_mode(0o644)).unwrap();
        Paths::prepare(&data).unwrap();
        assert_eq!((mode(&data), mode(&paths.identity)), (0o711, 0o600));
        for writable in [0o775, 0o757, 0o1777] {
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(writable)).unwrap();
            let err = format!("{:#}", Paths::prepare(&data).unwrap_err());
            assert!(err.contains("written by others"), "{err}");
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_directory_others_cannot_pass_through_is_found() {
        let root = std::env::temp_dir().join(format!("nimbus-agent-closed-{}", uuid::Uuid::now_v7()));
        let data = root.join("closed/data");
        std::fs::create_dir_all(&data).unwrap();
        for dir in [&root, &root.join("closed"), &data] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let ancestors_open = closed_to_others(&root).is_none();
        assert_eq!(closed_to_others(&data).is_none(), ancestors_open);
        std::fs::set_permissions(root.join("closed"), std::fs::Permissions::from_mode(0o750)).unwrap();
        assert_eq!(closed_to_others(&data), Some(root.join("closed").canonicalize().unwrap()));
        let _ = std::fs::remove_dir_all(root);
    }
}
