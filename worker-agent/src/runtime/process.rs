//! The `process` runtime: the package's entry executable, run per request like CGI.
//!
//! - The package is unpacked once per version into a directory of its own ([`unpack`]); members
//!   that would leave it, links that point out of it and device nodes are refused (the control
//!   plane checked this already; the agent does not rely on that). Its directories are made
//!   `0755` and its files readable and executable as the packer made them but writable by the
//!   agent alone ([`seal_package`]), so a function cannot change its own code or anyone else's.
//! - Each invocation runs the entry with a scrubbed environment (the contract's variables, the
//!   function's own, and `PATH=/usr/local/bin:/usr/bin:/bin` so scripts find basic tools), a fresh
//!   working directory (mode `0700`, owned by the invocation's user) that is removed afterwards
//!   (also its `HOME` and `TMPDIR`), its own process group, an address-space limit (`RLIMIT_AS`),
//!   a file-size limit (`RLIMIT_FSIZE`), no core dumps and `umask 077`, all set by a `/bin/sh`
//!   trampoline that then `exec`s the entry (`TRAMPOLINE` says why not in-process).
//! - [`Isolation::Uid`] (the default; the agent must run as root): every invocation runs under its
//!   own unprivileged uid and gid, leased from a [`UidPool`] for the invocation and switched to
//!   with util-linux `setpriv` (no supplementary groups, `no_new_privs`) before the trampoline.
//!   Two invocations running at once never share a uid, so they cannot read each other's
//!   `/proc/<pid>/environ` or working directory, signal or trace each other, and neither can read
//!   the agent's files (its data directory is `0711` and everything in it private but the
//!   scratch root and the unpacked packages). Before a uid is leased again every process left
//!   under it is killed (`kill -KILL -1` as that uid), so nothing of one invocation survives into
//!   the next one that gets its uid. [`Isolation::None`] runs functions as the agent itself.
//! - Not isolated yet (no namespaces): the file system is shared, so a function can read any
//!   world-readable file, including another tenant's unpacked package once it learns the path
//!   (for example from `/proc/<pid>/cmdline`, unless `/proc` is mounted `hidepid=2`), and write
//!   to world-writable directories such as `/tmp`; the network is open; CPU is not limited.
//! - The wall-clock timeout kills the whole process group, children included; stdout beyond the
//!   response limit kills it too; so does the entry's exit, so children it left behind neither
//!   outlive the invocation nor hold its answer back by keeping stdout open; stderr is kept up to
//!   a bound and drained after that (a timed-out invocation keeps what it logged).
//! - Exit 0 → the CGI response; another exit code → `exit_code`; a signal → `crash`.
//! - Streaming ([`ProcessRuntime::invoke_streaming`]): a request body that streams in is written
//!   to stdin as its chunks arrive (until it ends or the entry exits), and stdout goes through a
//!   [`Stdout`], which sends the response's head once the header block is complete and then every
//!   chunk as it is read; a failure after that (timeout, response limit, exit code, signal) is
//!   the outcome's failure with the head's status, and the listener cuts the body.

