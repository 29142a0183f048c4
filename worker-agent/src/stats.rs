//! Per-second traffic metrics of each version, as reports carry them ([`VersionMetrics`]):
//! time-weighted average in-flight concurrency over the second, requests, errors, cold starts and
//! a latency histogram. Only completed seconds are handed out; what the control plane has not
//! taken yet is kept for at most [`KEEP_SECONDS`].

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Instant,
};

use chrono::{DateTime, Utc};
use nimbus_protocol::{LATENCY_BUCKETS_MS, VersionMetrics, latency_bucket};
use uuid::Uuid;

/// Unreported seconds kept while the control plane does not take them.
pub const KEEP_SECONDS: i64 = 60;

/// The traffic of one version in the second being counted.
#[derive(Debug)]
struct Series {
    tenant_id: Uuid,
    in_flight: u32,
    /// The second being counted (Unix seconds).
    second: i64,
    /// When `in_flight` last changed or was accounted (Unix seconds, fractional).
    last: f64,
    /// In-flight × seconds accumulated in `second`.
    area: f64,
    requests: u64,
    errors: u64,
    cold_starts: u64,
    buckets: Vec<u64>,
}

impl Series {
    fn new(tenant_id: Uuid, now: f64) -> Series {
        Series {
            tenant_id,
            in_flight: 0,
            second: now.floor() as i64,
            last: now,
            area: 0.0,
            requests: 0,
            errors: 0,
            cold_starts: 0,
            buckets: vec![0; LATENCY_BUCKETS_MS.len() + 1],
        }
    }

    fn idle(&self) -> bool {
        self.in_flight == 0 && self.requests == 0 && self.area == 0.0
    }

    /// Accounts time up to `now`, closing every second that ended before it.
    fn advance(&mut self, version_id: Uuid, now: f64, out: &mut VecDeque<VersionMetrics>) {
        let now = now.max(self.last);
        loop {
            let end = (self.second + 1) as f64;
            if now < end {
                self.area += f64::from(self.in_flight) * (now - self.last);
                self.last = now;
                return;
            }
            self.area += f64::from(self.in_flight) * (end - self.last);
            if self.requests > 0 || self.area > 0.0 {
                out.push_back(VersionMetrics {
                    version_id,
                    tenant_id: self.tenant_id,
                    second: DateTime::from_timestamp(self.second, 0).unwrap_or_default(),
                    concurrency: self.area,
                    requests: self.requests,
                    errors: self.errors,
                    cold_starts: self.cold_starts,
                    latency_buckets: std::mem::replace(&mut self.buckets, vec![0; LATENCY_BUCKETS_MS.len() + 1]),
                });
            }
            (self.area, self.requests, self.errors, self.cold_starts) = (0.0, 0, 0, 0);
            self.second += 1;
            self.last = end;
            // Nothing happens in seconds without traffic; and a long-running invocation must not
            // make one metric per second of a long gap beyond what is kept anyway.
            let floor = now.floor() as i64;
            let skip_to = if self.in_flight == 0 { floor } else { floor - KEEP_SECONDS };
            if skip_to > self.second {
                self.second = skip_to;
                self.last = skip_to as f64;
            }
        }
    }
}

/// The metrics of all versions on the node.
#[derive(Debug)]
pub struct Stats {
    anchor: (Instant, f64),
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    series: HashMap<Uuid, Series>,
    completed: VecDeque<VersionMetrics>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    /// Empty metrics, on a monotonic clock anchored at the current wall time.
    pub fn new() -> Stats {
        let wall = Utc::now();
        let unix = wall.timestamp() as f64 + f64::from(wall.timestamp_subsec_nanos()) / 1e9;
        Stats { anchor: (Instant::now(), unix), inner: Mutex::default() }
    }

