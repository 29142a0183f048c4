//! The whole elastic path with real processes: the API (gateway + autoscaler) and three agents in
//! two zones on a real PostgreSQL. Scale from zero under a burst of 200 concurrent first
//! requests, alias weights, scale back to zero, a `kill -9` of an agent under load (idempotent
//! requests retried elsewhere, none hanging, its instances re-placed), and limits answering 429
//! without failing anything else.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use futures_util::future::join_all;
use nimbus_e2e::{Platform, Running, hello_wasm};
use serde_json::{Value, json};
use sqlx::Connection;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
/// Longest any single invocation may take in these tests before it counts as hanging.
const NO_HANG: Duration = Duration::from_secs(20);

/// `hello_wasm` with thousands of extra functions: its first compile takes long enough that a
/// burst piles up at the gateway while the first instance starts.
fn bulky_wasm() -> Vec<u8> {
    let hello = hello_text();
    let extra: String = (0..4000)
        .map(|i| {
            format!(
                "(func $f{i} (param i64) (result i64) (i64.add (i64.mul (local.get 0) (i64.const {i})) (i64.const 7)))"
            )
        })
        .collect();
    wat::parse_str(hello.replace("(memory (export \"memory\") 1)", &format!("(memory (export \"memory\") 1) {extra}")))
        .unwrap()
}

/// The text of `nimbus_e2e::hello_wasm`'s module.
fn hello_text() -> String {
    let out = "Status: 200 OK\nContent-Type: text/plain\n\nhello from wasm\n";
    format!(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (data (i32.const 64) "{}")
             (func (export "_start")
               (i32.store (i32.const 0) (i32.const 64))
               (i32.store (i32.const 4) (i32.const {}))
               (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))))"#,
        out.replace('\n', "\\0a"),
        out.len()
    )
}

/// A wasm function that spins for a while before answering (to hold concurrency).
fn slow_wasm() -> Vec<u8> {
    let out = "Status: 200 OK\nContent-Type: text/plain\n\nslow\n";
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (data (i32.const 64) "{}")
             (func (export "_start") (local $i i32)
               (local.set $i (i32.const 30000000))
               (loop $l (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $l (local.get $i)))
               (i32.store (i32.const 0) (i32.const 64))
               (i32.store (i32.const 4) (i32.const {}))
               (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))))"#,
        out.replace('\n', "\\0a"),
        out.len()
    ))
    .unwrap()
}

/// The shared harness with this test's steps.
struct P(Platform);

impl std::ops::Deref for P {
    type Target = Platform;
    fn deref(&self) -> &Platform {
        &self.0
    }
}

impl P {
    async fn start() -> P {
        P(Platform::start(&[
            ("NIMBUS_NODE_HEARTBEAT_TIMEOUT", "3s"),
            ("NIMBUS_GATEWAY_HOLD_TIMEOUT", "30s"),
            ("NIMBUS_TENANT_RATE_LIMIT", "0"),
        ])
        .await)
    }

    fn functions(&self) -> String {
        format!("/v1/tenants/{}/functions", self.tenant)
    }