use std::{
    collections::VecDeque,
    os::unix::{
        fs::{DirBuilderExt as _, PermissionsExt as _},
        process::ExitStatusExt,
    },
    path::{Component, Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{
    FailureReason, Invocation, Limits, Outcome, Response, contract_env, contract_env_with_length,
    stream::{Io, Stdout},
};
use crate::config::ProcessIsolation;

/// Sets the limits, then becomes the entry: `$1` is the address-space limit in KiB, `$2` the
/// file-size limit in 512-byte blocks (the unit of POSIX `ulimit -f`: dash's, and bash's in
/// POSIX mode), the rest the entry. `ulimit` without `-S`/`-H` sets the soft and the hard
/// limit, so the function cannot raise them again; `umask 077` makes what it writes private to
/// its uid unless it says otherwise.
///
/// Limits are set this way rather than by `setrlimit` in a `pre_exec` hook because any such hook
/// makes the standard library fork the agent, and forking a process that holds a wasm instance
/// pool copies its page tables: about 17 ms per invocation, against well under 1 ms for the
/// vfork-style `posix_spawn` used otherwise (measured in `benches/runtime.rs`). The same holds for
/// switching the uid: `Command::uid` forces a fork too, so `setpriv` does it after the spawn.
/// The price is one `exec` of `/bin/sh` (and of `setpriv`), and that a failing `exec` (an entry
/// that is not a valid executable) shows as exit code 126 or 127 with the shell's message in
/// the log.
const TRAMPOLINE: &str = r#"ulimit -c 0 && ulimit -v "$1" && ulimit -f "$2" && umask 077 && shift 2 && exec "$@""#;

/// Kills every process of the uid it runs as, after checking from `/proc/self/status` that it
/// really runs as `$1` (real, effective and saved uid): as root, `kill -1` would stop the whole
/// machine. Only shell built-ins, so the check and the kill are one process.
const SWEEP: &str = r#"while read -r k r e s f; do [ "$k" = Uid: ] && break; done < /proc/self/status; [ "$r" = "$1" ] && [ "$e" = "$1" ] && [ "$s" = "$1" ] && kill -KILL -1"#;

/// Unit of `ulimit -f`.
const FILE_BLOCK: u64 = 512;

/// Where `setpriv` is looked for before `PATH`.
const SETPRIV: [&str; 4] = ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv", "/sbin/setpriv"];

/// How long a killed invocation may take to close its pipes before its log is given up.
const KILL_GRACE: Duration = Duration::from_millis(250);

/// How a process package is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// A zip archive.
    Zip,
    /// A gzip-compressed tar archive.
    TarGz,
}

fn inside(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Unpacks a package into `dir` (which must not exist yet): into a temporary sibling first, then
/// renamed, so a half-unpacked package is never used.
pub fn unpack(archive: &Path, packing: Packing, dir: &Path) -> anyhow::Result<()> {
    // Unique per call, not only per process: two threads may unpack into the same parent.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = dir.file_name().with_context(|| format!("{} names no directory", dir.display()))?;
    let temp = dir.with_file_name(format!("{}.unpacking-{}-{n}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir_all(&temp)?;
    let result = match packing {
        Packing::TarGz => unpack_tar_gz(archive, &temp),
        Packing::Zip => unpack_zip(archive, &temp),
    };
    let result = result.and_then(|()| seal_package(&temp).context("setting the package's permissions"));
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    std::fs::rename(&temp, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&temp);
        anyhow::Error::new(e).context(format!("moving the unpacked package to {}", dir.display()))
    })
}

/// Makes an unpacked package unchangeable by functions: directories `0755`; files readable
/// (`0444`) and executable (`0111`) by everyone when the archive gave that to anyone, writable by
/// their owner (the agent, which unpacked them) alone, without setuid, setgid or sticky bits (see
/// [`package_file_mode`]). Functions run as other users than the owner, so they get the bits of
/// "others": what the packer meant for the package's owner. Symbolic links are left as they are
/// (their targets are inside the package and treated themselves).
pub fn seal_package(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Neither `file_type` nor `metadata` of a directory entry follows a link.
        let kind = entry.file_type()?;
        let path = entry.path();
        if kind.is_dir() {
            seal_package(&path)?;
        } else if kind.is_file() {
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(package_file_mode(mode)))?;
        }
    }
    Ok(())
}

/// The mode a package file gets for the mode its archive gave it: read and execute for everyone
/// when anyone had them, write for the owner only, nothing else (at most `0o755`).
pub fn package_file_mode(mode: u32) -> u32 {
    let read = if mode & 0o444 != 0 { 0o444 } else { 0 };
    let exec = if mode & 0o111 != 0 { 0o111 } else { 0 };
    0o200 | read | exec
}