    /// Now, in Unix seconds, monotonic (a clock step does not bend the seconds already counted).
    fn now(&self) -> f64 {
        self.anchor.1 + self.anchor.0.elapsed().as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An invocation of `version_id` started.
    pub fn started(&self, version_id: Uuid, tenant_id: Uuid) {
        self.started_at(version_id, tenant_id, self.now());
    }

    /// An invocation of `version_id` finished.
    pub fn finished(&self, version_id: Uuid, latency_ms: f64, error: bool, cold_start: bool) {
        self.finished_at(version_id, latency_ms, error, cold_start, self.now());
    }

    /// The metrics of every second completed so far, oldest first.
    pub fn take(&self) -> Vec<VersionMetrics> {
        self.take_at(self.now())
    }

    /// Everything counted, the second in progress included (for the last report before the
    /// agent exits).
    pub fn take_all(&self) -> Vec<VersionMetrics> {
        let now = self.now();
        // Closing the current second early: nothing is counted in it afterwards.
        self.take_at(now.floor() + 1.0)
    }

    /// Gives back metrics a report could not deliver; the oldest beyond [`KEEP_SECONDS`] are
    /// dropped.
    pub fn restore(&self, metrics: Vec<VersionMetrics>) {
        self.restore_at(metrics, self.now());
    }

    fn started_at(&self, version_id: Uuid, tenant_id: Uuid, now: f64) {
        let mut inner = self.lock();
        let Inner { series, completed } = &mut *inner;
        let s = series.entry(version_id).or_insert_with(|| Series::new(tenant_id, now));
        s.advance(version_id, now, completed);
        s.in_flight += 1;
    }

    fn finished_at(&self, version_id: Uuid, latency_ms: f64, error: bool, cold_start: bool, now: f64) {
        let mut inner = self.lock();
        let Inner { series, completed } = &mut *inner;
        let Some(s) = series.get_mut(&version_id) else { return };
        s.advance(version_id, now, completed);
        s.in_flight = s.in_flight.saturating_sub(1);
        s.requests += 1;
        s.errors += u64::from(error);
        s.cold_starts += u64::from(cold_start);
        s.buckets[latency_bucket(latency_ms)] += 1;
    }

    fn take_at(&self, now: f64) -> Vec<VersionMetrics> {
        let mut inner = self.lock();
        let Inner { series, completed } = &mut *inner;
        for (id, s) in series.iter_mut() {
            s.advance(*id, now, completed);
        }
        // A version without traffic has nothing to count; it comes back with its next request.
        series.retain(|_, s| !s.idle());
        trim(completed, now);
        completed.drain(..).collect()
    }

    fn restore_at(&self, metrics: Vec<VersionMetrics>, now: f64) {
        let mut inner = self.lock();
        for m in metrics.into_iter().rev() {
            inner.completed.push_front(m);
        }
        trim(&mut inner.completed, now);
    }
}

fn trim(completed: &mut VecDeque<VersionMetrics>, now: f64) {
    let oldest = now.floor() as i64 - KEEP_SECONDS;
    completed.retain(|m| m.second.timestamp() >= oldest);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrency_is_time_weighted_and_only_completed_seconds_are_reported() {
        let stats = Stats::new();
        let (v, t) = (Uuid::now_v7(), Uuid::now_v7());
        let base = 1_000_000.0;
        // Two overlapping invocations: one over all of second 0, one over its second half.
        stats.started_at(v, t, base);
        stats.started_at(v, t, base + 0.5);
        assert!(stats.take_at(base + 0.9).is_empty(), "second 0 is not over yet");
        stats.finished_at(v, 3000.0, false, true, base + 1.0);
        stats.finished_at(v, 700.0, true, false, base + 1.2);
        let m = stats.take_at(base + 2.0);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!((m[0].concurrency - 1.5).abs() < 1e-9, "{}", m[0].concurrency);
        assert_eq!((m[0].requests, m[0].errors), (0, 0));
        assert_eq!(m[0].second.timestamp(), 1_000_000);
        assert!((m[1].concurrency - 0.2).abs() < 1e-9, "{}", m[1].concurrency);
        assert_eq!((m[1].requests, m[1].errors, m[1].cold_starts), (2, 1, 1));
        assert_eq!(m[1].latency_buckets.iter().sum::<u64>(), 2);
        assert_eq!(m[1].latency_buckets[latency_bucket(700.0)], 1);
        assert!(stats.take_at(base + 10.0).is_empty(), "idle seconds are not reported");
    }

    #[test]
    fn undelivered_seconds_are_kept_for_a_minute_at_most() {
        let stats = Stats::new();
        let (v, t) = (Uuid::now_v7(), Uuid::now_v7());
        let base = 2_000_000.0;
        for i in 0..100 {
            stats.started_at(v, t, base + f64::from(i));
            stats.finished_at(v, 1.0, false, false, base + f64::from(i) + 0.1);
        }
        let m = stats.take_at(base + 100.0);
        stats.restore_at(m, base + 100.0);
        let m = stats.take_at(base + 100.0);
        assert_eq!(m.len(), 60, "seconds 40..=99 survive");
        assert_eq!(m[0].second.timestamp(), 2_000_040);
    }

    #[test]
    fn a_long_invocation_does_not_flood_the_report() {
        let stats = Stats::new();
        let (v, t) = (Uuid::now_v7(), Uuid::now_v7());
        stats.started_at(v, t, 3_000_000.0);
        let m = stats.take_at(3_003_600.5);
        assert!(m.len() <= KEEP_SECONDS as usize + 1, "{}", m.len());
        assert!(m.iter().all(|m| (m.concurrency - 1.0).abs() < 1e-9));
    }
}
