//! Metrics agents report: the recent seconds per version in memory (what the autoscaler reads),
//! and per-minute rollups written to PostgreSQL (`version_metrics`).
//!
//! Each replica keeps what the agents that reported to it sent. Rollups are upserts that add to
//! what other replicas wrote for the same minute, so replicas never overwrite each other. A
//! replica that dies loses at most its unflushed minute of metrics (never usage: usage has its
//! own idempotent path).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use nimbus_protocol::{LATENCY_BUCKETS_MS, VersionMetrics};
use uuid::Uuid;

use crate::db::{self, Scope};

/// Seconds of history kept per version.
pub const RECENT_SECONDS: usize = 120;
/// Buckets of a latency histogram.
pub const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// One second of one version, summed over nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Second {
    /// Start of the second.
    pub second: DateTime<Utc>,
    /// The same instant in milliseconds since the epoch (what the autoscaler averages over).
    pub at_ms: u64,
    /// In-flight average, summed over nodes.
    pub concurrency: f64,
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// Cold starts.
    pub cold_starts: u64,
}

#[derive(Debug, Clone)]
struct Rollup {
    tenant: Uuid,
    requests: i64,
    errors: i64,
    cold_starts: i64,
    concurrency_sum: f64,
    buckets: [i64; BUCKETS],
    queued: i64,
    queue_ms_sum: f64,
}

/// Largest count one rollup row takes in a minute; far above any real traffic, far below what
/// overflows `bigint` when replicas add to the row.
const MAX_COUNT: i64 = 1 << 48;

impl Rollup {
    fn add(
        &mut self,
        requests: i64,
        errors: i64,
        cold_starts: i64,
        concurrency: f64,
        buckets: impl Iterator<Item = i64>,
    ) {
        self.requests = self.requests.saturating_add(requests).min(MAX_COUNT);
        self.errors = self.errors.saturating_add(errors).min(MAX_COUNT);
        self.cold_starts = self.cold_starts.saturating_add(cold_starts).min(MAX_COUNT);
        self.concurrency_sum += concurrency;
        for (b, n) in self.buckets.iter_mut().zip(buckets) {
            *b = b.saturating_add(n).min(MAX_COUNT);
        }
    }

    fn empty(tenant: Uuid) -> Rollup {
        Rollup {
            tenant,
            requests: 0,
            errors: 0,
            cold_starts: 0,
            concurrency_sum: 0.0,
            buckets: [0; BUCKETS],
            queued: 0,
            queue_ms_sum: 0.0,
        }
    }

    fn merge(&mut self, other: &Rollup) {
        self.add(other.requests, other.errors, other.cold_starts, other.concurrency_sum, other.buckets.into_iter());
        self.queued = self.queued.saturating_add(other.queued).min(MAX_COUNT);
        self.queue_ms_sum += other.queue_ms_sum;
    }
}

#[derive(Default)]
struct Inner {
    recent: HashMap<Uuid, VecDeque<Second>>,
    pending: HashMap<(Uuid, DateTime<Utc>), Rollup>,
}

/// The metrics store of a replica.
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Mutex<Inner>>,
}