fn unpack_tar_gz(archive: &Path, into: &Path) -> anyhow::Result<()> {
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(std::fs::File::open(archive)?));
    let mut tar = tar::Archive::new(gz);
    // Permission bits, but no setuid, setgid or sticky bits: the agent may run as root.
    tar.set_preserve_permissions(false);
    tar.set_overwrite(false);
    for member in tar.entries()? {
        let mut member = member?;
        let path = member.path()?.into_owned();
        if !inside(&path) {
            bail!("member {} leaves the package", path.display());
        }
        let kind = member.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            bail!("member {} is not a file, directory or link", path.display());
        }
        // `unpack_in` refuses paths that would escape `into`, also through links unpacked
        // earlier, and hard links to anything outside.
        if !member.unpack_in(into).with_context(|| format!("unpacking member {}", path.display()))? {
            bail!("member {} leaves the package", path.display());
        }
    }
    // Symbolic links are checked once all members are there: a link may precede its target, and
    // only the file system can resolve chains of links (`a -> .` makes `a/../x` leave).
    let root = into.canonicalize()?;
    check_links(&root, &root)
}

/// Refuses any symbolic link under `dir` that does not resolve to something inside `root`
/// (dangling links included: where they would point is not known yet).
fn check_links(root: &Path, dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let path = entry.path();
        let shown = || path.strip_prefix(root).unwrap_or(&path).display().to_string();
        if kind.is_symlink() {
            match path.canonicalize() {
                Ok(target) if target.starts_with(root) => {}
                Ok(target) => bail!("link {} points outside the package ({})", shown(), target.display()),
                Err(_) => bail!("link {} points at nothing inside the package", shown()),
            }
        } else if kind.is_dir() {
            check_links(root, &path)?;
        }
    }
    Ok(())
}

fn unpack_zip(archive: &Path, into: &Path) -> anyhow::Result<()> {
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(std::fs::File::open(archive)?))?;
    for i in 0..zip.len() {
        let mut member = zip.by_index(i)?;
        if member.is_symlink() {
            bail!("member {i} is a symbolic link");
        }
        // `enclosed_name` alone would take an absolute name as relative; refuse it, as the
        // control plane does, rather than guess what the packer meant.
        let name = member.name()?.into_owned();
        let relative = match member.enclosed_name() {
            Some(relative) if inside(Path::new(&name)) => relative,
            _ => bail!("member {name:?} leaves the package"),
        };
        let target = into.join(relative);
        if member.is_dir() {
            std::fs::create_dir_all(&target)?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::fs::File::create(&target)?;
        std::io::copy(&mut member, &mut out)?;
        if let Some(mode) = member.unix_mode() {
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode & 0o777))?;
        }
    }
    Ok(())
}

/// An unpacked process package.
#[derive(Debug, Clone)]
pub struct ProcessPackage {
    /// Where it is unpacked.
    pub dir: PathBuf,
    /// The entry, relative to `dir`.
    pub entry: PathBuf,
}

/// What the host offers for [`Isolation::Uid`], as [`Host::probe`] finds it.
#[derive(Debug, Clone, Default)]
pub struct Host {
    /// The agent's effective uid.
    pub euid: u32,
    /// util-linux `setpriv`, if installed.
    pub setpriv: Option<PathBuf>,
    /// Accounts of `/etc/passwd` (name, uid).
    pub accounts: Vec<(String, u32)>,
}

impl Host {
    /// The host the agent runs on.
    pub fn probe() -> Host {
        let setpriv = SETPRIV.iter().map(PathBuf::from).find(|p| is_executable(p)).or_else(|| {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .filter(|d| d.is_absolute())
                    .map(|d| d.join("setpriv"))
                    .find(|p| is_executable(p))
            })
        });
        let accounts = std::fs::read_to_string("/etc/passwd").map(|t| parse_passwd(&t)).unwrap_or_default();
        Host { euid: rustix::process::geteuid().as_raw(), setpriv, accounts }
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The (name, uid) of every account in a `passwd` file.
pub fn parse_passwd(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((name.to_owned(), uid))
        })
        .collect()
}

