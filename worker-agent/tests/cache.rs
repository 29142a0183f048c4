//! The code cache against a real HTTP server started per test: verification, limits, reuse
//! without a second download, artifacts reused across a restart, least-recently-used eviction.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use nimbus_protocol::{PackageFormat, PackageRef};
use nimbus_worker_agent::{
    cache::{CacheError, CodeCache},
    runtime::{
        Invocation, Limits,
        wasm::{WasmEngine, WasmSettings},
    },
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A fresh directory for one test (removed when dropped).
struct Scratch(PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cache-{label}-{}-{n}", std::process::id()));
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

/// How the test server answers a path.
#[derive(Clone)]
enum Reply {
    /// 200 with the bytes and their length.
    Bytes(Vec<u8>),
    /// 200 with the bytes, chunked (no length announced).
    Chunked(Vec<u8>),
    /// Just a status.
    Status(u16),
    /// 200 announcing the bytes, then only half of them, then nothing (the connection stays).
    Stall(Vec<u8>),
}

/// A one-request-per-connection HTTP/1.1 server on 127.0.0.1 that counts requests and records
/// their `Authorization` headers.
struct Server {
    base: String,
    hits: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

async fn server<'a>(routes: impl IntoIterator<Item = (&'a str, Reply)>) -> Server {
    let routes: HashMap<String, Reply> = routes.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let auth = Arc::new(Mutex::new(Vec::new()));
    let (h, a) = (hits.clone(), auth.clone());
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let reply_for = routes.clone();
            let (hits, auth) = (h.clone(), a.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut byte).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&byte[..n]);
                }
                let head = String::from_utf8(head).unwrap();
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                let authorization = head
                    .lines()
                    .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("authorization")))
                    .map(|(_, v)| v.trim().to_owned());
                hits.fetch_add(1, Ordering::SeqCst);
                auth.lock().unwrap().push(authorization);
                let reply = reply_for.get(&path).cloned().unwrap_or(Reply::Status(404));
                let mut out = Vec::new();
                match reply {
                    Reply::Bytes(b) => {
                        out.extend(
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", b.len())
                                .bytes(),
                        );
                        out.extend(b);
                    }
                    Reply::Chunked(b) => {
                        out.extend(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
                        for c in b.chunks(1000) {
                            out.extend(format!("{:x}\r\n", c.len()).bytes());
                            out.extend(c);
                            out.extend(b"\r\n");
                        }
                        out.extend(b"0\r\n\r\n");
                    }
                    Reply::Status(s) => out
                        .extend(format!("HTTP/1.1 {s} Nope\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").bytes()),
                    Reply::Stall(b) => {
                        out.extend(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", b.len()).bytes());
                        out.extend(&b[..b.len() / 2]);
                        let _ = conn.write_all(&out).await;
                        std::future::pending::<()>().await;
                    }
                }
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Server { base, hits, auth }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn package(bytes: &[u8], format: PackageFormat, url: String) -> PackageRef {
    PackageRef { sha256: sha256(bytes), size: bytes.len() as u64, format, url }
}

/// What is in a directory of the cache (names only).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::symlink_metadata(path).unwrap().permissions()) & 0o7777
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

#[tokio::test]
async fn a_fetched_package_is_verified_kept_and_reused_without_a_second_download() {
    let scratch = Scratch::new("fetch");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let srv = server(HashMap::from([("/code/a", Reply::Bytes(bytes.clone()))])).await;
    let pkg = package(&bytes, PackageFormat::Wasm, srv.url("/code/a"));
    let cache = CodeCache::open(scratch.0.join("cache"), 10 << 20).unwrap();
    let path = cache.fetch(&client(), &pkg, Some("nnc_secret")).await.unwrap();
    assert_eq!(path, scratch.0.join("cache/blobs").join(&pkg.sha256));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(cache.size(), bytes.len() as u64);
    assert_eq!(srv.auth.lock().unwrap().as_slice(), [Some("Bearer nnc_secret".to_owned())]);
    assert_eq!(listing(&scratch.0.join("cache/tmp")), Vec::<String>::new());
    for (p, want) in [("cache", 0o711), ("cache/blobs", 0o700), ("cache/artifacts", 0o700), ("cache/tmp", 0o700)] {
        assert_eq!(mode(&scratch.0.join(p)), want, "{p}");
    }
    assert_eq!(mode(&path), 0o600, "the blob");

    // Cached: no second request, now or after a restart.
    assert_eq!(cache.fetch(&client(), &pkg, Some("nnc_secret")).await.unwrap(), path);
    drop(cache);
    let cache = CodeCache::open(scratch.0.join("cache"), 10 << 20).unwrap();
    assert_eq!(cache.size(), bytes.len() as u64);
    assert_eq!(cache.fetch(&client(), &pkg, None).await.unwrap(), path);
    assert_eq!(srv.hits(), 1);
}

#[tokio::test]
async fn no_credential_means_no_authorization_header() {
    let scratch = Scratch::new("anonymous");
    let bytes = b"presigned bytes".to_vec();
    let srv = server(HashMap::from([("/s3/x?X-Amz-Signature=abc", Reply::Bytes(bytes.clone()))])).await;
    let pkg = package(&bytes, PackageFormat::Wasm, srv.url("/s3/x?X-Amz-Signature=abc"));
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    cache.fetch(&client(), &pkg, None).await.unwrap();
    assert_eq!(srv.auth.lock().unwrap().as_slice(), [None]);
}

#[tokio::test]
async fn concurrent_fetches_of_one_package_download_it_once() {
    let scratch = Scratch::new("concurrent");
    let bytes = vec![42u8; 3 << 20];
    let srv = server(HashMap::from([("/code/big", Reply::Chunked(bytes.clone()))])).await;
    let pkg = package(&bytes, PackageFormat::Wasm, srv.url("/code/big"));
    let cache = CodeCache::open(&scratch.0, 64 << 20).unwrap();
    let client = client();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (cache, client, pkg) = (cache.clone(), client.clone(), pkg.clone());
            tokio::spawn(async move { cache.fetch(&client, &pkg, None).await.unwrap() })
        })
        .collect();
    for t in tasks {
        assert_eq!(std::fs::read(t.await.unwrap()).unwrap(), bytes);
    }
    assert_eq!(srv.hits(), 1);
    assert_eq!(cache.size(), bytes.len() as u64);
}