impl Stats {
    /// Adds one reported second of `tenant`'s version.
    pub fn record(&self, tenant: Uuid, m: &VersionMetrics) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let recent = inner.recent.entry(m.version_id).or_default();
        match recent.iter_mut().rev().find(|s| s.second == m.second) {
            Some(s) => {
                s.concurrency += m.concurrency;
                s.requests = s.requests.saturating_add(m.requests);
                s.errors = s.errors.saturating_add(m.errors);
                s.cold_starts = s.cold_starts.saturating_add(m.cold_starts);
            }
            None => {
                recent.push_back(Second {
                    second: m.second,
                    at_ms: u64::try_from(m.second.timestamp_millis()).unwrap_or(0),
                    concurrency: m.concurrency,
                    requests: m.requests,
                    errors: m.errors,
                    cold_starts: m.cold_starts,
                });
                recent.make_contiguous().sort_by_key(|s| s.second);
                while recent.len() > RECENT_SECONDS {
                    recent.pop_front();
                }
            }
        }
        let minute = m.second.duration_trunc(TimeDelta::minutes(1)).unwrap_or(m.second);
        let r = inner.pending.entry((m.version_id, minute)).or_insert_with(|| Rollup::empty(tenant));
        // Counts are a node's word: saturate rather than overflow (a value that overflows
        // `bigint` in the upsert would fail every later flush of this replica).
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX).min(MAX_COUNT);
        r.add(
            count(m.requests),
            count(m.errors),
            count(m.cold_starts),
            m.concurrency,
            m.latency_buckets.iter().map(|n| count(*n)),
        );
    }

    /// Counts a request the gateway held for `waited` while an instance started.
    pub fn record_queue(&self, tenant: Uuid, version: Uuid, waited: std::time::Duration) {
        let now = Utc::now();
        let minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let r = inner.pending.entry((version, minute)).or_insert_with(|| Rollup::empty(tenant));
        r.queued = r.queued.saturating_add(1).min(MAX_COUNT);
        r.queue_ms_sum += waited.as_secs_f64() * 1000.0;
    }

    /// The recent seconds of a version, oldest first.
    pub fn recent(&self, version: Uuid) -> Vec<Second> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.recent.get(&version).map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }

    /// The concurrency of every version with traffic in the last [`RECENT_SECONDS`], as
    /// `(second in ms since the epoch, concurrency)` oldest first (what the autoscaler averages),
    /// in one pass under one lock. Versions whose newest second is older than that are
    /// forgotten here.
    pub fn concurrency(&self, now: DateTime<Utc>) -> HashMap<Uuid, Vec<(u64, f64)>> {
        let mut out = HashMap::new();
        self.concurrency_into(now, None, &mut out);
        out
    }

    /// [`Stats::concurrency`] into `out`, reusing its series' buffers (the autoscaler keeps one
    /// map across ticks instead of allocating a series per version every tick). With `window`
    /// (ms), a series holds only the seconds of the last `window` before `now` and the newest
    /// one before them (which falls outside every average of at most `window` but still tells
    /// that the traffic began earlier): what the autoscaler's averages read, without copying the
    /// rest of [`RECENT_SECONDS`].
    pub fn concurrency_into(&self, now: DateTime<Utc>, window: Option<u64>, out: &mut HashMap<Uuid, Vec<(u64, f64)>>) {
        let horizon = now - TimeDelta::seconds(RECENT_SECONDS as i64);
        let from = window.map_or(0, |w| u64::try_from(now.timestamp_millis()).unwrap_or(0).saturating_sub(w));
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.recent.retain(|_, r| r.back().is_some_and(|s| s.second > horizon));
        out.retain(|v, _| inner.recent.contains_key(v));
        for (v, r) in &inner.recent {
            let series = out.entry(*v).or_default();
            series.clear();
            // The first second to copy: the newest one before `from`, else the oldest.
            // Scanned from the newest: only the seconds copied are read.
            let inside = r.len() - r.iter().rev().take_while(|s| s.at_ms >= from).count();
            series.extend(r.range(inside.saturating_sub(1)..).map(|s| (s.at_ms, s.concurrency)));
        }
    }

    /// Publishes the concurrency of the last `seconds` seconds (complete or not: a later publish
    /// overwrites) to `concurrency_samples` under `replica`, for the autoscaler leader of another
    /// replica. Returns the rows written.
    pub async fn publish(&self, pool: &db::Db, replica: Uuid, seconds: i64) -> Result<usize, sqlx::Error> {
        let since = Utc::now() - TimeDelta::seconds(seconds);
        let (mut versions, mut at, mut values) = (Vec::new(), Vec::new(), Vec::new());
        {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            for (v, recent) in &inner.recent {
                for s in recent.iter().rev().take_while(|s| s.second >= since) {
                    versions.push(*v);
                    at.push(s.second);
                    values.push(s.concurrency);
                }
            }
        }
        if versions.is_empty() {
            return Ok(0);
        }
        let mut tx = db::begin(pool, &Scope::platform(None)).await?;
        sqlx::query(
            "INSERT INTO concurrency_samples (version_id, second, replica_id, concurrency) \
             SELECT v, s, $3, c FROM unnest($1::uuid[], $2::timestamptz[], $4::float8[]) AS u(v, s, c) \
             ON CONFLICT (version_id, second, replica_id) DO UPDATE SET concurrency = EXCLUDED.concurrency",
        )
        .bind(&versions)
        .bind(&at)
        .bind(replica)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(versions.len())
    }

    /// Writes the pending rollups to PostgreSQL, adding to rows other replicas wrote. On failure
    /// the rollups are kept for the next flush. Returns the rows written.
    pub async fn flush(&self, pool: &db::Db) -> Result<usize, sqlx::Error> {
        let pending = std::mem::take(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).pending);
        if pending.is_empty() {
            return Ok(0);
        }
        let result = write(pool, &pending).await;
        if result.is_err() {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            // Merge with what arrived meanwhile: nothing counted twice, nothing dropped.
            for (k, v) in pending {
                match inner.pending.get_mut(&k) {
                    Some(r) => r.merge(&v),
                    None => {
                        inner.pending.insert(k, v);
                    }
                }
            }
        }
        result
    }
}

