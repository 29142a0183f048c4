//! The usage spool and its shipper against a stand-in control plane over real HTTP: records
//! written and the agent "crashing" (dropped without shipping, a torn last line), reopened, and
//! every record shipped exactly once; a failing control plane, a refused join and a 400 keep the
//! segment and get it again; a 422 sets aside only the records refused on their own.

mod fake_cp;

use std::{
    collections::HashSet,
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use fake_cp::{FakeCp, TOKEN};
use nimbus_protocol::{Capacity, LogLine, UsageBatch, UsageRecord, UsageStatus};
use nimbus_worker_agent::{
    client::{CallError, ControlPlane, NodeInfo},
    config::Secret,
    shipper::{ShipError, Shipper},
    spool::{Spool, SpoolEntry},
};
use uuid::Uuid;

fn scratch(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("usage-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entry(log_lines: u32) -> SpoolEntry {
    let id = Uuid::now_v7();
    let tenant = Uuid::now_v7();
    SpoolEntry {
        record: UsageRecord {
            invocation_id: id,
            tenant_id: tenant,
            function_id: tenant,
            version_id: tenant,
            version: 1,
            started_at: Utc::now(),
            duration_us: 1500,
            billed_ms: 2,
            memory_mb: 128,
            http_status: 200,
            status: UsageStatus::Ok,
            cold_start: false,
        },
        logs: (0..log_lines)
            .map(|seq| LogLine {
                invocation_id: id,
                tenant_id: tenant,
                function_id: tenant,
                version: 1,
                seq,
                time: Utc::now(),
                line: format!("line {seq}"),
            })
            .collect(),
    }
}

async fn client(cp: &FakeCp, dir: &std::path::Path) -> Arc<ControlPlane> {
    let node = NodeInfo {
        name: "n1".into(),
        zone: "local".into(),
        capacity: Capacity { memory_mb: 1024, cpu_millis: 1000, instance_slots: 8 },
        invoke_url: "http://127.0.0.1:1".into(),
        labels: Default::default(),
    };
    let client = ControlPlane::new(cp.url.clone(), Some(Secret::new(TOKEN)), node, dir.join("identity.json")).unwrap();
    client.establish().await.unwrap();
    Arc::new(client)
}

fn segments(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn spooled_usage_survives_a_crash_and_is_shipped_exactly_once() {
    let dir = scratch("crash");
    let usage = dir.join("usage");
    let written: Vec<SpoolEntry> = (0..25).map(|i| entry(i % 3)).collect();
    {
        let spool = Spool::open(&usage, 1000).unwrap();
        for e in &written[..10] {
            spool.append(e).unwrap();
        }
        spool.rotate().unwrap();
        for e in &written[10..] {
            spool.append(e).unwrap();
        }
        // The "crash": the spool goes away without shipping or closing, mid-write of a line.
    }
    let open = std::fs::read_dir(&usage).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().unwrap() == "open");
    let mut f = std::fs::OpenOptions::new().append(true).open(open.unwrap()).unwrap();
    f.write_all(br#"{"record":{"invocation_id":"0190"#).unwrap();
    drop(f);

    let cp = FakeCp::start().await;
    let spool = Arc::new(Spool::open(&usage, 1000).unwrap());
    assert_eq!(segments(&usage).iter().filter(|s| s.ends_with(".jsonl")).count(), 2, "both old segments sealed");
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    shipper.ship_all().await.unwrap();

    let got: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    let want: Vec<Uuid> = written.iter().map(|e| e.record.invocation_id).collect();
    assert_eq!(got, want, "every record once, in order, the torn line skipped");
    let logs: HashSet<(Uuid, u32)> = cp.logs().iter().map(|l| (l.invocation_id, l.seq)).collect();
    assert_eq!(logs.len(), written.iter().map(|e| e.logs.len()).sum::<usize>());
    assert_eq!(cp.logs().len(), logs.len(), "no log line twice");
    assert!(
        segments(&usage).iter().all(|s| s.ends_with(".open")),
        "shipped segments are deleted: {:?}",
        segments(&usage)
    );

    // Nothing is sent twice: another round has nothing to ship.
    let batches = cp.state.batches.lock().unwrap().len();
    shipper.ship_all().await.unwrap();
    assert_eq!(cp.state.batches.lock().unwrap().len(), batches);
}

#[tokio::test]
async fn a_failing_control_plane_keeps_the_segment_and_gets_it_again() {
    let dir = scratch("failing");
    let cp = FakeCp::start().await;
    let spool = Arc::new(Spool::open(&dir.join("usage"), 1000).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    let written: Vec<SpoolEntry> = (0..5).map(|_| entry(1)).collect();
    for e in &written {
        spool.append(e).unwrap();
    }
    cp.state.fail_usage.store(true, Ordering::Relaxed);
    assert!(shipper.ship_all().await.is_err());
    assert_eq!(spool.sealed().unwrap().len(), 1, "the segment stays");
    assert!(cp.records().is_empty());

    // The shipper's own loop retries with backoff until the control plane takes the batch.
    let running = tokio::spawn(shipper.clone().run(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cp.state.fail_usage.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Until the loop has also deleted the segment (it does so once the answer is in, after the
    // control plane stored the batch).
    while cp.records().len() < written.len() || !spool.sealed().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the segment was not shipped after the control plane recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.abort();
    let got: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    assert_eq!(got, written.iter().map(|e| e.record.invocation_id).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_full_batch_ships_before_the_interval_and_a_401_rejoins() {
    let dir = scratch("batch");
    let cp = FakeCp::start().await;
    let spool = Arc::new(Spool::open(&dir.join("usage"), 3).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    assert_eq!(cp.state.joins.lock().unwrap().len(), 1);
    let running = tokio::spawn(shipper.clone().run(Duration::from_secs(3600)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cp.revoke();
    for _ in 0..3 {
        spool.append(&entry(0)).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while cp.records().len() < 3 {
        assert!(Instant::now() < deadline, "a full batch was not shipped at once");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.abort();
    assert_eq!(cp.state.joins.lock().unwrap().len(), 2, "the refused credential led to one re-join");
}

/// The batches set aside in the `.rejected` files of `dir`.
fn set_aside(dir: &std::path::Path) -> Vec<UsageBatch> {
    segments(dir)
        .iter()
        .filter(|s| s.ends_with(".rejected"))
        .flat_map(|s| {
            let text = std::fs::read_to_string(dir.join(s)).unwrap();
            text.lines().map(|l| serde_json::from_str::<UsageBatch>(l).unwrap()).collect::<Vec<_>>()
        })
        .collect()
}

fn mode(path: &std::path::Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
}

#[tokio::test]
async fn a_segment_refused_as_invalid_is_set_aside_record_by_record_and_does_not_hold_up_the_rest() {
    let dir = scratch("rejected");
    let cp = FakeCp::start().await;
    let usage = dir.join("usage");
    let spool = Arc::new(Spool::open(&usage, 1000).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    let refused = entry(0);
    spool.append(&refused).unwrap();
    cp.state.reject_usage.store(true, Ordering::Relaxed);
    shipper.ship_all().await.unwrap();
    let aside = set_aside(&usage);
    assert_eq!(aside.len(), 1);
    assert_eq!(aside[0].records, std::slice::from_ref(&refused.record));
    let file = segments(&usage).into_iter().find(|s| s.ends_with(".rejected")).unwrap();
    assert_eq!(mode(&usage.join(file)), 0o600);
    assert_eq!(mode(&usage), 0o700, "the spool holds every tenant's usage");

    cp.state.reject_usage.store(false, Ordering::Relaxed);
    let later = entry(1);
    spool.append(&later).unwrap();
    shipper.ship_all().await.unwrap();
    assert_eq!(cp.records().iter().map(|r| r.invocation_id).collect::<Vec<_>>(), [later.record.invocation_id]);
    assert_eq!(set_aside(&usage).len(), 1, "kept for an operator");
}

#[tokio::test]
async fn one_invalid_record_is_set_aside_alone_and_the_good_ones_are_shipped() {
    let dir = scratch("poisoned");
    let cp = FakeCp::start().await;
    let usage = dir.join("usage");
    let spool = Arc::new(Spool::open(&usage, 1000).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    let written: Vec<SpoolEntry> = (0..9).map(|i| entry(i % 3)).collect();
    for e in &written {
        spool.append(e).unwrap();
    }
    let bad = written[5].record.clone();
    cp.state.poisoned.lock().unwrap().insert(bad.invocation_id);
    shipper.ship_all().await.unwrap();

    let good: Vec<Uuid> =
        written.iter().map(|e| e.record.invocation_id).filter(|id| *id != bad.invocation_id).collect();
    let shipped: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    assert_eq!(shipped, good, "every other record once, in order");
    let lines: HashSet<(Uuid, u32)> = cp.logs().iter().map(|l| (l.invocation_id, l.seq)).collect();
    assert_eq!(lines.len(), written.iter().map(|e| e.logs.len()).sum::<usize>(), "every log line (none is refused)");
    let aside = set_aside(&usage);
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!((aside[0].records.as_slice(), aside[0].logs.len()), (std::slice::from_ref(&bad), 0));
    assert!(spool.sealed().unwrap().is_empty(), "the segment is done with");
    // Halving found it: a handful of refused batches, not one per record.
    assert!(cp.state.refused_batches.load(Ordering::Relaxed) <= 5);
}

#[tokio::test]
async fn a_400_keeps_the_segment_and_it_ships_once_the_control_plane_takes_it() {
    let dir = scratch("bad-request");
    let cp = FakeCp::start().await;
    let usage = dir.join("usage");
    let spool = Arc::new(Spool::open(&usage, 1000).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    let written: Vec<SpoolEntry> = (0..3).map(|_| entry(1)).collect();
    for e in &written {
        spool.append(e).unwrap();
    }
    // Say, an agent newer than its control plane during an upgrade.
    cp.state.usage_status.store(400, Ordering::Relaxed);
    let err = shipper.ship_all().await.unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    assert_eq!(spool.sealed().unwrap().len(), 1, "the segment stays");
    assert!(set_aside(&usage).is_empty(), "nothing is set aside");

    cp.state.usage_status.store(0, Ordering::Relaxed);
    shipper.ship_all().await.unwrap();
    let got: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    assert_eq!(got, written.iter().map(|e| e.record.invocation_id).collect::<Vec<_>>());
    assert!(spool.sealed().unwrap().is_empty());
}

#[tokio::test]
async fn a_refused_join_keeps_the_usage_until_the_node_can_join_again() {
    let dir = scratch("join-refused");
    let cp = FakeCp::start().await;
    let usage = dir.join("usage");
    let spool = Arc::new(Spool::open(&usage, 1000).unwrap());
    let shipper = Shipper::new(spool.clone(), client(&cp, &dir).await);
    let written: Vec<SpoolEntry> = (0..4).map(|_| entry(2)).collect();
    for e in &written {
        spool.append(e).unwrap();
    }
    // The credential is refused (say, the node was removed) and so is the join token.
    cp.revoke();
    cp.state.token_revoked.store(true, Ordering::Relaxed);
    match shipper.ship_all().await {
        Err(ShipError::Call(e @ CallError::JoinRefused { status: 401, .. })) => {
            assert!(e.is_credential_problem());
            assert!(e.to_string().contains("new join token"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cp.state.refused_joins.load(Ordering::Relaxed), 1);
    assert_eq!(spool.sealed().unwrap().len(), 1, "the segment stays");
    assert!(set_aside(&usage).is_empty(), "nothing is set aside");
    assert!(cp.records().is_empty());

    // A new join token (here: the old one valid again) and the next round ships it all.
    cp.state.token_revoked.store(false, Ordering::Relaxed);
    shipper.ship_all().await.unwrap();
    let got: Vec<Uuid> = cp.records().iter().map(|r| r.invocation_id).collect();
    assert_eq!(got, written.iter().map(|e| e.record.invocation_id).collect::<Vec<_>>());
    assert_eq!(cp.logs().len(), 8);
    assert!(spool.sealed().unwrap().is_empty());
}
