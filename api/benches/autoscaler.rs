//! Autoscaler tick time at fleet scale (target: a tick with 10,000 active versions in < 50 ms).
//!
//! `cargo bench -p nimbus-api --bench autoscaler` (release profile). Two parts, one run:
//!
//! 1. **Pure decision + placement**, [`run::compute`], over a synthetic fleet of 100 nodes in 3
//!    zones (64 GiB and 256 instance slots each, the agent's default slots; spot, reserved, GPU
//!    and SSD labels, one tenant's dedicated pool, one node draining) and 10,000 routed versions
//!    (and 1,000 for comparison, on the same nodes) with 60 s of per-second concurrency samples
//!    each: some never see traffic (initial scale 0 or 1), some stop and scale to zero, most
//!    follow waves, a few burst into panic mode, and a few idle ones get requests held by a
//!    gateway. One cold tick (no state, nothing assigned), then steady state: every tick feeds
//!    the previous tick's assignments back as `current` and its placed counts as `ready` (the
//!    agents caught up), with the clock 2 s on; 31 warm-up ticks (past the 60 s stable window, so
//!    the panic of everything starting at once is over), then 30 measured. For the breakdown the
//!    measured ticks also time [`placement::place`] alone on the demands `compute` decided, and
//!    one scan of all assignment rows per version (what placement does to count a version's
//!    placed instances).
//! 2. **The full tick with PostgreSQL**: a scratch database on the machine's PostgreSQL
//!    (`NIMBUS_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`, as the
//!    whole-system tests), migrated, filled with the 10,000-version fleet by SQL, then
//!    [`run::Autoscaler::tick`] paced as the real loop paces it (every 2 s; a cold tick, 31
//!    warm-up ticks, 30 measured), each followed, as in the loop, by
//!    [`run::Autoscaler::refresh_if_due`] (the periodic full re-read, timed on its own), with
//!    the agents' seconds recorded into its [`Stats`] and the nodes' reported versions following
//!    the assignments between ticks (untimed). Then the
//!    same steady state tick by tick through
//!    [`run::load`], [`run::merge_published`], [`run::compute`] and [`run::store`] (as a leader
//!    holding the advisory lock, which `store` checks), each timed. The database is dropped at
//!    the end. The server's Prometheus recorder is installed, so that the tick's per-version
//!    gauges cost what they cost in the server. `NIMBUS_BENCH_SKIP_DB=1` skips this part.

use std::{
    collections::{BTreeMap, HashMap},
    str::FromStr,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeZone, Utc};
use nimbus_api::{
    autoscaler::{PlacementRules, Priority, Scaling, kpa, placement, run},
    db,
    nodes::Stats,
};
use nimbus_protocol::{LATENCY_BUCKETS_MS, VersionMetrics};
use sqlx::{Connection, postgres::PgConnectOptions};
use uuid::Uuid;

/// Wall-clock start of the pure part's synthetic clock (ms since the epoch).
const T0_MS: u64 = 1_800_000_000_000;
/// Ticks of the pure part after the cold one before measuring: longer than the default stable
/// window, so that the start (every version new at once) is out of the panic windows.
const WARMUP_TICKS: usize = 31;
/// Measured steady-state ticks of the pure part.
const PURE_TICKS: usize = 30;
/// Measured steady-state ticks of `Autoscaler::tick` against PostgreSQL (after as many warm-up
/// ticks as the pure part, paced in real time).
const DB_TICKS: usize = 30;
/// Steady-state ticks of the load/compute/store breakdown against PostgreSQL.
const DB_BREAKDOWN_TICKS: usize = 10;
/// The real loop's period.
const TICK: Duration = run::TICK;
/// Seconds of samples per version.
const HISTORY_S: u64 = 60;
/// Nodes.
const NODES: usize = 100;
/// Versions per tenant.
const PER_TENANT: usize = 20;

