//! Time from zero to the first response (target: a cached function, p50 < 5 ms end to end),
//! with real processes: the release `nimbus-api` (gateway + autoscaler) and one release
//! `nimbus-worker-agent` on a scratch database of the machine's PostgreSQL, as
//! `e2e/tests/scaling.rs` runs them.
//!
//! The binaries are found next to the bench executable, so build them in release mode first:
//! `cargo build --release --workspace && cargo bench -p nimbus-e2e --bench zero_to_first`.
//!
//! Sixty wasm functions (the e2e hello module), scaling `initial_scale 0`,
//! `scale_to_zero_grace_s 0`, 6 s windows, alias `live`. Measured in one run, one request at a
//! time through the gateway (`POST /fn/acme/<name>/x`, access token, one pooled client
//! connection), each timed from sending to the last byte of the body:
//!
//! - **(A) parked, cached**: 20 functions get one first request each, then the bench waits until
//!   each is scaled to zero (its assignment rows at 0 instances) *and* the agent dropped its code
//!   from memory (the node reports it ready with 0 instances: the agent cools on-demand code idle
//!   for 30 s at its next pass). The timed request is then zero → first response with the
//!   compiled artifact on the node's disk; it must answer 200 with `x-nimbus-cold-start: true`.
//! - **(B) warm**: a second request to the same function right after (the comparison), and, warm
//!   too, a `GET` through the gateway and a `POST` and a `GET` straight to the agent's listener.
//! - **(C) unplaced**: 20 other functions, never invoked, nothing assigned: the first request
//!   takes the whole hold path (poke → autoscaler tick → assignment → the agent's long poll →
//!   download → compile → report → routing-table reload → forward), each 300 ms after the last;
//!   **(C′)** the same for 20 more, back to back. The breakdown comes from the assignment row's
//!   `created_at` (the autoscaler's write) and the agent's `version ready` log line (code
//!   downloaded and compiled), on the same clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use nimbus_e2e::{Platform, Running, hello_wasm};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio::time::Instant;
use uuid::Uuid;

/// Functions per scenario.
const N: usize = 20;
const WAIT: Duration = Duration::from_secs(60);
/// Longest wait for every parked function's code to be cooled on the node.
const COOL_WAIT: Duration = Duration::from_secs(90);

/// The platform the bench runs on: the API with the autoscaler on (its default).
async fn start() -> Platform {
    Platform::start(&[
        ("NIMBUS_NODE_HEARTBEAT_TIMEOUT", "3s"),
        ("NIMBUS_GATEWAY_HOLD_TIMEOUT", "30s"),
        ("NIMBUS_TENANT_RATE_LIMIT", "0"),
    ])
    .await
}