/// How process invocations are kept apart from the agent and from each other.
#[derive(Debug)]
pub enum Isolation {
    /// Each invocation under a uid and gid of its own, leased from the pool.
    Uid(UidPool),
    /// As the agent's own user: not isolated from the agent nor from each other.
    None,
    /// Isolation was asked for but the host cannot provide it: every invocation fails to start
    /// with this reason (never silently runs unisolated).
    Unavailable(String),
}

impl Isolation {
    /// What `--process-isolation` can be on `host`, with the uid pool `base .. base + count`
    /// (checked by the settings already).
    pub fn decide(mode: ProcessIsolation, base: u32, count: u32, host: &Host) -> Isolation {
        if mode == ProcessIsolation::None {
            return Isolation::None;
        }
        if host.euid != 0 {
            return Isolation::Unavailable(format!(
                "process isolation `uid` needs the agent to run as root, and it runs as uid {}: run the agent as \
                 root, or set --process-isolation none (process functions are then not isolated)",
                host.euid
            ));
        }
        let Some(setpriv) = &host.setpriv else {
            return Isolation::Unavailable(
                "process isolation `uid` needs `setpriv` (util-linux), which is not installed".into(),
            );
        };
        let last = base.saturating_add(count.saturating_sub(1));
        if let Some((name, uid)) = host.accounts.iter().find(|(_, uid)| (base..=last).contains(uid)) {
            return Isolation::Unavailable(format!(
                "the process uids {base}..={last} include the account {name:?} (uid {uid}), whose processes the agent \
                 would kill: choose another --process-uid-base"
            ));
        }
        Isolation::Uid(UidPool::new(setpriv.clone(), base, count))
    }
}

/// A uid the pool holds.
#[derive(Debug, Clone, Copy)]
struct Free {
    uid: u32,
    /// Whether no process of it can be left (swept since its last use, or since the agent
    /// started: a killed agent's invocations may still run).
    swept: bool,
}

struct PoolInner {
    setpriv: PathBuf,
    base: u32,
    count: u32,
    free: Mutex<VecDeque<Free>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for PoolInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UidPool")
            .field("setpriv", &self.setpriv)
            .field("base", &self.base)
            .field("count", &self.count)
            .field("free", &self.permits.available_permits())
            .finish()
    }
}

/// The uids (and equal gids) process invocations run under: each is leased to one invocation
/// at a time, and every process left under it is killed before it is leased again. The range
/// must be this agent's alone (see `--process-uid-base`).
#[derive(Debug, Clone)]
pub struct UidPool {
    inner: Arc<PoolInner>,
}

impl UidPool {
    /// A pool of `count` uids from `base`, switched to with `setpriv`.
    pub fn new(setpriv: PathBuf, base: u32, count: u32) -> UidPool {
        let free = (0..count).filter_map(|i| base.checked_add(i)).map(|uid| Free { uid, swept: false }).collect();
        UidPool {
            inner: Arc::new(PoolInner {
                setpriv,
                base,
                count,
                free: Mutex::new(free),
                permits: Arc::new(tokio::sync::Semaphore::new(count as usize)),
            }),
        }
    }

    /// The uids of the pool.
    pub fn uids(&self) -> std::ops::RangeInclusive<u32> {
        self.inner.base..=self.inner.base.saturating_add(self.inner.count.saturating_sub(1))
    }

    /// Checks that the agent can switch to the pool's uids (and clears the first one).
    pub async fn check(&self) -> Result<(), String> {
        sweep(&self.inner.setpriv, self.inner.base).await
    }