/// Nothing of a refused download stays anywhere in the cache.
fn assert_nothing_kept(cache: &CodeCache, dir: &Path) {
    assert_eq!(cache.size(), 0);
    for sub in ["blobs", "tmp", "artifacts", "unpacked"] {
        assert_eq!(listing(&dir.join(sub)), Vec::<String>::new(), "{sub}");
    }
}

#[tokio::test]
async fn bytes_with_another_sha256_are_refused_and_nothing_is_kept() {
    let scratch = Scratch::new("mismatch");
    let srv = server(HashMap::from([("/code/evil", Reply::Bytes(b"tampered".to_vec()))])).await;
    let mut pkg = package(b"original", PackageFormat::Wasm, srv.url("/code/evil"));
    pkg.size = 8;
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    match cache.fetch(&client(), &pkg, None).await {
        Err(CacheError::Mismatch { expected, actual }) => {
            assert_eq!(expected, sha256(b"original"));
            assert_eq!(actual, sha256(b"tampered"));
        }
        other => panic!("{other:?}"),
    }
    assert_nothing_kept(&cache, &scratch.0);

    // Fewer bytes than declared: refused too, even when the hash would match.
    let srv = server(HashMap::from([("/code/short", Reply::Chunked(b"short".to_vec()))])).await;
    let mut pkg = package(b"short", PackageFormat::Wasm, srv.url("/code/short"));
    pkg.size = 10;
    match cache.fetch(&client(), &pkg, None).await {
        Err(CacheError::Mismatch { expected, actual }) => {
            assert_eq!((expected.as_str(), actual.as_str()), ("10 bytes", "5 bytes"))
        }
        other => panic!("{other:?}"),
    }
    assert_nothing_kept(&cache, &scratch.0);
}

