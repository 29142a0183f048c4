//! The wasm runtime against the handler contract, one fixture per behaviour.

mod common;

use std::{collections::BTreeMap, time::Duration};

use nimbus_worker_agent::runtime::{
    FailureReason, Invocation, Limits, Outcome,
    wasm::{WasmEngine, WasmSettings},
};

fn engine() -> WasmEngine {
    WasmEngine::new(&WasmSettings { instance_slots: 16, max_memory_mb: 256, pooling: true }).unwrap()
}

fn request(body: &[u8]) -> Invocation {
    Invocation {
        id: "0190f0e0-0000-7000-8000-000000000001".into(),
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

async fn run(engine: &WasmEngine, fixture: &str, limits: Limits) -> Outcome {
    let module = engine.compile(&common::wasm(fixture)).unwrap();
    let warm = engine.prepare(&module).unwrap();
    engine.invoke(&warm, &request(b"ping"), &limits).await
}

fn header<'a>(o: &'a Outcome, name: &str) -> Option<&'a str> {
    o.response.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn echo_gets_the_body_and_the_contract_environment() {
    let e = engine();
    let o = run(&e, "echo.c", Limits::default()).await;
    assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.response.body));
    assert_eq!(o.response.status, 200);
    assert_eq!(header(&o, "content-type"), Some("text/plain"));
    assert_eq!(header(&o, "x-echo"), Some("1"));
    let body = String::from_utf8(o.response.body.clone()).unwrap();
    assert!(body.starts_with("ping\n"), "{body}");
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
        "NIMBUS_INVOCATION_ID=0190f0e0-0000-7000-8000-000000000001",
        // Nothing of the agent's own environment leaks in.
        "HOME=(unset)",
        "PATH=(unset)",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in {body}");
    }
    assert_eq!(String::from_utf8_lossy(&o.log), "echoed 4 bytes\n");
    assert!(!o.log_truncated);
}

#[tokio::test]
async fn a_cgi_header_block_sets_status_and_headers() {
    let o = run(&engine(), "status.wat", Limits::default()).await;
    assert_eq!(o.response.status, 404);
    assert_eq!(header(&o, "content-type"), Some("application/json"));
    assert_eq!(header(&o, "x-custom"), Some("yes"));
    assert_eq!(o.response.body, b"{\"found\":false}");
}

#[tokio::test]
async fn functions_have_no_file_system() {
    let o = run(&engine(), "sandbox.c", Limits::default()).await;
    assert_eq!(String::from_utf8_lossy(&o.response.body), "read:refused write:refused\n");
}

/// CPU time this process has used, in clock ticks (utime + stime of /proc/self/stat).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn a_spinning_function_is_stopped_at_its_timeout_and_the_cpu_goes_idle() {
    let e = engine();
    let limits = Limits { timeout: Duration::from_millis(200), ..Limits::default() };
    let o = run(&e, "spin.wat", limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::Timeout));
    assert_eq!(o.response.status, 504);
    assert_eq!(header(&o, "x-nimbus-error"), Some("timeout"));
    assert!(o.duration >= Duration::from_millis(200), "{:?}", o.duration);
    // The guest is really stopped: over the next half second this process uses (almost) no CPU.
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used = cpu_ticks() - before;
    assert!(used <= 10, "{used} ticks of CPU after the timeout: the guest still runs");
}

#[tokio::test]
async fn a_function_waiting_in_the_host_is_stopped_at_its_timeout() {
    // `sleep.wat` sleeps a minute in `poll_oneoff`, where the epoch cannot interrupt it.
    let limits = Limits { timeout: Duration::from_millis(200), ..Limits::default() };
    let o = run(&engine(), "sleep.wat", limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::Timeout), "{}", String::from_utf8_lossy(&o.response.body));
    assert_eq!(o.response.status, 504);
}

// On a current-thread runtime both guests share one thread: the quick one can only finish first
// if the spinning one yields while it runs.
#[tokio::test]
async fn a_spinning_function_yields_its_thread_to_others() {
    let e = engine();
    let spin = e.prepare(&e.compile(&common::wasm("spin.wat")).unwrap()).unwrap();
    let echo = e.prepare(&e.compile(&common::wasm("echo.c")).unwrap()).unwrap();
    let long = Limits { timeout: Duration::from_secs(30), ..Limits::default() };
    let (spinning, ping, short) = (request(b""), request(b"ping"), Limits::default());
    tokio::select! {
        biased;
        _ = e.invoke(&spin, &spinning, &long) => panic!("the spinning function held the thread until its timeout"),
        o = e.invoke(&echo, &ping, &short) => assert!(o.response.body.starts_with(b"ping\n")),
    }
}