    /// A uid no other invocation holds and no process runs as, waiting until one is free.
    pub async fn lease(&self) -> Result<UidLease, String> {
        let permit = self.inner.permits.clone().acquire_owned().await.map_err(|_| "the uid pool is closed")?;
        let Some(free) = self.inner.free.lock().unwrap_or_else(|p| p.into_inner()).pop_front() else {
            return Err("the uid pool is empty".into());
        };
        // From here on the lease returns the uid when dropped, whatever happens.
        permit.forget();
        let lease = UidLease { uid: free.uid, pool: Some(self.inner.clone()), leftover: None };
        if !free.swept {
            sweep(&self.inner.setpriv, free.uid).await?;
        }
        Ok(lease)
    }
}

/// A uid leased to one invocation. Dropping it gives the uid back once every process left
/// under it is killed (on a task of its own, so the response need not wait for that).
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    pool: Option<Arc<PoolInner>>,
    /// A working directory to remove after the sweep (the first removal failed).
    leftover: Option<PathBuf>,
}

impl UidLease {
    /// The uid (and gid).
    pub fn uid(&self) -> u32 {
        self.uid
    }

    fn setpriv(&self) -> &Path {
        &self.pool.as_ref().expect("a live lease has its pool").setpriv
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let (uid, leftover) = (self.uid, self.leftover.take());
        let give_back = move |pool: &PoolInner, swept: bool| {
            pool.free.lock().unwrap_or_else(|p| p.into_inner()).push_back(Free { uid, swept });
            pool.permits.add_permits(1);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let swept = match sweep(&pool.setpriv, uid).await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(uid, error = %e, "could not stop what an invocation left running");
                            false
                        }
                    };
                    if let Some(dir) = leftover {
                        let _ = tokio::fs::remove_dir_all(dir).await;
                    }
                    give_back(&pool, swept);
                });
            }
            // No runtime to sweep on: the next lease of this uid sweeps it first.
            Err(_) => give_back(&pool, false),
        }
    }
}

/// Kills every process running as `uid` (see [`SWEEP`]).
async fn sweep(setpriv: &Path, uid: u32) -> Result<(), String> {
    if uid == 0 {
        return Err("refusing to sweep uid 0".into());
    }
    let output = tokio::process::Command::new(setpriv)
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--no-new-privs", "--", "/bin/sh", "-c", SWEEP, "nimbus-sweep"])
        .arg(uid.to_string())
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", setpriv.display()))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    Err(format!("cannot switch to uid {uid} ({}): {}", output.status, said.trim()))
}

/// Runs process functions; scratch directories go under `work_dir`.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    work_dir: PathBuf,
    isolation: Arc<Isolation>,
}

/// Reads at most `limit` bytes; returns them and whether there was more (the rest is drained when
/// `drain`, so the child never blocks on a full pipe).
async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, limit: usize, drain: bool) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut over = false;
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
                if n > room {
                    over = true;
                    if !drain {
                        break;
                    }
                }
            }
        }
    }
    (kept, over)
}

