//! Runtime benchmark of the agent alone (no control plane): wasm cold starts from the on-disk
//! artifact, first starts including compilation, warm invocations at concurrency 1 and 64 —
//! in-process and through the agent's HTTP invocation listener (driven by `wrk` on the same
//! machine) — against plain wasmtime in the same run, and process-runtime invocations. Prints a
//! Markdown table. Run with `cargo bench -p nimbus-worker-agent --bench runtime` (release
//! profile; Debian's `wrk` for the listener rows).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::Barrier,
    time::{Duration, Instant},
};

use nimbus_worker_agent::{
    cache::CodeCache,
    config::ProcessIsolation,
    runtime::{
        Invocation, Limits,
        process::{Host, Isolation, Packing, ProcessPackage, ProcessRuntime, unpack},
        wasm::{WasmEngine, WasmSettings},
    },
};
use wasmtime_wasi::{WasiCtxBuilder, p1::WasiP1Ctx, p2::pipe::MemoryOutputPipe};

thread_local! {
    /// Each measuring thread's own single-threaded runtime: a guest runs as a future on it
    /// (with its timeout's timer), as on the agent's workers.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("a runtime");
}

/// Runs `f` to completion on this thread's runtime.
fn block<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// The cheapest possible function: does nothing, answers an empty 200.
const NOOP: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

/// A trivial function that answers: one `fd_write` of `hello\n` to stdout.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 6))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// A module of about `target` bytes: many functions with arithmetic, branches and loops, so the
/// compiler has real work per byte.
fn big_module(target: usize) -> Vec<u8> {
    let mut body = String::new();
    for k in 0..60 {
        write!(
            body,
            "(local.set 1 (i32.add (local.get 1) (i32.mul (local.get 0) (i32.const {}))))\
             (if (i32.gt_u (local.get 1) (i32.const {})) (then (local.set 1 (i32.xor (local.get 1) (i32.const {})))))",
            k * 7919 + 1,
            k * 104_729,
            k * 31 + 5
        )
        .unwrap();
    }
    let func = format!(
        "(func (param i32) (result i32) (local i32) (local.set 1 (i32.const 1)) \
         (block (loop (br_if 1 (i32.eqz (local.get 0))) {body} \
         (local.set 0 (i32.sub (local.get 0) (i32.const 1))) (br 0))) (local.get 1))"
    );
    let one = wat::parse_str(format!("(module {func})")).unwrap().len();
    let count = target / one.max(1) + 1;
    let mut text = String::from("(module (memory (export \"memory\") 1)\n");
    for _ in 0..count {
        text.push_str(&func);
        text.push('\n');
    }
    text.push_str("(func (export \"_start\") (drop (call 0 (i32.const 3)))))");
    wat::parse_str(text).unwrap()
}

/// Latencies of one measurement.
struct Sample {
    times: Vec<Duration>,
    wall: Duration,
}

impl Sample {
    fn of(mut times: Vec<Duration>, wall: Duration) -> Sample {
        times.sort();
        Sample { times, wall }
    }
    fn pct(&self, p: f64) -> Duration {
        let i = ((self.times.len() as f64 * p) as usize).min(self.times.len() - 1);
        self.times[i]
    }
    fn per_second(&self) -> f64 {
        self.times.len() as f64 / self.wall.as_secs_f64()
    }
}

/// Times `f` `n` times in a row.
fn repeat(n: usize, mut f: impl FnMut()) -> Sample {
    let start = Instant::now();
    let times = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    Sample::of(times, start.elapsed())
}

/// Times `per_thread` calls of `f` on each of `threads` OS threads started together.
fn concurrent(threads: usize, per_thread: usize, f: impl Fn() + Sync) -> Sample {
    let barrier = Barrier::new(threads + 1);
    let (times, wall) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    (0..per_thread)
                        .map(|_| {
                            let t = Instant::now();
                            f();
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let times: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        (times, start.elapsed())
    });
    Sample::of(times, wall)
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 { format!("{ms:.3} ms") } else { format!("{ms:.0} ms") }
}

