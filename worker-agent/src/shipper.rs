//! Ships the usage spool to the control plane (`POST /agent/v1/usage`): every flush interval, or
//! as soon as a batch's worth of records is spooled, the open segment is sealed and every sealed
//! segment is sent, oldest first, in chunks within the protocol's bounds. A segment is deleted
//! only after every chunk was acknowledged; failures are retried with exponential backoff, and
//! that includes every refusal but one: a node without a usable credential (a refused join
//! token among them: an operator must give it a new one) and a 400 (say, the control plane and
//! the agent disagree on the protocol during an upgrade) keep the segment until it goes through.
//! Only a chunk the control plane calls invalid (422) is split, and its halves again, down to
//! single records and log lines, so that one bad item cannot take the good ones with it; the
//! items refused on their own are appended to `<seq>.rejected` for an operator (each line a
//! usage batch that can be sent again as it is), and the segment goes on.
//! Delivery is at least once: the control plane stores each invocation and log line once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nimbus_protocol::{MAX_LOG_LINES, MAX_USAGE_RECORDS, UsageBatch};
use tokio::sync::Mutex;

use crate::{
    backoff::Backoff,
    client::{CallError, ControlPlane},
    spool::{Spool, SpoolEntry, read_segment, set_aside},
};

/// Serialized size a batch stays under, so that it fits the control plane's body limit (1 MiB by
/// default) with room to spare.
pub const MAX_BATCH_BYTES: usize = 768 * 1024;

/// Splits spooled entries into batches of at most [`MAX_USAGE_RECORDS`] records,
/// [`MAX_LOG_LINES`] log lines and about [`MAX_BATCH_BYTES`]. An invocation's log lines may
/// spread over several batches; its record always goes with the first.
pub fn batches(entries: Vec<SpoolEntry>) -> Vec<UsageBatch> {
    let mut out = Vec::new();
    let mut batch = UsageBatch::default();
    let mut bytes = 0;
    for entry in entries {
        let record_bytes = json_len(&entry.record);
        if batch.records.len() == MAX_USAGE_RECORDS || bytes + record_bytes > MAX_BATCH_BYTES {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        batch.records.push(entry.record);
        bytes += record_bytes;
        for line in entry.logs {
            let line_bytes = json_len(&line);
            if batch.logs.len() == MAX_LOG_LINES || bytes + line_bytes > MAX_BATCH_BYTES {
                out.push(std::mem::take(&mut batch));
                bytes = 0;
            }
            batch.logs.push(line);
            bytes += line_bytes;
        }
    }
    if !batch.records.is_empty() || !batch.logs.is_empty() {
        out.push(batch);
    }
    out
}

/// Bytes of a value's JSON form, plus a separator.
fn json_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len() + 1)
}

/// The shipper of one spool.
pub struct Shipper {
    spool: Arc<Spool>,
    client: Arc<ControlPlane>,
    /// Chunks of a segment already acknowledged, so that a retry resumes after them.
    acked: Mutex<HashMap<PathBuf, usize>>,
}

impl Shipper {
    /// A shipper of `spool` to `client`.
    pub fn new(spool: Arc<Spool>, client: Arc<ControlPlane>) -> Arc<Shipper> {
        Arc::new(Shipper { spool, client, acked: Mutex::default() })
    }

