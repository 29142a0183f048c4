//! The `nimbus-worker-agent` binary against a stand-in control plane: the lines it prints, join
//! then renew on a restart, reports, a drain on SIGTERM that leaves and exits 0, and the exit
//! codes of bad settings and a node that cannot join.

mod common;
mod fake_cp;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use fake_cp::{FakeCp, TOKEN};
use nimbus_protocol::{InstanceState, PackageFormat, PackageRef, Report, Runtime};
use uuid::Uuid;

fn scratch(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The agent binary running as a child, its standard output read line by line.
pub struct AgentProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl AgentProcess {
    /// Starts the agent with `env` (and none of the caller's `NIMBUS_*` variables).
    pub fn start(env: &[(&str, &str)]) -> AgentProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nimbus-worker-agent"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("NIMBUS_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied()).env("NIMBUS_AGENT_LOG", "info,nimbus_worker_agent=debug");
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AgentProcess { child, lines }
    }

    /// The rest of the first line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.to_owned();
                    }
                }
                Err(e) => panic!("no line starting with {prefix:?}: {e}"),
            }
        }
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        self.wait()
    }

    /// Waits (bounded) for the exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the agent did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uids the agents of this test process run process functions under: a range of its own per
/// test process (they run in parallel, and an agent kills whatever runs under a uid it takes
/// back), split between its agents.
fn uid_base() -> &'static str {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32 % 60;
    let base = 300_000_000 + (std::process::id() % 100_000) * 1_000 + n * UIDS;
    Box::leak(base.to_string().into_boxed_str())
}

/// Uids per agent.
const UIDS: u32 = 16;