/// The Markdown table being built.
#[derive(Default)]
struct Table(String);

impl Table {
    fn row(&mut self, what: &str, s: &Sample, rate: bool, note: &str) {
        let rate = if rate { format!("{:.0}", s.per_second()) } else { "—".into() };
        writeln!(self.0, "| {what} | {} | {} | {} | {rate} | {note} |", s.times.len(), ms(s.pct(0.5)), ms(s.pct(0.99)))
            .unwrap();
    }
}

fn request() -> Invocation {
    Invocation {
        id: "0190f0e0-0000-7000-8000-0000000000b1".into(),
        function: "bench".into(),
        version: 1,
        method: "GET".into(),
        path: "/".into(),
        headers: vec![("user-agent".into(), "bench".into())],
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        ..Invocation::default()
    }
}

fn sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A code cache in `dir` already holding `wasm` as a fetched blob (as the agent's cache would
/// after a download); returns it and the package's SHA-256.
fn cache_with(dir: &Path, wasm: &[u8]) -> (CodeCache, String) {
    let sha = sha256(wasm);
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    std::fs::write(dir.join("blobs").join(&sha), wasm).unwrap();
    (CodeCache::open(dir, 1 << 30).unwrap(), sha)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap().trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}), {} {}", std::env::consts::OS, std::env::consts::ARCH)
}

/// Plain wasmtime: Engine, Linker with WASI preview 1, and per call a Store with a minimal WASI
/// context (stdout to a memory pipe), `instantiate_pre`, `_start`.
struct Plain {
    engine: wasmtime::Engine,
    pre: wasmtime::InstancePre<WasiP1Ctx>,
}

impl Plain {
    fn new(config: &wasmtime::Config, wasm: &[u8]) -> Plain {
        let engine = wasmtime::Engine::new(config).unwrap();
        let module = wasmtime::Module::new(&engine, wasm).unwrap();
        let mut linker = wasmtime::Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |c: &mut WasiP1Ctx| c).unwrap();
        let pre = linker.instantiate_pre(&module).unwrap();
        Plain { engine, pre }
    }

    fn call(&self) {
        let ctx = WasiCtxBuilder::new().stdout(MemoryOutputPipe::new(1 << 20)).build_p1();
        let mut store = wasmtime::Store::new(&self.engine, ctx);
        let instance = self.pre.instantiate(&mut store).unwrap();
        let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
        start.call(&mut store, ()).unwrap();
    }
}

