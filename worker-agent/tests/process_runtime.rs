//! The process runtime against the handler contract: shell-script fixtures packed at test time
//! (gzip tarballs and zip archives), unpacked with `process::unpack`, run with
//! `ProcessRuntime::invoke`; and archives that try to leave their directory.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nimbus_worker_agent::runtime::{
    FailureReason, Invocation, Limits, Outcome,
    process::{Packing, ProcessPackage, ProcessRuntime, unpack},
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
    }
}

/// Runs `script` (packed as a tarball) once and checks that its scratch directory is gone after.
async fn run_with(script: &str, inv: &Invocation, limits: Limits) -> Outcome {
    let scratch = Scratch::new(script);
    let pkg = package(&scratch, script, Packing::TarGz);
    let work = scratch.0.join("work");
    let runtime = ProcessRuntime::new(&work).unwrap();
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
        let runtime = ProcessRuntime::new(scratch.0.join("work")).unwrap();
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
    let pid_file = scratch.0.join("pids");
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
    let pid_file = scratch.0.join("pids");
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
    let o = run("limits.sh", Limits { memory_bytes: 64 << 20, ..Limits::default() }).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.log));
    assert_eq!(String::from_utf8_lossy(&o.response.body), "address space 65536 65536, core 0 0\n");
}

#[tokio::test]
async fn a_missing_or_escaping_entry_fails_to_start() {
    let scratch = Scratch::new("entry");
    let pkg = package(&scratch, "echo.sh", Packing::Zip);
    let runtime = ProcessRuntime::new(scratch.0.join("work")).unwrap();
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