fn mix(mut x: u64) -> u64 {
    // splitmix64: deterministic per-version variety without a dependency.
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A number in `lo..hi` drawn from `h`.
fn draw(h: u64, lo: f64, hi: f64) -> f64 {
    lo + (h % 10_000) as f64 / 10_000.0 * (hi - lo)
}

fn id(kind: u128, n: usize) -> Uuid {
    Uuid::from_u128((kind << 96) | n as u128)
}

/// Concurrency a version sees over time (seconds since the fleet's start).
#[derive(Debug, Clone, Copy)]
enum Load {
    /// No traffic at all.
    Idle,
    /// `c` in flight until `until_s`, nothing after.
    Stops { c: f64, until_s: f64 },
    /// `base × (1 + 0.5 sin)`, with its own period and phase.
    Wave { base: f64, period_s: f64, phase: f64 },
    /// `base`, and `mult × base` for `len_s` every `every_s`.
    Bursts { base: f64, every_s: f64, len_s: f64, mult: f64, phase_s: f64 },
}

impl Load {
    fn at(&self, t_s: f64) -> f64 {
        match *self {
            Load::Idle => 0.0,
            Load::Stops { c, until_s } => {
                if t_s < until_s {
                    c
                } else {
                    0.0
                }
            }
            Load::Wave { base, period_s, phase } => {
                base * (1.0 + 0.5 * (std::f64::consts::TAU * t_s / period_s + phase).sin())
            }
            Load::Bursts { base, every_s, len_s, mult, phase_s } => {
                if (t_s + phase_s).rem_euclid(every_s) < len_s {
                    base * mult
                } else {
                    base
                }
            }
        }
    }
}

/// One version of the fleet, with what the database needs to store it.
struct Spec {
    input: run::VersionInput,
    scaling: Scaling,
    concurrency: u32,
    load: Load,
    /// Gets requests held by a gateway now and then (an idle version at zero).
    pokes: bool,
}

struct Fleet {
    specs: Vec<Spec>,
    nodes: Vec<placement::Node>,
    tenants: Vec<Uuid>,
    /// Pool name → tenant.
    pools: Vec<(String, Uuid)>,
    start_ms: u64,
}

fn nodes() -> Vec<placement::Node> {
    (0..NODES)
        .map(|i| {
            let mut labels = BTreeMap::new();
            match i {
                0..30 => labels.insert("pool".into(), "spot".into()),
                30..40 => labels.insert("pool".into(), "reserved".into()),
                96..100 => labels.insert("pool".into(), "acme".into()),
                _ => None,
            };
            if (90..96).contains(&i) {
                labels.insert("accelerator".into(), "gpu".into());
            }
            if i % 2 == 0 {
                labels.insert("disk".into(), "ssd".into());
            }
            placement::Node {
                id: id(4, i),
                zone: ["zone-a", "zone-b", "zone-c"][i % 3].into(),
                memory_mb: 65_536,
                slots: 256,
                schedulable: i != 77, // one node draining
                labels,
                dedicated_to: (i >= 96).then(|| id(1, 0)),
            }
        })
        .collect()
}

fn fleet(versions: usize, start_ms: u64) -> Fleet {
    let tenants: Vec<Uuid> = (0..versions.div_ceil(PER_TENANT)).map(|t| id(1, t)).collect();
    let specs = (0..versions)
        .map(|i| {
            let h = mix(i as u64);
            let class = i % 100;
            let mut scaling = Scaling::default();
            let mut concurrency = 10;
            let load = match class {
                0..30 => {
                    scaling.initial_scale = Some(0);
                    Load::Idle
                }
                30..40 => Load::Idle,
                40..55 => {
                    scaling.stable_window_s = Some(20);
                    scaling.scale_to_zero_grace_s = Some(10);
                    Load::Stops { c: draw(h, 2.0, 10.0), until_s: draw(h >> 16, 10.0, 30.0) }
                }
                55..90 => {
                    concurrency = match h % 10 {
                        0 => 4,
                        1 => 50,
                        _ => 10,
                    };
                    Load::Wave {
                        base: draw(h, 0.5, 18.0),
                        period_s: draw(h >> 16, 30.0, 300.0),
                        phase: draw(h >> 32, 0.0, std::f64::consts::TAU),
                    }
                }
                90..98 => Load::Wave {
                    base: draw(h, 20.0, 80.0),
                    period_s: draw(h >> 16, 60.0, 300.0),
                    phase: draw(h >> 32, 0.0, std::f64::consts::TAU),
                },
                _ => Load::Bursts {
                    base: draw(h, 2.0, 8.0),
                    every_s: draw(h >> 16, 30.0, 60.0),
                    len_s: 6.0,
                    mult: draw(h >> 32, 12.0, 25.0),
                    phase_s: draw(h >> 40, 0.0, 60.0),
                },
            };
            let mut rules = PlacementRules::default();
            match h % 50 {
                0 => rules.priority = Priority::Critical,
                1..=5 => rules.priority = Priority::Low,
                _ => {}
            }
            if h % 10 == 3 {
                rules.preferred.insert("disk".into(), "ssd".into());
            }
            if (mix(h) % 200 == 7) && class < 90 {
                rules.required.insert("accelerator".into(), "gpu".into());
            }
            let memory_mb = match (h >> 8) % 20 {
                0..14 => 128,
                14..19 => 256,
                _ => 512,
            };
            let tenant = tenants[i / PER_TENANT];
            let input = run::VersionInput {
                id: id(3, i),
                tenant,
                function: id(2, i),
                label: (format!("fn-{i:05}"), 1),
                memory_mb,
                kpa: scaling.config(concurrency, 0, 0),
                rules,
                routed: true,
            };
            Spec { input, scaling, concurrency, load, pokes: class == 0 }
        })
        .collect();
    Fleet { specs, nodes: nodes(), tenants, pools: vec![("acme".into(), id(1, 0))], start_ms }
}

impl Fleet {
    fn inputs(&self) -> run::Inputs {
        run::Inputs {
            versions: self.specs.iter().map(|s| s.input.clone()).collect(),
            nodes: self.nodes.clone(),
            dedicated: self.pools.iter().map(|(_, t)| *t).collect(),
            ..run::Inputs::default()
        }
    }

    fn load_at(&self, s: &Spec, second_ms: u64) -> f64 {
        s.load.at((second_ms as f64 - self.start_ms as f64) / 1000.0)
    }

    /// The last [`HISTORY_S`] whole seconds before `now_ms` with any traffic, per version.
    fn samples(&self, now_ms: u64) -> HashMap<Uuid, Vec<(u64, f64)>> {
        let last = now_ms / 1000 * 1000;
        self.specs
            .iter()
            .filter_map(|s| {
                let series: Vec<(u64, f64)> = (1..=HISTORY_S)
                    .rev()
                    .map(|k| last - k * 1000)
                    .map(|t| (t, self.load_at(s, t)))
                    .filter(|(_, c)| *c > 0.0)
                    .collect();
                (!series.is_empty()).then_some((s.input.id, series))
            })
            .collect()
    }

    /// Requests held by gateways at tick `n`: a few idle versions at zero get a first request.
    fn held(&self, n: usize) -> HashMap<Uuid, u32> {
        self.specs
            .iter()
            .enumerate()
            .filter(|(i, s)| s.pokes && (i / 100 + n) % 25 == 0)
            .map(|(_, s)| (s.input.id, 3))
            .collect()
    }
}

/// The demands `compute` handed to placement, rebuilt from what it decided.
fn demands(inputs: &run::Inputs, outcome: &run::Outcome) -> Vec<placement::Demand> {
    let by_id: HashMap<Uuid, &run::VersionInput> = inputs.versions.iter().map(|v| (v.id, v)).collect();
    outcome.decided.iter().map(|d| by_id[&d.version].demand(d.desired, inputs)).collect()
}

fn placed_per_version(a: &placement::Assignments) -> HashMap<Uuid, u32> {
    let mut m = HashMap::new();
    for ((_, v), n) in a {
        *m.entry(*v).or_insert(0) += n;
    }
    m
}

fn changed_rows(before: &placement::Assignments, after: &placement::Assignments) -> usize {
    after.iter().filter(|(k, n)| before.get(k) != Some(n)).count()
        + before.keys().filter(|k| !after.contains_key(k)).count()
}

/// Nearest-rank percentile of `xs` (sorted here), in ms.
fn pct(xs: &[Duration], p: f64) -> f64 {
    let mut v: Vec<Duration> = xs.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1].as_secs_f64() * 1000.0
}

