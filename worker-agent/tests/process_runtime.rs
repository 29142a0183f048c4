//! The process runtime against the handler contract: shell-script fixtures packed at test time
//! (gzip tarballs and zip archives), unpacked with `process::unpack`, run with
//! `ProcessRuntime::invoke` — under uids of their own when the tests run as root (as the agent
//! does by default), else as the test itself; archives that try to leave their directory; and,
//! as root, what uid isolation keeps functions from: the agent's files, their own package, each
//! other's environment, processes left behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nimbus_worker_agent::{
    config::ProcessIsolation,
    runtime::{
        FailureReason, Invocation, Limits, Outcome,
        process::{Host, Isolation, Packing, ProcessPackage, ProcessRuntime, package_file_mode, unpack},
    },
};

/// Where the entry sits inside every test package (a subdirectory, so unpacking creates one).
const ENTRY: &str = "bin/handler";

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fresh directory for one test (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("process-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Scratch {
    /// A directory in it every user may write to (for files a function hands to the test).
    fn shared(&self) -> PathBuf {
        let dir = self.0.join("shared");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h
}

/// A gzip tarball of `(path, mode, contents)` members.
fn tar_gz(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (path, mode, data) in members {
        let mut h = tar_header(tar::EntryType::Regular, *mode, data.len() as u64);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A zip archive of `(path, mode, contents)` members.
fn zip(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (path, mode, data) in members {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        w.start_file(*path, options).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Writes `archive` into `scratch` and unpacks it into `scratch/pkg`.
fn unpack_bytes(scratch: &Scratch, archive: &[u8], packing: Packing) -> anyhow::Result<PathBuf> {
    let file = scratch.0.join("package");
    std::fs::write(&file, archive).unwrap();
    let dir = scratch.0.join("pkg");
    unpack(&file, packing, &dir)?;
    Ok(dir)
}

/// The fixture packed as `packing` with its script at [`ENTRY`], unpacked.
fn package(scratch: &Scratch, script: &str, packing: Packing) -> ProcessPackage {
    let source = fixture(script);
    let members: &[(&str, u32, &[u8])] = &[(ENTRY, 0o755, &source), ("README", 0o644, b"a test package\n")];
    let archive = match packing {
        Packing::TarGz => tar_gz(members),
        Packing::Zip => zip(members),
    };
    let dir = unpack_bytes(scratch, &archive, packing).unwrap();
    ProcessPackage { dir, entry: ENTRY.into() }
}

/// A tarball package holding `script` at [`ENTRY`] (and a README), unpacked into `scratch/pkg`.
fn script_package(scratch: &Scratch, script: &str) -> ProcessPackage {
    let members: &[(&str, u32, &[u8])] = &[(ENTRY, 0o755, script.as_bytes()), ("README", 0o644, b"a test package\n")];
    let dir = unpack_bytes(scratch, &tar_gz(members), Packing::TarGz).unwrap();
    ProcessPackage { dir, entry: ENTRY.into() }
}

fn request(body: &[u8]) -> Invocation {
    Invocation {
        id: "0190f0e0-0000-7000-8000-000000000002".into(),
        function: "echo".into(),
        version: 7,
        method: "POST".into(),
        path: "/greet/world".into(),
        query: "lang=en".into(),
        headers: vec![("content-type".into(), "text/plain".into()), ("x-test".into(), "yes".into())],
        body: body.to_vec(),
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        ..Invocation::default()
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A uid range of its own for every pool of these tests: test processes run in parallel, and a
/// pool kills whatever runs under a uid it takes back.
fn uid_base() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32 % 125;
    10_000_000 + (std::process::id() % 100_000) * 1_000 + n * 8
}

/// Uid isolation with a pool of `uids` (root only: it panics when the host cannot isolate).
fn uid_isolation(uids: u32) -> Isolation {
    match Isolation::decide(ProcessIsolation::Uid, uid_base(), uids, &Host::probe()) {
        Isolation::Uid(pool) => Isolation::Uid(pool),
        other => panic!("uid isolation is not available: {other:?}"),
    }
}

/// How the agent runs functions by default when the tests can: as root, under uids of their
/// own; otherwise as the test's own user.
fn default_isolation() -> Isolation {
    if is_root() { uid_isolation(8) } else { Isolation::None }
}

/// A runtime with scratch directories under `work`, isolated as the agent does by default.
fn runtime(work: &Path) -> ProcessRuntime {
    ProcessRuntime::new(work, default_isolation()).unwrap()
}

/// Runs `script` (packed as a tarball) once and checks that its scratch directory is gone after.
async fn run_with(script: &str, inv: &Invocation, limits: Limits) -> Outcome {
    let scratch = Scratch::new(script);
    let pkg = package(&scratch, script, Packing::TarGz);
    let work = scratch.0.join("work");
    let runtime = runtime(&work);
    let outcome = runtime.invoke(&pkg, inv, &limits).await;
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
    assert!(left.is_empty(), "the invocation's working directory is removed: {left:?}");
    outcome
}

async fn run(script: &str, limits: Limits) -> Outcome {
    run_with(script, &request(b"ping"), limits).await
}

fn header<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    o.response.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn detail(o: &Outcome) -> String {
    let body: serde_json::Value = serde_json::from_slice(&o.response.body).unwrap();
    body["detail"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn echo_gets_the_body_and_exactly_the_contract_environment() {
    for packing in [Packing::TarGz, Packing::Zip] {
        let scratch = Scratch::new("echo");
        let pkg = package(&scratch, "echo.sh", packing);
        let runtime = runtime(&scratch.0.join("work"));
        let mut inv = request(b"ping");
        // The function's own PATH is overridden by the fixed one; reserved names never reach it.
        inv.env.insert("PATH".into(), "/opt/evil".into());
        inv.env.insert("NIMBUS_VERSION".into(), "999".into());
        let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
        assert_eq!(o.response.failure, None, "{packing:?}: {}", String::from_utf8_lossy(&o.response.body));
        assert_eq!(o.response.status, 200);
        assert_eq!(header(&o, "content-type"), Some("text/plain"));
        assert_eq!(header(&o, "x-echo"), Some("1"));
        let body = String::from_utf8(o.response.body.clone()).unwrap();
        let (echoed, env) = body.split_once('\n').unwrap();
        assert_eq!(echoed, "ping");
        let env: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
        let scratch_dir = env["PWD"];
        assert!(scratch_dir.starts_with(scratch.0.join("work").to_str().unwrap()), "{scratch_dir}");
        let expected = BTreeMap::from([
            ("CONTENT_LENGTH", "4"),
            ("CONTENT_TYPE", "text/plain"),
            ("GATEWAY_INTERFACE", "CGI/1.1"),
            ("GREETING", "hello"),
            ("HOME", scratch_dir),
            ("HTTP_X_TEST", "yes"),
            ("NIMBUS_FUNCTION", "echo"),
            ("NIMBUS_INVOCATION_ID", "0190f0e0-0000-7000-8000-000000000002"),
            ("NIMBUS_VERSION", "7"),
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
            ("PATH_INFO", "/greet/world"),
            ("PWD", scratch_dir),
            ("QUERY_STRING", "lang=en"),
            ("REQUEST_METHOD", "POST"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("TMPDIR", scratch_dir),
        ]);
        // Exactly these, so nothing of the agent's own environment (this test process's: HOME,
        // PATH, CARGO_*, ...) leaks in.
        assert_eq!(env, expected, "{packing:?}");
        for (name, _) in std::env::vars() {
            assert!(!env.contains_key(name.as_str()) || expected.contains_key(name.as_str()), "{name} leaked");
        }
        assert_eq!(String::from_utf8_lossy(&o.log), format!("echoed 4 bytes from {scratch_dir}\n"));
        assert!(!o.log_truncated);
        assert!(!o.cold_start);
    }
}

#[tokio::test]
async fn a_large_body_goes_in_while_the_output_comes_out() {
    // Larger than any pipe buffer both ways: feeding stdin must not wait for stdout to be read.
    let body: Vec<u8> = (0..4 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let o = run_with("echo.sh", &request(&body), Limits::default()).await;
    assert_eq!(o.response.failure, None);
    assert!(o.response.body.starts_with(&body));
    assert_eq!(o.response.body[body.len()], b'\n');
}

#[tokio::test]
async fn a_function_that_ignores_its_body_still_answers() {
    let o = run_with("status.sh", &request(&vec![b'x'; 1 << 20]), Limits::default()).await;
    assert_eq!(o.response.status, 404);
}

#[tokio::test]
async fn a_cgi_header_block_sets_status_and_headers() {
    let o = run("status.sh", Limits::default()).await;
    assert_eq!(o.response.failure, None);
    assert_eq!(o.response.status, 404);
    assert_eq!(header(&o, "content-type"), Some("application/json"));
    assert_eq!(header(&o, "x-custom"), Some("yes"));
    assert_eq!(o.response.body, b"{\"found\":false}");
}

#[tokio::test]
async fn a_non_zero_exit_code_is_reported_with_the_log() {
    let o = run("exit3.sh", Limits::default()).await;
    assert_eq!(o.response.failure, Some(FailureReason::ExitCode));
    assert_eq!(o.response.status, 502);
    assert_eq!(header(&o, "x-nimbus-error"), Some("exit_code"));
    assert_eq!(detail(&o), "exited with code 3");
    assert_eq!(o.log, b"giving up\n");
}

#[tokio::test]
async fn death_by_a_signal_is_a_crash() {
    let o = run("crash.sh", Limits::default()).await;
    assert_eq!(o.response.failure, Some(FailureReason::Crash));
    assert_eq!(o.response.status, 502);
    assert_eq!(detail(&o), "killed by signal 11");
    assert_eq!(o.log, b"about to crash\n");
}

/// Whether process `pid` is gone (or a zombie: dead, waiting for a parent that may never reap
/// it, as init does not in every container).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => matches!(stat[stat.rfind(')').unwrap() + 2..].chars().next(), Some('Z' | 'X')),
    }
}

/// Waits (a bounded while: SIGKILL is delivered asynchronously) until every pid is dead.
async fn all_dead(pids: &[u32]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if pids.iter().all(|p| dead(*p)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn pids(file: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(file).expect("the fixture wrote its pids");
    text.split_whitespace().map(|p| p.parse().unwrap()).collect()
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let scratch = Scratch::new("spin-pids");
    let pid_file = scratch.shared().join("pids");
    let mut inv = request(b"");
    inv.env.insert("PID_FILE".into(), pid_file.to_str().unwrap().into());
    let limits = Limits { timeout: Duration::from_millis(500), ..Limits::default() };
    let o = run_with("spin.sh", &inv, limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::Timeout));
    assert_eq!(o.response.status, 504);
    assert_eq!(header(&o, "x-nimbus-error"), Some("timeout"));
    assert!(o.duration >= Duration::from_millis(500), "{:?}", o.duration);
    assert!(o.duration < Duration::from_secs(3), "{:?}", o.duration);
    let pids = pids(&pid_file);
    assert_eq!(pids.len(), 2, "the script and its busy child");
    assert!(all_dead(&pids).await, "the script or its busy child still runs after the timeout: {pids:?}");
    assert_eq!(o.log, b"spinning\n", "the log written before the timeout is kept");
}

#[tokio::test]
async fn children_left_behind_neither_delay_the_answer_nor_outlive_it() {
    let scratch = Scratch::new("linger-pids");
    let pid_file = scratch.shared().join("pids");
    let mut inv = request(b"");
    inv.env.insert("PID_FILE".into(), pid_file.to_str().unwrap().into());
    let limits = Limits { timeout: Duration::from_secs(10), ..Limits::default() };
    let o = run_with("linger.sh", &inv, limits).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.response.body));
    assert_eq!(o.response.body, b"done\n");
    // The child holds stdout open for a minute; the answer came when the entry exited.
    assert!(o.duration < Duration::from_secs(3), "{:?}", o.duration);
    let pids = pids(&pid_file);
    assert!(all_dead(&pids).await, "the child outlived the invocation: {pids:?}");
}

#[tokio::test]
async fn endless_output_is_stopped_at_the_response_limit() {
    let limits = Limits { max_response_bytes: 1 << 20, timeout: Duration::from_secs(10), ..Limits::default() };
    let o = run("bigout.sh", limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::ResponseTooLarge));
    assert_eq!(o.response.status, 502);
    assert!(o.response.body.len() < 1024, "the error, not the output");
    // Stopped when the limit was passed, not at the timeout (the script ignores SIGPIPE).
    assert!(o.duration < Duration::from_secs(5), "{:?}", o.duration);
}

#[tokio::test]
async fn logs_are_bounded_and_marked_truncated() {
    let limits = Limits { max_log_bytes: 4096, ..Limits::default() };
    let o = run("chatty.sh", limits).await;
    assert_eq!(o.response.failure, None);
    assert_eq!(o.response.body, b"done\n");
    assert_eq!(o.log.len(), 4096);
    assert!(o.log_truncated);
    assert!(o.log.starts_with(b"log line 0\nlog line 1\n"));
}

#[tokio::test]
async fn the_memory_limit_is_enforced() {
    // Enough memory: the script answers.
    let o = run("memhog.sh", Limits { memory_bytes: 256 << 20, ..Limits::default() }).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.response.body));
    assert_eq!(o.response.body, b"16000000\n");
    // 32 MiB of address space: the shell cannot hold the string. A native process cannot tell
    // the runtime why an allocation failed, so this surfaces as an exit code or a crash,
    // whichever the program does when malloc fails; what matters is that it fails.
    let o = run("memhog.sh", Limits { memory_bytes: 32 << 20, ..Limits::default() }).await;
    let failure = o.response.failure.expect("the limit stops the function");
    assert!(
        matches!(failure, FailureReason::ExitCode | FailureReason::Crash | FailureReason::MemoryLimit),
        "{failure:?}: {}",
        String::from_utf8_lossy(&o.response.body)
    );
    assert_eq!(o.response.status, 502);
}

#[tokio::test]
async fn the_limits_are_set_hard_before_the_entry_runs() {
    let o = run("limits.sh", Limits { memory_bytes: 64 << 20, max_file_bytes: 8 << 20, ..Limits::default() }).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.log));
    assert_eq!(
        String::from_utf8_lossy(&o.response.body),
        "address space 65536 65536, core 0 0, file 16384 16384, umask 0077\n",
        "file sizes in 512-byte blocks"
    );
}

#[tokio::test]
async fn a_function_cannot_write_a_file_larger_than_the_limit() {
    let scratch = Scratch::new("fsize");
    let script =
        "#!/bin/sh\nhead -c 3000000 /dev/zero > \"$HOME/big\"\necho \"status $? size $(wc -c < \"$HOME/big\")\"\n";
    let pkg = script_package(&scratch, script);
    let runtime = runtime(&scratch.0.join("work"));
    let o = runtime.invoke(&pkg, &request(b""), &Limits { max_file_bytes: 1 << 20, ..Limits::default() }).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.log));
    // `head` is stopped by SIGXFSZ (25) at the limit: 128 + 25 for the shell.
    assert_eq!(String::from_utf8_lossy(&o.response.body), "status 153 size 1048576\n");
}

#[tokio::test]
async fn a_missing_or_escaping_entry_fails_to_start() {
    let scratch = Scratch::new("entry");
    let pkg = package(&scratch, "echo.sh", Packing::Zip);
    let runtime = runtime(&scratch.0.join("work"));
    for entry in ["bin/nothing", "README", "../pkg/bin/handler", "/bin/sh"] {
        let pkg = ProcessPackage { entry: entry.into(), ..pkg.clone() };
        let o = runtime.invoke(&pkg, &request(b""), &Limits::default()).await;
        assert_eq!(o.response.failure, Some(FailureReason::StartFailed), "{entry}");
        assert_eq!(o.response.status, 503, "{entry}");
    }
}

/// A tarball with one member whose raw name is `name` (the builder refuses unsafe names, so the
/// header is written by hand).
fn tar_gz_raw_name(name: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let data = b"#!/bin/sh\necho pwned\n";
    let mut h = tar_header(tar::EntryType::Regular, 0o755, data.len() as u64);
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

/// A tarball holding a symbolic link `link -> target`, then (optionally) a file written through it.
fn tar_gz_link(link: &str, target: &str, through: Option<&str>) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar_header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, link, target).unwrap();
    if let Some(path) = through {
        let mut h = tar_header(tar::EntryType::Regular, 0o755, 3);
        b.append_data(&mut h, path, &b"hi\n"[..]).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// Every file name under `dir`, recursively (the check that nothing landed outside).
fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.insert(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(tree(&e.path()));
        }
    }
    out
}

