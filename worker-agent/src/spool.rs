//! The usage spool: every invocation's usage record and log lines are appended to a segment file
//! in `<data>/usage/` before its response is returned, so a crash of the agent loses nothing
//! billable.
//!
//! - A segment is JSON lines, one [`SpoolEntry`] per line. The open segment is
//!   `<seq>.open`; rotating it fsyncs it and renames it to `<seq>.jsonl` (sealed), which the
//!   shipper sends and deletes once the control plane acknowledged all of it (or renames to
//!   `<seq>.rejected` when the control plane refuses it outright).
//! - Appends are one plain `write()` each, without fsync: data in the page cache survives a kill
//!   of the process (only a crash of the machine can lose the last moments, and fsyncing every
//!   invocation would cost more than the invocation).
//! - A torn last line (the process died mid-write) is skipped when the segment is read; segments
//!   left open by an earlier run are sealed when the spool opens, so they are shipped first.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use anyhow::Context;
use nimbus_protocol::{LogLine, UsageRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const OPEN: &str = "open";
const SEALED: &str = "jsonl";
/// Set aside by the shipper (refused by the control plane); never read again, never reused.
pub const REJECTED: &str = "rejected";

/// What a segment file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Open,
    Sealed,
    Rejected,
}

/// One invocation in the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolEntry {
    /// Its usage record.
    pub record: UsageRecord,
    /// Its log lines.
    #[serde(default)]
    pub logs: Vec<LogLine>,
}

struct Open {
    file: std::fs::File,
    path: PathBuf,
    seq: u64,
    records: usize,
}

/// The spool directory and its open segment.
pub struct Spool {
    dir: PathBuf,
    open: Mutex<Open>,
    batch_size: usize,
    batch_ready: Notify,
}

fn segment(dir: &Path, seq: u64, ext: &str) -> PathBuf {
    dir.join(format!("{seq:020}.{ext}"))
}

/// The sequence number of a segment file and what it is.
fn parse_name(path: &Path) -> Option<(u64, Kind)> {
    let seq = path.file_stem()?.to_str()?.parse().ok()?;
    match path.extension()?.to_str()? {
        OPEN => Some((seq, Kind::Open)),
        SEALED => Some((seq, Kind::Sealed)),
        REJECTED => Some((seq, Kind::Rejected)),
        _ => None,
    }
}

fn open_segment(dir: &Path, seq: u64) -> std::io::Result<Open> {
    let path = segment(dir, seq, OPEN);
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    Ok(Open { file, path, seq, records: 0 })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens the spool in `dir`: seals segments an earlier run left open and starts a new one.
    /// `batch_size` records in the open segment wake [`Spool::batch_ready`].
    pub fn open(dir: &Path, batch_size: usize) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut last = 0;
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some((seq, kind)) = parse_name(&path) else { continue };
            last = last.max(seq);
            if kind == Kind::Open {
                let file = std::fs::File::open(&path)?;
                if file.metadata()?.len() == 0 {
                    std::fs::remove_file(&path)?;
                    continue;
                }
                file.sync_all()?;
                std::fs::rename(&path, segment(dir, seq, SEALED))?;
                tracing::info!(segment = %path.display(), "sealed a usage segment left by an earlier run");
            }
        }
        sync_dir(dir)?;
        let open = open_segment(dir, last + 1)?;
        Ok(Spool {
            dir: dir.to_owned(),
            open: Mutex::new(open),
            batch_size: batch_size.max(1),
            batch_ready: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one invocation: one line, one `write()`.
    pub fn append(&self, entry: &SpoolEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut open = self.lock();
        open.file.write_all(&line)?;
        open.records += 1;
        if open.records == self.batch_size {
            self.batch_ready.notify_one();
        }
        Ok(())
    }

    /// Waits until the open segment holds a batch's worth of records.
    pub async fn batch_ready(&self) {
        self.batch_ready.notified().await;
    }

    /// Seals the open segment (unless it is empty) and opens the next one.
    pub fn rotate(&self) -> std::io::Result<()> {
        let mut open = self.lock();
        if open.records == 0 {
            return Ok(());
        }
        let next = open_segment(&self.dir, open.seq + 1)?;
        let done = std::mem::replace(&mut *open, next);
        drop(open);
        done.file.sync_all()?;
        std::fs::rename(&done.path, segment(&self.dir, done.seq, SEALED))?;
        sync_dir(&self.dir)
    }

    /// The sealed segments, oldest first.
    pub fn sealed(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| match parse_name(&p) {
                Some((seq, Kind::Sealed)) => Some((seq, p)),
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out.into_iter().map(|(_, p)| p).collect())
    }

    /// Records written to the open segment and not yet sealed.
    pub fn unsealed_records(&self) -> usize {
        self.lock().records
    }

    /// Closes the spool: an empty open segment is removed, a non-empty one stays for the next
    /// run.
    pub fn close(&self) {
        let open = self.lock();
        if open.records == 0 {
            let _ = std::fs::remove_file(&open.path);
        }
    }
}

/// Reads a sealed segment; lines that do not parse (a torn last line) are skipped.
pub fn read_segment(path: &Path) -> std::io::Result<Vec<SpoolEntry>> {
    let reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut out = Vec::new();
    for (n, line) in reader.split(b'\n').enumerate() {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(&line) {
            Ok(entry) => out.push(entry),
            Err(e) => tracing::warn!(segment = %path.display(), line = n + 1, error = %e, "skipping a torn usage line"),
        }
    }
    Ok(out)
}