impl ProcessRuntime {
    /// A runtime with scratch directories under `work_dir` (made `0711`: functions running as
    /// other users must reach their own directory in it, and must not list it).
    pub fn new(work_dir: impl Into<PathBuf>, isolation: Isolation) -> anyhow::Result<Self> {
        let work_dir = work_dir.into();
        std::fs::create_dir_all(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        std::fs::set_permissions(&work_dir, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("setting the mode of {}", work_dir.display()))?;
        Ok(ProcessRuntime { work_dir, isolation: Arc::new(isolation) })
    }

    /// How invocations are isolated.
    pub fn isolation(&self) -> &Isolation {
        &self.isolation
    }

    /// Runs one invocation, its response buffered.
    pub async fn invoke(&self, pkg: &ProcessPackage, inv: &Invocation, limits: &Limits) -> Outcome {
        self.invoke_streaming(pkg, inv, limits, Io::default()).await
    }

    /// Runs one invocation with the body streaming in and the response streaming out as `io`
    /// says.
    pub async fn invoke_streaming(&self, pkg: &ProcessPackage, inv: &Invocation, limits: &Limits, io: Io) -> Outcome {
        let not_started = |detail: String| Outcome {
            response: Response::failed(FailureReason::StartFailed, detail),
            log: Vec::new(),
            log_truncated: false,
            cold_start: false,
            duration: Duration::ZERO,
        };
        let mut lease = match &*self.isolation {
            Isolation::None => None,
            Isolation::Unavailable(why) => return not_started(why.clone()),
            // Waiting for a uid is bounded like the invocation.
            Isolation::Uid(pool) => match tokio::time::timeout(limits.timeout, pool.lease()).await {
                Ok(Ok(lease)) => Some(lease),
                Ok(Err(e)) => return not_started(format!("no user to run the function as: {e}")),
                Err(_) => {
                    return not_started(format!(
                        "no process uid became free within {} ms (--process-uids)",
                        limits.timeout.as_millis()
                    ));
                }
            },
        };
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch = self.work_dir.join(format!("inv-{}-{n}", file_safe(&inv.id)));
        let outcome = self.run(pkg, inv, limits, &scratch, lease.as_ref(), io).await;
        let removed = tokio::fs::remove_dir_all(&scratch).await;
        if let (Err(e), Some(lease)) = (removed, lease.as_mut()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                // Something still running as the uid may be writing there: again after the sweep.
                lease.leftover = Some(scratch);
            }
        }
        drop(lease);
        outcome
    }