fn max_ms(xs: &[Duration]) -> f64 {
    xs.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// What the measured ticks decided, tick by tick.
#[derive(Default)]
struct Seen {
    panicking: Vec<usize>,
    at_zero: Vec<usize>,
    parked: Vec<usize>,
    unplaced: Vec<u32>,
    scale_ups: Vec<usize>,
    scale_downs: Vec<usize>,
    changed: Vec<usize>,
    instances: Vec<u32>,
}

impl Seen {
    fn note(&mut self, o: &run::Outcome, before: &placement::Assignments) {
        let count = |f: &dyn Fn(&run::Decided) -> bool| o.decided.iter().filter(|d| f(d)).count();
        self.panicking.push(count(&|d| d.panicking));
        self.at_zero.push(count(&|d| d.desired == 0));
        self.scale_ups.push(count(&|d| d.desired > d.ready));
        self.scale_downs.push(count(&|d| d.desired < d.ready));
        self.parked.push(o.assignments.values().filter(|n| **n == 0).count());
        self.unplaced.push(o.decided.iter().map(|d| d.desired.saturating_sub(d.placed)).sum());
        self.changed.push(changed_rows(before, &o.assignments));
        self.instances.push(o.assignments.values().sum());
    }
}

fn median<T: Copy + Ord>(xs: &[T]) -> T {
    let mut v = xs.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// Part 1 for `versions` versions: one row of the main table, one of the breakdown.
fn pure(versions: usize) -> String {
    let fleet = fleet(versions, T0_MS);
    let mut inputs = fleet.inputs();
    let mut states: HashMap<Uuid, kpa::State> = HashMap::new();

    // Cold: no state, nothing assigned, nothing ready.
    let samples = fleet.samples(T0_MS);
    let held = fleet.held(0);
    let t = Instant::now();
    let mut outcome = run::compute(&inputs, &mut states, &samples, &held, T0_MS);
    let cold = t.elapsed();
    assert_eq!(outcome.decided.len(), versions, "every routed version is active");
    let mut seen = Seen::default();

    let (mut ticks, mut place_only, mut scans) = (Vec::new(), Vec::new(), Vec::new());
    for n in 1..=WARMUP_TICKS + PURE_TICKS {
        let now = T0_MS + n as u64 * TICK.as_millis() as u64;
        inputs.ready = placed_per_version(&outcome.assignments);
        inputs.current = outcome.assignments;
        let samples = fleet.samples(now);
        let held = fleet.held(n);
        let t = Instant::now();
        outcome = run::compute(&inputs, &mut states, &samples, &held, now);
        let took = t.elapsed();
        assert_eq!(outcome.decided.len(), versions, "every routed version is active");
        if n <= WARMUP_TICKS {
            continue;
        }
        ticks.push(took);
        seen.note(&outcome, &inputs.current);
        // Placement alone, on the demands this tick decided and the same starting point.
        let d = demands(&inputs, &outcome);
        let t = Instant::now();
        let p = placement::place(&inputs.nodes, &d, &inputs.current);
        place_only.push(t.elapsed());
        assert_eq!(p.assignments, outcome.assignments, "placement alone places the same");
        // One scan of every assignment row per version, collecting that version's rows: what
        // placement does for a version's placed count (more than once per version).
        let t = Instant::now();
        let found: usize = d
            .iter()
            .map(|d| outcome.assignments.iter().filter(|((_, v), _)| *v == d.version).collect::<Vec<_>>().len())
            .sum();
        scans.push(t.elapsed());
        assert_eq!(found, outcome.assignments.len());
    }

    // What was measured is the real thing: instances placed, every kind of decision seen.
    let instances = median(&seen.instances);
    assert!(instances > versions as u32 / 2, "instances placed: {instances}");
    assert!(seen.panicking.iter().all(|n| *n > 0), "some versions panic at every tick");
    assert!(seen.at_zero.iter().all(|n| *n > 0), "some versions sit at zero");
    assert!(seen.parked.iter().all(|n| *n > 0), "some versions parked");
    let (ups, downs): (usize, usize) = (seen.scale_ups.iter().sum(), seen.scale_downs.iter().sum());
    assert!(ups > 0 && downs > 0, "ups {ups} downs {downs}");
    let p50 = pct(&ticks, 50.0);
    println!(
        "| {versions} | {} | {PURE_TICKS} | {:.2} ms | **{p50:.2} ms** | {:.2} ms | {:.2} ms | {} | {} | {} | {} | {} | {} | {} |",
        inputs.nodes.len(),
        cold.as_secs_f64() * 1000.0,
        pct(&ticks, 99.0),
        max_ms(&ticks),
        instances,
        outcome.assignments.len(),
        median(&seen.parked),
        median(&seen.changed),
        median(&seen.panicking),
        median(&seen.at_zero),
        median(&seen.unplaced),
    );
    let place = pct(&place_only, 50.0);
    // Per tick, placement's share of the tick (the machine drifts between the two timings).
    let mut share: Vec<f64> =
        ticks.iter().zip(&place_only).map(|(t, p)| p.as_secs_f64() / t.as_secs_f64() * 100.0).collect();
    share.sort_by(f64::total_cmp);
    format!(
        "| {versions} | {p50:.2} ms | {place:.2} ms | {:.0} % | {:.2} ms |",
        share[share.len() / 2],
        pct(&scans, 50.0),
    )
}

// ---------------------------------------------------------------------------------------------
// Part 2: the full tick against PostgreSQL.

fn admin_url() -> String {
    std::env::var("NIMBUS_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

fn at_ms(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms as i64).single().expect("a time")
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("JSON")
}

/// Inserts the fleet with the superuser connection, in a handful of statements.
async fn insert_fleet(c: &mut sqlx::PgConnection, f: &Fleet) -> anyhow::Result<()> {
    let names: Vec<String> = (0..f.tenants.len()).map(|t| format!("bench-t{t:04}")).collect();
    sqlx::query(
        "INSERT INTO tenants (id, name, display_name) SELECT t, n, n FROM unnest($1::uuid[], $2::text[]) AS u(t, n)",
    )
    .bind(&f.tenants)
    .bind(&names)
    .execute(&mut *c)
    .await?;
    let col = |g: &dyn Fn(&Spec) -> Uuid| f.specs.iter().map(g).collect::<Vec<Uuid>>();
    let (fns, tenants, versions) = (col(&|s| s.input.function), col(&|s| s.input.tenant), col(&|s| s.input.id));
    let packages: Vec<Uuid> = (0..f.specs.len()).map(|i| id(5, i)).collect();
    let aliases: Vec<Uuid> = (0..f.specs.len()).map(|i| id(6, i)).collect();
    let fn_names: Vec<String> = f.specs.iter().map(|s| s.input.label.0.clone()).collect();
    let memory: Vec<i32> = f.specs.iter().map(|s| s.input.memory_mb as i32).collect();
    let concurrency: Vec<i32> = f.specs.iter().map(|s| s.concurrency as i32).collect();
    let scaling: Vec<String> = f.specs.iter().map(|s| json(&s.scaling)).collect();
    let placement: Vec<String> = f.specs.iter().map(|s| json(&s.input.rules)).collect();
    let sha: Vec<String> = (0..f.specs.len()).map(|i| format!("{:064x}", mix(i as u64))).collect();
    // A version's frozen configuration, as `StoredConfig` in functions/versions.rs stores it.
    let configs: Vec<String> = f
        .specs
        .iter()
        .map(|s| {
            json(&serde_json::json!({
                "runtime": "wasm", "entry": null, "memory_mb": s.input.memory_mb, "timeout_ms": 10000,
                "concurrency": s.concurrency, "min_scale": 0, "max_scale": 0, "reserved_concurrency": null,
                "tags": {}, "environment": {}
            }))
        })
        .collect();
    sqlx::query(
        "INSERT INTO functions (id, tenant_id, name, runtime, memory_mb, timeout_ms, concurrency, min_scale, max_scale, \
         scaling, placement) \
         SELECT f, t, n, 'wasm', m, 10000, c, 0, 0, s::jsonb, p::jsonb \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int[], $5::int[], $6::text[], $7::text[]) AS u(f, t, n, m, c, s, p)",
    )
    .bind(&fns)
    .bind(&tenants)
    .bind(&fn_names)
    .bind(&memory)
    .bind(&concurrency)
    .bind(&scaling)
    .bind(&placement)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO packages (id, tenant_id, function_id, sha256, size, format) \
         SELECT p, t, f, s, 1234, 'wasm' FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) AS u(p, t, f, s)",
    )
    .bind(&packages)
    .bind(&tenants)
    .bind(&fns)
    .bind(&sha)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "UPDATE functions SET package_id = u.p, next_version = 2 FROM unnest($1::uuid[], $2::uuid[]) AS u(f, p) \
         WHERE functions.id = u.f",
    )
    .bind(&fns)
    .bind(&packages)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO versions (id, tenant_id, function_id, number, package_id, sha256, config, published_via) \
         SELECT v, t, f, 1, p, s, cfg::jsonb, 'user' \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[]) AS u(v, t, f, p, s, cfg)",
    )
    .bind(&versions)
    .bind(&tenants)
    .bind(&fns)
    .bind(&packages)
    .bind(&sha)
    .bind(&configs)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO aliases (id, tenant_id, function_id, name, routing) \
         SELECT a, t, f, 'live', '{\"weights\": [{\"version\": 1, \"weight\": 100}], \"sticky\": false, \"header_rules\": []}'::jsonb \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS u(a, t, f)",
    )
    .bind(&aliases)
    .bind(&tenants)
    .bind(&fns)
    .execute(&mut *c)
    .await?;
    sqlx::query(
        "INSERT INTO alias_routes (tenant_id, alias_id, function_id, version) \
         SELECT t, a, f, 1 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS u(a, t, f)",
    )
    .bind(&aliases)
    .bind(&tenants)
    .bind(&fns)
    .execute(&mut *c)
    .await?;
    for (i, n) in f.nodes.iter().enumerate() {
        sqlx::query(
            "INSERT INTO nodes (id, name, zone, memory_mb, cpu_millis, instance_slots, invoke_url, invoke_secret, state, \
             draining, labels) VALUES ($1, $2, $3, $4, 16000, $5, $6, 'secret', 'ready', $7, $8::jsonb)",
        )
        .bind(n.id)
        .bind(format!("worker-{i:03}"))
        .bind(&n.zone)
        .bind(n.memory_mb as i64)
        .bind(n.slots as i32)
        .bind(format!("http://10.0.{}.{}:9090", i / 250, i % 250))
        .bind(!n.schedulable)
        .bind(json(&n.labels))
        .execute(&mut *c)
        .await?;
    }
    for (pool, tenant) in &f.pools {
        sqlx::query("INSERT INTO pool_dedications (pool, tenant_id) VALUES ($1, $2)")
            .bind(pool)
            .bind(tenant)
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// What the agents would report after reconciling the assignments: every assigned version
/// ready with its instances (untimed, between ticks).
async fn report_ready(c: &mut sqlx::PgConnection) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE nodes n SET versions = coalesce((SELECT jsonb_agg(jsonb_build_object('version_id', a.version_id, \
         'state', 'ready', 'instances', a.instances, 'in_flight', 0, 'error', null) ORDER BY a.version_id) \
         FROM assignments a WHERE a.node_id = n.id), '[]'::jsonb), reported_revision = revision, last_heartbeat_at = now()",
    )
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// Records the agents' seconds in `(from_ms, to_ms]` (whole seconds) into `stats`.
fn record_seconds(stats: &Stats, f: &Fleet, from_ms: u64, to_ms: u64) {
    let buckets = vec![0; LATENCY_BUCKETS_MS.len() + 1];
    let mut second = (from_ms / 1000 + 1) * 1000;
    while second + 1000 <= to_ms {
        for s in &f.specs {
            let c = f.load_at(s, second);
            if c > 0.0 {
                let m = VersionMetrics {
                    version_id: s.input.id,
                    tenant_id: s.input.tenant,
                    second: at_ms(second),
                    concurrency: c,
                    requests: (c * 10.0) as u64,
                    errors: 0,
                    cold_starts: 0,
                    latency_buckets: buckets.clone(),
                };
                stats.record(s.input.tenant, &m);
            }
        }
        second += 1000;
    }
}

