//! The code cache: packages fetched once per node, verified against their SHA-256, kept on disk
//! with what is derived from them (precompiled wasm artifacts, unpacked process packages), and
//! evicted least-recently-used first when the cache outgrows its budget.
//!
//! Layout under the cache directory:
//!
//! | path | what |
//! |---|---|
//! | `blobs/<sha256>` | the package bytes, verified before they were renamed into place |
//! | `artifacts/<sha256>-<engine key>.cwasm` | a module precompiled by an engine with that key |
//! | `unpacked/<sha256>/` | a process package, unpacked |
//! | `tmp/` | downloads and compilations in progress (emptied at open) |
//!
//! Modes: the cache directory and `unpacked/` are `0711` (process functions running under uids of
//! their own must pass through them to their package, but cannot list them), each unpacked
//! package `0755` with files no function can write ([`process::seal_package`]); `blobs/`,
//! `artifacts/` and `tmp/` are `0700` and their files `0600`.
//!
//! A download has a deadline scaled to its size ([`download_timeout`]): a stalled transfer fails
//! (and the version is tried again later) instead of holding reconciliation up.
//!
//! Everything appears by rename from `tmp/` (or from a sibling, for unpacking) once complete, so a
//! crash never leaves a partial file under a final name. A blob and what is derived from it form
//! one entry: they are evicted together. Recency is the blob's modification time, so it survives
//! restarts; `touch` keeps it in memory and writes it to disk at most once a second per entry.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use nimbus_protocol::{PackageFormat, PackageRef};
use tokio::io::AsyncWriteExt as _;

use crate::runtime::{
    process::{self, Packing},
    wasm::WasmEngine,
};

/// Why a package could not be fetched into the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The bytes are not the ones the package reference names: another SHA-256, or fewer bytes
    /// than its size (then `expected` and `actual` are sizes, `"<n> bytes"`). Nothing was kept.
    #[error("the package is not the one named: expected {expected}, got {actual}")]
    Mismatch {
        /// The SHA-256 (or size) the reference names.
        expected: String,
        /// The SHA-256 (or size) of the bytes received.
        actual: String,
    },
    /// The package is larger than allowed: than its declared size, or than the whole cache.
    #[error("the package is larger than {limit} bytes")]
    TooLarge {
        /// The limit passed.
        limit: u64,
    },
    /// The download failed (connection, HTTP status); worth retrying.
    #[error("fetching the package failed: {0}")]
    Fetch(String),
    /// The cache's own files.
    #[error("code cache I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else (an invalid reference).
    #[error("{0}")]
    Other(String),
}

/// How long any download may take, on top of its size at [`MIN_DOWNLOAD_RATE`].
pub const DOWNLOAD_BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The slowest transfer a download's deadline allows for, bytes per second.
pub const MIN_DOWNLOAD_RATE: u64 = 1 << 20;

/// The deadline of a download of `size` bytes: `base` plus the size at [`MIN_DOWNLOAD_RATE`].
pub fn download_timeout(base: Duration, size: u64) -> Duration {
    base.saturating_add(Duration::from_secs_f64(size as f64 / MIN_DOWNLOAD_RATE as f64))
}

/// How often at most a `touch` writes an entry's recency to disk.
const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Per-package locks, so that one package is downloaded, compiled or unpacked once at a time.
#[derive(Default)]
struct Locks {
    fetch: tokio::sync::Mutex<()>,
    build: Mutex<()>,
}

/// One cached package and what is derived from it.
#[derive(Debug, Clone, Copy)]
struct Entry {
    blob: u64,
    artifacts: u64,
    unpacked: u64,
    /// Last use.
    used: SystemTime,
    /// The last use written to disk (the blob's modification time).
    persisted: SystemTime,
}

impl Entry {
    fn size(&self) -> u64 {
        self.blob + self.artifacts + self.unpacked
    }
}