#[tokio::test]
async fn a_memory_hog_hits_its_limit() {
    let limits = Limits { memory_bytes: 32 << 20, ..Limits::default() };
    let o = run(&engine(), "memhog.wat", limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::MemoryLimit), "{}", String::from_utf8_lossy(&o.response.body));
    assert_eq!(o.response.status, 502);
}

#[tokio::test]
async fn a_trap_is_a_crash_not_a_crashed_agent() {
    let o = run(&engine(), "trap.wat", Limits::default()).await;
    assert_eq!(o.response.failure, Some(FailureReason::Crash));
    let body: serde_json::Value = serde_json::from_slice(&o.response.body).unwrap();
    assert_eq!(body["code"], "crash");
    assert!(body["detail"].as_str().unwrap().contains("unreachable"), "{body}");
}

#[tokio::test]
async fn a_non_zero_exit_code_is_reported() {
    let o = run(&engine(), "exit3.wat", Limits::default()).await;
    assert_eq!(o.response.failure, Some(FailureReason::ExitCode));
    let body: serde_json::Value = serde_json::from_slice(&o.response.body).unwrap();
    assert_eq!(body["detail"], "exited with code 3");
}

#[tokio::test]
async fn endless_output_is_stopped_at_the_response_limit() {
    let limits = Limits { max_response_bytes: 1 << 20, ..Limits::default() };
    let o = run(&engine(), "bigout.c", limits).await;
    assert_eq!(o.response.failure, Some(FailureReason::ResponseTooLarge));
    assert!(o.response.body.len() < 1024, "the error, not the output");
}

#[tokio::test]
async fn logs_are_bounded_and_marked_truncated() {
    let limits = Limits { max_log_bytes: 4096, ..Limits::default() };
    let o = run(&engine(), "chatty.c", limits).await;
    assert_eq!(o.response.failure, None);
    assert_eq!(o.response.body, b"done\n");
    assert_eq!(o.log.len(), 4096);
    assert!(o.log_truncated);
    assert!(o.log.starts_with(b"log line 0\n"));
}

#[tokio::test]
async fn one_warm_module_serves_many_invocations_in_fresh_instances() {
    let e = engine();
    let module = e.compile(&common::wasm("echo.c")).unwrap();
    let warm = e.prepare(&module).unwrap();
    for i in 0..50 {
        let body = format!("call {i}");
        let o = e.invoke(&warm, &request(body.as_bytes()), &Limits::default()).await;
        assert!(o.response.body.starts_with(body.as_bytes()));
    }
}

#[tokio::test]
async fn an_instance_never_sees_what_an_earlier_one_left_in_its_memory() {
    // The pooling allocator reuses a module's slot and zeroes the first 128 KiB of its memory
    // in place (the rest, and memory grown at run time, by `madvise`): every part must be clean.
    let e = engine();
    assert!(e.pooled(), "the pooling allocator is what this checks");
    let module = e.compile(&common::wasm("dirty.wat")).unwrap();
    let warm = e.prepare(&module).unwrap();
    for i in 0..5 {
        let o = e.invoke(&warm, &request(b""), &Limits::default()).await;
        assert_eq!(o.response.failure, None, "{}", String::from_utf8_lossy(&o.response.body));
        assert_eq!(String::from_utf8_lossy(&o.response.body), "clean\n", "invocation {i}");
    }
}

#[tokio::test]
async fn artifacts_round_trip_through_disk() {
    let e = engine();
    let artifact = e.precompile(&common::wasm("status.wat")).unwrap();
    let path = std::env::temp_dir().join(format!("nimbus-artifact-{}.cwasm", std::process::id()));
    std::fs::write(&path, artifact).unwrap();
    let module = e.load_artifact(&path).unwrap();
    let o = e.invoke(&e.prepare(&module).unwrap(), &request(b""), &Limits::default()).await;
    assert_eq!(o.response.status, 404);
    // Garbage is refused, not loaded. (Another file: the loaded artifact stays mapped, and a
    // mapped artifact must never be rewritten in place.)
    let garbage = path.with_extension("garbage");
    std::fs::write(&garbage, b"not an artifact").unwrap();
    assert!(e.load_artifact(&garbage).is_err());
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(garbage);
}
