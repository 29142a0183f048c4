//! The invocation listener in-process over real HTTP: a registry holding wasm fixtures and shell
//! scripts, the invoke secret, the headers in and out, the refusals (401, 404, 413, 429, 503),
//! cold starts, the usage the spool holds before the response completes, and bodies that stream
//! both ways (also when the function fails after its head went out).

mod common;

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nimbus_protocol::{Assignment, PackageFormat, PackageRef, Runtime, UsageStatus};
use nimbus_worker_agent::{
    invoke::Invoker,
    listener::{InvokeAuth, Listener, router},
    registry::{Code, Loader, Registry, Version},
    runtime::{
        process::{Isolation, ProcessPackage, ProcessRuntime},
        wasm::{WasmEngine, WasmSettings},
    },
    spool::{Spool, read_segment},
    stats::Stats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const SECRET: &str = "nis_test-secret";

/// A directory of its own for one test.
fn scratch(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("listener-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assignment(runtime: Runtime, instances: u32, concurrency: u32, timeout_ms: u32) -> Assignment {
    Assignment {
        version_id: Uuid::now_v7(),
        tenant_id: Uuid::now_v7(),
        function_id: Uuid::now_v7(),
        function: "echo".into(),
        version: 7,
        runtime,
        entry: (runtime == Runtime::Process).then(|| "handler".into()),
        package: PackageRef {
            sha256: "0".repeat(64),
            size: 1,
            format: if runtime == Runtime::Wasm { PackageFormat::Wasm } else { PackageFormat::TarGz },
            url: "http://127.0.0.1:1/unused".into(),
        },
        memory_mb: 128,
        timeout_ms,
        concurrency,
        instances,
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
    }
}

struct Agent {
    url: String,
    registry: Arc<Registry>,
    engine: Arc<WasmEngine>,
    draining: Arc<AtomicBool>,
    spool: Arc<Spool>,
    spool_dir: PathBuf,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Agent {
    async fn start(label: &str, max_body_bytes: usize) -> Agent {
        let dir = scratch(label);
        let engine =
            Arc::new(WasmEngine::new(&WasmSettings { instance_slots: 16, max_memory_mb: 256, pooling: true }).unwrap());
        let spool_dir = dir.join("usage");
        let spool = Arc::new(Spool::open(&spool_dir, 1000).unwrap());
        let registry = Registry::new();
        let invoker = Arc::new(Invoker::new(
            registry.clone(),
            Arc::new(Stats::new()),
            engine.clone(),
            ProcessRuntime::new(dir.join("scratch"), Isolation::None).unwrap(),
            spool.clone(),
        ));
        let auth = Arc::new(InvokeAuth::default());
        auth.set(SECRET);
        let draining = Arc::new(AtomicBool::new(false));
        let app = router(Arc::new(Listener {
            invoker,
            auth,
            draining: draining.clone(),
            max_body_bytes,
            api_url: Some("http://control-plane.test".into()),
        }));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await.unwrap() });
        Agent { url, registry, engine, draining, spool, spool_dir, dir, http: reqwest::Client::new() }
    }

    /// A wasm version of `fixture`, warm at once or loaded by its first invocation.
    fn wasm(&self, fixture: &str, instances: u32, warm: bool) -> Arc<Version> {
        self.wasm_timed(fixture, instances, warm, 10_000)
    }

    /// [`Agent::wasm`] with a timeout of `timeout_ms`.
    fn wasm_timed(&self, fixture: &str, instances: u32, warm: bool, timeout_ms: u32) -> Arc<Version> {
        let module = self.engine.compile(&common::wasm(fixture)).unwrap();
        let engine = self.engine.clone();
        let loader: Loader = Arc::new(move || Ok(Code::Wasm(engine.prepare(&module)?)));
        let code = warm.then(|| loader().unwrap());
        let v = Version::new(assignment(Runtime::Wasm, instances, 1, timeout_ms), loader, code, 8);
        self.registry.insert(v.clone());
        v
    }

    /// A process version running `script`.
    fn script(&self, script: &str, concurrency: u32, max_queued: usize) -> Arc<Version> {
        self.script_timed(script, concurrency, max_queued, 60_000)
    }

    /// [`Agent::script`] with a timeout of `timeout_ms`.
    fn script_timed(&self, script: &str, concurrency: u32, max_queued: usize, timeout_ms: u32) -> Arc<Version> {
        let pkg = self.dir.join(format!("pkg-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&pkg).unwrap();
        let entry = pkg.join("handler");
        std::fs::write(&entry, script).unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        let package = ProcessPackage { dir: pkg, entry: "handler".into() };
        let loader: Loader = Arc::new(move || Ok(Code::Process(package.clone())));
        let code = loader().unwrap();
        let v = Version::new(assignment(Runtime::Process, 1, concurrency, timeout_ms), loader, Some(code), max_queued);
        self.registry.insert(v.clone());
        v
    }

    fn post(&self, version: Uuid, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}/invoke/{version}{path}", self.url)).bearer_auth(SECRET)
    }
}

async fn problem(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    (status, response.json().await.unwrap())
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// The spool's entries so far.
fn spooled(agent: &Agent) -> Vec<nimbus_worker_agent::spool::SpoolEntry> {
    agent.spool.rotate().unwrap();
    agent.spool.sealed().unwrap().iter().flat_map(|s| read_segment(s).unwrap()).collect()
}

/// Reads `response`'s body until it holds `want` (bounded: a response that does not stream
/// would never get there, and the test fails instead of hanging).
async fn read_until(response: &mut reqwest::Response, got: &mut String, want: &str) {
    let read = async {
        while !got.contains(want) {
            match response.chunk().await.unwrap() {
                Some(chunk) => got.push_str(std::str::from_utf8(&chunk).unwrap()),
                None => panic!("the body ended before {want:?}: {got:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| panic!("{want:?} did not arrive while the function ran: {got:?}"));
}

/// A request body that the test feeds line by line (with its length declared up front).
fn streaming_body(
    request: reqwest::RequestBuilder,
    length: usize,
) -> (tokio::sync::mpsc::Sender<&'static str>, reqwest::RequestBuilder) {
    let (tx, rx) = tokio::sync::mpsc::channel::<&'static str>(4);
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(chunk), rx))
    });
    let request = request.header("content-length", length.to_string()).body(reqwest::Body::wrap_stream(chunks));
    (tx, request)
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn invocations_need_the_invoke_secret() {
    let agent = Agent::start("auth", 1 << 20).await;
    let v = agent.wasm("status.wat", 1, true);
    let url = format!("{}/invoke/{}", agent.url, v.id());
    let (status, body) = problem(agent.http.post(&url).send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let wrong = agent.http.post(&url).bearer_auth("nis_wrong").send().await.unwrap();
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    assert_eq!(problem(wrong).await.0, 401);
    let right = agent.http.post(&url).bearer_auth(SECRET).send().await.unwrap();
    assert_eq!(right.status(), 404, "the function's own 404");
    assert_eq!(header(&right, "x-custom"), "yes");
}

#[tokio::test]
async fn the_function_gets_the_request_and_the_caller_its_response() {
    let agent = Agent::start("echo", 1 << 20).await;
    let v = agent.wasm("echo.c", 1, true);
    let id = Uuid::now_v7();
    let response = agent
        .post(v.id(), "/greet/world?lang=en")
        .header("x-test", "yes")
        .header("content-type", "text/plain")
        .header("x-nimbus-invocation-id", id.to_string())
        .body("ping")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-echo"), "1");
    assert_eq!(header(&response, "content-type"), "text/plain");
    assert_eq!(header(&response, "x-nimbus-invocation-id"), id.to_string());
    assert_eq!(header(&response, "x-nimbus-cold-start"), "false");
    let body = response.text().await.unwrap();
    for line in [
        "REQUEST_METHOD=POST",
        "PATH_INFO=/greet/world",
        "QUERY_STRING=lang=en",
        "CONTENT_TYPE=text/plain",
        "CONTENT_LENGTH=4",
        "HTTP_X_TEST=yes",
        "GREETING=hello",
        "NIMBUS_FUNCTION=echo",
        "NIMBUS_VERSION=7",
        &format!("NIMBUS_INVOCATION_ID={id}"),
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in {body}");
    }

    // The usage record and the log were spooled before the response came back.
    agent.spool.rotate().unwrap();
    let entries: Vec<_> = agent.spool.sealed().unwrap().iter().flat_map(|s| read_segment(s).unwrap()).collect();
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!((e.record.invocation_id, e.record.version_id, e.record.version), (id, v.id(), 7));
    assert_eq!((e.record.http_status, e.record.status, e.record.cold_start), (200, UsageStatus::Ok, false));
    assert!(e.record.billed_ms >= 1 && e.record.memory_mb == 128);
    assert_eq!(e.logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["echoed 4 bytes"]);
    assert_eq!(e.logs[0].seq, 0);

    // Without an id from the caller, the agent makes one (a UUIDv7).
    let response = agent.post(v.id(), "").header("x-nimbus-invocation-id", "not-a-uuid").send().await.unwrap();
    let made: Uuid = header(&response, "x-nimbus-invocation-id").parse().unwrap();
    assert_eq!(made.get_version_num(), 7);
    assert!(response.text().await.unwrap().lines().any(|l| l == "PATH_INFO=/"));
}

#[tokio::test]
async fn hop_by_hop_headers_the_credential_and_proxy_never_reach_the_function_nor_can_it_forge_ours() {
    let agent = Agent::start("headers", 1 << 20).await;
    let v = agent.script(
        "#!/bin/sh\nprintf 'X-Nimbus-Cold-Start: true\\nX-Mine: 1\\n\\n'\nenv | grep '^HTTP_' | sort\n",
        4,
        4,
    );
    let response = agent
        .post(v.id(), "/x")
        .header("x-visible", "1")
        .header("te", "trailers")
        .header("proxy", "http://evil.example:3128")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-mine"), "1");
    assert_eq!(header(&response, "x-nimbus-cold-start"), "false", "the platform's header, not the function's");
    let env = response.text().await.unwrap();
    assert!(env.contains("HTTP_X_VISIBLE=1"), "{env}");
    assert!(!env.contains("HTTP_AUTHORIZATION") && !env.contains("HTTP_TE="), "{env}");
    assert!(!env.contains("HTTP_PROXY"), "httpoxy: {env}");
    assert!(!env.contains(SECRET), "{env}");
}

#[tokio::test]
async fn unknown_versions_are_404_and_failures_carry_their_reason() {
    let agent = Agent::start("unknown", 1 << 20).await;
    for id in [Uuid::now_v7().to_string(), "nope".to_owned()] {
        let response = agent.http.get(format!("{}/invoke/{id}/a", agent.url)).bearer_auth(SECRET).send().await.unwrap();
        let (status, body) = problem(response).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("version_not_assigned")), "{body}");
    }
    let trap = agent.wasm("trap.wat", 1, true);
    let response = agent.post(trap.id(), "").send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(header(&response, "x-nimbus-error"), "crash");
    assert_eq!(problem(response).await.1["code"], "crash");
    agent.spool.rotate().unwrap();
    let entries: Vec<_> = agent.spool.sealed().unwrap().iter().flat_map(|s| read_segment(s).unwrap()).collect();
    assert_eq!(entries[0].record.status, UsageStatus::Crash);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let agent = Agent::start("body", 1024).await;
    let v = agent.wasm("echo.c", 1, true);
    let (status, body) = problem(agent.post(v.id(), "").body(vec![b'x'; 2048]).send().await.unwrap()).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("body_too_large")));
    // Also when the size is not declared up front (chunked, over a raw connection).
    let mut tcp = tokio::net::TcpStream::connect(agent.url.trim_start_matches("http://")).await.unwrap();
    let chunk = "x".repeat(700);
    let request = format!(
        "POST /invoke/{}/ HTTP/1.1\r\nhost: agent\r\nauthorization: Bearer {SECRET}\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n2bc\r\n{chunk}\r\n2bc\r\n{chunk}\r\n0\r\n\r\n",
        v.id()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"), "{answer}");
    assert_eq!(agent.post(v.id(), "").body(vec![b'x'; 1024]).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_saturated_version_queues_then_refuses_with_429() {
    let agent = Agent::start("queue", 1 << 20).await;
    let v = agent.script("#!/bin/sh\nexec sleep 30\n", 1, 1);
    let running = tokio::spawn(agent.post(v.id(), "").send());
    until("one invocation runs", || agent.registry.in_flight() == 1 && v.in_flight() == 1).await;
    let queued = tokio::spawn(agent.post(v.id(), "").send());
    until("one invocation waits", || v.limiter().waiting() == 1).await;
    let refused = agent.post(v.id(), "").send().await.unwrap();
    assert_eq!(header(&refused, "retry-after"), "1");
    let (status, body) = problem(refused).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("queue_full")), "{body}");
    running.abort();
    queued.abort();
}

#[tokio::test]
async fn an_on_demand_load_is_a_cold_start_and_a_warm_instance_is_not() {
    let agent = Agent::start("cold", 1 << 20).await;
    let on_demand = agent.wasm("status.wat", 0, false);
    assert!(!on_demand.is_warm());
    // Each body is read to its end: the usage record is in the spool once the response completes.
    let first = agent.post(on_demand.id(), "").send().await.unwrap();
    assert_eq!((first.status().as_u16(), header(&first, "x-nimbus-cold-start")), (404, "true".into()));
    first.bytes().await.unwrap();
    assert!(on_demand.is_warm());
    let second = agent.post(on_demand.id(), "").send().await.unwrap();
    assert_eq!(header(&second, "x-nimbus-cold-start"), "false");
    second.bytes().await.unwrap();

    let warmed = agent.wasm("status.wat", 1, false);
    warmed.warm_up().await.unwrap();
    let response = agent.post(warmed.id(), "").send().await.unwrap();
    assert_eq!(header(&response, "x-nimbus-cold-start"), "false", "reconciliation warmed it, not this call");
    response.bytes().await.unwrap();

    agent.spool.rotate().unwrap();
    let colds: Vec<bool> = agent
        .spool
        .sealed()
        .unwrap()
        .iter()
        .flat_map(|s| read_segment(s).unwrap())
        .map(|e| e.record.cold_start)
        .collect();
    assert_eq!(colds, [true, false, false]);
    assert!(agent.spool_dir.exists());
}

#[tokio::test]
async fn a_draining_agent_refuses_new_invocations() {
    let agent = Agent::start("drain", 1 << 20).await;
    let v = agent.wasm("status.wat", 1, true);
    agent.draining.store(true, Ordering::Relaxed);
    let response = agent.post(v.id(), "").send().await.unwrap();
    assert_eq!(header(&response, "retry-after"), "1");
    let (status, body) = problem(response).await;
    assert_eq!((status, body["code"].as_str()), (503, Some("draining")));
}

#[tokio::test]
async fn a_process_response_streams_before_the_function_ends() {
    let agent = Agent::start("stream-out", 1 << 20).await;
    let go = agent.dir.join("go");
    // Line 2 comes only once the caller has seen line 1 (and made the file).
    let v = agent.script(
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\nX-Mine: 1\\n\\nline 1\\n'\n\
         while [ ! -e \"$QUERY_STRING\" ]; do sleep 0.01; done\nprintf 'line 2\\n'\necho bye >&2\n",
        1,
        1,
    );
    let id = Uuid::now_v7();
    let request = agent.post(v.id(), &format!("?{}", go.display())).header("x-nimbus-invocation-id", id.to_string());
    let mut response = tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .expect("the head comes while the function still runs")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-mine"), "1");
    assert_eq!(header(&response, "content-type"), "text/plain");
    assert_eq!(header(&response, "x-nimbus-invocation-id"), id.to_string());
    assert_eq!(header(&response, "x-nimbus-cold-start"), "false");
    assert_eq!(header(&response, "x-nimbus-error"), "");
    let mut got = String::new();
    read_until(&mut response, &mut got, "line 1\n").await;
    assert_eq!(got, "line 1\n");
    std::fs::write(&go, "").unwrap();
    got.push_str(&response.text().await.unwrap());
    assert_eq!(got, "line 1\nline 2\n");
    // The body ended cleanly, after the usage was spooled.
    let entries = spooled(&agent);
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].record.invocation_id, entries[0].record.status), (id, UsageStatus::Ok));
    assert_eq!(entries[0].record.http_status, 200);
    assert_eq!(entries[0].logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["bye"]);
}