struct Inner {
    dir: PathBuf,
    budget: u64,
    /// The part of every download's deadline that does not depend on its size, milliseconds.
    download_base_ms: AtomicU64,
    entries: Mutex<HashMap<String, Entry>>,
    locks: Mutex<HashMap<String, Arc<Locks>>>,
    next_tmp: AtomicU64,
}

/// The node's code cache. Cheap to clone (the clones share one cache); `Send + Sync`.
#[derive(Clone)]
pub struct CodeCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeCache").field("dir", &self.inner.dir).field("budget", &self.inner.budget).finish()
    }
}

/// Whether `s` is a SHA-256 as the cache names files: 64 lowercase hex digits. Checked before
/// any name becomes part of a path.
fn valid_sha(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_sha(s: &str) -> anyhow::Result<()> {
    anyhow::ensure!(valid_sha(s), "{s:?} is not a lowercase hex SHA-256");
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of the files under `dir` (links counted as themselves, never followed).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_size(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Makes renames into `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// A file under `tmp/` that removes itself unless it was renamed into place.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("not yet persisted")
    }

    /// Renames it to `to` (and makes the rename durable).
    fn persist(mut self, to: &Path) -> std::io::Result<()> {
        let from = self.0.take().expect("persisted once");
        if let Err(e) = fs::rename(&from, to) {
            let _ = fs::remove_file(&from);
            return Err(e);
        }
        sync_dir(to.parent().expect("a file in a directory"))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

impl CodeCache {
    /// Opens (or creates) the cache in `dir`, allowed `budget_bytes` on disk. What a previous run
    /// left is taken over: blobs with their recency, their artifacts and unpacked directories;
    /// anything unfinished or belonging to no blob is removed.
    pub fn open(dir: impl Into<PathBuf>, budget_bytes: u64) -> anyhow::Result<CodeCache> {
        let dir = dir.into();
        let tmp = dir.join("tmp");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        remove_any(&tmp).with_context(|| format!("emptying {}", tmp.display()))?;
        for (path, mode) in [
            (dir.clone(), 0o711),
            (dir.join("blobs"), 0o700),
            (dir.join("artifacts"), 0o700),
            (dir.join("tmp"), 0o700),
            (dir.join("unpacked"), 0o711),
        ] {
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }

        let mut entries = HashMap::new();
        for e in fs::read_dir(dir.join("blobs"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata()?;
            if !valid_sha(&name) || !meta.is_file() {
                remove_any(&e.path())?;
                continue;
            }
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            entries.insert(name, Entry { blob: meta.len(), artifacts: 0, unpacked: 0, used: mtime, persisted: mtime });
        }
        for e in fs::read_dir(dir.join("artifacts"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.split_once('-').map(|(sha, _)| sha).filter(|_| name.ends_with(".cwasm"));
            match owner.and_then(|sha| entries.get_mut(sha)) {
                Some(entry) if e.file_type()?.is_file() => entry.artifacts += e.metadata()?.len(),
                _ => remove_any(&e.path())?,
            }
        }
        for e in fs::read_dir(dir.join("unpacked"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            // Half-unpacked siblings (`<sha>.unpacking-...`) have no entry of their own.
            match entries.get_mut(&name) {
                Some(entry) if e.file_type()?.is_dir() => {
                    // An earlier version of the agent did not set these modes.
                    process::seal_package(&e.path())
                        .with_context(|| format!("setting the modes of {}", e.path().display()))?;
                    entry.unpacked = tree_size(&e.path());
                }
                _ => remove_any(&e.path())?,
            }
        }
        Ok(CodeCache {
            inner: Arc::new(Inner {
                dir,
                budget: budget_bytes,
                download_base_ms: AtomicU64::new(DOWNLOAD_BASE_TIMEOUT.as_millis() as u64),
                entries: Mutex::new(entries),
                locks: Mutex::default(),
                next_tmp: AtomicU64::new(0),
            }),
        })
    }

    /// Uses `base` instead of [`DOWNLOAD_BASE_TIMEOUT`] in the deadline of later downloads
    /// (tests use a short one).
    pub fn set_download_base_timeout(&self, base: Duration) {
        self.inner.download_base_ms.store(base.as_millis() as u64, Ordering::Relaxed);
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.inner.dir.join("blobs").join(sha256)
    }

    fn unpacked_path(&self, sha256: &str) -> PathBuf {
        self.inner.dir.join("unpacked").join(sha256)
    }

    /// The artifacts of package `sha256`, for any engine key.
    fn artifact_files(&self, sha256: &str) -> std::io::Result<Vec<PathBuf>> {
        let prefix = format!("{sha256}-");
        let mut files = Vec::new();
        for e in fs::read_dir(self.inner.dir.join("artifacts"))? {
            let e = e?;
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                files.push(e.path());
            }
        }
        Ok(files)
    }

    fn temp(&self, name: &str) -> TempFile {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        TempFile(Some(self.inner.dir.join("tmp").join(format!("{name}.{n}"))))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn locks(&self, sha256: &str) -> Arc<Locks> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(sha256.to_owned()).or_default().clone()
    }

    fn cached(&self, sha256: &str) -> bool {
        self.entries().contains_key(sha256)
    }

    /// Path of the verified package bytes, downloading them first when they are not cached.
    ///
    /// The download is a GET of `pkg.url` (with `Authorization: Bearer <credential>` only when
    /// `credential` is given), streamed to `tmp/` while it is hashed and counted: more than
    /// `pkg.size` bytes is [`CacheError::TooLarge`], fewer bytes or a SHA-256 other than
    /// `pkg.sha256` [`CacheError::Mismatch`], and nothing is kept. Verified bytes are fsynced and
    /// renamed into `blobs/<sha256>`. A cached blob is trusted: it was verified when written.
    /// Concurrent fetches of one package download it once; a package larger than the whole
    /// budget is refused without a request.
    pub async fn fetch(
        &self,
        client: &reqwest::Client,
        pkg: &PackageRef,
        credential: Option<&str>,
    ) -> Result<PathBuf, CacheError> {
        let sha = pkg.sha256.as_str();
        if !valid_sha(sha) {
            return Err(CacheError::Other(format!("{sha:?} is not a lowercase hex SHA-256")));
        }
        let path = self.blob_path(sha);
        if self.cached(sha) {
            self.touch(sha);
            return Ok(path);
        }
        if pkg.size > self.inner.budget {
            return Err(CacheError::TooLarge { limit: self.inner.budget });
        }
        let locks = self.locks(sha);
        let _fetching = locks.fetch.lock().await;
        // Someone else may have fetched it while this call waited.
        if self.cached(sha) {
            self.touch(sha);
            return Ok(path);
        }

        // Errors never carry the URL: a presigned URL is a credential until it expires.
        let base = Duration::from_millis(self.inner.download_base_ms.load(Ordering::Relaxed));
        let deadline = download_timeout(base, pkg.size);
        let fetch_error = |e: reqwest::Error| {
            if e.is_timeout() {
                CacheError::Fetch(format!("the download did not finish within {} s", deadline.as_secs()))
            } else {
                CacheError::Fetch(e.without_url().to_string())
            }
        };
        // The whole request, body included: a transfer that stalls fails rather than waits forever.
        let mut request = client.get(&pkg.url).timeout(deadline);
        if let Some(token) = credential {
            request = request.bearer_auth(token);
        }
        let mut response = request.send().await.map_err(fetch_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(CacheError::Fetch(format!("the package server answered {status}")));
        }
        if response.content_length().is_some_and(|n| n > pkg.size) {
            return Err(CacheError::TooLarge { limit: pkg.size });
        }

        let temp = self.temp(sha);
        let file =
            tokio::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(temp.path()).await?;
        file.set_permissions(fs::Permissions::from_mode(0o600)).await?;
        // Fewer, larger writes: each one is a trip to the blocking pool.
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut received = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(fetch_error)? {
            received += chunk.len() as u64;
            if received > pkg.size {
                return Err(CacheError::TooLarge { limit: pkg.size });
            }
            digest.update(&chunk);
            out.write_all(&chunk).await?;
        }
        if received != pkg.size {
            return Err(CacheError::Mismatch {
                expected: format!("{} bytes", pkg.size),
                actual: format!("{received} bytes"),
            });
        }
        let actual = hex(digest.finish().as_ref());
        if actual != sha {
            return Err(CacheError::Mismatch { expected: sha.to_owned(), actual });
        }
        out.flush().await?;
        let file = out.into_inner();
        file.sync_all().await?;
        drop(file);
        let to = path.clone();
        tokio::task::spawn_blocking(move || temp.persist(&to))
            .await
            .map_err(|e| CacheError::Other(format!("storing the package: {e}")))??;

        let now = SystemTime::now();
        self.entries()
            .insert(sha.to_owned(), Entry { blob: received, artifacts: 0, unpacked: 0, used: now, persisted: now });
        tracing::debug!(sha256 = sha, bytes = received, "package fetched into the code cache");
        Ok(path)
    }

    /// The precompiled module of package `sha256` for `engine` (a plain function: it compiles,
    /// so callers run it on the blocking pool).
    ///
    /// When `artifacts/<sha256>-<engine key>.cwasm` exists it is loaded; otherwise the blob is
    /// precompiled, written to `tmp/`, renamed into place and loaded. An artifact that does not
    /// load is replaced. Returns the module and whether it was compiled now.
    pub fn wasm_module(&self, engine: &WasmEngine, sha256: &str) -> anyhow::Result<(wasmtime::Module, bool)> {
        check_sha(sha256)?;
        let name = format!("{sha256}-{}.cwasm", engine.artifact_key());
        let path = self.inner.dir.join("artifacts").join(&name);
        let locks = self.locks(sha256);
        let _building = locks.build.lock().unwrap_or_else(|p| p.into_inner());
        anyhow::ensure!(self.cached(sha256), "package {sha256} is not in the code cache");
        if path.exists() {
            match engine.load_artifact(&path) {
                Ok(module) => {
                    self.touch(sha256);
                    return Ok((module, false));
                }
                Err(e) => {
                    let (error, artifact) = (format!("{e:#}"), path.display());
                    tracing::warn!(%error, %artifact, "recompiling an artifact that does not load");
                }
            }
        }
        let wasm = fs::read(self.blob_path(sha256)).with_context(|| format!("reading package {sha256}"))?;
        let artifact = engine.precompile(&wasm).with_context(|| format!("compiling package {sha256}"))?;
        let temp = self.temp(&name);
        let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(temp.path())?;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(&artifact)?;
        file.sync_all()?;
        drop(file);
        // A rename, never a rewrite: a module loaded from the old file keeps its mapping.
        temp.persist(&path)?;
        // Counted from the directory: this may have replaced an artifact, or added one for
        // another engine key next to older ones.
        let artifacts = self.artifact_files(sha256)?.iter().filter_map(|p| fs::metadata(p).ok()).map(|m| m.len()).sum();
        if let Some(entry) = self.entries().get_mut(sha256) {
            entry.artifacts = artifacts;
        }
        let module = engine.load_artifact(&path)?;
        self.touch(sha256);
        Ok((module, true))
    }

    /// The unpacked directory of process package `sha256` ([`process::unpack`] into
    /// `unpacked/<sha256>` on first use). A plain function: callers run it on the blocking pool.
    pub fn unpacked(&self, sha256: &str, format: PackageFormat) -> anyhow::Result<PathBuf> {
        check_sha(sha256)?;
        let packing = match format {
            PackageFormat::Zip => Packing::Zip,
            PackageFormat::TarGz => Packing::TarGz,
            PackageFormat::Wasm => bail!("package {sha256} is a wasm module, not an archive to unpack"),
        };
        let dir = self.unpacked_path(sha256);
        let locks = self.locks(sha256);
        let _building = locks.build.lock().unwrap_or_else(|p| p.into_inner());
        anyhow::ensure!(self.cached(sha256), "package {sha256} is not in the code cache");
        if !dir.is_dir() {
            process::unpack(&self.blob_path(sha256), packing, &dir)
                .with_context(|| format!("unpacking package {sha256}"))?;
            let size = tree_size(&dir);
            if let Some(entry) = self.entries().get_mut(sha256) {
                entry.unpacked = size;
            }
        }
        self.touch(sha256);
        Ok(dir)
    }

    /// Marks package `sha256` used now (for least-recently-used eviction). Unknown packages are
    /// ignored.
    pub fn touch(&self, sha256: &str) {
        let now = SystemTime::now();
        let persist = {
            let mut entries = self.entries();
            let Some(entry) = entries.get_mut(sha256) else { return };
            entry.used = now;
            let due = now.duration_since(entry.persisted).map_or(true, |age| age >= PERSIST_EVERY);
            if due {
                entry.persisted = now;
            }
            due
        };
        if persist {
            // The blob's modification time is the recency the next run starts from.
            let result = fs::File::open(self.blob_path(sha256)).and_then(|f| f.set_modified(now));
            if let Err(e) = result {
                tracing::warn!(error = %e, sha256, "could not record the package's last use");
            }
        }
    }

    /// Evicts entries (a blob with its artifacts and unpacked directory) least recently used
    /// first, skipping those in `keep` (every package assigned or in use) and any being fetched
    /// or built right now, until the cache is within its budget. Returns the bytes freed.
    pub fn evict(&self, keep: &HashSet<String>) -> anyhow::Result<u64> {
        let mut candidates: Vec<(SystemTime, String)> = {
            let entries = self.entries();
            if entries.values().map(Entry::size).sum::<u64>() <= self.inner.budget {
                return Ok(0);
            }
            entries.iter().filter(|(sha, _)| !keep.contains(*sha)).map(|(sha, e)| (e.used, sha.clone())).collect()
        };
        candidates.sort();
        let mut freed = 0;
        for (_, sha) in candidates {
            if self.size() <= self.inner.budget {
                break;
            }
            let locks = self.locks(&sha);
            // Busy entries are in use: skip them rather than wait.
            let (Ok(_fetching), Ok(_building)) = (locks.fetch.try_lock(), locks.build.try_lock()) else { continue };
            let Some(entry) = self.entries().remove(&sha) else { continue };
            for artifact in self.artifact_files(&sha)? {
                remove_any(&artifact)?;
            }
            remove_any(&self.unpacked_path(&sha))?;
            remove_any(&self.blob_path(&sha))?;
            self.inner.locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&sha);
            freed += entry.size();
            tracing::debug!(sha256 = %sha, bytes = entry.size(), "package evicted from the code cache");
        }
        Ok(freed)
    }

    /// Total bytes the cache holds (blobs, artifacts, unpacked packages).
    pub fn size(&self) -> u64 {
        self.entries().values().map(Entry::size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_deadlines_grow_with_the_size() {
        assert_eq!(download_timeout(DOWNLOAD_BASE_TIMEOUT, 0), Duration::from_secs(60));
        assert_eq!(download_timeout(DOWNLOAD_BASE_TIMEOUT, 64 << 20), Duration::from_secs(124));
        assert_eq!(download_timeout(Duration::from_millis(200), 512 << 10), Duration::from_millis(700));
        assert_eq!(download_timeout(Duration::MAX, u64::MAX), Duration::MAX);
    }
}