    async fn run(
        &self,
        pkg: &ProcessPackage,
        inv: &Invocation,
        limits: &Limits,
        scratch: &Path,
        lease: Option<&UidLease>,
        io: Io,
    ) -> Outcome {
        let started = Instant::now();
        let failed = |reason, detail: String| Outcome {
            response: Response::failed(reason, detail),
            log: Vec::new(),
            log_truncated: false,
            cold_start: false,
            duration: started.elapsed(),
        };
        let made = {
            let (dir, owner) = (scratch.to_owned(), lease.map(UidLease::uid));
            tokio::task::spawn_blocking(move || make_scratch(&dir, owner)).await
        };
        match made {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return failed(FailureReason::StartFailed, format!("no working directory: {e}")),
            Err(e) => return failed(FailureReason::StartFailed, format!("no working directory: {e}")),
        }
        // The entry is relative and inside the package (the control plane checked; so does the
        // agent, which must never run something else).
        if !inside(&pkg.entry) || pkg.entry.as_os_str().is_empty() {
            return failed(
                FailureReason::StartFailed,
                format!("the entry {} is not inside the package", pkg.entry.display()),
            );
        }
        let entry = pkg.dir.join(&pkg.entry);
        // Checked here so that the usual mistakes are start failures, not the trampoline's exit
        // codes (see `TRAMPOLINE`).
        match tokio::fs::metadata(&entry).await {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(_) => {
                return failed(
                    FailureReason::StartFailed,
                    format!("the entry {} is not an executable file", pkg.entry.display()),
                );
            }
            Err(e) => {
                return failed(FailureReason::StartFailed, format!("could not start {}: {e}", pkg.entry.display()));
            }
        }
        let mut cmd = match lease {
            Some(lease) => {
                let mut cmd = tokio::process::Command::new(lease.setpriv());
                cmd.arg(format!("--reuid={}", lease.uid())).arg(format!("--regid={}", lease.uid())).args([
                    "--clear-groups",
                    "--no-new-privs",
                    "--",
                    "/bin/sh",
                ]);
                cmd
            }
            None => tokio::process::Command::new("/bin/sh"),
        };
        cmd.arg("-c")
            .arg(TRAMPOLINE)
            .arg("nimbus-limits")
            .arg((limits.memory_bytes / 1024).max(1).to_string())
            .arg((limits.max_file_bytes / FILE_BLOCK).max(1).to_string())
            .arg(&entry)
            .current_dir(scratch)
            .env_clear()
            .envs(match &io.stdin {
                Some(stdin) => contract_env_with_length(inv, stdin.length),
                None => contract_env(inv),
            })
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", scratch)
            .env("TMPDIR", scratch)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return failed(FailureReason::StartFailed, format!("could not start {}: {e}", pkg.entry.display()));
            }
        };
        let group = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
        // The entry leads its own group, so the group's id is the entry's pid. It names nobody
        // else while any member lives; once all are gone the kill finds nothing (the id could only
        // be reused by a new group after the pid space wrapped around in between).
        let kill_group = move || {
            if let Some(pid) = group {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        };
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let body = inv.body.clone();
        let mut chunks = io.stdin.map(|s| s.chunks);
        let collector = Mutex::new(Stdout::new(limits.max_response_bytes, io.response));
        let collector = &collector;
        let (exited_tx, mut exited) = tokio::sync::watch::channel(false);
        let (failure, log, log_truncated, duration) = {
            // The body goes in while the output comes out: neither side can block the other. A
            // body that streams in is fed until it ends or the function does.
            let feed = async move {
                if stdin.write_all(&body).await.is_ok() {
                    while let Some(chunks) = chunks.as_mut() {
                        let chunk = tokio::select! {
                            chunk = chunks.recv() => chunk,
                            _ = exited.wait_for(|e| *e) => None,
                        };
                        let Some(chunk) = chunk else { break };
                        if stdin.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                }
                drop(stdin);
            };
            let output = async {
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    match stdout.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => {
                            if !collector.lock().unwrap_or_else(|p| p.into_inner()).push(&chunk[..n]) {
                                // At once: a function that ignores the closed pipe would
                                // otherwise run on to its timeout.
                                kill_group();
                                return true;
                            }
                        }
                    }
                }
            };
            let exit = async {
                let status = child.wait().await;
                // Whatever the entry left running in its group does not outlive the invocation, and
                // killing it now also closes the pipes such children inherited, so the readers end.
                kill_group();
                exited_tx.send_replace(true);
                status
            };
            let work = async {
                let (out_over, (log, log_over), (), status) =
                    tokio::join!(output, read_bounded(stderr, limits.max_log_bytes, true), feed, exit);
                (out_over, log, log_over, status)
            };
            tokio::pin!(work);
            let finished = tokio::select! {
                done = &mut work => Ok(done),
                () = tokio::time::sleep(limits.timeout) => Err(started.elapsed()),
            };
            match finished {
                Ok((out_over, log, log_truncated, status)) => {
                    let failure = if out_over {
                        Some(Response::failed(
                            FailureReason::ResponseTooLarge,
                            format!("the response is larger than {} bytes", limits.max_response_bytes),
                        ))
                    } else {
                        match status {
                            Ok(s) if s.success() => None,
                            Ok(s) => Some(match (s.code(), s.signal()) {
                                (Some(code), _) => {
                                    Response::failed(FailureReason::ExitCode, format!("exited with code {code}"))
                                }
                                (None, Some(signal)) => {
                                    Response::failed(FailureReason::Crash, format!("killed by signal {signal}"))
                                }
                                (None, None) => Response::failed(FailureReason::Crash, "ended abnormally"),
                            }),
                            Err(e) => Some(Response::failed(FailureReason::Crash, format!("lost the process: {e}"))),
                        }
                    };
                    (failure, log, log_truncated, started.elapsed())
                }
                Err(duration) => {
                    // The whole group: children the entry started die with it. Their pipes close,
                    // so the log written so far can still be collected, briefly: a process that
                    // left the group may hold them open.
                    kill_group();
                    let (log, log_truncated) = match tokio::time::timeout(KILL_GRACE, &mut work).await {
                        Ok((_, log, log_truncated, _)) => (log, log_truncated),
                        Err(_) => (Vec::new(), false),
                    };
                    let failure = Response::failed(
                        FailureReason::Timeout,
                        format!("ran longer than its timeout of {} ms and was stopped", limits.timeout.as_millis()),
                    );
                    (Some(failure), log, log_truncated, duration)
                }
            }
        };
        let response = collector.lock().unwrap_or_else(|p| p.into_inner()).finish(failure);
        Outcome { response, log, log_truncated, cold_start: false, duration }
    }
}