    /// Uploads `code` to `name` and publishes a version; returns its id.
    async fn publish(&self, name: &str, code: Vec<u8>) -> String {
        let res = self
            .http
            .put(format!("{}{}/{name}/code", self.base, self.functions()))
            .bearer_auth(&self.token)
            .header("content-type", "application/wasm")
            .body(code)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{:?}", res.text().await);
        let (s, v) =
            self.call(reqwest::Method::POST, &format!("{}/{name}/versions", self.functions()), Some(json!({}))).await;
        assert_eq!(s, 201, "{v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Creates a wasm function with `spec` merged in, publishes version 1 and points `live` at it.
    async fn deploy(&self, name: &str, spec: Value, code: Vec<u8>) -> String {
        let mut body = json!({"name": name, "runtime": "wasm", "timeout_ms": 10000});
        for (k, v) in spec.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, b) = self.call(reqwest::Method::POST, &self.functions(), Some(body)).await;
        assert_eq!(s, 201, "{b}");
        let id = self.publish(name, code).await;
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                &format!("{}/{name}/aliases", self.functions()),
                Some(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        id
    }

    async fn db(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url).await.unwrap()
    }

    /// Instances assigned per node (by name) for `version`.
    async fn placed(&self, version: &str) -> BTreeMap<String, i32> {
        sqlx::query_as::<_, (String, i32)>(
            "SELECT n.name, a.instances FROM assignments a JOIN nodes n ON n.id = a.node_id \
             WHERE a.version_id = $1::uuid",
        )
        .bind(version)
        .fetch_all(&mut self.db().await)
        .await
        .unwrap()
        .into_iter()
        .collect()
    }

    /// Waits until `ok` holds for the placement of `version`.
    async fn wait_placed(&self, version: &str, what: &str, ok: impl Fn(&BTreeMap<String, i32>) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let placed = self.placed(version).await;
            if ok(&placed) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {what}: {placed:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Agent {
    run: Running,
    name: String,
}

fn start_agent(p: &P, token: &str, name: &str, zone: &str, uid_base: u32) -> (Agent, PathBuf) {
    let data = std::env::temp_dir().join(format!("nimbus-e2e-{name}-{}", Uuid::now_v7().simple()));
    let uid_base = uid_base.to_string();
    let mut run = Running::start_agent(
        &[],
        &[
            ("NIMBUS_AGENT_CONTROL_PLANE_URL", &p.base),
            ("NIMBUS_AGENT_JOIN_TOKEN", token),
            ("NIMBUS_AGENT_NAME", name),
            ("NIMBUS_AGENT_ZONE", zone),
            ("NIMBUS_AGENT_DATA_DIR", data.to_str().unwrap()),
            ("NIMBUS_AGENT_LISTEN", "127.0.0.1:0"),
            ("NIMBUS_AGENT_USAGE_FLUSH_INTERVAL", "500ms"),
            ("NIMBUS_AGENT_WASM_POOL_SLOTS", "64"),
            ("NIMBUS_AGENT_MAX_QUEUED", "512"),
            ("NIMBUS_AGENT_INSTANCE_SLOTS", "8"),
            ("NIMBUS_AGENT_PROCESS_UID_BASE", &uid_base),
            ("NIMBUS_AGENT_PROCESS_UIDS", "4"),
            ("NIMBUS_AGENT_LOG", "warn"),
        ],
    )
    .unwrap();
    run.wait_for_line("joined as node", WAIT).unwrap();
    (Agent { run, name: name.to_owned() }, data)
}

/// One invocation through the gateway: (status, served version, cold start).
async fn invoke(p: &P, method: reqwest::Method, path: &str) -> (u16, String, bool) {
    let res = tokio::time::timeout(
        NO_HANG,
        p.http.request(method, format!("{}/fn/acme/{path}", p.base)).bearer_auth(&p.token).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("an invocation of {path} hung"))
    .unwrap();
    let header = |n: &str| res.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (version, cold) = (header("x-nimbus-version"), header("x-nimbus-cold-start") == "true");
    (res.status().as_u16(), version, cold)
}

#[tokio::test]
async fn three_agents_in_two_zones_scale_from_zero_route_by_weight_scale_to_zero_and_survive_kill_9() {
    let p = P::start().await;
    let token = p.join_token(10).await;
    let (a1, d1) = start_agent(&p, &token, "worker-a1", "zone-a", 620_000);
    let (a2, d2) = start_agent(&p, &token, "worker-a2", "zone-a", 620_100);
    let (a3, d3) = start_agent(&p, &token, "worker-b1", "zone-b", 620_200);

    // At zero from the start (initial scale 0): nothing is placed before the first request.
    let scaling = json!({"initial_scale": 0, "scale_to_zero_grace_s": 2, "stable_window_s": 6, "panic_window_s": 6});
    let v1 = p.deploy("hello", json!({"concurrency": 50, "scaling": scaling}), bulky_wasm()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // one autoscaler tick: it must not place anything
    assert!(p.placed(&v1).await.is_empty(), "nothing placed before demand");

    // A burst of 200 concurrent first requests: every one answered 200, with instances started
    // for what the burst needs (50 × 0.7 = 35 per instance → 6), not one per request.
    let burst: Vec<_> = (0..200).map(|_| invoke(&p, reqwest::Method::POST, "hello/x")).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        // The most instances placed while the burst runs.
        let mut most = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            most = most.max(p.placed(&v1).await.values().sum::<i32>());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    };
    let run = async {
        let answers = join_all(burst).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        answers
    };
    let (answers, most) = tokio::join!(run, watch);
    // The held requests asked for capacity at once: more than one instance, never more than needed.
    assert!((2..=6).contains(&most), "instances placed during the burst: {most}");
    let ok = answers.iter().filter(|(s, v, _)| *s == 200 && v == "1").count();
    assert_eq!(
        ok,
        200,
        "every request of the burst answered: {:?}",
        answers.iter().filter(|a| a.0 != 200).take(3).collect::<Vec<_>>()
    );
    let placed = p.placed(&v1).await;
    let instances: i32 = placed.values().sum();
    assert!((1..=6).contains(&instances), "starts ≤ needed (6): {placed:?}");
    let cold = answers.iter().filter(|(_, _, c)| *c).count();
    assert!(cold <= 3, "at most one cold start per node: {cold}");
    // Spread over both zones once more than one instance runs.
    if instances > 1 {
        assert!(placed.keys().any(|n| n.starts_with("worker-b")), "both zones: {placed:?}");
    }

    // Weights are honoured: version 2 at 30 %.
    let v2 = p.publish("hello", hello_wasm()).await;
    let (s, b) = p
        .call(
            reqwest::Method::PUT,
            &format!("{}/hello/aliases/live", p.functions()),
            Some(json!({"routing": {"weights": [{"version": 1, "weight": 70}, {"version": 2, "weight": 30}]}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut served: HashMap<String, u32> = HashMap::new();
    for _ in 0..10 {
        let wave = join_all((0..20).map(|_| invoke(&p, reqwest::Method::GET, "hello/w")).collect::<Vec<_>>()).await;
        for (s, v, _) in wave {
            assert_eq!(s, 200);
            *served.entry(v).or_default() += 1;
        }
    }
    let two = served.get("2").copied().unwrap_or(0);
    // 200 draws at p = 0.3: 60 expected; outside 30..=90 has a probability far below 1e-6.
    assert!((30..=90).contains(&two), "version 2 served {two} of 200: {served:?}");
    p.wait_placed(&v2, "version 2 placed", |m| m.values().sum::<i32>() >= 1).await;

    // Without traffic both scale to zero after the grace period: parked (0 instances), the code
    // kept on the nodes, so the next request starts from disk.
    for v in [&v1, &v2] {
        p.wait_placed(v, "scaled to zero", |m| !m.is_empty() && m.values().all(|n| *n == 0)).await;
    }
    let (s, _, _) = invoke(&p, reqwest::Method::GET, "hello:1/again").await;
    assert_eq!(s, 200, "a parked version answers at once");

    // kill -9 one agent under load: idempotent requests are retried elsewhere, none hangs, and
    // the dead node's instances are placed on the others.
    // (A function kept at three instances, one per node, by its min scale.)
    let steady = p.deploy("steady", json!({"concurrency": 10, "min_scale": 3, "max_scale": 3}), hello_wasm()).await;
    p.wait_placed(&steady, "one instance on every node", |m| m.len() == 3 && m.values().all(|n| *n == 1)).await;
    let load = |n: usize| join_all((0..n).map(|_| invoke(&p, reqwest::Method::GET, "steady/load")).collect::<Vec<_>>());
    let ready = load(30).await;
    assert!(ready.iter().all(|(s, _, _)| *s == 200), "{ready:?}");
    let victim = a1.name.clone();
    let mut during: Vec<(u16, String, bool)> = Vec::new();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        a1.run.kill9().unwrap();
    };
    let loader = async {
        for _ in 0..10 {
            during.extend(load(30).await);
        }
    };
    tokio::join!(killer, loader);
    let failed: Vec<_> = during.iter().filter(|(s, _, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "GETs are retried on another node: {} of {} failed: {:?}",
        failed.len(),
        during.len(),
        failed.first()
    );
    p.wait_placed(&steady, "the dead node's instance re-placed", |m| {
        m.get(&victim).is_none() && m.values().sum::<i32>() == 3
    })
    .await;

    // Limits: a function with reserved concurrency 2 answers 429 beyond it, while another
    // function keeps answering 200 at the same time.
    p.deploy(
        "slow",
        json!({"concurrency": 10, "reserved_concurrency": 2, "scaling": {"initial_scale": 1}}),
        slow_wasm(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        // The routing table learns of the new function by notification; until then it is unknown.
        match invoke(&p, reqwest::Method::POST, "slow").await.0 {
            200 => break,
            404 if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            s => panic!("the slow function answered {s}"),
        }
    }
    let slow = join_all((0..20).map(|_| invoke(&p, reqwest::Method::POST, "slow")).collect::<Vec<_>>());
    let fast = join_all((0..20).map(|_| invoke(&p, reqwest::Method::GET, "hello:1/x")).collect::<Vec<_>>());
    let (slow, fast) = tokio::join!(slow, fast);
    let limited = slow.iter().filter(|(s, _, _)| *s == 429).count();
    assert!(limited > 0, "beyond reserved concurrency: 429s");
    assert!(slow.iter().all(|(s, _, _)| *s == 200 || *s == 429), "{slow:?}");
    assert!(fast.iter().all(|(s, _, _)| *s == 200), "other functions are not affected: {fast:?}");

    for a in [a2, a3] {
        let _ = a.run.terminate();
    }
    for d in [d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
    p.0.stop().await;
}