#[test]
fn archive_members_escaping_the_package_are_refused() {
    let scratch = Scratch::new("escape");
    let outside = scratch.0.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let outside_abs = outside.to_str().unwrap().to_owned();
    let through = format!("{outside_abs}/pwned");
    let cases: Vec<(&str, Vec<u8>, Packing)> = vec![
        ("tar ..", tar_gz_raw_name("../outside/pwned"), Packing::TarGz),
        ("tar nested ..", tar_gz_raw_name("bin/../../outside/pwned"), Packing::TarGz),
        ("tar absolute", tar_gz_raw_name(&through), Packing::TarGz),
        ("tar link out, absolute", tar_gz_link("lib", &outside_abs, None), Packing::TarGz),
        ("tar link out, relative", tar_gz_link("lib", "../outside", None), Packing::TarGz),
        ("tar write through link", tar_gz_link("lib", &outside_abs, Some("lib/pwned")), Packing::TarGz),
        ("zip ..", zip(&[("../outside/pwned", 0o755, b"x")]), Packing::Zip),
        ("zip absolute", zip(&[(&through, 0o755, b"x")]), Packing::Zip),
        (
            "zip symlink",
            {
                let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
                w.add_symlink("lib", &outside_abs, zip::write::SimpleFileOptions::default()).unwrap();
                w.finish().unwrap().into_inner()
            },
            Packing::Zip,
        ),
    ];
    for (what, archive, packing) in cases {
        let err = unpack_bytes(&scratch, &archive, packing).expect_err(what);
        let text = format!("{err:#}");
        assert!(["leaves the package", "link", "outside"].iter().any(|w| text.contains(w)), "{what}: {text}");
        assert!(!scratch.0.join("pkg").exists(), "{what}: nothing is left unpacked");
        assert!(tree(&outside).is_empty(), "{what}: nothing lands outside");
        let leftovers: Vec<_> = std::fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "outside" && n != "package")
            .collect();
        assert!(leftovers.is_empty(), "{what}: no half-unpacked directory stays: {leftovers:?}");
    }
}

