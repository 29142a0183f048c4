//! Running one invocation of a ready version: its code (warm, or loaded now as a cold start), the
//! runtime with the version's limits, and what it leaves behind — metrics, and a usage record
//! with its log lines, which are in the spool before the caller's response completes (a streamed
//! response's body ends only after the invocation, and so its usage, is done).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use uuid::Uuid;

use crate::{
    registry::{Code, Registry, Version},
    runtime::{
        FailureReason, Invocation, Limits, Outcome, Response, process::ProcessRuntime, stream::Io, wasm::WasmEngine,
    },
    spool::{Spool, SpoolEntry},
    stats::Stats,
    usage,
};

/// Everything an invocation needs from the agent.
pub struct Invoker {
    /// The versions served.
    pub registry: Arc<Registry>,
    /// Per-second metrics.
    pub stats: Arc<Stats>,
    wasm: Arc<WasmEngine>,
    process: ProcessRuntime,
    spool: Arc<Spool>,
}

impl Invoker {
    /// An invoker over these parts.
    pub fn new(
        registry: Arc<Registry>,
        stats: Arc<Stats>,
        wasm: Arc<WasmEngine>,
        process: ProcessRuntime,
        spool: Arc<Spool>,
    ) -> Invoker {
        Invoker { registry, stats, wasm, process, spool }
    }

    /// The limits of one invocation of `version`.
    pub fn limits(version: &Version) -> Limits {
        Limits {
            memory_bytes: u64::from(version.assignment.memory_mb) << 20,
            timeout: Duration::from_millis(u64::from(version.assignment.timeout_ms)),
            ..Limits::default()
        }
    }

    /// Runs `inv` (whose id is `id`) on `version`, for a caller that has been waiting since
    /// `received`, with the body and the response streaming as `io` says. The caller holds the
    /// version's slot. The usage record is spooled before this returns, and before a streamed
    /// response's body ends (its sink closes only after that).
    pub async fn run(&self, version: &Arc<Version>, id: Uuid, inv: Invocation, received: Instant, io: Io) -> Outcome {
        let a = &version.assignment;
        let _running = version.enter(&self.registry);
        self.stats.started(a.version_id, a.tenant_id);
        let limits = Self::limits(version);

        let started_at = Utc::now();
        let mut outcome = match version.code().await {
            Ok((code, cold)) => {
                let mut io = io;
                // Known before the function runs: a streamed head carries it.
                if let Some(sink) = io.response.as_mut() {
                    sink.cold_start = cold;
                }
                let mut outcome = self.execute(code, inv, limits, io).await;
                outcome.cold_start = cold;
                outcome
            }
            Err(e) => {
                tracing::error!(version_id = %a.version_id, error = format!("{e:#}"), "loading the code failed");
                Outcome {
                    response: Response::failed(FailureReason::StartFailed, "the function's code could not be loaded"),
                    log: Vec::new(),
                    log_truncated: false,
                    cold_start: true,
                    duration: Duration::ZERO,
                }
            }
        };

        let finished = Utc::now();
        let entry = SpoolEntry {
            record: usage::record(a, id, started_at, &outcome),
            logs: usage::log_lines(a, id, finished, &outcome.log, outcome.log_truncated),
        };
        // Billing depends on this line reaching the disk before the caller has its answer.
        if let Err(e) = self.spool.append(&entry) {
            tracing::error!(invocation_id = %id, error = %e, "cannot spool the usage record; it is lost");
        }
        outcome.log.clear();

        let error = outcome.response.failure.is_some() || outcome.response.status >= 500;
        let latency_ms = received.elapsed().as_secs_f64() * 1000.0;
        self.stats.finished(a.version_id, latency_ms, error, outcome.cold_start);
        tracing::debug!(
            status = outcome.response.status,
            cold_start = outcome.cold_start,
            duration_us = entry.record.duration_us,
            "invocation finished"
        );
        outcome
    }

    async fn execute(&self, code: Code, inv: Invocation, limits: Limits, io: Io) -> Outcome {
        match code {
            // The guest runs on this task, yielding at every epoch tick (see `runtime::wasm`).
            Code::Wasm(warm) => self.wasm.invoke_streaming(&warm, &inv, &limits, io).await,
            Code::Process(package) => self.process.invoke_streaming(&package, &inv, &limits, io).await,
        }
    }
}