/// Makes an invocation's working directory: mode `0700`, owned by `owner` (uid and gid) when
/// given, else by the agent.
fn make_scratch(dir: &Path, owner: Option<u32>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    // Explicitly: the umask could have taken bits the owner needs.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    }
    Ok(())
}

/// A file-name-safe form of an invocation id.
fn file_safe(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(euid: u32, setpriv: bool) -> Host {
        Host {
            euid,
            setpriv: setpriv.then(|| PathBuf::from("/usr/bin/setpriv")),
            accounts: parse_passwd("root:x:0:0:root:/root:/bin/bash\nbob:x:1000:1000::/home/bob:/bin/sh\n\nbroken\n"),
        }
    }

    #[test]
    fn uid_isolation_needs_root_and_setpriv_and_a_free_range_and_never_falls_back_silently() {
        let decide = |mode, base, h: &Host| Isolation::decide(mode, base, 256, h);
        match decide(ProcessIsolation::Uid, 200_000, &host(0, true)) {
            Isolation::Uid(pool) => assert_eq!(pool.uids(), 200_000..=200_255),
            other => panic!("{other:?}"),
        }
        // Not root: every invocation fails with a reason naming the way out; never unisolated.
        match decide(ProcessIsolation::Uid, 200_000, &host(1000, true)) {
            Isolation::Unavailable(why) => {
                assert!(
                    why.contains("root") && why.contains("uid 1000") && why.contains("--process-isolation none"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        match decide(ProcessIsolation::Uid, 200_000, &host(0, false)) {
            Isolation::Unavailable(why) => assert!(why.contains("setpriv"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A range holding an account would have its processes killed.
        match decide(ProcessIsolation::Uid, 900, &host(0, true)) {
            Isolation::Unavailable(why) => assert!(why.contains("\"bob\"") && why.contains("1000"), "{why}"),
            other => panic!("{other:?}"),
        }
        // `none` is what it says, root or not.
        for euid in [0, 1000] {
            assert!(matches!(decide(ProcessIsolation::None, 200_000, &host(euid, false)), Isolation::None));
        }
    }

    #[test]
    fn passwd_files_are_read_for_names_and_uids() {
        assert_eq!(
            parse_passwd("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/usr/sbin/nologin\nbad:x:y:1\n"),
            [("root".to_owned(), 0), ("nobody".to_owned(), 65_534)]
        );
    }

    #[tokio::test]
    async fn a_pool_never_leases_one_uid_twice_at_once_and_gives_uids_back() {
        // `true` stands in for setpriv: the sweep "succeeds" without switching anything.
        let pool = UidPool::new(PathBuf::from("/bin/true"), 500_000, 2);
        let a = pool.lease().await.unwrap();
        let b = pool.lease().await.unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(pool.uids().contains(&a.uid()) && pool.uids().contains(&b.uid()));
        // Both leased: the next one waits until one comes back.
        let third = tokio::spawn({
            let pool = pool.clone();
            async move { pool.lease().await.unwrap().uid() }
        });
        let (uid_a, uid_b) = (a.uid(), b.uid());
        drop(a);
        assert_eq!(third.await.unwrap(), uid_a);
        drop(b);
        let again = pool.lease().await.unwrap();
        assert!([uid_a, uid_b].contains(&again.uid()));
    }

    #[tokio::test]
    async fn uid_zero_is_never_swept() {
        assert!(sweep(Path::new("/bin/true"), 0).await.unwrap_err().contains("uid 0"));
    }
}