#[test]
fn links_inside_the_package_are_kept() {
    let scratch = Scratch::new("links");
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let data = b"#!/bin/sh\necho hi\n";
    b.append_data(&mut tar_header(tar::EntryType::Regular, 0o755, data.len() as u64), "bin/real", &data[..]).unwrap();
    b.append_link(&mut tar_header(tar::EntryType::Symlink, 0o777, 0), "bin/handler", "real").unwrap();
    b.append_link(&mut tar_header(tar::EntryType::Symlink, 0o777, 0), "lib/up", "../bin").unwrap();
    let archive = b.into_inner().unwrap().finish().unwrap();
    let dir = unpack_bytes(&scratch, &archive, Packing::TarGz).unwrap();
    assert_eq!(std::fs::read(dir.join("lib/up/handler")).unwrap(), data);
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    let scratch = Scratch::new("special");
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    b.append_data(&mut tar_header(tar::EntryType::Fifo, 0o644, 0), "pipe", &b""[..]).unwrap();
    let archive = b.into_inner().unwrap().finish().unwrap();
    let err = unpack_bytes(&scratch, &archive, Packing::TarGz).unwrap_err();
    assert!(format!("{err:#}").contains("not a file"), "{err:#}");
    assert!(!scratch.0.join("pkg").exists());
}