/// Sends two lines through a streaming request body, the second only after the echo of the
/// first came back: only a function that gets its body (and answers) while both flow can pass.
async fn echo_line_by_line(agent: &Agent, version: Uuid) {
    let (tx, request) = streaming_body(agent.post(version, ""), "one\ntwo\n".len());
    tx.send("one\n").await.unwrap();
    let mut response = tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .expect("the head comes while the request body still streams")
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut got = String::new();
    read_until(&mut response, &mut got, "echo: one\n").await;
    assert_eq!(got, "echo: one\n");
    tx.send("two\n").await.unwrap();
    read_until(&mut response, &mut got, "echo: two\n").await;
    drop(tx);
    got.push_str(&response.text().await.unwrap());
    assert_eq!(got, "echo: one\necho: two\n");
    let entries = spooled(agent);
    assert_eq!(entries.last().unwrap().record.status, UsageStatus::Ok);
}

#[tokio::test]
async fn a_process_function_reads_its_body_as_it_arrives() {
    let agent = Agent::start("stream-in", 1 << 20).await;
    let v = agent.script(
        "#!/bin/sh\nprintf 'Content-Type: text/plain\\n\\n'\n\
         [ \"$CONTENT_LENGTH\" = 8 ] || exit 9\n\
         while IFS= read -r line; do printf 'echo: %s\\n' \"$line\"; done\n",
        1,
        1,
    );
    echo_line_by_line(&agent, v.id()).await;
}