fn env<'a>(cp: &'a FakeCp, data: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("NIMBUS_AGENT_PROCESS_UID_BASE", uid_base()),
        ("NIMBUS_AGENT_PROCESS_UIDS", "16"),
        ("NIMBUS_AGENT_CONTROL_PLANE_URL", cp.url.as_str()),
        ("NIMBUS_AGENT_DATA_DIR", data.to_str().unwrap()),
        ("NIMBUS_AGENT_LISTEN", "127.0.0.1:0"),
        ("NIMBUS_AGENT_NAME", "test-node"),
        ("NIMBUS_AGENT_ZONE", "zone-a"),
        ("NIMBUS_AGENT_WASM_POOL_SLOTS", "8"),
        ("NIMBUS_AGENT_WASM_MAX_MEMORY_MB", "128"),
        ("NIMBUS_AGENT_DRAIN_TIMEOUT", "5s"),
    ]
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_reports_drains_on_sigterm_and_renews_after_a_restart() {
    let cp = FakeCp::start().await;
    let data = scratch("lifecycle");
    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_JOIN_TOKEN", TOKEN));
    vars.push(("NIMBUS_AGENT_LABELS", "pool=spot,accelerator=gpu"));
    let agent = AgentProcess::start(&vars);
    let listen = agent.wait_line("listening on ");
    assert!(listen.starts_with("http://127.0.0.1:"), "{listen}");
    assert_eq!(agent.wait_line("joined as node "), cp.state.node_id.to_string());
    {
        let joins = cp.state.joins.lock().unwrap();
        assert_eq!(joins.len(), 1);
        assert_eq!((joins[0].name.as_str(), joins[0].zone.as_str()), ("test-node", "zone-a"));
        assert_eq!(joins[0].invoke_url, listen, "the advertised URL defaults to the bound address");
        let labels: Vec<(&str, &str)> = joins[0].labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(labels, [("accelerator", "gpu"), ("pool", "spot")], "labels from NIMBUS_AGENT_LABELS");
    }
    // Functions run as other users: they may pass through the data directory to their
    // packages and working directories, and read nothing else.
    let mode = |p: &str| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join(p)).unwrap().permissions()) & 0o7777
    };
    for (path, want) in [
        ("", 0o711),
        ("identity.json", 0o600),
        ("usage", 0o700),
        ("cache", 0o711),
        ("cache/blobs", 0o700),
        ("cache/artifacts", 0o700),
        ("cache/tmp", 0o700),
        ("cache/unpacked", 0o711),
        ("scratch", 0o711),
    ] {
        assert_eq!(mode(path), want, "{path:?}: {:o}", mode(path));
    }

    until("a report reconciled to revision 1 arrives", || cp.last_report().is_some_and(|r| r.revision == 1)).await;
    let health = reqwest::get(format!("{listen}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    let refused =
        reqwest::Client::new().post(format!("{listen}/invoke/{}", uuid::Uuid::now_v7())).send().await.unwrap();
    assert_eq!(refused.status(), 401);

    let status = tokio::task::spawn_blocking(move || agent.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(cp.state.leaves.load(Ordering::Relaxed), 1, "a drained agent leaves");

    // A restart keeps the identity: the credential is renewed, no token needed.
    let agent = AgentProcess::start(&env(&cp, &data));
    agent.wait_line("listening on ");
    assert_eq!(agent.wait_line("joined as node "), cp.state.node_id.to_string());
    assert_eq!(cp.state.renews.load(Ordering::Relaxed), 1);
    assert_eq!(cp.state.joins.lock().unwrap().len(), 1);
    let status = tokio::task::spawn_blocking(move || agent.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs the agent with `vars` to its exit; blocking, so off the runtime the fake serves on.
async fn exit_code(vars: Vec<(String, String)>) -> Option<i32> {
    tokio::task::spawn_blocking(move || {
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut agent = AgentProcess::start(&vars);
        agent.wait().code()
    })
    .await
    .unwrap()
}

fn owned(vars: Vec<(&str, &str)>) -> Vec<(String, String)> {
    vars.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_identity_or_token_exits_1_and_bad_settings_exit_2() {
    let cp = FakeCp::start().await;
    let data = scratch("no-token");
    assert_eq!(exit_code(owned(env(&cp, &data))).await, Some(1));

    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_ZOEN", "typo"));
    assert_eq!(exit_code(owned(vars)).await, Some(2));

    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_JOIN_TOKEN", "njt_wrong"));
    assert_eq!(exit_code(owned(vars)).await, Some(1), "a refused join token is final");
    assert!(cp.state.joins.lock().unwrap().is_empty());
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A gzip tarball holding one executable, `handler`.
fn process_package(script: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o755);
    header.set_size(script.len() as u64);
    tar.append_data(&mut header, "handler", script.as_bytes()).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

fn assignment(
    runtime: Runtime,
    bytes: &[u8],
    sha256: &str,
    url: String,
    instances: u32,
) -> nimbus_protocol::Assignment {
    nimbus_protocol::Assignment {
        version_id: Uuid::now_v7(),
        tenant_id: Uuid::now_v7(),
        function_id: Uuid::now_v7(),
        function: "f".into(),
        version: 1,
        runtime,
        entry: (runtime == Runtime::Process).then(|| "handler".into()),
        package: PackageRef {
            sha256: sha256.to_owned(),
            size: bytes.len() as u64,
            format: if runtime == Runtime::Wasm { PackageFormat::Wasm } else { PackageFormat::TarGz },
            url,
        },
        memory_mb: 64,
        timeout_ms: 10_000,
        concurrency: 2,
        instances,
        env: Default::default(),
    }
}

fn state_of(report: &Report, version: Uuid) -> Option<(InstanceState, Option<String>)> {
    report.versions.iter().find(|s| s.version_id == version).map(|s| (s.state, s.error.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_assigned_versions_retries_failures_and_ships_their_usage() {
    let cp = FakeCp::start().await;
    // Stands in for an object store behind presigned URLs: it must never see the credential.
    let store = FakeCp::start().await;
    store.state.open_code.store(true, Ordering::Relaxed);

    let echo = common::wasm("echo.c");
    let status = common::wasm("status.wat");
    let noop = common::wasm("noop.wat");
    let script = "#!/bin/sh\nprintf 'Content-Type: text/plain\\n\\n'\necho \"process $NIMBUS_VERSION\"\nid -u\n";
    let tarball = process_package(script);
    let (sha_echo, sha_status, sha_noop, sha_tar) =
        (sha256_hex(&echo), sha256_hex(&status), sha256_hex(&noop), sha256_hex(&tarball));
    // The control plane names its own store by path; the object store by absolute URL.
    let code_url = |sha: &str| FakeCp::code_path(sha);
    {
        let mut code = cp.state.code.lock().unwrap();
        code.insert(sha_echo.clone(), echo.clone());
        code.insert(sha_tar.clone(), tarball.clone());
        // Other bytes than the assignment names, of the very same size: a tampered package.
        let mut tampered = noop.clone();
        tampered[noop.len() - 1] ^= 0xff;
        code.insert(sha_noop.clone(), tampered);
    }
    store.state.code.lock().unwrap().insert(sha_status.clone(), status.clone());
    let warm = assignment(Runtime::Wasm, &echo, &sha_echo, code_url(&sha_echo), 1);
    let on_demand =
        assignment(Runtime::Wasm, &status, &sha_status, format!("{}/agent/v1/code/{sha_status}", store.url), 0);
    let process = assignment(Runtime::Process, &tarball, &sha_tar, code_url(&sha_tar), 1);
    let bad = assignment(Runtime::Wasm, &noop, &sha_noop, code_url(&sha_noop), 1);
    let all = vec![warm.clone(), on_demand.clone(), process.clone(), bad.clone()];
    cp.assign(all.clone());

    let data = scratch("serve");
    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_JOIN_TOKEN", TOKEN));
    vars.push(("NIMBUS_AGENT_REPORT_INTERVAL", "100ms"));
    let agent = AgentProcess::start(&vars);
    let listen = agent.wait_line("listening on ");
    agent.wait_line("joined as node ");

    until("three versions are ready and the tampered one failed", || {
        cp.last_report().is_some_and(|r| {
            [&warm, &on_demand, &process]
                .iter()
                .all(|a| state_of(&r, a.version_id).is_some_and(|s| s.0 == InstanceState::Ready))
                && state_of(&r, bad.version_id).is_some_and(|s| s.0 == InstanceState::Failed)
        })
    })
    .await;
    let report = cp.last_report().unwrap();
    let (_, error) = state_of(&report, bad.version_id).unwrap();
    assert!(
        error.as_deref().unwrap_or_default().starts_with(&format!("sha256 mismatch: expected {sha_noop} got ")),
        "{error:?}"
    );
    let warm_status = report.versions.iter().find(|s| s.version_id == warm.version_id).unwrap();
    assert_eq!(warm_status.instances, 1);
    let on_demand_status = report.versions.iter().find(|s| s.version_id == on_demand.version_id).unwrap();
    assert_eq!(on_demand_status.instances, 0, "no instance until the first invocation");

    // The credential goes to the control plane's code endpoint, and nowhere else.
    assert!(
        cp.state.code_auth.lock().unwrap().iter().all(|a| a.as_deref().is_some_and(|a| a.starts_with("Bearer nnc_")))
    );
    assert_eq!(store.state.code_auth.lock().unwrap().as_slice(), [None]);

    let http = reqwest::Client::new();
    let secret = cp.state.invoke_secret.clone();
    let invoke = |a: &nimbus_protocol::Assignment| {
        http.post(format!("{listen}/invoke/{}/p", a.version_id)).bearer_auth(&secret).body("ping").send()
    };
    let mut ids = Vec::new();
    let mut call = async |a: &nimbus_protocol::Assignment, status: u16, cold: &str| {
        let r = invoke(a).await.unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["x-nimbus-cold-start"], cold);
        ids.push(r.headers()["x-nimbus-invocation-id"].to_str().unwrap().parse::<Uuid>().unwrap());
        r.text().await.unwrap()
    };
    assert!(call(&warm, 200, "false").await.starts_with("ping\n"));
    call(&on_demand, 404, "true").await;
    call(&on_demand, 404, "false").await;
    let answer = call(&process, 200, "false").await;
    let (first, uid) = answer.split_once('\n').unwrap();
    assert_eq!(first, "process 1");
    if rustix::process::geteuid().is_root() {
        // The agent's default: a uid of the pool, not the agent's own.
        let base: u32 = vars.iter().find(|(k, _)| *k == "NIMBUS_AGENT_PROCESS_UID_BASE").unwrap().1.parse().unwrap();
        let uid: u32 = uid.trim().parse().unwrap();
        assert!((base..base + UIDS).contains(&uid), "{uid} is not in {base}..{}", base + UIDS);
    }

    // The right bytes appear; the next pass retries and the version becomes ready.
    cp.state.code.lock().unwrap().insert(sha_noop.clone(), noop.clone());
    cp.assign(all);
    until("the repaired version is ready", || {
        cp.last_report().is_some_and(|r| state_of(&r, bad.version_id).is_some_and(|s| s.0 == InstanceState::Ready))
    })
    .await;
    call(&bad, 200, "false").await;

    // Versions no longer assigned are gone.
    cp.assign(vec![warm.clone()]);
    until("only one version is left", || cp.last_report().is_some_and(|r| r.versions.len() == 1)).await;
    assert_eq!(invoke(&on_demand).await.unwrap().status(), 404);

    let status = tokio::task::spawn_blocking(move || agent.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let mut shipped: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    shipped.sort();
    ids.sort();
    assert_eq!(shipped, ids, "every invocation billed once, all shipped before the agent left");
    let cold: Vec<bool> =
        cp.records().iter().filter(|r| r.version_id == on_demand.version_id).map(|r| r.cold_start).collect();
    assert_eq!(cold, [true, false]);
    assert!(cp.logs().iter().any(|l| l.line == "echoed 4 bytes"));
    assert_eq!(cp.state.leaves.load(Ordering::Relaxed), 1);
    let metrics: u64 = cp.state.reports.lock().unwrap().iter().flat_map(|r| r.metrics.iter()).map(|m| m.requests).sum();
    assert!(metrics >= 4, "per-second metrics counted the invocations ({metrics})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_renewed_before_they_expire_and_a_refused_one_rejoins() {
    let cp = FakeCp::start().await;
    *cp.state.credential_ttl.lock().unwrap() = chrono::Duration::milliseconds(600);
    let data = scratch("renew");
    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_JOIN_TOKEN", TOKEN));
    let agent = AgentProcess::start(&vars);
    agent.wait_line("joined as node ");
    until("the credential was renewed twice", || cp.state.renews.load(Ordering::Relaxed) >= 2).await;
    // The agent writes the renewed credential after the control plane answered: wait for the file
    // to hold the one the control plane handed out last.
    until("the renewed credential is stored", || {
        let current = cp.state.credential.lock().unwrap().clone();
        std::fs::read_to_string(data.join("identity.json")).is_ok_and(|stored| stored.contains(current.as_str()))
    })
    .await;

    *cp.state.credential_ttl.lock().unwrap() = chrono::Duration::hours(1);
    cp.revoke();
    until("the agent joined again", || cp.state.joins.lock().unwrap().len() == 2).await;
    let reports = cp.state.reports.lock().unwrap().len();
    until("reports flow again", || cp.state.reports.lock().unwrap().len() > reports + 2).await;
    let status = tokio::task::spawn_blocking(move || agent.terminate()).await.unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_running_invocations_finish_and_bills_them() {
    let cp = FakeCp::start().await;
    let script = "#!/bin/sh\nsleep 1\nprintf 'Content-Type: text/plain\\n\\nslow done\\n'\n";
    let tarball = process_package(script);
    let sha = sha256_hex(&tarball);
    cp.state.code.lock().unwrap().insert(sha.clone(), tarball.clone());
    let slow = assignment(Runtime::Process, &tarball, &sha, FakeCp::code_path(&sha), 1);
    cp.assign(vec![slow.clone()]);

    let data = scratch("drain");
    let mut vars = env(&cp, &data);
    vars.push(("NIMBUS_AGENT_JOIN_TOKEN", TOKEN));
    vars.push(("NIMBUS_AGENT_REPORT_INTERVAL", "50ms"));
    // Shipping only at the drain: the record must come from the final flush.
    vars.push(("NIMBUS_AGENT_USAGE_FLUSH_INTERVAL", "1h"));
    let agent = AgentProcess::start(&vars);
    let listen = agent.wait_line("listening on ");
    agent.wait_line("joined as node ");
    until("the version is ready", || {
        cp.last_report().is_some_and(|r| state_of(&r, slow.version_id).is_some_and(|s| s.0 == InstanceState::Ready))
    })
    .await;

    let request = reqwest::Client::new()
        .post(format!("{listen}/invoke/{}", slow.version_id))
        .bearer_auth(&cp.state.invoke_secret)
        .send();
    let running = tokio::spawn(request);
    until("the invocation runs", || cp.last_report().is_some_and(|r| r.in_flight == 1)).await;
    let exit = tokio::task::spawn_blocking(move || agent.terminate());

    let response = running.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let id: Uuid = response.headers()["x-nimbus-invocation-id"].to_str().unwrap().parse().unwrap();
    assert_eq!(response.text().await.unwrap(), "slow done\n");
    let status = exit.await.unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(cp.records().iter().map(|r| r.invocation_id).collect::<Vec<_>>(), [id], "billed once, at the drain");
    assert_eq!(cp.state.leaves.load(Ordering::Relaxed), 1);
    let last = cp.last_report().unwrap();
    assert_eq!(last.metrics.iter().map(|m| m.requests).sum::<u64>(), 1, "the last report counts the last second");
}