#[test]
fn unpacked_packages_can_be_read_and_run_by_everyone_and_changed_by_no_function() {
    let scratch = Scratch::new("modes");
    let archive = tar_gz(&[
        ("bin/handler", 0o700, b"#!/bin/sh\necho hi\n"),
        ("bin/tool", 0o4777, b"x"),
        ("etc/config", 0o600, b"x"),
        ("etc/shared", 0o666, b"x"),
        ("private", 0o000, b"x"),
    ]);
    let dir = unpack_bytes(&scratch, &archive, Packing::TarGz).unwrap();
    let mode = |p: &str| std::fs::symlink_metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(""), 0o755);
    assert_eq!(mode("bin"), 0o755);
    assert_eq!(mode("etc"), 0o755);
    assert_eq!(mode("bin/handler"), 0o755, "owner-only execute becomes everyone's (functions are not the owner)");
    assert_eq!(mode("bin/tool"), 0o755, "no setuid, and no write for others");
    assert_eq!(mode("etc/config"), 0o644);
    assert_eq!(mode("etc/shared"), 0o644);
    assert_eq!(mode("private"), 0o200);
    for m in 0..=0o7777 {
        assert_eq!(package_file_mode(m) & !0o755, 0, "{m:o}");
    }
}

#[tokio::test]
async fn when_isolation_is_unavailable_invocations_fail_to_start_and_say_why() {
    let scratch = Scratch::new("unavailable");
    let pkg = package(&scratch, "echo.sh", Packing::TarGz);
    let why = "process isolation `uid` needs the agent to run as root, and it runs as uid 1000";
    let runtime = ProcessRuntime::new(scratch.0.join("work"), Isolation::Unavailable(why.into())).unwrap();
    let o = runtime.invoke(&pkg, &request(b"ping"), &Limits::default()).await;
    assert_eq!(o.response.failure, Some(FailureReason::StartFailed));
    assert_eq!(o.response.status, 503);
    assert_eq!(detail(&o), why);
}