#[tokio::test]
async fn a_wasm_function_streams_both_ways() {
    let agent = Agent::start("stream-wasm", 1 << 20).await;
    let v = agent.wasm("lines.c", 1, true);
    echo_line_by_line(&agent, v.id()).await;
    assert_eq!(spooled(&agent)[0].logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["done"]);
}

/// Reads the body of a response whose function failed after its head went out: the body
/// breaks off (an incomplete chunked body), after what came before.
async fn broken_body(mut response: reqwest::Response) -> String {
    let mut got = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), response.chunk()).await.expect("the body ends") {
            Ok(Some(chunk)) => got.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => panic!("the body ended as if complete after {} bytes", got.len()),
            Err(_) => return got,
        }
    }
}

#[tokio::test]
async fn failures_after_the_head_cut_the_body_and_are_recorded() {
    let agent = Agent::start("stream-fail", 1 << 20).await;

    // Beyond the response limit (6 MiB): the function is stopped, the body cut.
    let big = agent.script("#!/bin/sh\nprintf 'Content-Type: text/plain\\n\\n'\nexec yes\n", 1, 1);
    let response = agent.post(big.id(), "").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-nimbus-error"), "", "the head went out before the failure");
    let got = broken_body(response).await;
    assert!(got.len() <= 6 << 20 && got.starts_with("y\ny\n"), "{}", got.len());
    let entry = spooled(&agent).pop().unwrap();
    assert_eq!((entry.record.status, entry.record.http_status), (UsageStatus::ResponseTooLarge, 200));

    // A timeout after the head (process).
    let slow = agent.script_timed(
        "#!/bin/sh\nprintf 'Status: 202\\n\\nstarted\\n'\necho waiting >&2\nexec sleep 30\n",
        1,
        1,
        300,
    );
    let response = agent.post(slow.id(), "").send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(broken_body(response).await, "started\n");
    let entry = spooled(&agent).pop().unwrap();
    assert_eq!((entry.record.status, entry.record.http_status), (UsageStatus::Timeout, 202));
    assert_eq!(entry.logs.iter().map(|l| l.line.as_str()).collect::<Vec<_>>(), ["waiting"]);

    // A timeout after the head (wasm), while the function waits for a body that does not come.
    let waiting = agent.wasm_timed("lines.c", 1, true, 300);
    let (tx, request) = streaming_body(agent.post(waiting.id(), ""), 100);
    tx.send("one\n").await.unwrap();
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(broken_body(response).await, "echo: one\n");
    drop(tx);
    let entry = spooled(&agent).pop().unwrap();
    assert_eq!((entry.record.status, entry.record.http_status), (UsageStatus::Timeout, 200));
}