/// Creates a wasm function scaled from zero, publishes version 1 and points `live` at it;
/// returns the version's id.
async fn deploy(p: &Platform, name: &str) -> Uuid {
    let functions = format!("/v1/tenants/{}/functions", p.tenant);
    let scaling = json!({"initial_scale": 0, "scale_to_zero_grace_s": 0, "stable_window_s": 6, "panic_window_s": 6});
    let body = json!({"name": name, "runtime": "wasm", "timeout_ms": 10000, "concurrency": 10, "scaling": scaling});
    let (s, b) = p.call(reqwest::Method::POST, &functions, Some(body)).await;
    assert_eq!(s, 201, "{b}");
    let res = p
        .http
        .put(format!("{}{functions}/{name}/code", p.base))
        .bearer_auth(&p.token)
        .header("content-type", "application/wasm")
        .body(hello_wasm())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{:?}", res.text().await);
    let (s, v) = p.call(reqwest::Method::POST, &format!("{functions}/{name}/versions"), Some(json!({}))).await;
    assert_eq!(s, 201, "{v}");
    let (s, b) = p
        .call(
            reqwest::Method::POST,
            &format!("{functions}/{name}/aliases"),
            Some(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    v["id"].as_str().unwrap().parse().unwrap()
}

/// One invocation through the gateway (`POST`), timed from sending to the last byte of the
/// body: (duration, status, served version, cold start).
async fn invoke(p: &Platform, name: &str) -> (Duration, u16, String, bool) {
    timed(p.http.post(format!("{}/fn/acme/{name}/x", p.base)).bearer_auth(&p.token), name).await
}

/// One request, timed from sending to the last byte of the body: (duration, status,
/// `x-nimbus-version`, `x-nimbus-cold-start`). A 200 must carry the function's body.
async fn timed(req: reqwest::RequestBuilder, what: &str) -> (Duration, u16, String, bool) {
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(40), req.send())
        .await
        .unwrap_or_else(|_| panic!("an invocation of {what} hung"))
        .unwrap();
    let header = |n: &str| res.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (version, cold) = (header("x-nimbus-version"), header("x-nimbus-cold-start") == "true");
    let status = res.status().as_u16();
    let body = res.bytes().await.unwrap();
    let took = started.elapsed();
    if status == 200 {
        assert_eq!(&body[..], b"hello from wasm\n", "{what} answered with the function's body");
    }
    (took, status, version, cold)
}

/// Per version: (assignment rows, all of them at 0 instances, the node reports it ready with
/// 0 warm instances).
async fn parked_and_cool(c: &mut sqlx::PgConnection, versions: &[Uuid]) -> Vec<(usize, bool, bool)> {
    let rows: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT version_id, instances FROM assignments WHERE version_id = ANY($1)")
            .bind(versions)
            .fetch_all(&mut *c)
            .await
            .unwrap();
    let reported: Vec<(sqlx::types::Json<Vec<Value>>,)> =
        sqlx::query_as("SELECT versions FROM nodes WHERE state = 'ready'").fetch_all(&mut *c).await.unwrap();
    versions
        .iter()
        .map(|v| {
            let mine: Vec<i32> = rows.iter().filter(|(x, _)| x == v).map(|(_, n)| *n).collect();
            let id = v.to_string();
            let cool = reported
                .iter()
                .flat_map(|(r,)| r.0.iter())
                .any(|e| e["version_id"].as_str() == Some(id.as_str()) && e["state"] == "ready" && e["instances"] == 0);
            (mine.len(), !mine.is_empty() && mine.iter().all(|n| *n == 0), cool)
        })
        .collect()
}

fn micros_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile, ms.
fn pct(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn row(what: &str, xs: &[f64], note: &str) {
    println!(
        "| {what} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {note} |",
        xs.len(),
        pct(xs, 50.0),
        pct(xs, 99.0),
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(0.0, f64::max)
    );
}

/// The agent's `version ready` log line for `version` (JSON log): its RFC 3339 time.
fn version_ready_at(agent: &mut Running, version: Uuid) -> String {
    let needle = format!("\"version_id\":\"{version}\"");
    loop {
        let line = agent.wait_for_line(&needle, Duration::from_secs(10)).unwrap();
        let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
        if v["fields"]["message"] == "version ready" {
            return v["timestamp"].as_str().unwrap().to_owned();
        }
    }
}

/// First requests of functions nobody invoked yet, one at a time, `gap` apart, with where each
/// one's time went.
#[derive(Default)]
struct Firsts {
    total: Vec<f64>,
    to_assign: Vec<f64>,
    to_ready: Vec<f64>,
    to_answer: Vec<f64>,
    cold: usize,
}

impl Firsts {
    fn rows(&self, what: &str, tag: &str) {
        row(what, &self.total, &format!("200; {} of {} cold starts", self.cold, self.total.len()));
        row(
            &format!("↳ ({tag}) request → assignment written (poke, autoscaler tick)"),
            &self.to_assign,
            "`assignments.created_at`",
        );
        row(
            &format!("↳ ({tag}) assignment → agent has the code (long poll, download, compile)"),
            &self.to_ready,
            "agent's `version ready` log",
        );
        row(&format!("↳ ({tag}) code ready → response (report, routing reload, forward, invoke)"), &self.to_answer, "");
    }
}

async fn first_requests(
    p: &Platform,
    agent: &mut Running,
    c: &mut sqlx::PgConnection,
    names: &[String],
    versions: &[Uuid],
    gap: Duration,
) -> Firsts {
    let mut f = Firsts::default();
    for (name, v) in names.iter().zip(versions) {
        let state = parked_and_cool(c, std::slice::from_ref(v)).await[0];
        assert_eq!(state.0, 0, "{name} has no assignment before its first request");
        tokio::time::sleep(gap).await;
        let sent = micros_now();
        let (took, status, version, cold) = invoke(p, name).await;
        let answered = sent + took.as_micros() as i64;
        assert_eq!((status, version.as_str()), (200, "1"), "{name}'s first request");
        f.cold += usize::from(cold);
        f.total.push(ms(took));
        let ready_at = version_ready_at(agent, *v);
        // Both instants as microseconds since the epoch (PostgreSQL reads the agent's time).
        let (assigned_at, ready_at): (i64, i64) = sqlx::query_as(
            "SELECT (extract(epoch FROM min(created_at)) * 1000000)::int8, \
             (extract(epoch FROM $2::timestamptz) * 1000000)::int8 FROM assignments WHERE version_id = $1",
        )
        .bind(v)
        .bind(&ready_at)
        .fetch_one(&mut *c)
        .await
        .unwrap();
        let span = |a: i64, b: i64| (b - a) as f64 / 1000.0;
        f.to_assign.push(span(sent, assigned_at));
        f.to_ready.push(span(assigned_at, ready_at));
        f.to_answer.push(span(ready_at, answered));
    }
    f
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let run_started = Instant::now();
    let p = start().await;
    let join = p.join_token(1).await;
    let data = std::env::temp_dir().join(format!("nimbus-bench-z2f-agent-{}", Uuid::now_v7().simple()));
    let mut agent = Running::start_agent(
        &[],
        &[
            ("NIMBUS_AGENT_CONTROL_PLANE_URL", &p.base),
            ("NIMBUS_AGENT_JOIN_TOKEN", &join),
            ("NIMBUS_AGENT_NAME", "bench-worker"),
            ("NIMBUS_AGENT_ZONE", "zone-a"),
            ("NIMBUS_AGENT_DATA_DIR", data.to_str().unwrap()),
            ("NIMBUS_AGENT_LISTEN", "127.0.0.1:0"),
            ("NIMBUS_AGENT_MEMORY_MB", "8192"),
            ("NIMBUS_AGENT_WASM_POOL_SLOTS", "64"),
            ("NIMBUS_AGENT_PROCESS_UID_BASE", "630000"),
            ("NIMBUS_AGENT_PROCESS_UIDS", "4"),
            ("NIMBUS_AGENT_LOG_FORMAT", "json"),
            ("NIMBUS_AGENT_LOG", "warn,nimbus_worker_agent::reconcile=info"),
        ],
    )
    .unwrap();
    agent.wait_for_line("joined as node", WAIT).unwrap();

    let parked_names: Vec<String> = (0..N).map(|i| format!("parked-{i:02}")).collect();
    let fresh_names: Vec<String> = (0..N).map(|i| format!("fresh-{i:02}")).collect();
    let packed_names: Vec<String> = (0..N).map(|i| format!("packed-{i:02}")).collect();
    let mut parked = Vec::new();
    for n in &parked_names {
        parked.push(deploy(&p, n).await);
    }
    let (mut fresh, mut packed) = (Vec::new(), Vec::new());
    for n in &fresh_names {
        fresh.push(deploy(&p, n).await);
    }
    for n in &packed_names {
        packed.push(deploy(&p, n).await);
    }
    let mut c = sqlx::PgConnection::connect(&p.url).await.unwrap();
    let (assigned,): (i64,) = sqlx::query_as("SELECT count(*) FROM assignments").fetch_one(&mut c).await.unwrap();
    assert_eq!(assigned, 0, "initial scale 0: nothing placed before the first request");
    eprintln!("{} functions deployed after {:.1} s", 3 * N, run_started.elapsed().as_secs_f64());

    // The routing table learns of new functions by notification: wait until the last one is
    // known (a request that is not a 404; it is held and answered, so it is its first request).
    let deadline = Instant::now() + WAIT;
    let last = parked_names.last().unwrap();
    let first_of_last = loop {
        let r = invoke(&p, last).await;
        if r.1 != 404 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first_of_last.1, 200, "{last}'s first request");

    // (A) first requests to the parked set, all at once: placed, downloaded, compiled, answered.
    let firsts = join_all(parked_names.iter().take(N - 1).map(|n| invoke(&p, n))).await;
    assert!(firsts.iter().all(|r| r.1 == 200), "first requests: {:?}", firsts.iter().map(|r| r.1).collect::<Vec<_>>());
    let cool_from = Instant::now();
    let deadline = cool_from + COOL_WAIT;
    loop {
        let state = parked_and_cool(&mut c, &parked).await;
        if state.iter().all(|(_, zero, cool)| *zero && *cool) {
            break;
        }
        assert!(Instant::now() < deadline, "not all parked and cooled within {COOL_WAIT:?}: {state:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("all {N} parked and cooled {:.1} s after their first requests", cool_from.elapsed().as_secs_f64());

    // Warm the client's connection to the gateway (every timed request reuses it).
    let (s, _) = p.call(reqwest::Method::GET, "/v1/me", None).await;
    assert_eq!(s, 200);

    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (name, v) in parked_names.iter().zip(&parked) {
        // Still parked and cool right before the request (nothing above woke it).
        let state = parked_and_cool(&mut c, std::slice::from_ref(v)).await[0];
        assert!(state.1 && state.2, "{name} parked and cool before its timed request: {state:?}");
        let (took, status, version, cold) = invoke(&p, name).await;
        assert_eq!((status, version.as_str()), (200, "1"), "{name} (A)");
        assert!(cold, "{name}: a parked, cooled version starts from disk (x-nimbus-cold-start: true)");
        a.push(ms(took));
        let (took, status, _, cold) = invoke(&p, name).await;
        assert_eq!(status, 200, "{name} (B)");
        assert!(!cold, "{name}: the second request finds the code warm");
        b.push(ms(took));
    }

    // Comparisons for (B), warm, one request each per function: GET through the gateway, and
    // POST and GET straight to the agent's listener (what the gateway forwards to).
    let (invoke_url, secret): (String, String) =
        sqlx::query_as("SELECT invoke_url, invoke_secret FROM nodes WHERE state = 'ready'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    let (mut b_get, mut d_post, mut d_get) = (Vec::new(), Vec::new(), Vec::new());
    for (name, v) in parked_names.iter().zip(&parked) {
        let gateway = format!("{}/fn/acme/{name}/x", p.base);
        let agent = format!("{invoke_url}/invoke/{v}/x");
        for (req, into, what) in [
            (p.http.get(&gateway).bearer_auth(&p.token), &mut b_get, "GET via the gateway"),
            (p.http.post(&agent).bearer_auth(&secret), &mut d_post, "POST to the agent"),
            (p.http.get(&agent).bearer_auth(&secret), &mut d_get, "GET to the agent"),
        ] {
            let (took, status, _, cold) = timed(req, &format!("{name}, {what}")).await;
            assert!(status == 200 && !cold, "{name}, {what}: {status}, cold {cold}");
            into.push(ms(took));
        }
    }

    // (C) never invoked, nothing assigned: the whole hold path, one function at a time, each
    // first request 300 ms after the last one was answered (a first request that finds no tick
    // in the autoscaler's last 100 ms, its spacing of poke-caused ticks).
    let spaced = first_requests(&p, &mut agent, &mut c, &fresh_names, &fresh, Duration::from_millis(300)).await;
    // (C′) the same, back to back: each poke comes right after the tick of the one before.
    let packed = first_requests(&p, &mut agent, &mut c, &packed_names, &packed, Duration::ZERO).await;

    println!("## Zero to first response, one API + one agent, {N} functions per scenario");
    println!();
    println!("| scenario | requests | p50 | p99 | min | max | notes |");
    println!("|---|---|---|---|---|---|---|");
    row("**(A) parked, cached: zero → first response**", &a, "200, `x-nimbus-cold-start: true` for every one");
    row("(B) warm: the next request", &b, "200, not a cold start");
    row("↳ (B) warm, `GET` instead of `POST`, through the gateway", &b_get, "200, not a cold start");
    row("↳ (B) warm, `POST` straight to the agent (`/invoke/<version>/x`)", &d_post, "no gateway");
    row("↳ (B) warm, `GET` straight to the agent", &d_get, "no gateway");
    spaced.rows("(C) unplaced: first request ever (hold path), 300 ms apart", "C");
    packed.rows("(C′) unplaced, first requests back to back", "C′");
    println!();
    println!("bench ran {:.0} s", run_started.elapsed().as_secs_f64());

    let _ = agent.terminate();
    let _ = std::fs::remove_dir_all(&data);
    p.stop().await;
}