/// Skips a test that needs root (the agent's uid isolation does), saying so.
macro_rules! needs_root {
    () => {
        if !is_root() {
            eprintln!("skipped: uid isolation needs root");
            return;
        }
    };
}

/// A FIFO every user may open.
fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("mkfifo").arg("-m").arg("0666").arg(&path).status().unwrap();
    assert!(status.success());
    path
}

/// Reads one line from a FIFO (opened read-write, so it never sees an end before the writer came).
async fn read_line(fifo: &Path) -> String {
    let mut rx = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_receiver(fifo).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut byte).await.unwrap();
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap().trim().to_owned()
}

/// Two invocations at once: the first has a secret in its environment, hands its pid over and
/// waits; the second tries to read the first's `/proc/<pid>/environ` and to signal it. Returns
/// what both printed.
async fn a_neighbour_s_environment(isolation: Isolation) -> (String, String) {
    let scratch = Scratch::new("environ");
    let shared = scratch.shared();
    let (pid_fifo, go_fifo) = (fifo(&shared, "pid"), fifo(&shared, "go"));
    let holder = "#!/bin/sh\necho $$ > \"$PID_FIFO\"\nread -r go < \"$GO_FIFO\"\necho \"uid $(id -u)\"\n";
    let prober = "#!/bin/sh\necho \"uid $(id -u)\"\n\
        if tr '\\0' '\\n' < /proc/$TARGET/environ 2>/dev/null | grep -q '^SECRET=tenant-a'; then echo 'environ read'; else echo 'environ denied'; fi\n\
        if kill -0 \"$TARGET\" 2>/dev/null; then echo 'signal sent'; else echo 'signal denied'; fi\n";
    let (a_dir, b_dir) = (Scratch::new("environ-a"), Scratch::new("environ-b"));
    let (pkg_a, pkg_b) = (script_package(&a_dir, holder), script_package(&b_dir, prober));
    let runtime = ProcessRuntime::new(scratch.0.join("work"), isolation).unwrap();
    let mut inv_a = request(b"");
    inv_a.env.insert("SECRET".into(), "tenant-a".into());
    inv_a.env.insert("PID_FIFO".into(), pid_fifo.to_str().unwrap().into());
    inv_a.env.insert("GO_FIFO".into(), go_fifo.to_str().unwrap().into());
    let first = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.invoke(&pkg_a, &inv_a, &Limits::default()).await })
    };
    let pid = read_line(&pid_fifo).await;
    // The pid is the right one: the test itself (root, or the same user) sees the secret.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.split(|b| *b == 0).any(|v| v == b"SECRET=tenant-a"), "pid {pid} is the first invocation");

    let mut inv_b = request(b"");
    inv_b.env.insert("TARGET".into(), pid);
    let second = runtime.invoke(&pkg_b, &inv_b, &Limits::default()).await;
    // Let the first one finish (the sender stays open until it has read).
    let mut go = tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(&go_fifo).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut go, b"go\n").await.unwrap();
    let first = first.await.unwrap();
    drop(go);
    for o in [&first, &second] {
        assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.log));
    }
    let text = |o: &Outcome| String::from_utf8(o.response.body.clone()).unwrap();
    (text(&first), text(&second))
}