    /// Ships every `interval`, or sooner when a batch is ready, forever (abort it to stop).
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            match self.ship_all().await {
                Ok(()) => {
                    backoff.reset();
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = self.spool.batch_ready() => {}
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let retry_in_ms = delay.as_millis() as u64;
                    if matches!(&e, ShipError::Call(c) if c.is_credential_problem()) {
                        tracing::error!(
                            error = %e,
                            retry_in_ms,
                            "the node has no credential the control plane accepts and cannot join again; its usage \
                             stays in the spool until it can"
                        );
                    } else {
                        tracing::warn!(error = %e, retry_in_ms, "shipping usage failed; the segment is kept");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Seals the open segment and ships every sealed one, oldest first; stops at the first
    /// failure (the segment stays and is sent again).
    pub async fn ship_all(&self) -> Result<(), ShipError> {
        let spool = self.spool.clone();
        let sealed = tokio::task::spawn_blocking(move || {
            spool.rotate()?;
            spool.sealed()
        })
        .await
        .map_err(|e| ShipError::Io(std::io::Error::other(e)))??;
        for segment in sealed {
            self.ship_segment(&segment).await?;
        }
        Ok(())
    }

    async fn ship_segment(&self, segment: &Path) -> Result<(), ShipError> {
        let mut acked = self.acked.lock().await;
        let path = segment.to_owned();
        let entries = tokio::task::spawn_blocking(move || read_segment(&path))
            .await
            .map_err(|e| ShipError::Io(std::io::Error::other(e)))??;
        let chunks = batches(entries);
        let done = acked.get(segment).copied().unwrap_or(0);
        for (i, batch) in chunks.into_iter().enumerate().skip(done) {
            let refused = self.ship_splitting(batch).await?;
            if !refused.is_empty() {
                let aside = segment.with_extension(crate::spool::REJECTED);
                tracing::error!(
                    segment = %segment.display(),
                    set_aside = %aside.display(),
                    items = refused.len(),
                    "the control plane refused usage as invalid; the refused items are set aside"
                );
                let write = {
                    let aside = aside.clone();
                    tokio::task::spawn_blocking(move || set_aside(&aside, &refused))
                };
                write.await.map_err(|e| ShipError::Io(std::io::Error::other(e)))??;
            }
            acked.insert(segment.to_owned(), i + 1);
        }
        std::fs::remove_file(segment)?;
        acked.remove(segment);
        Ok(())
    }

    /// Sends `batch`. When the control plane refuses it as invalid (422), its halves are sent
    /// instead, and so on down to single items; returns the items refused on their own (each a
    /// batch of one record or one log line). Any other failure stops it (what was acknowledged
    /// is stored once however often it is sent again).
    async fn ship_splitting(&self, batch: UsageBatch) -> Result<Vec<UsageBatch>, CallError> {
        let mut refused = Vec::new();
        let mut todo = vec![batch];
        while let Some(batch) = todo.pop() {
            match self.client.usage(&batch).await {
                Ok(ack) => tracing::debug!(
                    records = batch.records.len(),
                    logs = batch.logs.len(),
                    accepted = ack.accepted,
                    duplicates = ack.duplicates,
                    "usage shipped"
                ),
                Err(CallError::Status { status: 422, body }) => match split(batch) {
                    Ok((first, second)) => {
                        todo.push(second);
                        todo.push(first);
                    }
                    Err(single) => {
                        tracing::warn!(problem = %body, "the control plane refused a usage item as invalid");
                        refused.push(single);
                    }
                },
                Err(e) => return Err(e),
            }
        }
        Ok(refused)
    }
}

/// Splits a batch of two or more items (its records, then its log lines) into halves in order;
/// a batch of one item (or none) is given back as it is.
pub fn split(batch: UsageBatch) -> Result<(UsageBatch, UsageBatch), UsageBatch> {
    let items = batch.records.len() + batch.logs.len();
    if items < 2 {
        return Err(batch);
    }
    let half = items / 2;
    let UsageBatch { mut records, mut logs } = batch;
    let second = if half <= records.len() {
        UsageBatch { records: records.split_off(half), logs: std::mem::take(&mut logs) }
    } else {
        UsageBatch { records: Vec::new(), logs: logs.split_off(half - records.len()) }
    };
    Ok((UsageBatch { records, logs }, second))
}

/// Why shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The control plane did not take a batch.
    #[error(transparent)]
    Call(#[from] CallError),
    /// The spool could not be read or changed.
    #[error("usage spool: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use nimbus_protocol::{LogLine, UsageRecord, UsageStatus};
    use uuid::Uuid;

    use super::*;

    fn entry(logs: usize, line_len: usize) -> SpoolEntry {
        let id = Uuid::now_v7();
        let record = UsageRecord {
            invocation_id: id,
            tenant_id: id,
            function_id: id,
            version_id: id,
            version: 1,
            started_at: Utc::now(),
            duration_us: 1,
            billed_ms: 1,
            memory_mb: 1,
            http_status: 200,
            status: UsageStatus::Ok,
            cold_start: false,
        };
        let logs = (0..logs)
            .map(|seq| LogLine {
                invocation_id: id,
                tenant_id: id,
                function_id: id,
                version: 1,
                seq: seq as u32,
                time: Utc::now(),
                line: "x".repeat(line_len),
            })
            .collect();
        SpoolEntry { record, logs }
    }

    #[test]
    fn batches_respect_every_bound_and_keep_everything() {
        let check = |entries: Vec<SpoolEntry>| {
            let (records, logs) = (entries.len(), entries.iter().map(|e| e.logs.len()).sum::<usize>());
            let out = batches(entries);
            for b in &out {
                assert!(b.records.len() <= MAX_USAGE_RECORDS && b.logs.len() <= MAX_LOG_LINES);
                assert!(serde_json::to_vec(b).unwrap().len() <= MAX_BATCH_BYTES + 1024);
            }
            assert_eq!(out.iter().map(|b| b.records.len()).sum::<usize>(), records);
            assert_eq!(out.iter().map(|b| b.logs.len()).sum::<usize>(), logs);
            out.len()
        };
        assert_eq!(check(vec![entry(0, 0)]), 1);
        assert_eq!(check(Vec::new()), 0);
        assert!(check((0..MAX_USAGE_RECORDS + 1).map(|_| entry(0, 0)).collect()) >= 2);
        assert!(check(vec![entry(MAX_LOG_LINES + 5, 1)]) >= 2, "one invocation's lines spread over batches");
        assert!(check(vec![entry(300, 4000)]) >= 2, "large lines split by bytes");
    }

    #[test]
    fn splitting_halves_a_batch_down_to_single_items_and_keeps_everything_in_order() {
        let entries = vec![entry(2, 1), entry(0, 0), entry(1, 1)];
        let batch = batches(entries).remove(0);
        let (records, logs) = (batch.records.clone(), batch.logs.clone());
        assert_eq!((records.len(), logs.len()), (3, 3));
        let (a, b) = split(batch).unwrap();
        assert_eq!((a.records.len(), a.logs.len(), b.records.len(), b.logs.len()), (3, 0, 0, 3));
        let (b1, b2) = split(b).unwrap();
        assert_eq!((b1.logs.len(), b2.logs.len()), (1, 2));
        let (a1, a2) = split(a).unwrap();
        assert_eq!((a1.records.len(), a2.records.len()), (1, 2));
        assert_eq!([a1.records.clone(), a2.records.clone()].concat(), records);
        assert_eq!([b1.logs.clone(), b2.logs.clone()].concat(), logs);
        // One item (or none) cannot be split.
        assert!(split(a1).is_err());
        assert!(split(b1).is_err());
        assert!(split(UsageBatch::default()).is_err());
        // Records and lines across the middle.
        let mixed = UsageBatch { records: records[..1].to_vec(), logs: logs.clone() };
        let (m1, m2) = split(mixed).unwrap();
        assert_eq!((m1.records.len(), m1.logs.len(), m2.records.len(), m2.logs.len()), (1, 1, 0, 2));
    }
}