/// Sleeps until `next`: ticks start 2 s apart, or at once after one that ran longer (the real
/// loop's `interval` with `MissedTickBehavior::Delay`).
async fn pace(next: tokio::time::Instant) {
    tokio::time::sleep_until(next).await;
}

struct DbRun {
    cold: Duration,
    ticks: Vec<Duration>,
    writes: Vec<usize>,
    /// The periodic full re-reads between the measured ticks (`Autoscaler::refresh_if_due`).
    refreshes: Vec<Duration>,
    load: Vec<Duration>,
    load_full: Vec<Duration>,
    merge: Vec<Duration>,
    /// Per tick: rows `store` wrote, and decisions of them that changed (not only their KPA state).
    decisions: Vec<(usize, usize)>,
    compute: Vec<Duration>,
    store: Vec<Duration>,
    breakdown_cold: Duration,
    assignments: i64,
    instances: i64,
    states: i64,
}

async fn with_database(f: &Fleet, url: &str) -> anyhow::Result<DbRun> {
    let t = Instant::now();
    db::migrate(url).await?;
    let mut su = sqlx::PgConnection::connect_with(&PgConnectOptions::from_str(url)?).await?;
    insert_fleet(&mut su, f).await?;
    eprintln!("database filled in {:.1} s", t.elapsed().as_secs_f64());
    let pool = db::connect_app(url, 5).await?;
    let stats = Stats::default();
    let mut recorded = now_ms().saturating_sub(HISTORY_S * 1000 + 1000);
    let mut catch_up = |stats: &Stats| {
        let now = now_ms();
        record_seconds(stats, f, recorded, now);
        recorded = now / 1000 * 1000 - 1000;
    };

    // `Autoscaler::tick`, as the loop runs it: a cold first tick, then every 2 s.
    let mut a = run::Autoscaler::new(pool.clone(), url.to_owned(), stats.clone());
    // As the leader runs it: following the routing channel, so that a tick re-reads only the
    // fleet while no function, version or alias changes.
    a.watch().await?;
    catch_up(&stats);
    let t = Instant::now();
    let first = a.tick().await?;
    let cold = t.elapsed();
    assert!(first > f.specs.len(), "the cold tick writes every decision and the assignments: {first}");
    let (mut ticks, mut writes, mut refreshes) = (Vec::new(), Vec::new(), Vec::new());
    let mut next = tokio::time::Instant::now() + TICK;
    for n in 0..WARMUP_TICKS + DB_TICKS {
        report_ready(&mut su).await?;
        catch_up(&stats);
        pace(next).await;
        let started = tokio::time::Instant::now();
        let t = Instant::now();
        let wrote = a.tick().await?;
        let tick = t.elapsed();
        // As the loop does after a tick: the periodic full re-read, off the tick's path.
        let t = Instant::now();
        let refreshed = a.refresh_if_due().await?;
        if n >= WARMUP_TICKS {
            writes.push(wrote);
            ticks.push(tick);
            if refreshed {
                refreshes.push(t.elapsed());
            }
        }
        next = (started + TICK).max(tokio::time::Instant::now());
    }
    assert!(!refreshes.is_empty(), "the periodic re-read falls due within {DB_TICKS} ticks");

    // The same steady state, phase by phase (its own KPA state: its first tick rewrites every
    // decision, as a new leader's does).
    // As a leader does: the advisory lock on a connection of its own, checked by every store.
    let mut lock = sqlx::PgConnection::connect(url).await?;
    let (got,): (bool,) =
        sqlx::query_as("SELECT pg_try_advisory_lock($1)").bind(run::LOCK_KEY).fetch_one(&mut lock).await?;
    assert!(got, "the autoscaler's lock is free");
    let (leader_pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut lock).await?;
    let mut states: HashMap<Uuid, kpa::State> = HashMap::new();
    let rows: Vec<(Uuid, sqlx::types::Json<kpa::State>)> =
        sqlx::query_as("SELECT version_id, state FROM autoscaler_state").fetch_all(&mut su).await?;
    states.extend(rows.into_iter().map(|(v, s)| (v, s.0)));
    let mut written = run::Written::default();
    let (mut load, mut merge, mut compute, mut store) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut load_full = Vec::new();
    let mut inputs = run::Inputs::default();
    let replica = Uuid::now_v7();
    let mut decisions = Vec::new();
    let mut breakdown_cold = Duration::ZERO;
    let mut samples = HashMap::new();
    for n in 0..=DB_BREAKDOWN_TICKS {
        report_ready(&mut su).await?;
        catch_up(&stats);
        pace(next).await;
        let started = tokio::time::Instant::now();
        // The full read (what every tick did before the routing channel was followed), timed for
        // the comparison; then the fleet-only read the tick uses, on the inputs kept from the
        // last tick (the first tick reads everything).
        let t = Instant::now();
        let full = run::load(&pool).await?;
        let lf = t.elapsed();
        if n == 0 {
            inputs = full;
        }
        let t = Instant::now();
        if n > 0 {
            run::reload(&pool, &mut inputs, run::Reload::Fleet).await?;
        }
        let l = if n == 0 { lf } else { t.elapsed() };
        let now = now_ms();
        let t = Instant::now();
        stats.concurrency_into(Utc::now(), Some(run::longest_window(&inputs)), &mut samples);
        run::merge_published(&pool, replica, &mut samples).await?;
        let m = t.elapsed();
        let t = Instant::now();
        let outcome = run::compute(&inputs, &mut states, &samples, &HashMap::new(), now);
        let c = t.elapsed();
        assert_eq!(outcome.decided.len(), f.specs.len(), "every routed version is active");
        // What `store` will write of the decisions (untimed): those that differ from what was
        // written last; the rest of its rows are assignments.
        let rewritten = outcome.decided.iter().filter(|d| written.decision(&d.version).is_none_or(|w| w != *d)).count();
        let t = Instant::now();
        let sink = run::Sink { pool: &pool, leader_pid: Some(leader_pid), purge: n == 0 };
        let rows = run::store(&sink, &inputs, &outcome, &states, now, &mut written).await?;
        let s = t.elapsed();
        inputs.current = outcome.assignments;
        if n == 0 {
            breakdown_cold = l + m + c + s;
        } else {
            load.push(l);
            load_full.push(lf);
            merge.push(m);
            decisions.push((rows, rewritten));
            compute.push(c);
            store.push(s);
        }
        next = (started + TICK).max(tokio::time::Instant::now());
    }

    let (assignments, instances): (i64, i64) =
        sqlx::query_as("SELECT count(*), coalesce(sum(instances), 0) FROM assignments").fetch_one(&mut su).await?;
    let (states_n,): (i64,) = sqlx::query_as("SELECT count(*) FROM autoscaler_state").fetch_one(&mut su).await?;
    assert!(instances > f.specs.len() as i64 / 2, "instances assigned: {instances}");
    assert_eq!(states_n, f.specs.len() as i64, "a decision stored per version");
    pool.close();
    Ok(DbRun {
        cold,
        ticks,
        writes,
        refreshes,
        load,
        load_full,
        merge,
        decisions,
        compute,
        store,
        breakdown_cold,
        assignments,
        instances,
        states: states_n,
    })
}