fn uid_of(output: &str) -> u32 {
    let line = output.lines().find_map(|l| l.strip_prefix("uid ")).expect("the uid was printed");
    line.parse().unwrap()
}

#[tokio::test]
async fn concurrent_invocations_run_as_different_users_that_cannot_read_each_others_environment() {
    needs_root!();
    let isolation = uid_isolation(4);
    let Isolation::Uid(pool) = &isolation else { unreachable!() };
    let uids = pool.uids();
    let (first, second) = a_neighbour_s_environment(isolation).await;
    let (a, b) = (uid_of(&first), uid_of(&second));
    assert!(uids.contains(&a) && uids.contains(&b), "{a} and {b} come from the pool {uids:?}");
    assert_ne!(a, b, "two invocations at once never share a uid");
    assert!(second.contains("environ denied"), "{second}");
    assert!(second.contains("signal denied"), "{second}");

    // The control: as one user, the same probe reads the secret (so the check above can fail).
    let (_, second) = a_neighbour_s_environment(Isolation::None).await;
    assert!(second.contains("environ read") && second.contains("signal sent"), "{second}");
}

/// What a function tries against the agent's files and its own package: a line `<probe> yes|no`
/// each, then its uid, gid and groups.
const PROBES: &str = r#"#!/bin/sh
probe() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name yes"; else echo "$name no"; fi; }
probe read-identity cat "$DATA/identity.json"
probe list-data ls "$DATA"
probe enter-data sh -c 'cd "$DATA"'
probe list-usage ls "$DATA/usage"
probe read-sealed-segment cat "$SEALED"
probe read-open-segment cat "$OPEN"
probe list-cache ls "$DATA/cache"
probe list-blobs ls "$DATA/cache/blobs"
probe read-blob cat "$DATA/cache/blobs/$SHA"
probe list-artifacts ls "$DATA/cache/artifacts"
probe list-unpacked ls "$DATA/cache/unpacked"
probe list-scratch ls "$DATA/scratch"
probe read-own-package cat "$PKG/README"
probe append-to-package sh -c 'echo x >> "$PKG/bin/handler"'
probe create-in-package touch "$PKG/new"
probe remove-from-package rm "$PKG/README"
probe chmod-package chmod 777 "$PKG/bin/handler"
probe write-home touch "$HOME/mine"
echo "ids $(id -u) $(id -g) $(id -G)"
"#;