async fn write(pool: &db::Db, pending: &HashMap<(Uuid, DateTime<Utc>), Rollup>) -> Result<usize, sqlx::Error> {
    let mut tx = db::begin(pool, &Scope::platform(None)).await?;
    for ((version, minute), r) in pending {
        sqlx::query(
            "INSERT INTO version_metrics (tenant_id, version_id, minute, requests, errors, cold_starts, \
             concurrency_sum, latency_buckets, queued, queue_ms_sum) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (version_id, minute) DO UPDATE SET \
               queued = version_metrics.queued + EXCLUDED.queued, \
               queue_ms_sum = version_metrics.queue_ms_sum + EXCLUDED.queue_ms_sum, \
               requests = version_metrics.requests + EXCLUDED.requests, \
               errors = version_metrics.errors + EXCLUDED.errors, \
               cold_starts = version_metrics.cold_starts + EXCLUDED.cold_starts, \
               concurrency_sum = version_metrics.concurrency_sum + EXCLUDED.concurrency_sum, \
               latency_buckets = ARRAY(SELECT a + b FROM unnest(version_metrics.latency_buckets, \
                 EXCLUDED.latency_buckets) WITH ORDINALITY AS t(a, b, i) ORDER BY i)",
        )
        .bind(r.tenant)
        .bind(version)
        .bind(minute)
        .bind(r.requests)
        .bind(r.errors)
        .bind(r.cold_starts)
        .bind(r.concurrency_sum)
        .bind(&r.buckets[..])
        .bind(r.queued)
        .bind(r.queue_ms_sum)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(pending.len())
}

/// Flushes rollups every minute.
pub async fn rollup_loop(stats: Stats, pool: db::Db) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        match stats.flush(&pool).await {
            Ok(n) => metrics::counter!("nimbus_metrics_rollups_written_total").increment(n as u64),
            Err(e) => tracing::warn!(error = ?e, "writing metrics rollups failed; kept for the next minute"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(version: Uuid, at: DateTime<Utc>, concurrency: f64) -> VersionMetrics {
        VersionMetrics {
            version_id: version,
            tenant_id: Uuid::nil(),
            second: at,
            concurrency,
            requests: 1,
            errors: 0,
            cold_starts: 0,
            latency_buckets: vec![0; BUCKETS],
        }
    }

    #[test]
    fn a_window_keeps_its_seconds_and_the_newest_one_before_them_reusing_the_series() {
        let stats = Stats::default();
        let (v, quiet) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        for (ago, c) in [(90, 1.0), (70, 2.0), (30, 3.0), (1, 4.0)] {
            stats.record(Uuid::nil(), &second(v, now - TimeDelta::seconds(ago), c));
        }
        // Traffic 100 s ago only: nothing inside a 60 s window, but still seen as traffic.
        stats.record(Uuid::nil(), &second(quiet, now - TimeDelta::seconds(100), 5.0));
        let ms = |ago: i64| u64::try_from((now - TimeDelta::seconds(ago)).timestamp_millis()).unwrap();
        let mut out = HashMap::new();
        stats.concurrency_into(now, Some(60_000), &mut out);
        assert_eq!(out[&v], vec![(ms(70), 2.0), (ms(30), 3.0), (ms(1), 4.0)]);
        assert_eq!(out[&quiet], vec![(ms(100), 5.0)]);
        stats.concurrency_into(now, None, &mut out);
        assert_eq!(out[&v].len(), 4, "no window: every recent second");
        assert_eq!(stats.concurrency(now), out);
        let buffer = out[&v].as_ptr();
        stats.concurrency_into(now, Some(60_000), &mut out);
        assert_eq!(out[&v].as_ptr(), buffer, "the series' buffer is reused");
        // Once the quiet version's second leaves the recent horizon it is forgotten.
        stats.concurrency_into(now + TimeDelta::seconds(30), Some(60_000), &mut out);
        assert!(!out.contains_key(&quiet) && out.contains_key(&v));
    }
}