async fn database_part(versions: usize) -> anyhow::Result<()> {
    let name = format!("nimbus_bench_as_{}", Uuid::now_v7().simple());
    let admin = admin_url();
    let mut c = sqlx::PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await?;
    let (head, _) = admin.rsplit_once('/').expect("a database URL");
    let url = format!("{head}/{name}");
    let f = fleet(versions, now_ms());
    let result = with_database(&f, &url).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
    let r = result?;
    let version: (String,) = sqlx::query_as("SHOW server_version").fetch_one(&mut c).await?;
    println!();
    println!(
        "PostgreSQL {}; {versions} versions, {} nodes; end state: {} assignment rows, {} instances, {} stored decisions",
        version.0,
        f.nodes.len(),
        r.assignments,
        r.instances,
        r.states
    );
    println!();
    println!("| measurement | ticks | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!(
        "| `Autoscaler::tick()`, cold (first tick: every decision and assignment written) | 1 | {:.1} ms | | |",
        r.cold.as_secs_f64() * 1000.0
    );
    println!(
        "| **`Autoscaler::tick()`, steady state** (median {} rows written per tick) | {} | **{:.1} ms** | {:.1} ms | {:.1} ms |",
        median(&r.writes),
        r.ticks.len(),
        pct(&r.ticks, 50.0),
        pct(&r.ticks, 99.0),
        max_ms(&r.ticks)
    );
    println!(
        "| between ticks: the periodic full re-read of versions and assignments (`refresh_if_due`, every {} s) | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        run::FULL_RELOAD.as_secs(),
        r.refreshes.len(),
        pct(&r.refreshes, 50.0),
        pct(&r.refreshes, 99.0),
        max_ms(&r.refreshes)
    );
    println!(
        "| load + merge + compute + store, first tick of a new leader (every decision rewritten) | 1 | {:.1} ms | | |",
        r.breakdown_cold.as_secs_f64() * 1000.0
    );
    for (what, xs) in [
        ("↳ `reload` of the fleet (2 queries, one transaction; versions and assignments kept)", &r.load),
        ("(comparison: `load` of everything, 5 queries, as before the routing channel was followed)", &r.load_full),
        ("↳ recent concurrency: this replica's `Stats` + `merge_published` (other replicas')", &r.merge),
        ("↳ `compute`", &r.compute),
        ("↳ `store` (lock check, upserts; row triggers bump node revisions)", &r.store),
    ] {
        println!(
            "| {what}, steady state | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            xs.len(),
            pct(xs, 50.0),
            pct(xs, 99.0),
            max_ms(xs)
        );
    }
    let (rows, changed) = median(&r.decisions);
    println!();
    println!(
        "`store`, steady state (median tick): {rows} rows written (decisions and assignments), of the {} decisions \
         {changed} changed beyond their KPA state",
        f.specs.len()
    );
    Ok(())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    println!(
        "## run::compute (decision + placement, no I/O): one cold tick, {WARMUP_TICKS} warm-up ticks, {PURE_TICKS} measured"
    );
    println!();
    println!(
        "| versions | nodes | ticks | cold tick | p50 | p99 | max | instances | assignment rows | parked rows | rows changed/tick | panicking | at zero | unplaced |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let breakdown = [pure(1_000), pure(10_000)];
    println!();
    println!("(medians per measured tick for the counts)");
    println!();
    println!(
        "| versions | `compute` p50 | `placement::place` alone p50 | placement's share of a tick (median) | one scan of all assignment rows per version, p50 |"
    );
    println!("|---|---|---|---|---|");
    for row in breakdown {
        println!("{row}");
    }

    if std::env::var("NIMBUS_BENCH_SKIP_DB").is_ok_and(|v| v == "1") {
        println!("\n(NIMBUS_BENCH_SKIP_DB=1: the PostgreSQL part skipped)");
        return;
    }
    println!();
    println!("## Autoscaler::tick with PostgreSQL (load + compute + store), paced every {} s", TICK.as_secs());
    // The server's Prometheus recorder, so that the tick's gauges cost what they cost there.
    let _metrics = nimbus_api::telemetry::metrics_handle();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(database_part(10_000)).expect("the PostgreSQL part");
}