#[tokio::test]
async fn a_function_cannot_read_the_agent_s_files_nor_change_its_package() {
    use nimbus_worker_agent::{agent::Paths, cache::CodeCache, identity, spool::Spool};

    needs_root!();
    let scratch = Scratch::new("agent-files");
    let data = scratch.0.join("data");
    let paths = Paths::prepare(&data).unwrap();
    let id = identity::Identity {
        control_plane_url: "http://cp".into(),
        node_id: uuid::Uuid::now_v7(),
        credential: "nnc_secret".into(),
        expires_at: chrono::Utc::now(),
        invoke_secret: "nis_secret".into(),
        report_interval_ms: 1000,
    };
    identity::save(&paths.identity, &id).unwrap();
    let spool = Spool::open(&paths.usage, 1000).unwrap();
    let record = |n: u32| nimbus_worker_agent::spool::SpoolEntry {
        record: nimbus_protocol::UsageRecord {
            invocation_id: uuid::Uuid::now_v7(),
            tenant_id: uuid::Uuid::now_v7(),
            function_id: uuid::Uuid::now_v7(),
            version_id: uuid::Uuid::now_v7(),
            version: n,
            started_at: chrono::Utc::now(),
            duration_us: 1,
            billed_ms: 1,
            memory_mb: 1,
            http_status: 200,
            status: nimbus_protocol::UsageStatus::Ok,
            cold_start: false,
        },
        logs: Vec::new(),
    };
    spool.append(&record(1)).unwrap();
    spool.rotate().unwrap();
    spool.append(&record(2)).unwrap();
    let sealed = spool.sealed().unwrap().remove(0);
    let open = std::fs::read_dir(&paths.usage)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "open"))
        .unwrap();
    let _cache = CodeCache::open(&paths.cache, 1 << 20).unwrap();
    let archive = tar_gz(&[(ENTRY, 0o755, PROBES.as_bytes()), ("README", 0o644, b"a test package\n")]);
    let sha = "ab".repeat(32);
    std::fs::write(paths.cache.join("blobs").join(&sha), &archive).unwrap();
    let pkg_dir = paths.cache.join("unpacked").join(&sha);
    unpack(&paths.cache.join("blobs").join(&sha), Packing::TarGz, &pkg_dir).unwrap();
    let pkg = ProcessPackage { dir: pkg_dir.clone(), entry: ENTRY.into() };

    let mut inv = request(b"");
    for (k, v) in [
        ("DATA", data.to_str().unwrap()),
        ("SEALED", sealed.to_str().unwrap()),
        ("OPEN", open.to_str().unwrap()),
        ("SHA", sha.as_str()),
        ("PKG", pkg_dir.to_str().unwrap()),
    ] {
        inv.env.insert(k.into(), v.into());
    }
    let isolation = uid_isolation(2);
    let Isolation::Uid(pool) = &isolation else { unreachable!() };
    let uids = pool.uids();
    let runtime = ProcessRuntime::new(&paths.scratch, isolation).unwrap();
    let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
    assert_eq!(o.response.failure, None, "{:?}", String::from_utf8_lossy(&o.log));
    let body = String::from_utf8(o.response.body.clone()).unwrap();
    let probes: BTreeMap<&str, &str> = body.lines().filter_map(|l| l.split_once(' ')).collect();
    let allowed = ["enter-data", "read-own-package", "write-home"];
    for (probe, result) in &probes {
        if *probe == "ids" {
            continue;
        }
        let want = if allowed.contains(probe) { "yes" } else { "no" };
        assert_eq!(*result, want, "{probe}: {body}");
    }
    assert_eq!(probes.len(), 19, "{body}");
    let ids: Vec<u32> = probes["ids"].split(' ').map(|n| n.parse().unwrap()).collect();
    assert!(uids.contains(&ids[0]), "{ids:?}");
    assert_eq!(ids, [ids[0], ids[0], ids[0]], "its own gid, and no other groups");
    assert_eq!(std::fs::read(pkg_dir.join(ENTRY)).unwrap(), PROBES.as_bytes(), "the package is unchanged");
    assert!(pkg_dir.join("README").exists() && !pkg_dir.join("new").exists());

    // The control: as the agent's own user the same probes read the agent's secrets (only the
    // reading ones: the others would change the package under the running script).
    let reads: String =
        PROBES.lines().filter(|l| !l.starts_with("probe ") || l.contains(" read-")).collect::<Vec<_>>().join("\n");
    let control = Scratch::new("agent-files-control");
    let pkg = script_package(&control, &reads);
    let runtime = ProcessRuntime::new(control.0.join("work"), Isolation::None).unwrap();
    let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
    let body = String::from_utf8(o.response.body).unwrap();
    assert!(body.contains("read-identity yes") && body.contains("read-sealed-segment yes"), "{body}");
}

