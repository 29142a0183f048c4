//! The usage spool: every invocation's usage record and log lines are appended to a segment file
//! in `<data>/usage/` before its response is returned, so a crash of the agent loses nothing
//! billable.
//!
//! - A segment is JSON lines, one [`SpoolEntry`] per line. The open segment is
//!   `<seq>.open`; rotating it fsyncs it and renames it to `<seq>.jsonl` (sealed), which the
//!   shipper sends and deletes once the control plane acknowledged all of it; the items the
//!   control plane refused as invalid one by one go to `<seq>.rejected` ([`set_aside`]).
//! - Appends are one plain `write()` each, without fsync: data in the page cache survives a kill
//!   of the process (only a crash of the machine can lose the last moments, and fsyncing every
//!   invocation would cost more than the invocation). An append that fails part-way (a full
//!   disk) is cut off again (`set_len` back to the last whole line), so no fragment is left for
//!   the next line to be glued to; until that succeeds nothing more is written.
//! - The directory is `0700` and segments `0600`: they hold every tenant's usage and logs.
//! - A torn last line (the process died mid-write) is skipped when the segment is read; segments
//!   left open by an earlier run are sealed when the spool opens, so they are shipped first.

use std::{
    io::{BufRead, Write},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use anyhow::Context;
use nimbus_protocol::{LogLine, UsageRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

const OPEN: &str = "open";
const SEALED: &str = "jsonl";
/// Usage the control plane refused as invalid, set aside by the shipper for an operator; never
/// read again, its sequence number never reused.
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
    /// Bytes of whole lines in the file.
    len: u64,
    /// Whether bytes of a failed append may follow them (cutting them off failed too).
    torn: bool,
}

/// What an append needs of a segment file (a trait so the rollback can be tested with a writer
/// that fails part-way).
trait SegmentFile: Write {
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl SegmentFile for std::fs::File {
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
}

/// Appends `line` to `file`, which holds `*len` bytes of whole lines (followed by the fragment
/// of a failed append when `*torn`). Either the whole line is added, or the file is cut back
/// to `*len` bytes; when even that fails `*torn` stays set, and the next append cuts first.
fn append_line(file: &mut impl SegmentFile, len: &mut u64, torn: &mut bool, line: &[u8]) -> std::io::Result<()> {
    if *torn {
        file.truncate(*len)?;
        *torn = false;
    }
    match file.write_all(line) {
        Ok(()) => {
            *len += line.len() as u64;
            Ok(())
        }
        Err(e) => {
            // The file is opened for appending: once cut, the next write lands right there.
            if file.truncate(*len).is_err() {
                *torn = true;
            }
            Err(e)
        }
    }
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
    let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let len = file.metadata()?.len();
    Ok(Open { file, path, seq, records: 0, len, torn: false })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens the spool in `dir`: seals segments an earlier run left open and starts a new one.
    /// `batch_size` records in the open segment wake [`Spool::batch_ready`].
    pub fn open(dir: &Path, batch_size: usize) -> anyhow::Result<Spool> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
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
        let Open { file, len, torn, .. } = &mut *open;
        append_line(file, len, torn, &line)?;
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

/// Appends refused usage to `file` (`<seq>.rejected`, mode `0600`), one line per batch: each
/// line is a usage batch the control plane can be sent again as it is. Fsynced (and its
/// directory), so it is on disk before the segment it came from is deleted.
pub fn set_aside(file: &Path, batches: &[nimbus_protocol::UsageBatch]) -> std::io::Result<()> {
    let mut lines = Vec::new();
    for batch in batches {
        serde_json::to_writer(&mut lines, batch).map_err(std::io::Error::other)?;
        lines.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(file)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let mut len = f.metadata()?.len();
    let mut torn = false;
    append_line(&mut f, &mut len, &mut torn, &lines)?;
    f.sync_all()?;
    sync_dir(file.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk with room for `room` more bytes: writes beyond it fail part-way, as on a full disk.
    struct FullDisk {
        data: Vec<u8>,
        room: usize,
        /// Whether cutting the file fails too.
        cannot_cut: bool,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.data.extend_from_slice(&buf[..n]);
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SegmentFile for FullDisk {
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            if self.cannot_cut {
                return Err(std::io::Error::other("cannot cut"));
            }
            self.data.truncate(len as usize);
            Ok(())
        }
    }

    #[test]
    fn a_failed_append_leaves_no_fragment_and_the_next_line_stays_whole() {
        let mut disk = FullDisk { data: Vec::new(), room: 10, cannot_cut: false };
        let (mut len, mut torn) = (0, false);
        append_line(&mut disk, &mut len, &mut torn, b"{\"a\":1}\n").unwrap();
        assert_eq!(len, 8);
        // Two bytes of room left: the write gets part of the way and fails.
        let err = append_line(&mut disk, &mut len, &mut torn, b"{\"b\":2}\n").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
        assert_eq!(disk.data, b"{\"a\":1}\n", "the fragment is cut off");
        assert!(!torn);
        disk.room = 100;
        append_line(&mut disk, &mut len, &mut torn, b"{\"c\":3}\n").unwrap();
        assert_eq!(disk.data, b"{\"a\":1}\n{\"c\":3}\n");
        assert_eq!(len, disk.data.len() as u64);
    }

    #[test]
    fn when_cutting_fails_too_the_next_append_cuts_first_or_writes_nothing() {
        let mut disk = FullDisk { data: b"{\"a\":1}\n".to_vec(), room: 3, cannot_cut: true };
        let (mut len, mut torn) = (8, false);
        assert!(append_line(&mut disk, &mut len, &mut torn, b"{\"b\":2}\n").is_err());
        assert!(torn, "the fragment is still there");
        disk.room = 100;
        // Still cannot cut: nothing is glued to the fragment.
        assert!(append_line(&mut disk, &mut len, &mut torn, b"{\"c\":3}\n").is_err());
        assert_eq!(disk.data, b"{\"a\":1}\n{\"b");
        disk.cannot_cut = false;
        append_line(&mut disk, &mut len, &mut torn, b"{\"c\":3}\n").unwrap();
        assert_eq!(disk.data, b"{\"a\":1}\n{\"c\":3}\n");
        assert!(!torn);
    }

    #[test]
    fn a_real_segment_is_cut_back_to_its_last_whole_line() {
        let dir = std::env::temp_dir().join(format!("nimbus-spool-cut-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("1.open");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let (mut len, mut torn) = (0, false);
        append_line(&mut file, &mut len, &mut torn, b"one\n").unwrap();
        // A fragment as a failed write would leave it, then the rollback of `append_line`.
        file.write_all(b"tw").unwrap();
        file.truncate(len).unwrap();
        append_line(&mut file, &mut len, &mut torn, b"three\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\nthree\n", "appends land after the cut");
        let _ = std::fs::remove_dir_all(dir);
    }
}
