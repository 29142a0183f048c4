//! The real control plane and the real worker agent together: join, reconcile, both runtimes,
//! code verification, usage and logs, graceful leave, heartbeat loss, and usage that survives a
//! `kill -9` of the agent and arrives exactly once.

use std::{collections::BTreeSet, path::Path, time::Duration};

use nimbus_e2e::{Platform, Running, hello_wasm};
use serde_json::{Value, json};
use sqlx::Connection;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// A gzip tarball holding one executable shell script `handler.sh`.
fn hello_process() -> Vec<u8> {
    let script = b"#!/bin/sh\nread -r body\necho 'Content-Type: text/plain'\necho\necho \"hello from process $NIMBUS_FUNCTION: $body\"\necho 'a log line from process' >&2\n";
    nimbus_e2e::script_package("handler.sh", script)
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
        let secrets = format!("e2e:{}", "A".repeat(43));
        P(Platform::start(&[
            ("NIMBUS_SECRETS_KEYS", &secrets),
            ("NIMBUS_NODE_HEARTBEAT_TIMEOUT", "3s"),
            // This test places versions itself (`PUT /v1/nodes/{id}/assignments`).
            ("NIMBUS_AUTOSCALER", "false"),
        ])
        .await)
    }

    /// Creates, uploads and publishes a function; returns its version id and package SHA-256.
    async fn deploy(&self, name: &str, runtime: &str, content_type: &str, code: Vec<u8>) -> (String, String) {
        let mut spec = json!({"name": name, "runtime": runtime, "timeout_ms": 5000});
        if runtime == "process" {
            spec["entry"] = json!("handler.sh");
        }
        self.0.deploy(spec, content_type, code).await
    }

    async fn assign(&self, node: &str, functions: &[&str]) {
        let assignments: Vec<Value> = functions
            .iter()
            .map(|f| json!({"tenant_id": self.tenant, "function": f, "version": 1, "instances": 1}))
            .collect();
        let (s, b) = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/nodes/{node}/assignments"),
                Some(json!({"assignments": assignments})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }

    /// Waits until the node, as the control plane sees it, satisfies `ok`.
    async fn wait_node(&self, node: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, n) = self.call(reqwest::Method::GET, &format!("/v1/nodes/{node}"), None).await;
            if ok(&n) {
                return n;
            }
            assert!(tokio::time::Instant::now() < deadline, "the node never got {what}: {n}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn usage_ids(&self) -> BTreeSet<Uuid> {
        let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar::<_, Uuid>("SELECT invocation_id FROM usage_records")
            .fetch_all(&mut c)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// Waits until the usage table holds exactly `want` (and nothing else).
    async fn wait_usage(&self, want: &BTreeSet<Uuid>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let have = self.usage_ids().await;
            if &have == want {
                return;
            }
            assert!(have.is_subset(want), "usage that no invocation produced: {:?}", have.difference(want));
            assert!(
                tokio::time::Instant::now() < deadline,
                "usage never arrived: have {}, want {}",
                have.len(),
                want.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn invoke_secret(&self, node: &str) -> String {
        let mut c = sqlx::PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar("SELECT invoke_secret FROM nodes WHERE id = $1::uuid")
            .bind(node)
            .fetch_one(&mut c)
            .await
            .unwrap()
    }
}

struct Agent {
    run: Running,
    url: String,
    node: String,
}

fn start_agent(p: &P, token: &str, data: &Path, flush: &str) -> Agent {
    let mut run = Running::start_agent(
        &[],
        &[
            ("NIMBUS_AGENT_CONTROL_PLANE_URL", &p.base),
            ("NIMBUS_AGENT_JOIN_TOKEN", token),
            ("NIMBUS_AGENT_NAME", "worker-1"),
            ("NIMBUS_AGENT_ZONE", "zone-a"),
            ("NIMBUS_AGENT_DATA_DIR", data.to_str().unwrap()),
            ("NIMBUS_AGENT_LISTEN", "127.0.0.1:0"),
            ("NIMBUS_AGENT_USAGE_FLUSH_INTERVAL", flush),
            ("NIMBUS_AGENT_WASM_POOL_SLOTS", "16"),
            // A uid range of its own: agents of other tests on this machine sweep theirs.
            ("NIMBUS_AGENT_PROCESS_UID_BASE", "610000"),
            ("NIMBUS_AGENT_PROCESS_UIDS", "32"),
            ("NIMBUS_AGENT_LOG", "warn"),
        ],
    )
    .unwrap();
    let url = run.wait_for_line("listening on", WAIT).unwrap().trim_start_matches("listening on ").trim().to_owned();
    let node =
        run.wait_for_line("joined as node", WAIT).unwrap().trim_start_matches("joined as node ").trim().to_owned();
    Agent { run, url, node }
}

async fn invoke(p: &P, agent: &Agent, secret: &str, version: &str, body: &str) -> (u16, String, Option<Uuid>, String) {
    let res = p
        .http
        .post(format!("{}/invoke/{version}/greet", agent.url))
        .bearer_auth(secret)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let id = res.headers().get("x-nimbus-invocation-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let cold = res.headers().get("x-nimbus-cold-start").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (status, res.text().await.unwrap(), id, cold)
}

fn versions_ready(n: &Value, want: &[&str]) -> bool {
    let vs = n["versions"].as_array().cloned().unwrap_or_default();
    vs.len() == want.len() && want.iter().all(|w| vs.iter().any(|v| v["version_id"] == *w && v["state"] == "ready"))
}

#[tokio::test]
async fn an_agent_runs_both_runtimes_reconciles_verifies_code_and_ships_usage_exactly_once_across_kill_9() {
    let p = P::start().await;
    let (wasm, _) = p.deploy("hello-wasm", "wasm", "application/wasm", hello_wasm()).await;
    let (process, _) = p.deploy("hello-sh", "process", "application/gzip", hello_process()).await;
    let token = p.join_token(10).await;
    let data = std::env::temp_dir().join(format!("nimbus-e2e-agent-{}", Uuid::now_v7().simple()));

    // Join, then reconcile to two warm versions.
    let agent = start_agent(&p, &token, &data, "200ms");
    p.assign(&agent.node, &["hello-wasm", "hello-sh"]).await;
    let n = p.wait_node(&agent.node, "both versions ready", |n| versions_ready(n, &[&wasm, &process])).await;
    assert_eq!(
        (n["state"].as_str(), n["zone"].as_str(), n["name"].as_str()),
        (Some("ready"), Some("zone-a"), Some("worker-1"))
    );
    let secret = p.invoke_secret(&agent.node).await;

    // Only the control plane's secret opens the listener.
    let (status, _, _, _) = invoke(&p, &agent, "wrong", &wasm, "x").await;
    assert_eq!(status, 401);
    let mut expected = BTreeSet::new();
    for i in 0..3 {
        let (status, body, id, cold) = invoke(&p, &agent, &secret, &wasm, "ping").await;
        assert_eq!((status, body.as_str()), (200, "hello from wasm\n"), "invocation {i}");
        assert_eq!(cold, "false", "the version was warm");
        expected.insert(id.expect("an invocation id"));
    }
    for _ in 0..2 {
        let (status, body, id, _) = invoke(&p, &agent, &secret, &process, "from e2e").await;
        assert_eq!((status, body.as_str()), (200, "hello from process hello-sh: from e2e\n"));
        expected.insert(id.unwrap());
    }
    // And through the gateway, by alias: `/fn/acme/hello-sh` goes to `live`, version 1.
    let (s, b) = p
        .call(
            reqwest::Method::POST,
            &format!("/v1/tenants/{}/functions/hello-sh/aliases", p.tenant),
            Some(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let res = loop {
        // The routing table follows the new alias by notification; until then the alias is unknown.
        let res = p
            .http
            .post(format!("{}/fn/acme/hello-sh/greet", p.base))
            .bearer_auth(&p.token)
            .body("via gateway")
            .send()
            .await
            .unwrap();
        if res.status() != 404 || tokio::time::Instant::now() > deadline {
            break res;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-nimbus-version"], "1");
    let id: Uuid = res.headers()["x-nimbus-invocation-id"].to_str().unwrap().parse().unwrap();
    assert_eq!(res.text().await.unwrap(), "hello from process hello-sh: via gateway\n");
    expected.insert(id);
    p.wait_usage(&expected).await;
    let (_, logs) =
        p.call(reqwest::Method::GET, &format!("/v1/tenants/{}/functions/hello-wasm/logs", p.tenant), None).await;
    let lines: Vec<&str> = logs["items"].as_array().unwrap().iter().map(|l| l["line"].as_str().unwrap()).collect();
    assert_eq!(lines, ["a log line from wasm"; 3], "{logs}");

    // Reconcile removes what is no longer desired.
    p.assign(&agent.node, &["hello-sh"]).await;
    p.wait_node(&agent.node, "only the process version", |n| versions_ready(n, &[&process])).await;
    let (status, body, _, _) = invoke(&p, &agent, &secret, &wasm, "x").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("version_not_assigned"), "{body}");

    // A package whose bytes do not match its SHA-256 is refused, and the refusal is reported.
    let (broken, sha) = p
        .deploy(
            "broken",
            "wasm",
            "application/wasm",
            wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#).unwrap(),
        )
        .await;
    let blob = p.packages.join("sha256").join(&sha[..2]).join(&sha);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    p.assign(&agent.node, &["hello-sh", "broken"]).await;
    let n = p
        .wait_node(&agent.node, "the broken version refused", |n| {
            n["versions"]
                .as_array()
                .is_some_and(|vs| vs.iter().any(|v| v["version_id"] == broken.as_str() && v["state"] == "failed"))
        })
        .await;
    let failed = n["versions"].as_array().unwrap().iter().find(|v| v["version_id"] == broken.as_str()).unwrap().clone();
    assert!(failed["error"].as_str().unwrap().contains("sha256 mismatch"), "{failed}");
    let (status, _, _, _) = invoke(&p, &agent, &secret, &broken, "x").await;
    assert_ne!(status, 200, "a refused package never runs");

    // SIGTERM drains and leaves.
    let (status, _) = agent.run.finish().unwrap();
    assert!(status.success(), "a drained agent exits 0: {status:?}");
    p.wait_node(&agent.node, "state left", |n| n["state"] == "left").await;

    // Usage held only in the spool survives kill -9 and arrives exactly once after a restart.
    let agent = start_agent(&p, &token, &data, "1h");
    p.wait_node(&agent.node, "ready after the restart", |n| n["state"] == "ready").await;
    p.assign(&agent.node, &["hello-sh"]).await;
    p.wait_node(&agent.node, "the process version", |n| versions_ready(n, &[&process])).await;
    let secret = p.invoke_secret(&agent.node).await;
    let mut held = BTreeSet::new();
    for _ in 0..4 {
        let (status, _, id, _) = invoke(&p, &agent, &secret, &process, "held").await;
        assert_eq!(status, 200);
        held.insert(id.unwrap());
    }
    assert!(p.usage_ids().await.is_disjoint(&held), "with an hour's flush interval nothing has shipped yet");
    let node = agent.node.clone();
    agent.run.kill9().unwrap();
    // Missed heartbeats mark it lost.
    p.wait_node(&node, "state lost", |n| n["state"] == "lost").await;
    let agent = start_agent(&p, &token, &data, "200ms");
    assert_eq!(agent.node, node, "the restarted agent keeps its identity");
    expected.extend(held);
    p.wait_usage(&expected).await;
    p.wait_node(&node, "ready again", |n| n["state"] == "ready").await;

    let (status, _) = agent.run.finish().unwrap();
    assert!(status.success());
    assert_eq!(p.usage_ids().await, expected, "nothing was billed twice");
    let _ = std::fs::remove_dir_all(&data);
    p.0.stop().await;
}