#[tokio::test]
async fn more_bytes_than_declared_are_refused_and_nothing_is_kept() {
    let scratch = Scratch::new("oversize");
    let bytes = vec![1u8; 50_000];
    let srv = server(HashMap::from([
        ("/announced", Reply::Bytes(bytes.clone())),
        ("/streamed", Reply::Chunked(bytes.clone())),
    ]))
    .await;
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    for path in ["/announced", "/streamed"] {
        let mut pkg = package(&bytes, PackageFormat::Wasm, srv.url(path));
        pkg.size = 10_000;
        match cache.fetch(&client(), &pkg, None).await {
            Err(CacheError::TooLarge { limit }) => assert_eq!(limit, 10_000, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
        assert_nothing_kept(&cache, &scratch.0);
    }
    // A package larger than the whole cache is not even requested.
    let hits = srv.hits();
    let small = CodeCache::open(scratch.0.join("small"), 1_000).unwrap();
    let pkg = package(&bytes, PackageFormat::Wasm, srv.url("/announced"));
    assert!(matches!(small.fetch(&client(), &pkg, None).await, Err(CacheError::TooLarge { limit: 1_000 })));
    assert_eq!(srv.hits(), hits);
}

#[tokio::test]
async fn http_errors_and_invalid_references_are_refused() {
    let scratch = Scratch::new("errors");
    let srv = server(HashMap::from([("/gone", Reply::Status(404))])).await;
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    let pkg = package(b"x", PackageFormat::Wasm, srv.url("/gone?X-Amz-Signature=secret"));
    match cache.fetch(&client(), &pkg, None).await {
        Err(CacheError::Fetch(e)) => assert!(e.contains("404") && !e.contains("secret"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A name that is no SHA-256 never becomes a path.
    let hits = srv.hits();
    let bad = PackageRef { sha256: "../../etc/passwd".into(), ..pkg.clone() };
    assert!(matches!(cache.fetch(&client(), &bad, None).await, Err(CacheError::Other(_))));
    assert_eq!(srv.hits(), hits);
    assert!(cache.wasm_module(&engine(), "../x").is_err());
    assert!(cache.unpacked("../x", PackageFormat::Zip).is_err());
    // Nothing listens here any more: a connection error is a fetch error.
    let dead = PackageRef { url: "http://127.0.0.1:9/code".into(), ..pkg };
    assert!(matches!(cache.fetch(&client(), &dead, None).await, Err(CacheError::Fetch(_))));
    assert_nothing_kept(&cache, &scratch.0);
}

#[tokio::test]
async fn a_stalled_download_fails_at_its_deadline_and_a_later_attempt_succeeds() {
    let scratch = Scratch::new("stall");
    let bytes = vec![7u8; 100_000];
    let srv = server([("/stall", Reply::Stall(bytes.clone())), ("/whole", Reply::Bytes(bytes.clone()))]).await;
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    cache.set_download_base_timeout(Duration::from_millis(300));
    // No timeout of its own (as the agent's client has none): the cache's deadline must end it.
    let client = reqwest::Client::new();
    let pkg = package(&bytes, PackageFormat::Wasm, srv.url("/stall"));
    let started = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(20), cache.fetch(&client, &pkg, None)).await {
        Ok(Err(CacheError::Fetch(e))) => assert!(e.contains("did not finish within"), "{e}"),
        Ok(other) => panic!("{other:?}"),
        Err(_) => panic!("the stalled download hung"),
    }
    // 300 ms plus 100 kB at 1 MiB/s.
    assert!(started.elapsed() >= Duration::from_millis(390), "{:?}", started.elapsed());
    assert_nothing_kept(&cache, &scratch.0);

    // What the next reconcile pass does: the package comes whole this time.
    let pkg = PackageRef { url: srv.url("/whole"), ..pkg };
    assert_eq!(std::fs::read(cache.fetch(&client, &pkg, None).await.unwrap()).unwrap(), bytes);
}

/// The status and body of one invocation.
async fn status(e: &WasmEngine, module: &wasmtime::Module) -> (u16, Vec<u8>) {
    let o = e.invoke(&e.prepare(module).unwrap(), &Invocation::default(), &Limits::default()).await;
    (o.response.status, o.response.body)
}

fn engine() -> WasmEngine {
    WasmEngine::new(&WasmSettings { instance_slots: 4, max_memory_mb: 64, pooling: true }).unwrap()
}

const STATUS_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Status: 404\n\nnope")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

#[tokio::test]
async fn a_precompiled_artifact_is_reused_across_restarts() {
    let scratch = Scratch::new("artifact");
    let wasm = wat::parse_str(STATUS_WAT).unwrap();
    let srv = server(HashMap::from([("/code/m", Reply::Bytes(wasm.clone()))])).await;
    let pkg = package(&wasm, PackageFormat::Wasm, srv.url("/code/m"));
    let cache = CodeCache::open(&scratch.0, 64 << 20).unwrap();
    assert!(cache.wasm_module(&engine(), &pkg.sha256).is_err(), "not fetched yet");
    cache.fetch(&client(), &pkg, None).await.unwrap();

    let e = engine();
    let (module, compiled_now) = cache.wasm_module(&e, &pkg.sha256).unwrap();
    assert!(compiled_now);
    assert_eq!(status(&e, &module).await, (404, b"nope".to_vec()));
    let artifact = scratch.0.join("artifacts").join(format!("{}-{}.cwasm", pkg.sha256, e.artifact_key()));
    assert!(artifact.is_file());
    assert_eq!(cache.size(), wasm.len() as u64 + std::fs::metadata(&artifact).unwrap().len());
    assert!(!cache.wasm_module(&e, &pkg.sha256).unwrap().1, "loaded, not compiled again");

    // A restart: a new cache on the same directory and a new engine with the same settings.
    drop((module, cache, e));
    let cache = CodeCache::open(&scratch.0, 64 << 20).unwrap();
    let e = engine();
    let (module, compiled_now) = cache.wasm_module(&e, &pkg.sha256).unwrap();
    assert!(!compiled_now, "the artifact on disk is reused after a restart");
    assert_eq!(status(&e, &module).await.0, 404);

    // An artifact that does not load is compiled again (a new file: never rewrite a mapped one).
    drop(module);
    std::fs::remove_file(&artifact).unwrap();
    std::fs::write(&artifact, b"garbage").unwrap();
    assert!(cache.wasm_module(&e, &pkg.sha256).unwrap().1);
    assert_eq!(cache.size(), wasm.len() as u64 + std::fs::metadata(&artifact).unwrap().len());
    assert_eq!(srv.hits(), 1);
}

/// A gzip tarball with an executable `bin/handler` printing `hi`.
fn tar_gz_package() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let data = b"#!/bin/sh\necho hi\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "bin/handler", &data[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[tokio::test]
async fn a_process_package_is_unpacked_once() {
    let scratch = Scratch::new("unpacked");
    let archive = tar_gz_package();
    let srv = server(HashMap::from([("/code/p", Reply::Bytes(archive.clone()))])).await;
    let pkg = package(&archive, PackageFormat::TarGz, srv.url("/code/p"));
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    cache.fetch(&client(), &pkg, None).await.unwrap();
    let dir = cache.unpacked(&pkg.sha256, PackageFormat::TarGz).unwrap();
    assert_eq!(dir, scratch.0.join("unpacked").join(&pkg.sha256));
    assert_eq!(std::fs::read(dir.join("bin/handler")).unwrap(), b"#!/bin/sh\necho hi\n");
    let size = cache.size();
    assert_eq!(size, archive.len() as u64 + 18);
    assert_eq!((mode(&scratch.0.join("unpacked")), mode(&dir), mode(&dir.join("bin/handler"))), (0o711, 0o755, 0o755));
    // Again, and after a restart: the same directory, not unpacked again.
    std::fs::write(dir.join("marker"), b"").unwrap();
    assert_eq!(cache.unpacked(&pkg.sha256, PackageFormat::TarGz).unwrap(), dir);
    // One an earlier agent left writable by everyone is sealed when the cache opens.
    std::fs::set_permissions(dir.join("bin/handler"), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    assert_eq!(cache.unpacked(&pkg.sha256, PackageFormat::TarGz).unwrap(), dir);
    assert!(dir.join("marker").exists());
    assert_eq!((mode(&dir.join("bin/handler")), mode(&dir.join("marker"))), (0o755, 0o644));
    assert_eq!(cache.size(), size);
    assert!(cache.unpacked(&pkg.sha256, PackageFormat::Wasm).is_err());
}

#[test]
fn leftovers_of_a_previous_run_are_removed_at_open() {
    let scratch = Scratch::new("leftovers");
    let sha = "ab".repeat(32);
    for dir in ["blobs", "artifacts", "unpacked", "tmp"] {
        std::fs::create_dir_all(scratch.0.join(dir)).unwrap();
    }
    std::fs::write(scratch.0.join("tmp/half-download.7"), b"partial").unwrap();
    std::fs::write(scratch.0.join("artifacts").join(format!("{sha}-0123.cwasm")), b"orphan").unwrap();
    std::fs::create_dir_all(scratch.0.join("unpacked").join(format!("{sha}.unpacking-1-0"))).unwrap();
    std::fs::create_dir_all(scratch.0.join("unpacked").join(&sha)).unwrap();
    std::fs::write(scratch.0.join("blobs/not-a-sha"), b"?").unwrap();
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    assert_nothing_kept(&cache, &scratch.0);
}

/// Fetches `n` packages of `size` bytes each; returns their SHA-256s in fetch order.
async fn fill(cache: &CodeCache, n: u8, size: usize) -> Vec<String> {
    let pkgs: Vec<(String, Vec<u8>)> = (0..n).map(|i| (format!("/code/{i}"), vec![i; size])).collect();
    let srv = server(pkgs.iter().map(|(path, bytes)| (path.as_str(), Reply::Bytes(bytes.clone())))).await;
    let mut shas = Vec::new();
    for (path, bytes) in &pkgs {
        let pkg = package(bytes, PackageFormat::TarGz, srv.url(path));
        cache.fetch(&client(), &pkg, None).await.unwrap();
        shas.push(pkg.sha256);
    }
    shas
}

fn blobs(dir: &Path) -> HashSet<String> {
    listing(&dir.join("blobs")).into_iter().collect()
}

#[tokio::test]
async fn eviction_removes_the_least_recently_used_entries_not_kept_until_within_budget() {
    let scratch = Scratch::new("evict");
    let cache = CodeCache::open(&scratch.0, 3_000).unwrap();
    let shas = fill(&cache, 3, 1_000).await;
    assert_eq!(cache.evict(&HashSet::new()).unwrap(), 0, "within budget: nothing to do");
    // The oldest is used again, so the second is now the least recently used.
    cache.touch(&shas[0]);
    let more = {
        let bytes = tar_gz_package();
        let srv = server([("/code/x", Reply::Bytes(bytes.clone()))]).await;
        let pkg = package(&bytes, PackageFormat::TarGz, srv.url("/code/x"));
        cache.fetch(&client(), &pkg, None).await.unwrap();
        // Its unpacked directory belongs to it and goes with it.
        cache.unpacked(&pkg.sha256, PackageFormat::TarGz).unwrap();
        pkg.sha256
    };
    let over = cache.size() - 3_000;
    let freed = cache.evict(&HashSet::new()).unwrap();
    assert_eq!(freed, 1_000);
    assert!(freed >= over);
    assert!(cache.size() <= 3_000);
    assert_eq!(blobs(&scratch.0), HashSet::from([shas[0].clone(), shas[2].clone(), more.clone()]));

    // `keep` wins over recency (the kept entry is the oldest on disk: its touch was too recent
    // to be written), and eviction goes on until the budget holds.
    let tight = CodeCache::open(&scratch.0, 1_000).unwrap();
    let keep = HashSet::from([shas[0].clone()]);
    let freed = tight.evict(&keep).unwrap();
    assert_eq!(blobs(&scratch.0), keep);
    assert_eq!(listing(&scratch.0.join("unpacked")), Vec::<String>::new());
    assert_eq!(tight.size(), 1_000);
    assert!(freed > 1_000);
}

/// Sets the recorded last use (the blob's modification time) of `sha` to `ago` in the past.
fn age(dir: &Path, sha: &str, ago: Duration) {
    let f = std::fs::File::open(dir.join("blobs").join(sha)).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

#[tokio::test]
async fn recency_survives_restarts() {
    let scratch = Scratch::new("recency");
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    let shas = fill(&cache, 3, 1_000).await;
    drop(cache);
    let hour = Duration::from_secs(3600);
    age(&scratch.0, &shas[0], 3 * hour);
    age(&scratch.0, &shas[1], hour);
    age(&scratch.0, &shas[2], 2 * hour);
    // The oldest is used after a restart; the use is written down.
    let cache = CodeCache::open(&scratch.0, 1 << 20).unwrap();
    cache.touch(&shas[0]);
    drop(cache);
    // Room for one: the one used last stays.
    let cache = CodeCache::open(&scratch.0, 1_000).unwrap();
    assert_eq!(cache.evict(&HashSet::new()).unwrap(), 2_000);
    assert_eq!(blobs(&scratch.0), HashSet::from([shas[0].clone()]));
}