/// One `wrk` run against the listener: requests per second, p50 and p99.
struct WrkRun {
    rps: f64,
    p50: String,
    p99: String,
    /// Cores the agent's side (this process) used during the run.
    agent_cores: f64,
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat` (clock ticks of
/// 10 ms, plenty over a 5 s run).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Parses a `wrk --latency` duration (`812.00us`, `1.23ms`, `2.01s`) into milliseconds text.
fn wrk_ms(text: &str) -> String {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        (text, 1.0)
    };
    let ms = number.parse::<f64>().unwrap_or(f64::NAN) * factor;
    if ms < 10.0 { format!("{ms:.3} ms") } else { format!("{ms:.0} ms") }
}

/// Serves the `hello` module warm through the real invocation listener (invoke-secret check,
/// limiter, usage spool written before each response, per-second stats), and drives it with
/// `wrk` at each concurrency. `None` when `wrk` is not installed.
fn http_listener(scratch: &Path, hello: &[u8], concurrencies: &[usize]) -> Option<Vec<(usize, WrkRun)>> {
    use std::sync::{Arc, atomic::AtomicBool};

    use nimbus_protocol::{Assignment, PackageFormat, PackageRef, Runtime};
    use nimbus_worker_agent::{
        invoke::Invoker,
        listener::{InvokeAuth, Listener, router},
        registry::{Code, Loader, Registry, Version},
        spool::Spool,
        stats::Stats,
    };

    if std::process::Command::new("wrk").arg("--version").output().is_err() {
        return None;
    }
    const SECRET: &str = "bench-secret";
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let engine = Arc::new(WasmEngine::new(&WasmSettings::default()).unwrap());
    let registry = Registry::new();
    let spool = Arc::new(Spool::open(&scratch.join("usage"), 1000).unwrap());
    let invoker = Arc::new(Invoker::new(
        registry.clone(),
        Arc::new(Stats::new()),
        engine.clone(),
        ProcessRuntime::new(scratch.join("http-scratch"), Isolation::None).unwrap(),
        spool,
    ));
    let module = engine.compile(hello).unwrap();
    let prepared = engine.clone();
    let loader: Loader = Arc::new(move || Ok(Code::Wasm(prepared.prepare(&module)?)));
    let version_id = uuid::Uuid::now_v7();
    let assignment = Assignment {
        version_id,
        tenant_id: uuid::Uuid::now_v7(),
        function_id: uuid::Uuid::now_v7(),
        function: "bench".into(),
        version: 1,
        runtime: Runtime::Wasm,
        entry: None,
        package: PackageRef { sha256: "0".repeat(64), size: 1, format: PackageFormat::Wasm, url: String::new() },
        memory_mb: 128,
        timeout_ms: 10_000,
        concurrency: 1000,
        instances: 1,
        env: BTreeMap::new(),
    };
    registry.insert(Version::new(assignment, loader.clone(), Some(loader().unwrap()), 1000));
    let auth = Arc::new(InvokeAuth::default());
    auth.set(SECRET);
    let app = router(Arc::new(Listener {
        invoker,
        auth,
        draining: Arc::new(AtomicBool::new(false)),
        max_body_bytes: 6 << 20,
        api_url: None,
    }));
    let tcp = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/invoke/{version_id}", tcp.local_addr().unwrap());
    rt.spawn(async move { axum::serve(tcp, app).await });
    let script = scratch.join("post.lua");
    std::fs::write(
        &script,
        format!("wrk.method = \"POST\"\nwrk.body = \"ping\"\nwrk.headers[\"Authorization\"] = \"Bearer {SECRET}\"\n"),
    )
    .unwrap();
    let mut out = Vec::new();
    for &c in concurrencies {
        let threads = c.min(2).to_string();
        let conns = c.to_string();
        let run = |secs: &str| {
            std::process::Command::new("wrk")
                .args(["-t", &threads, "-c", &conns, "-d", secs, "--latency", "-s"])
                .arg(&script)
                .arg(&url)
                .output()
                .unwrap()
        };
        run("1s"); // warm-up
        let (cpu_before, wall) = (own_cpu_seconds(), Instant::now());
        let text = String::from_utf8_lossy(&run("5s").stdout).into_owned();
        let agent_cores = (own_cpu_seconds() - cpu_before) / wall.elapsed().as_secs_f64();
        assert!(!text.contains("Non-2xx"), "the listener refused requests: {text}");
        let field = |prefix: &str| {
            text.lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("?")
                .to_owned()
        };
        let rps = field("Requests/sec:").parse().unwrap_or(0.0);
        out.push((c, WrkRun { rps, p50: wrk_ms(&field("50%")), p99: wrk_ms(&field("99%")), agent_cores }));
    }
    drop(rt);
    Some(out)
}

/// The process runtime: an echo shell script packed as a gzip tarball, run per invocation.
fn process_invocations(scratch: &Path, n: usize) -> Sample {
    let script = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/echo.sh")).unwrap();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(script.len() as u64);
    b.append_data(&mut h, "bin/handler", &script[..]).unwrap();
    let archive = scratch.join("echo.tar.gz");
    std::fs::write(&archive, b.into_inner().unwrap().finish().unwrap()).unwrap();
    let dir = scratch.join("echo");
    unpack(&archive, Packing::TarGz, &dir).unwrap();
    let pkg = ProcessPackage { dir, entry: "bin/handler".into() };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    // As the agent runs them by default: under uids of their own (when this runs as root).
    let isolation = match Isolation::decide(ProcessIsolation::Uid, 700_000, 16, &Host::probe()) {
        Isolation::Unavailable(why) => {
            println!("(process rows without uid isolation: {why})");
            Isolation::None
        }
        other => other,
    };
    let runtime = ProcessRuntime::new(scratch.join("work"), isolation).unwrap();
    let mut inv = request();
    inv.body = b"ping".to_vec();
    rt.block_on(async {
        let start = Instant::now();
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let o = runtime.invoke(&pkg, &inv, &Limits::default()).await;
            assert_eq!(o.response.status, 200);
            times.push(t.elapsed());
        }
        Sample::of(times, start.elapsed())
    })
}

fn main() {
    let started = Instant::now();
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-runtime-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let limits = Limits::default();
    let inv = request();
    let engine = WasmEngine::new(&WasmSettings::default()).unwrap();
    let mut t = Table::default();

    // Cold start with the artifact cached on disk: deserialize, link, one invocation.
    let noop = wat::parse_str(NOOP).unwrap();
    let artifact = scratch.join("noop.cwasm");
    std::fs::write(&artifact, engine.precompile(&noop).unwrap()).unwrap();
    for _ in 0..50 {
        let warm = engine.prepare(&engine.load_artifact(&artifact).unwrap()).unwrap();
        block(engine.invoke(&warm, &inv, &limits));
    }
    let cold = repeat(2_000, || {
        let warm = engine.prepare(&engine.load_artifact(&artifact).unwrap()).unwrap();
        let o = block(engine.invoke(&warm, &inv, &limits));
        assert_eq!(o.response.status, 200);
    });
    t.row("wasm cold start, artifact on disk: load + prepare + invoke (noop)", &cold, false, "target p50 < 0.5 ms");
    let load = repeat(2_000, || {
        engine.prepare(&engine.load_artifact(&artifact).unwrap()).unwrap();
    });
    t.row("↳ of which load (deserialize) + prepare (link)", &load, false, "");
    let warm_noop = engine.prepare(&engine.load_artifact(&artifact).unwrap()).unwrap();
    let run = repeat(2_000, || {
        block(engine.invoke(&warm_noop, &inv, &limits));
    });
    t.row("↳ of which instantiate + run (warm invocation)", &run, false, "");

    // First start: compiled now, through the code cache (precompile, write, fsync, rename, load),
    // then prepare and one invocation.
    for (label, wasm, runs) in [("small (noop)", noop.clone(), 5), ("large", big_module(5 << 20), 3)] {
        let dir = scratch.join(format!("cache-{}", wasm.len()));
        let (cache, sha) = cache_with(&dir, &wasm);
        let mut artifact_bytes = 0;
        let first = repeat(runs, || {
            for f in std::fs::read_dir(dir.join("artifacts")).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
            let (module, compiled_now) = cache.wasm_module(&engine, &sha).unwrap();
            assert!(compiled_now);
            let o = block(engine.invoke(&engine.prepare(&module).unwrap(), &inv, &limits));
            assert_eq!(o.response.status, 200);
            artifact_bytes = cache.size() - wasm.len() as u64;
        });
        let note = format!("{:.2} MB wasm → {:.2} MB artifact", wasm.len() as f64 / 1e6, artifact_bytes as f64 / 1e6);
        t.row(&format!("wasm first start incl. compilation, {label}"), &first, false, &note);
    }

    // Warm invocations: Nimbus's WasmEngine::invoke against plain wasmtime, same module.
    let hello = wat::parse_str(HELLO).unwrap();
    let warm = engine.prepare(&engine.compile(&hello).unwrap()).unwrap();
    assert_eq!(block(engine.invoke(&warm, &inv, &limits)).response.body, b"hello\n");
    let nimbus = || {
        block(engine.invoke(&warm, &inv, &limits));
    };
    let default_plain = Plain::new(&wasmtime::Config::new(), &hello);
    let mut pooling = wasmtime::Config::new();
    pooling.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(
        wasmtime::PoolingAllocationConfig::default(),
    ));
    let pooled_plain = Plain::new(&pooling, &hello);
    for f in [&nimbus as &(dyn Fn() + Sync), &|| default_plain.call(), &|| pooled_plain.call()] {
        repeat(2_000, f);
    }
    let mut ratios = String::new();
    let mut pooled_rates = Vec::new();
    for (concurrency, per_thread) in [(1, 20_000), (64, 400)] {
        let measure = |f: &(dyn Fn() + Sync)| {
            if concurrency == 1 { repeat(per_thread, f) } else { concurrent(concurrency, per_thread, f) }
        };
        let n = measure(&nimbus);
        let d = measure(&|| default_plain.call());
        let p = measure(&|| pooled_plain.call());
        pooled_rates.push((concurrency, p.per_second()));
        t.row(&format!("wasm warm invocation, Nimbus `WasmEngine::invoke`, concurrency {concurrency}"), &n, true, "");
        t.row(&format!("↳ plain wasmtime, default config, concurrency {concurrency}"), &d, true, "baseline");
        t.row(&format!("↳ plain wasmtime, pooling allocator, concurrency {concurrency}"), &p, true, "baseline");
        writeln!(
            ratios,
            "- concurrency {concurrency}: Nimbus / plain (default) p50 {:.2}×, throughput {:.2}×; \
             Nimbus / plain (pooling) p50 {:.2}×, throughput {:.2}×",
            n.pct(0.5).as_secs_f64() / d.pct(0.5).as_secs_f64(),
            n.per_second() / d.per_second(),
            n.pct(0.5).as_secs_f64() / p.pct(0.5).as_secs_f64(),
            n.per_second() / p.per_second(),
        )
        .unwrap();
    }

    // The same module through the agent's HTTP invocation listener, against the in-process
    // plain-wasmtime (pooling) figures of this run.
    match http_listener(&scratch, &hello, &[1, 64]) {
        Some(runs) => {
            for (c, r) in runs {
                writeln!(
                    t.0,
                    "| wasm warm invocation through the agent's HTTP listener (wrk), concurrency {c} | 5 s | {} | {} | {:.0} | wrk on the same 2 cores; the agent used {:.2} cores = {:.0} inv/s per agent core |",
                    r.p50, r.p99, r.rps, r.agent_cores, r.rps / r.agent_cores.max(0.01)
                )
                .unwrap();
                if let Some((_, plain)) = pooled_rates.iter().find(|(pc, _)| *pc == c) {
                    writeln!(
                        ratios,
                        "- concurrency {c}: HTTP listener / plain wasmtime in-process (pooling) throughput {:.2}×",
                        r.rps / plain
                    )
                    .unwrap();
                }
            }
        }
        None => println!("(wrk is not installed: the HTTP listener rows are skipped; apt-get install wrk)"),
    }

    // The process runtime: spawn, exec of setpriv (as root) and a shell script, pipes, scratch
    // directory, group kill; the sweep of the uid runs after the answer.
    let process = process_invocations(&scratch, 300);
    t.row(
        "process invocation (echo shell script, `ProcessRuntime::invoke`)",
        &process,
        true,
        "cold every time, by design",
    );

    println!("## Runtime benchmark (`cargo bench -p nimbus-worker-agent --bench runtime`)\n");
    println!("Machine: {}. Engine: pooling = {}.\n", machine(), engine.pooled());
    println!("| measurement | runs | p50 | p99 | per second | notes |");
    println!("|---|---|---|---|---|---|");
    print!("{}", t.0);
    println!("\nRatios (below 1× p50 or above 1× throughput: Nimbus is faster):\n\n{ratios}");
    println!("Total bench time {:.1} s.", started.elapsed().as_secs_f64());
    let _ = std::fs::remove_dir_all(&scratch);
}