#[tokio::test]
async fn what_an_invocation_leaves_running_is_killed_before_its_uid_is_used_again() {
    needs_root!();
    // Escapes its process group (a session of its own), so the group kill misses it. The escapee
    // names itself only once in its session, and the leaver ends only then: under load, a leaver
    // that ended first would have the group kill catch the escapee before it left.
    let leaver = "#!/bin/sh\nsetsid sh -c 'echo $$ > \"$SHARED/escapee.tmp\"; exec sleep 60' < /dev/null > /dev/null 2>&1 &\n\
        while [ ! -s \"$SHARED/escapee.tmp\" ]; do sleep 0.01; done\n\
        mv \"$SHARED/escapee.tmp\" \"$SHARED/escapee\"\necho \"uid $(id -u)\"\n";
    // Gone: no such process, a zombie (init does not reap in every container), or SIGKILL
    // pending (delivered, not yet acted on: it runs no more of its code).
    let checker = r#"#!/bin/sh
echo "uid $(id -u)"
st=/proc/$ESCAPEE/status
running() { grep -qs '^State:[[:space:]]*[RSDTt] ' "$st"; }
killed() {
    for f in SigPnd ShdPnd; do
        h=$(sed -n "s/^$f:[[:space:]]*//p" "$st")
        [ -n "$h" ] && [ $((0x$h & 0x100)) -ne 0 ] && return 0
    done
    return 1
}
if running && ! killed; then echo alive; else echo gone; fi
"#;
    let run_leaver = async |isolation: Isolation| {
        let scratch = Scratch::new("leaver");
        let shared = scratch.shared();
        let pkg = script_package(&scratch, leaver);
        let runtime = ProcessRuntime::new(scratch.0.join("work"), isolation).unwrap();
        let mut inv = request(b"");
        inv.env.insert("SHARED".into(), shared.to_str().unwrap().into());
        let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
        assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.log));
        let pid: u32 = std::fs::read_to_string(shared.join("escapee")).unwrap().trim().parse().unwrap();
        (runtime, uid_of(&String::from_utf8(o.response.body).unwrap()), pid, scratch)
    };

    // The control: without uid isolation the escapee outlives the invocation.
    let (_, _, pid, _scratch) = run_leaver(Isolation::None).await;
    let alive = !dead(pid);
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    );
    assert!(alive, "the escapee left the process group");

    // One uid: the next invocation gets it only after the sweep.
    let (runtime, uid, pid, _scratch) = run_leaver(uid_isolation(1)).await;
    let checker_dir = Scratch::new("checker");
    let pkg = script_package(&checker_dir, checker);
    let mut inv = request(b"");
    inv.env.insert("ESCAPEE".into(), pid.to_string());
    let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
    let body = String::from_utf8(o.response.body).unwrap();
    assert_eq!(o.response.failure, None, "{body} {:?}", String::from_utf8_lossy(&o.log));
    assert_eq!(uid_of(&body), uid, "the same uid, used again");
    assert!(body.ends_with("gone\n"), "{body}");
    assert!(all_dead(&[pid]).await);
}
