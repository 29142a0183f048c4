//! Reports (`POST /agent/v1/reports`): every report interval, the node's heartbeat — the revision
//! it reconciled to, its invocations in flight, each version's status — and the per-second
//! metrics completed since the last report. Metrics a failed report carried go back to be sent
//! again (for at most a minute).

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use nimbus_protocol::Report;

use crate::{
    client::{CallError, ControlPlane},
    registry::Registry,
    stats::Stats,
};

/// Most metrics entries in one report (the control plane takes up to 10,000 items).
pub const MAX_METRICS: usize = 5_000;

/// What reports are made of.
pub struct Reporter {
    /// Where they go.
    pub client: Arc<ControlPlane>,
    /// The versions.
    pub registry: Arc<Registry>,
    /// The metrics.
    pub stats: Arc<Stats>,
    /// The revision the last reconcile pass finished.
    pub reconciled: Arc<Reconciled>,
}

/// The revision the last reconcile pass finished, and a signal that one did: a pass that made a
/// version ready is reported at once (a request may be held at a gateway waiting for it), not at
/// the next interval.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// The revision.
    pub revision: AtomicI64,
    /// Notified after each pass.
    pub changed: tokio::sync::Notify,
}

impl Reporter {
    /// The report of now (taking the completed metrics, at most [`MAX_METRICS`]; the newer rest
    /// waits for the next report).
    pub fn report(&self) -> Report {
        let mut metrics = self.stats.take();
        if metrics.len() > MAX_METRICS {
            self.stats.restore(metrics.split_off(MAX_METRICS));
        }
        Report {
            revision: self.reconciled.revision.load(Ordering::Relaxed),
            in_flight: self.registry.in_flight(),
            versions: self.registry.statuses(),
            metrics,
        }
    }

    /// The last report before the agent exits: the second in progress included.
    pub async fn last(&self) -> Result<(), CallError> {
        let mut report = self.report();
        report.metrics.extend(self.stats.take_all());
        report.metrics.truncate(MAX_METRICS);
        self.client.report(&report).await
    }

    /// Reports every `interval`, forever.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.reconciled.changed.notified() => {}
            }
            let report = self.report();
            match self.client.report(&report).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("reports are accepted again");
                    }
                    failing = false;
                }
                // A report the control plane refuses as such would be refused again; a node
                // without a credential (its join refused too) keeps its metrics for a minute.
                Err(e) if !e.is_transient() && !e.is_credential_problem() => {
                    tracing::warn!(error = %e, metrics = report.metrics.len(), "a report was refused; its metrics are dropped");
                }
                Err(e) => {
                    // One warning per outage, not one per interval.
                    if !failing {
                        tracing::warn!(error = %e, "reporting failed; metrics are kept for a minute");
                    }
                    failing = true;
                    self.stats.restore(report.metrics);
                }
            }
        }
    }
}
