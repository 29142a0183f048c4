//! The `process` runtime: the package's entry executable, run per request like CGI.
//!
//! - The package is unpacked once per version into a directory of its own ([`unpack`]); members
//!   that would leave it, links that point out of it and device nodes are refused (the control
//!   plane checked this already; the agent does not rely on that).
//! - Each invocation runs the entry with a scrubbed environment (the contract's variables, the
//!   function's own, and `PATH=/usr/local/bin:/usr/bin:/bin` so scripts find basic tools), a fresh
//!   working directory that is removed afterwards (also its `HOME` and `TMPDIR`), its own process
//!   group, an address-space limit (`RLIMIT_AS`) and no core dumps, both set by a `/bin/sh`
//!   trampoline that then `exec`s the entry (`TRAMPOLINE` says why not in-process).
//! - The wall-clock timeout kills the whole process group, children included; stdout beyond the
//!   response limit kills it too; so does the entry's exit, so children it left behind neither
//!   outlive the invocation nor hold its answer back by keeping stdout open; stderr is kept up to
//!   a bound and drained after that (a timed-out invocation keeps what it logged).
//! - Exit 0 → the CGI response; another exit code → `exit_code`; a signal → `crash`.

use std::{
    os::unix::{fs::PermissionsExt as _, process::ExitStatusExt},
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{FailureReason, Invocation, Limits, Outcome, Response, cgi, contract_env};

/// Sets the limits, then becomes the entry (`$1` is the address-space limit in KiB, `$2` the
/// entry). `ulimit` without `-S`/`-H` sets the soft and the hard limit, so the function cannot
/// raise them again.
///
/// Limits are set this way rather than by `setrlimit` in a `pre_exec` hook because any such hook
/// makes the standard library fork the agent, and forking a process that holds a wasm instance
/// pool copies its page tables: about 17 ms per invocation, against well under 1 ms for the
/// vfork-style `posix_spawn` used otherwise (measured in `benches/runtime.rs`). The price is one
/// `exec` of `/bin/sh`, and that a failing `exec` (an entry that is not a valid executable) shows
/// as exit code 126 or 127 with the shell's message in the log.
const TRAMPOLINE: &str = r#"ulimit -c 0 && ulimit -v "$1" && shift && exec "$@""#;

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
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    std::fs::rename(&temp, dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&temp);
        anyhow::Error::new(e).context(format!("moving the unpacked package to {}", dir.display()))
    })
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

/// Runs process functions; scratch directories go under `work_dir`.
#[derive(Debug, Clone)]
pub struct ProcessRuntime {
    work_dir: PathBuf,
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
    /// A runtime with scratch directories under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let work_dir = work_dir.into();
        std::fs::create_dir_all(&work_dir)?;
        Ok(ProcessRuntime { work_dir })
    }

    /// Runs one invocation.
    pub async fn invoke(&self, pkg: &ProcessPackage, inv: &Invocation, limits: &Limits) -> Outcome {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scratch = self.work_dir.join(format!("inv-{}-{n}", file_safe(&inv.id)));
        let outcome = self.run(pkg, inv, limits, &scratch).await;
        let _ = tokio::fs::remove_dir_all(&scratch).await;
        outcome
    }

    async fn run(&self, pkg: &ProcessPackage, inv: &Invocation, limits: &Limits, scratch: &Path) -> Outcome {
        let started = Instant::now();
        let failed = |reason, detail: String| Outcome {
            response: Response::failed(reason, detail),
            log: Vec::new(),
            log_truncated: false,
            cold_start: false,
            duration: started.elapsed(),
        };
        if let Err(e) = tokio::fs::create_dir_all(scratch).await {
            return failed(FailureReason::StartFailed, format!("no working directory: {e}"));
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
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(TRAMPOLINE)
            .arg("nimbus-limits")
            .arg((limits.memory_bytes / 1024).max(1).to_string())
            .arg(&entry)
            .current_dir(scratch)
            .env_clear()
            .envs(contract_env(inv))
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
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let body = inv.body.clone();
        // The body goes in while the output comes out: neither side can block the other.
        let feed = async move {
            let _ = stdin.write_all(&body).await;
            drop(stdin);
        };
        let output = async {
            let (out, over) = read_bounded(stdout, limits.max_response_bytes, false).await;
            // At once: a function that ignores the closed pipe would otherwise run on to its
            // timeout.
            if over {
                kill_group();
            }
            (out, over)
        };
        let exit = async {
            let status = child.wait().await;
            // Whatever the entry left running in its group does not outlive the invocation, and
            // killing it now also closes the pipes such children inherited, so the readers end.
            kill_group();
            status
        };
        let work = async {
            let ((out, out_over), (log, log_over), (), status) =
                tokio::join!(output, read_bounded(stderr, limits.max_log_bytes, true), feed, exit);
            (out, out_over, log, log_over, status)
        };
        tokio::pin!(work);
        let finished = tokio::select! {
            done = &mut work => Ok(done),
            () = tokio::time::sleep(limits.timeout) => Err(started.elapsed()),
        };
        let (out, out_over, log, log_truncated, status) = match finished {
            Ok(done) => done,
            Err(duration) => {
                // The whole group: children the entry started die with it. Their pipes close,
                // so the log written so far can still be collected, briefly: a process that
                // left the group may hold them open.
                kill_group();
                let (log, log_truncated) = match tokio::time::timeout(KILL_GRACE, &mut work).await {
                    Ok((_, _, log, log_truncated, _)) => (log, log_truncated),
                    Err(_) => (Vec::new(), false),
                };
                return Outcome {
                    response: Response::failed(
                        FailureReason::Timeout,
                        format!("ran longer than its timeout of {} ms and was stopped", limits.timeout.as_millis()),
                    ),
                    log,
                    log_truncated,
                    cold_start: false,
                    duration,
                };
            }
        };
        let duration = started.elapsed();
        let response = if out_over {
            Response::failed(
                FailureReason::ResponseTooLarge,
                format!("the response is larger than {} bytes", limits.max_response_bytes),
            )
        } else {
            match status {
                Ok(s) if s.success() => cgi::parse(out),
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(code), _) => Response::failed(FailureReason::ExitCode, format!("exited with code {code}")),
                    (None, Some(signal)) => {
                        Response::failed(FailureReason::Crash, format!("killed by signal {signal}"))
                    }
                    (None, None) => Response::failed(FailureReason::Crash, "ended abnormally"),
                },
                Err(e) => Response::failed(FailureReason::Crash, format!("lost the process: {e}")),
            }
        };
        Outcome { response, log, log_truncated, cold_start: false, duration }
    }
}

/// A file-name-safe form of an invocation id.
fn file_safe(id: &str) -> String {
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect()
}
