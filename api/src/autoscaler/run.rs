//! The autoscaler loop: every [`TICK`] (and at once when a gateway holds requests for a version
//! nobody serves), in the one replica holding the advisory lock [`LOCK_KEY`]:
//!
//! 1. read the versions that matter (routed by an alias, assigned somewhere, with recent traffic
//!    or held requests), their functions' scaling settings and placement rules, the nodes with
//!    their labels, capacity and what they report ready, pool dedications and the assignments;
//! 2. decide each version's desired instances with [`kpa::decide`] over the concurrency agents
//!    reported ([`nodes::Stats`]), with requests held by gateways counted as concurrency (as
//!    Knative's activator reports its queue);
//! 3. place the counts on nodes ([`placement::place`]) and write what changed to `assignments`
//!    (triggers bump the nodes' revisions and wake their long-polls) and each version's decision
//!    and KPA state to `autoscaler_state`, from which a new leader resumes.
//!
//! A version scaled to zero keeps its assignment rows with 0 instances ("parked"): the node keeps
//! the code on disk and the version routable, so the next request starts an instance from the
//! on-disk artifact in well under a millisecond instead of waiting for a placement round.
//!
//! Times are wall-clock milliseconds since the epoch, so a state stored by one replica means the
//! same to the next.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use futures_util::FutureExt;
use sqlx::{Connection, postgres::PgListener};
use uuid::Uuid;

use super::{PlacementRules, Scaling, kpa, placement};
use crate::{
    db::{self, Scope},
    functions::versions::StoredConfig,
    nodes::Stats,
    routing::RoutingConfig,
};

/// How often the autoscaler decides.
pub const TICK: Duration = Duration::from_secs(2);
/// The channel gateways poke the autoscaler on (see [`poke_payload`]).
pub const CHANNEL: &str = "nimbus_autoscaler";
/// The advisory lock whose holder is the autoscaler (`"nimbus.as"` in ASCII).
pub const LOCK_KEY: i64 = 0x6e_69_6d_62_75_73_61_73;
/// Pokes arriving within this window cause one tick.
const POKE_DEBOUNCE: Duration = Duration::from_millis(2);
/// Ticks caused by pokes are at least this far apart.
const POKE_SPACING: Duration = Duration::from_millis(100);
/// Held requests a poke reported count this long.
const POKE_TTL_MS: u64 = 4_000;

/// A version as the autoscaler sees it.
#[derive(Debug, Clone)]
pub struct VersionInput {
    /// The version.
    pub id: Uuid,
    /// Its tenant.
    pub tenant: Uuid,
    /// Its function.
    pub function: Uuid,
    /// Its function's name and its number (for metrics labels).
    pub label: (String, u32),
    /// Memory of one instance, MiB.
    pub memory_mb: u64,
    /// Its KPA settings.
    pub kpa: kpa::Config,
    /// Its function's placement rules.
    pub rules: PlacementRules,
    /// An alias routes to it.
    pub routed: bool,
}

impl VersionInput {
    /// What placement needs of the version at `instances`.
    pub fn demand(&self, instances: u32, inputs: &Inputs) -> placement::Demand {
        placement::Demand {
            version: self.id,
            tenant: self.tenant,
            instances,
            memory_mb: self.memory_mb,
            rules: self.rules.clone(),
            dedicated: inputs.dedicated.contains(&self.tenant),
        }
    }
}

/// Everything one tick reads.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Every version.
    pub versions: Vec<VersionInput>,
    /// Every node not removed.
    pub nodes: Vec<placement::Node>,
    /// Ready instances per version, over ready nodes.
    pub ready: HashMap<Uuid, u32>,
    /// Ready instances per (node, version).
    pub ready_on: HashMap<(Uuid, Uuid), u32>,
    /// Nodes that take no new instances but keep what they have until it runs elsewhere
    /// (draining, lost, left): make before break.
    pub winding_down: HashSet<Uuid>,
    /// Tenants with a dedicated pool.
    pub dedicated: HashSet<Uuid>,
    /// The assignments now.
    pub current: placement::Assignments,
}

/// One version's decision, as stored in `autoscaler_state`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The version.
    pub version: Uuid,
    /// Its tenant.
    pub tenant: Uuid,
    /// Its function.
    pub function: Uuid,
    /// Instances wanted.
    pub desired: u32,
    /// Instances placed.
    pub placed: u32,
    /// Instances ready.
    pub ready: u32,
    /// In panic mode.
    pub panicking: bool,
    /// `ok`, `unplaced` or `unschedulable`.
    pub status: &'static str,
    /// Why not ok.
    pub reason: Option<String>,
}

/// What one tick decided.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The new assignments.
    pub assignments: placement::Assignments,
    /// Per active version.
    pub decided: Vec<Decided>,
}

/// One tick's decisions, without I/O: `states` carries each version's KPA state between ticks,
/// `samples` is the concurrency agents reported per version and `held` the requests gateways
/// hold per version.
pub fn compute(
    inputs: &Inputs,
    states: &mut HashMap<Uuid, kpa::State>,
    samples: &HashMap<Uuid, Vec<(u64, f64)>>,
    held: &HashMap<Uuid, u32>,
    now_ms: u64,
) -> Outcome {
    // Warm instances keep a version active; parked rows alone do not (they are dropped once the
    // version is neither routed nor used, so old versions do not stay on nodes forever).
    let assigned: rustc_hash::FxHashSet<Uuid> =
        inputs.current.iter().filter(|(_, n)| **n > 0).map(|((_, v), _)| *v).collect();
    let mut demands = Vec::new();
    let mut decided = Vec::new();
    for v in &inputs.versions {
        let held_now = held.get(&v.id).copied().unwrap_or(0);
        let traffic = samples.get(&v.id);
        let active = v.routed
            || assigned.contains(&v.id)
            || traffic.is_some()
            || held_now > 0
            || states.contains_key(&v.id) && v.kpa.min_scale > 0;
        if !active {
            states.remove(&v.id);
            continue;
        }
        let state = states.entry(v.id).or_insert_with(|| kpa::State {
            first_seen_ms: Some(now_ms),
            last_active_ms: Some(now_ms),
            ..kpa::State::default()
        });
        let first_seen = *state.first_seen_ms.get_or_insert(now_ms);
        let ready = inputs.ready.get(&v.id).copied().unwrap_or(0);
        // Held requests are demand now: one sample in the second that just ended, after the
        // agents' (appended as the series is read, not copied into it).
        let held_sample = (held_now > 0).then(|| (now_ms.saturating_sub(1), f64::from(held_now)));
        let reported = traffic.map_or(&[][..], Vec::as_slice);
        let series = || reported.iter().copied().chain(held_sample);
        if !state.initial_done
            && (held_now > 0
                || traffic.is_some()
                || ready >= v.kpa.initial_scale
                || now_ms.saturating_sub(first_seen) >= v.kpa.stable_window_ms)
        {
            state.initial_done = true;
        }
        let first = series().next().map_or(first_seen, |(t, _)| t.min(first_seen));
        let (stable, panic) = if state.initial_done {
            let avg = |window| kpa::window_average_of(series(), Some(first), now_ms, window);
            (avg(v.kpa.stable_window_ms), avg(v.kpa.panic_window_ms))
        } else {
            (None, None)
        };
        let mut d = kpa::decide(&v.kpa, state, &kpa::Observation { now_ms, ready, stable, panic });
        // Requests held now need capacity now, whatever the windows' averages say: one
        // instance per `target` of them (bounded by the version's max scale).
        if held_now > 0 {
            let need = (f64::from(held_now) / v.kpa.target()).ceil() as u32;
            let need = if v.kpa.max_scale > 0 { need.min(v.kpa.max_scale) } else { need };
            let need = need.max(1);
            if need > d.desired {
                d.desired = need;
                // Counted like any decision: in panic it is the floor, and the scale-down delay
                // remembers it.
                if d.panicking {
                    state.max_panic = state.max_panic.max(need);
                }
                if let Some(last) = state.delay_window.back_mut().filter(|(t, _)| *t == now_ms) {
                    last.1 = last.1.max(need);
                }
            }
        }
        demands.push(v.demand(d.desired, inputs));
        decided.push(Decided {
            version: v.id,
            tenant: v.tenant,
            function: v.function,
            desired: d.desired,
            placed: 0,
            ready,
            panicking: d.panicking,
            status: "ok",
            reason: None,
        });
    }
    let mut placed = placement::place(&inputs.nodes, &demands, &inputs.current);
    let mut per_version: rustc_hash::FxHashMap<Uuid, u32> = rustc_hash::FxHashMap::default();
    for ((_, v), n) in &placed.assignments {
        *per_version.entry(*v).or_insert(0) += n;
    }
    // Make before break: warm instances on a draining, lost or left node stay assigned there
    // until the version has as many ready elsewhere as it wants (a lost node's rows also survive
    // an outage of the control plane that marked every node lost). They do not count as placed.
    let wanted: rustc_hash::FxHashMap<Uuid, u32> = if inputs.winding_down.is_empty() {
        rustc_hash::FxHashMap::default()
    } else {
        demands.iter().map(|d| (d.version, d.instances)).collect()
    };
    let winding_down = inputs.winding_down.iter().flat_map(|&node| {
        inputs.current.range((node, Uuid::nil())..=(node, Uuid::max())).map(move |(&(_, v), &n)| (node, v, n))
    });
    for (node, v, n) in winding_down {
        let want = wanted.get(&v).copied().unwrap_or(0);
        if n == 0 || want == 0 || placed.unschedulable.contains_key(&v) {
            continue;
        }
        let here = inputs.ready_on.get(&(node, v)).copied().unwrap_or(0);
        let elsewhere = inputs.ready.get(&v).copied().unwrap_or(0).saturating_sub(here);
        if elsewhere < want {
            placed.assignments.insert((node, v), n);
        }
    }
    for d in &mut decided {
        d.placed = per_version.get(&d.version).copied().unwrap_or(0);
        if let Some(reason) = placed.unschedulable.get(&d.version) {
            d.status = "unschedulable";
            d.reason = Some(reason.clone());
        } else if let Some(short) = placed.unplaced.get(&d.version) {
            d.status = "unplaced";
            d.reason = Some(format!("{short} instance(s) found no node with room"));
        }
    }
    Outcome { assignments: placed.assignments, decided }
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    id: Uuid,
    tenant_id: Uuid,
    function_id: Uuid,
    number: i32,
    config: sqlx::types::Json<StoredConfig>,
    name: String,
    scaling: sqlx::types::Json<Scaling>,
    placement: sqlx::types::Json<PlacementRules>,
}

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: Uuid,
    zone: String,
    memory_mb: i64,
    instance_slots: i32,
    state: String,
    draining: bool,
    labels: sqlx::types::Json<BTreeMap<String, String>>,
    /// The versions the node reports ready and their instances, in the same order (the
    /// generated columns of migration 15: no JSON is decoded here).
    ready_version_ids: Vec<Uuid>,
    ready_instances: Vec<i32>,
}

/// What a tick re-reads: everything, or only the fleet (nodes, what they report, pool
/// dedications) while the versions and the assignments it keeps are known to be current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Versions, aliases, nodes, dedications and assignments.
    Full,
    /// Nodes and dedications only.
    Fleet,
}

/// Reads one tick's inputs (the gateway scope reads functions, versions and aliases of every
/// tenant; the platform scope nodes, assignments and dedications).
pub async fn load(pool: &db::Db) -> Result<Inputs, sqlx::Error> {
    let mut inputs = Inputs::default();
    reload(pool, &mut inputs, Reload::Full).await?;
    Ok(inputs)
}

/// Refreshes `inputs` in one transaction: the fleet always, the versions and the assignments
/// with [`Reload::Full`].
pub async fn reload(pool: &db::Db, inputs: &mut Inputs, what: Reload) -> Result<(), sqlx::Error> {
    let mut tx = db::begin(pool, &Scope { platform: true, gateway: true, ..Scope::default() }).await?;
    if what == Reload::Full {
        inputs.versions = read_versions(&mut tx).await?;
        let current: Vec<(Uuid, Uuid, i32)> =
            sqlx::query_as("SELECT node_id, version_id, instances FROM assignments").fetch_all(&mut *tx).await?;
        inputs.current = current.into_iter().map(|(n, v, c)| ((n, v), u32::try_from(c).unwrap_or(0))).collect();
    }
    read_fleet(&mut tx, inputs).await?;
    tx.commit().await
}

/// Every version with its function's settings, and whether an alias routes to it.
async fn read_versions(tx: &mut db::Tx) -> Result<Vec<VersionInput>, sqlx::Error> {
    let versions: Vec<VersionRow> = sqlx::query_as(
        "SELECT v.id, v.tenant_id, v.function_id, v.number, v.config, f.name, f.scaling, f.placement \
         FROM versions v JOIN functions f ON f.id = v.function_id",
    )
    .fetch_all(&mut **tx)
    .await?;
    let aliases: Vec<(Uuid, sqlx::types::Json<RoutingConfig>)> =
        sqlx::query_as("SELECT function_id, routing FROM aliases").fetch_all(&mut **tx).await?;
    let routed: HashSet<(Uuid, u32)> = aliases.iter().flat_map(|(f, r)| r.0.versions().map(move |n| (*f, n))).collect();
    Ok(versions
        .into_iter()
        .map(|r| {
            let c = &r.config.0;
            let number = u32::try_from(r.number).unwrap_or(0);
            VersionInput {
                id: r.id,
                tenant: r.tenant_id,
                function: r.function_id,
                routed: routed.contains(&(r.function_id, number)),
                label: (r.name, number),
                memory_mb: u64::from(c.memory_mb),
                kpa: r.scaling.0.config(c.concurrency, c.min_scale, c.max_scale),
                rules: r.placement.0,
            }
        })
        .collect())
}

/// The nodes (capacity, labels, what they report ready) and the pool dedications.
async fn read_fleet(tx: &mut db::Tx, inputs: &mut Inputs) -> Result<(), sqlx::Error> {
    let nodes: Vec<NodeRow> = sqlx::query_as(
        "SELECT id, zone, memory_mb, instance_slots, state, draining, labels, ready_version_ids, ready_instances \
         FROM nodes \
         WHERE state <> 'removed'",
    )
    .fetch_all(&mut **tx)
    .await?;
    let dedications: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT pool, tenant_id FROM pool_dedications").fetch_all(&mut **tx).await?;
    let dedicated_pools: HashMap<String, Uuid> = dedications.into_iter().collect();
    inputs.ready.clear();
    inputs.ready_on.clear();
    inputs.winding_down.clear();
    inputs.nodes = nodes
        .into_iter()
        .map(|n| {
            if n.state == "ready" {
                for (v, i) in n.ready_version_ids.iter().zip(&n.ready_instances) {
                    let i = u32::try_from(*i).unwrap_or(0);
                    *inputs.ready.entry(*v).or_insert(0) += i;
                    *inputs.ready_on.entry((n.id, *v)).or_insert(0) += i;
                }
            }
            if n.draining || n.state == "lost" || n.state == "left" {
                inputs.winding_down.insert(n.id);
            }
            let dedicated_to = n.labels.0.get("pool").and_then(|p| dedicated_pools.get(p)).copied();
            placement::Node {
                id: n.id,
                zone: n.zone,
                memory_mb: u64::try_from(n.memory_mb).unwrap_or(0),
                slots: u32::try_from(n.instance_slots).unwrap_or(0),
                schedulable: n.state == "ready" && !n.draining,
                labels: n.labels.0,
                dedicated_to,
            }
        })
        .collect();
    inputs.dedicated = dedicated_pools.into_values().collect();
    Ok(())
}

/// Whether `now` differs from the `stored` KPA state enough to be written: any change but the
/// last activity time and the scale-down-delay window, which count when the version's activity
/// (`active_now` against `active_stored`) or the window's maximum changes. While a version stays
/// active its last activity is every tick's time, which the heartbeat records for all of them
/// in one row (see [`Written`]); once it is quiet its last activity no longer moves.
fn state_moved(stored: &kpa::State, active_stored: bool, now: &kpa::State, active_now: bool) -> bool {
    let max = |s: &kpa::State| s.delay_window.iter().map(|(_, n)| *n).max();
    stored.panic_since_ms != now.panic_since_ms
        || stored.max_panic != now.max_panic
        || stored.first_seen_ms != now.first_seen_ms
        || stored.initial_done != now.initial_done
        || max(stored) != max(now)
        || active_stored != active_now
        || !active_now && stored.last_active_ms != now.last_active_ms
}

/// What a leader last wrote: each version's decision with its KPA state and whether the version
/// was active (had demand at that tick).
///
/// The stored rows of versions that stay active are not rewritten as their last activity moves
/// (that was most of the rows written each tick): the heartbeat row (`autoscaler_heartbeat`)
/// holds the time of the leader's last tick, and every row marked `active` was active then — a
/// version that went quiet was rewritten, unmarked, in that tick's transaction. A new leader
/// takes the heartbeat as their last activity ([`Autoscaler::resume`]).
#[derive(Debug, Default)]
pub struct Written {
    decisions: HashMap<Uuid, (Decided, kpa::State, bool)>,
}

impl Written {
    /// The decision last written for `version`.
    pub fn decision(&self, version: &Uuid) -> Option<&Decided> {
        self.decisions.get(version).map(|(d, ..)| d)
    }
}

/// The longest window any version averages over (ms): older seconds change no decision.
pub fn longest_window(inputs: &Inputs) -> u64 {
    inputs.versions.iter().map(|v| v.kpa.stable_window_ms.max(v.kpa.panic_window_ms)).max().unwrap_or(0)
}

/// Where a tick writes, and as whom.
pub struct Sink<'a> {
    /// The pool.
    pub pool: &'a db::Db,
    /// The backend pid of the connection holding the leader's lock: the write is refused unless
    /// it still holds it (a leader whose lock connection died must not write next to the new one).
    pub leader_pid: Option<i32>,
    /// Also delete stored decisions of versions no longer active (the first tick of a leader).
    pub purge: bool,
}

/// Writes what changed: assignments (one statement for removals, one for the rest) and the
/// decisions that differ from `written` (what this leader wrote last), with the heartbeat, in
/// one transaction (every tick: the heartbeat moves even when nothing else does). Returns the
/// rows written besides the heartbeat. `now_ms` is the tick's time (a version whose last
/// activity is `now_ms` is active).
pub async fn store(
    sink: &Sink<'_>,
    inputs: &Inputs,
    outcome: &Outcome,
    states: &HashMap<Uuid, kpa::State>,
    now_ms: u64,
    written: &mut Written,
) -> anyhow::Result<usize> {
    let pool = sink.pool;
    // What changed in the assignments, in one pass over both maps (both ordered by key).
    let (mut gone_nodes, mut gone_versions) = (Vec::new(), Vec::new());
    let mut upserts: Vec<(&(Uuid, Uuid), u32)> = Vec::new();
    let mut before = inputs.current.iter().peekable();
    for (key, &n) in &outcome.assignments {
        while let Some((gone, _)) = before.next_if(|(k, _)| *k < key) {
            gone_nodes.push(gone.0);
            gone_versions.push(gone.1);
        }
        if before.next_if(|(k, _)| *k == key).is_none_or(|(_, was)| *was != n) {
            upserts.push((key, n));
        }
    }
    for (gone, _) in before {
        gone_nodes.push(gone.0);
        gone_versions.push(gone.1);
    }
    let (mut nodes, mut tenants, mut versions, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    if !upserts.is_empty() {
        let tenant_of: rustc_hash::FxHashMap<Uuid, Uuid> = inputs.versions.iter().map(|v| (v.id, v.tenant)).collect();
        for (key, n) in upserts {
            if let Some(t) = tenant_of.get(&key.1) {
                nodes.push(key.0);
                tenants.push(*t);
                versions.push(key.1);
                counts.push(i32::try_from(n).unwrap_or(i32::MAX));
            }
        }
    }
    let active_now = |v: &Uuid| states.get(v).is_some_and(|s| s.last_active_ms == Some(now_ms));
    let changed: Vec<&Decided> = outcome
        .decided
        .iter()
        .filter(|d| {
            written.decisions.get(&d.version).is_none_or(|(w, s, was_active)| {
                w != *d
                    || states
                        .get(&d.version)
                        .is_some_and(|now| state_moved(s, *was_active, now, active_now(&d.version)))
            })
        })
        .collect();
    let active: rustc_hash::FxHashSet<Uuid> = outcome.decided.iter().map(|d| d.version).collect();
    let stale: Vec<Uuid> = written.decisions.keys().filter(|v| !active.contains(v)).copied().collect();
    let writes = gone_nodes.len() + nodes.len() + changed.len() + stale.len();

    // The gateway scope reads versions: a decision for a version deleted since the load is
    // skipped rather than failing the transaction on the foreign key.
    //
    // The commit does not wait for its WAL to reach the disk (`synchronous_commit = off`): all of
    // this is recomputed every tick, and a PostgreSQL crash can lose at most the last fraction
    // of a second of it, which the next tick (of this leader or the next) writes again.
    let mut tx = db::begin(pool, &Scope { platform: true, gateway: true, ..Scope::default() }).await?;
    let (_, leading): (String, bool) = sqlx::query_as(
        "SELECT set_config('synchronous_commit', 'off', true), $1::int IS NULL OR EXISTS ( \
         SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = $1 \
         AND ((classid::bigint << 32) | objid::bigint) = $2)",
    )
    .bind(sink.leader_pid)
    .bind(LOCK_KEY)
    .fetch_one(&mut *tx)
    .await?;
    anyhow::ensure!(leading, "this replica no longer holds the autoscaler's lock");
    if sink.purge {
        let active: Vec<Uuid> = outcome.decided.iter().map(|d| d.version).collect();
        sqlx::query("DELETE FROM autoscaler_state WHERE NOT (version_id = ANY($1))")
            .bind(&active)
            .execute(&mut *tx)
            .await?;
    }
    if !gone_nodes.is_empty() {
        sqlx::query(
            "DELETE FROM assignments a USING unnest($1::uuid[], $2::uuid[]) AS g(node_id, version_id) \
             WHERE a.node_id = g.node_id AND a.version_id = g.version_id",
        )
        .bind(&gone_nodes)
        .bind(&gone_versions)
        .execute(&mut *tx)
        .await?;
    }
    if !nodes.is_empty() {
        sqlx::query(
            "INSERT INTO assignments (node_id, tenant_id, version_id, instances) \
             SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[]) AS u(n, t, v, c) \
             WHERE EXISTS (SELECT 1 FROM versions WHERE versions.id = u.v) \
             ON CONFLICT (node_id, version_id) DO UPDATE SET instances = EXCLUDED.instances \
             WHERE assignments.instances IS DISTINCT FROM EXCLUDED.instances",
        )
        .bind(&nodes)
        .bind(&tenants)
        .bind(&versions)
        .bind(&counts)
        .execute(&mut *tx)
        .await?;
    }
    if !changed.is_empty() {
        let int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let col = |f: &dyn Fn(&Decided) -> i32| changed.iter().map(|d| f(d)).collect::<Vec<i32>>();
        let state_json = |d: &Decided| {
            serde_json::to_string(&states.get(&d.version).cloned().unwrap_or_default()).unwrap_or_else(|_| "{}".into())
        };
        sqlx::query(
            "INSERT INTO autoscaler_state (version_id, tenant_id, function_id, state, desired, placed, ready, \
             panicking, status, reason, active, updated_at) \
             SELECT v, t, f, s::jsonb, d, p, r, pa, st, re, ac, now() FROM unnest($1::uuid[], $2::uuid[], \
             $3::uuid[], $4::text[], $5::int[], $6::int[], $7::int[], $8::bool[], $9::text[], $10::text[], \
             $11::bool[]) AS u(v, t, f, s, d, p, r, pa, st, re, ac) \
             WHERE EXISTS (SELECT 1 FROM versions WHERE versions.id = u.v) \
             ON CONFLICT (version_id) DO UPDATE SET state = EXCLUDED.state, desired = EXCLUDED.desired, \
             placed = EXCLUDED.placed, ready = EXCLUDED.ready, panicking = EXCLUDED.panicking, \
             status = EXCLUDED.status, reason = EXCLUDED.reason, active = EXCLUDED.active, updated_at = now()",
        )
        .bind(changed.iter().map(|d| d.version).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| d.tenant).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| d.function).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| state_json(d)).collect::<Vec<_>>())
        .bind(col(&|d| int(d.desired)))
        .bind(col(&|d| int(d.placed)))
        .bind(col(&|d| int(d.ready)))
        .bind(changed.iter().map(|d| d.panicking).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| d.status).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| d.reason.clone()).collect::<Vec<_>>())
        .bind(changed.iter().map(|d| active_now(&d.version)).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !stale.is_empty() {
        sqlx::query("DELETE FROM autoscaler_state WHERE version_id = ANY($1)").bind(&stale).execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO autoscaler_heartbeat (tick_ms) VALUES ($1) \
         ON CONFLICT (singleton) DO UPDATE SET tick_ms = EXCLUDED.tick_ms",
    )
    .bind(i64::try_from(now_ms).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    for d in changed {
        let state = states.get(&d.version).cloned().unwrap_or_default();
        written.decisions.insert(d.version, (d.clone(), state, active_now(&d.version)));
    }
    for v in stale {
        written.decisions.remove(&v);
    }
    Ok(writes)
}

/// (count, when reported in ms) per (version, gateway replica).
type HeldCounts = HashMap<(Uuid, Uuid), (u32, u64)>;

/// Adds what other replicas published (their agents' per-second concurrency, the last
/// [`crate::nodes::stats::RECENT_SECONDS`]) to this replica's `samples`, and deletes older rows.
pub async fn merge_published(
    pool: &db::Db,
    replica: Uuid,
    samples: &mut HashMap<Uuid, Vec<(u64, f64)>>,
) -> Result<(), sqlx::Error> {
    let horizon = Utc::now() - chrono::TimeDelta::seconds(crate::nodes::stats::RECENT_SECONDS as i64);
    let mut tx = db::begin(pool, &Scope::platform(None)).await?;
    // One statement: the delete sees the rows older than the horizon, the read the others.
    let rows: Vec<(Uuid, chrono::DateTime<Utc>, f64)> = sqlx::query_as(
        "WITH gone AS (DELETE FROM concurrency_samples WHERE second < $2) \
         SELECT version_id, second, sum(concurrency) FROM concurrency_samples \
         WHERE replica_id <> $1 AND second >= $2 GROUP BY version_id, second",
    )
    .bind(replica)
    .bind(horizon)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut merged: HashMap<Uuid, BTreeMap<u64, f64>> = HashMap::new();
    for (v, series) in samples.drain() {
        merged.entry(v).or_default().extend(series);
    }
    for (v, second, c) in rows {
        let ms = u64::try_from(second.timestamp_millis()).unwrap_or(0);
        *merged.entry(v).or_default().entry(ms).or_insert(0.0) += c;
    }
    samples.extend(merged.into_iter().map(|(v, m)| (v, m.into_iter().collect())));
    Ok(())
}

/// Publishes this replica's per-second concurrency every [`TICK`] while another replica leads
/// the autoscaler (the leader reads its own in memory).
pub async fn publish_loop(stats: Stats, pool: db::Db, replica: Uuid, leading: Arc<std::sync::atomic::AtomicBool>) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if leading.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        // Three seconds: the one that just ended may still be growing when the last agents report.
        if let Err(e) = stats.publish(&pool, replica, 3).await {
            tracing::warn!(error = %e, "publishing concurrency for the autoscaler failed");
        }
    }
}

/// Requests held by gateways, per version, with when they were reported.
#[derive(Clone, Default)]
pub struct Held {
    /// The latest count per (version, gateway replica), with when it came.
    inner: Arc<Mutex<HeldCounts>>,
}

impl Held {
    /// Records a poke: `replica`'s gateway holds `held` requests for `version` now.
    pub fn poke(&self, version: Uuid, replica: Uuid, held: u32, now_ms: u64) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).insert((version, replica), (held, now_ms));
    }

    /// The held counts still fresh at `now_ms`, summed over gateway replicas.
    pub fn current(&self, now_ms: u64) -> HashMap<Uuid, u32> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.retain(|_, (_, at)| now_ms.saturating_sub(*at) < POKE_TTL_MS);
        let mut sum: HashMap<Uuid, u32> = HashMap::new();
        for ((v, _), (n, _)) in inner.iter() {
            let e = sum.entry(*v).or_insert(0);
            *e = e.saturating_add(*n);
        }
        sum
    }
}

/// A poke's payload: `"<version id> <held> <gateway replica id>"`.
pub fn poke_payload(version: Uuid, held: u32, replica: Uuid) -> String {
    format!("{version} {held} {replica}")
}

/// Parses a poke payload (see [`poke_payload`]).
pub fn parse_poke(payload: &str) -> Option<(Uuid, u32, Uuid)> {
    let mut parts = payload.split(' ');
    let (v, n, r) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((v.parse().ok()?, n.parse().ok()?, r.parse().ok()?))
}

/// The autoscaler of this replica: it runs ticks while it holds the lock.
pub struct Autoscaler {
    pool: db::Db,
    database_url: String,
    stats: Stats,
    held: Held,
    states: HashMap<Uuid, kpa::State>,
    written: Written,
    /// The pid of the lock connection while leading.
    leader_pid: Option<i32>,
    /// The next tick deletes stored decisions of inactive versions.
    purge: bool,
    /// This replica (its own samples are in `stats`, not read back from the table).
    replica: Uuid,
    /// Set while this replica leads (its publisher then stands down).
    leading: Arc<std::sync::atomic::AtomicBool>,
    /// The last tick's inputs, with the assignments as that tick wrote them.
    inputs: Inputs,
    /// When the versions and assignments in `inputs` were last read.
    loaded_at: Option<Instant>,
    /// How often they are read even without notifications ([`FULL_RELOAD`]).
    full_reload: Duration,
    /// The routing channel, while following it (see [`Autoscaler::watch`]).
    changes: Option<PgListener>,
    /// The desired and ready gauges of the active versions.
    gauges: Gauges,
    /// The recent concurrency per version, refilled every tick (kept for its buffers).
    samples: HashMap<Uuid, Vec<(u64, f64)>>,
}

/// The per-version gauges `nimbus_autoscaler_desired_instances` and
/// `nimbus_autoscaler_ready_instances`, with the values they show: a tick sets only those that
/// moved, through handles registered once per version (not a registry lookup and three label
/// strings per version and tick).
#[derive(Default)]
struct Gauges {
    shown: HashMap<Uuid, VersionGauges>,
}

struct VersionGauges {
    desired: metrics::Gauge,
    ready: metrics::Gauge,
    values: (u32, u32),
}

impl Gauges {
    /// Shows what a tick decided; versions no longer active show 0 and are forgotten.
    fn show(&mut self, inputs: &Inputs, decided: &[Decided]) {
        let mut seen: HashSet<Uuid> = HashSet::with_capacity(decided.len());
        let mut labels_of: Option<HashMap<Uuid, &VersionInput>> = None;
        for d in decided {
            seen.insert(d.version);
            let values = (d.desired, d.ready);
            let g = match self.shown.entry(d.version) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let labels_of =
                        labels_of.get_or_insert_with(|| inputs.versions.iter().map(|v| (v.id, v)).collect());
                    let Some(v) = labels_of.get(&d.version) else { continue };
                    let labels = [
                        ("tenant_id", d.tenant.to_string()),
                        ("function", v.label.0.clone()),
                        ("version", v.label.1.to_string()),
                    ];
                    // Nothing shown yet: both are set below.
                    e.insert(VersionGauges {
                        desired: metrics::gauge!("nimbus_autoscaler_desired_instances", &labels),
                        ready: metrics::gauge!("nimbus_autoscaler_ready_instances", &labels),
                        values: (u32::MAX, u32::MAX),
                    })
                }
            };
            if g.values.0 != values.0 {
                g.desired.set(f64::from(values.0));
            }
            if g.values.1 != values.1 {
                g.ready.set(f64::from(values.1));
            }
            g.values = values;
        }
        self.shown.retain(|v, g| {
            let keep = seen.contains(v);
            if !keep {
                g.desired.set(0.0);
                g.ready.set(0.0);
            }
            keep
        });
    }
}

/// The tables whose changes (announced on the routing channel) move a tick's versions.
const CATALOGUE_TABLES: [&str; 4] = ["tenants", "functions", "versions", "aliases"];
/// Versions and assignments are read again at least this often even without notifications, so
/// that anything a notification did not announce (an operator's manual assignments) is seen.
pub const FULL_RELOAD: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

impl Autoscaler {
    /// An autoscaler reading `stats` (this replica's agents) and what other replicas publish.
    pub fn new(pool: db::Db, database_url: String, stats: Stats) -> Self {
        Self::for_replica(pool, database_url, stats, Uuid::now_v7())
    }

    /// An autoscaler of the replica `replica` (the id its publisher writes under).
    pub fn for_replica(pool: db::Db, database_url: String, stats: Stats, replica: Uuid) -> Self {
        Autoscaler {
            pool,
            database_url,
            stats,
            held: Held::default(),
            states: HashMap::new(),
            written: Written::default(),
            leader_pid: None,
            purge: false,
            replica,
            leading: Arc::default(),
            inputs: Inputs::default(),
            loaded_at: None,
            full_reload: FULL_RELOAD,
            changes: None,
            gauges: Gauges::default(),
            samples: HashMap::new(),
        }
    }

    /// Reads versions and assignments at least every `period` even without notifications
    /// (default [`FULL_RELOAD`]).
    #[must_use]
    pub fn full_reload_every(mut self, period: Duration) -> Self {
        self.full_reload = period;
        self
    }

    /// Follows the routing channel: from now on a tick re-reads versions and assignments only
    /// when functions, versions, aliases or tenants changed (or [`FULL_RELOAD`] passed), and
    /// otherwise keeps the versions it read and the assignments it wrote. Without it every tick
    /// reads everything.
    pub async fn watch(&mut self) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect(&self.database_url).await?;
        listener.listen(crate::gateway::table::CHANNEL).await?;
        self.changes = Some(listener);
        self.loaded_at = None;
        Ok(())
    }

    /// Whether the versions or assignments kept from the last tick may be out of date: what
    /// arrived on the routing channel since then names a catalogue table, or notifications may
    /// have been lost, or [`FULL_RELOAD`] passed, or there is no channel.
    fn catalogue_stale(&mut self) -> bool {
        let Some(listener) = self.changes.as_mut() else { return true };
        let mut stale = self.loaded_at.is_none_or(|t| t.elapsed() >= self.full_reload);
        loop {
            match listener.try_recv().now_or_never() {
                None => break,
                Some(Ok(Some(n))) => stale |= CATALOGUE_TABLES.contains(&n.payload()),
                // The listener reconnected: what was sent meanwhile is lost.
                Some(Ok(None)) => stale = true,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the autoscaler's routing listener failed; reading everything each tick");
                    self.changes = None;
                    return true;
                }
            }
        }
        stale
    }

    /// Between ticks: re-reads versions and assignments when the periodic full re-read
    /// ([`FULL_RELOAD`]) would fall due at the next tick, so that this safety net is not on a
    /// tick's path (a tick reads everything only when the routing channel announced a change).
    /// Only while following the channel: without it every tick reads everything anyway. What was
    /// announced before this read is covered by it; what comes after, the next tick sees. Returns
    /// whether it read.
    pub async fn refresh_if_due(&mut self) -> Result<bool, sqlx::Error> {
        let due = self.loaded_at.is_some_and(|t| t.elapsed() + TICK >= self.full_reload);
        if !due || self.changes.is_none() {
            return Ok(false);
        }
        let _ = self.catalogue_stale();
        if self.changes.is_none() {
            return Ok(false);
        }
        if let Err(e) = reload(&self.pool, &mut self.inputs, Reload::Full).await {
            // Part of it may have been replaced: the next tick reads everything.
            self.loaded_at = None;
            return Err(e);
        }
        self.loaded_at = Some(Instant::now());
        Ok(true)
    }

    /// Runs one tick: load, decide, place, store. Returns the rows written.
    pub async fn tick(&mut self) -> anyhow::Result<usize> {
        let started = Instant::now();
        let now = now_ms();
        let what = if self.catalogue_stale() { Reload::Full } else { Reload::Fleet };
        let mut inputs = std::mem::take(&mut self.inputs);
        reload(&self.pool, &mut inputs, what).await?;
        if what == Reload::Full {
            self.loaded_at = Some(Instant::now());
        }
        self.stats.concurrency_into(Utc::now(), Some(longest_window(&inputs)), &mut self.samples);
        merge_published(&self.pool, self.replica, &mut self.samples).await?;
        let held = self.held.current(now);
        let outcome = compute(&inputs, &mut self.states, &self.samples, &held, now);
        let sink = Sink { pool: &self.pool, leader_pid: self.leader_pid, purge: self.purge };
        let written = match store(&sink, &inputs, &outcome, &self.states, now, &mut self.written).await {
            Ok(n) => n,
            Err(e) => {
                // What was written is unknown: the next tick reads it back.
                self.loaded_at = None;
                return Err(e);
            }
        };
        self.purge = false;
        self.gauges.show(&inputs, &outcome.decided);
        metrics::histogram!("nimbus_autoscaler_tick_seconds").record(started.elapsed().as_secs_f64());
        // The assignments are now what this tick wrote (versions deleted meanwhile were skipped
        // by `store`; their deletion notified, so the next tick reads everything).
        inputs.current = outcome.assignments;
        self.inputs = inputs;
        Ok(written)
    }

    /// The KPA state this autoscaler carries for `version` (what a resumed leader starts from).
    pub fn state(&self, version: &Uuid) -> Option<&kpa::State> {
        self.states.get(version)
    }

    /// Whether this replica leads now (shared with its publisher).
    pub fn leading(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.leading.clone()
    }

    /// Resumes from the stored state (what a new leader does first): versions stored as active
    /// were active until the heartbeat (see [`Written`]).
    pub async fn resume(&mut self) -> Result<(), sqlx::Error> {
        let mut tx = db::begin(&self.pool, &Scope::platform(None)).await?;
        let rows: Vec<(Uuid, sqlx::types::Json<kpa::State>, bool)> =
            sqlx::query_as("SELECT version_id, state, active FROM autoscaler_state").fetch_all(&mut *tx).await?;
        let heartbeat: Option<i64> =
            sqlx::query_scalar("SELECT tick_ms FROM autoscaler_heartbeat").fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        let heartbeat = heartbeat.and_then(|ms| u64::try_from(ms).ok());
        self.states = rows
            .into_iter()
            .map(|(v, s, active)| {
                let mut s = s.0;
                if active {
                    s.last_active_ms = s.last_active_ms.max(heartbeat);
                }
                (v, s)
            })
            .collect();
        self.written = Written::default();
        self.purge = true;
        self.loaded_at = None;
        Ok(())
    }

    /// Forever: wait for the lock, then tick every [`TICK`] and on pokes while holding it.
    pub async fn run(mut self) {
        loop {
            match self.lead().await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "the autoscaler lost its lock connection; retrying"),
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn lead(&mut self) -> anyhow::Result<()> {
        let mut lock = sqlx::PgConnection::connect(&self.database_url).await?;
        loop {
            let (got,): (bool,) =
                sqlx::query_as("SELECT pg_try_advisory_lock($1)").bind(LOCK_KEY).fetch_one(&mut lock).await?;
            if got {
                break;
            }
            tokio::time::sleep(TICK).await;
        }
        tracing::info!("this replica runs the autoscaler");
        let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()").fetch_one(&mut lock).await?;
        self.leader_pid = Some(pid);
        self.leading.store(true, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("nimbus_autoscaler_leader").set(1.0);
        let result = self.lead_locked(&mut lock).await;
        self.changes = None;
        metrics::gauge!("nimbus_autoscaler_leader").set(0.0);
        self.leader_pid = None;
        self.leading.store(false, std::sync::atomic::Ordering::Relaxed);
        result
    }

    async fn lead_locked(&mut self, lock: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        self.resume().await?;
        self.watch().await?;
        let mut listener = PgListener::connect(&self.database_url).await?;
        listener.listen(CHANNEL).await?;
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    // The lock lives as long as its connection: a tick only runs while it does.
                    sqlx::query("SELECT 1").execute(&mut *lock).await?;
                }
                n = listener.try_recv() => {
                    match n? {
                        Some(n) => {
                            if let Some((v, held, replica)) = parse_poke(n.payload()) {
                                self.held.poke(v, replica, held, now_ms());
                            }
                            // Coalesce a burst, and leave at least POKE_SPACING between ticks
                            // that pokes cause.
                            let since = last_tick.elapsed();
                            tokio::time::sleep(POKE_DEBOUNCE.max(POKE_SPACING.saturating_sub(since))).await;
                            while let Some(n) = listener.next_buffered() {
                                if let Some((v, held, replica)) = parse_poke(n.payload()) {
                                    self.held.poke(v, replica, held, now_ms());
                                }
                            }
                            sqlx::query("SELECT 1").execute(&mut *lock).await?;
                        }
                        // The listener reconnected: pokes may be lost, the next tick covers them.
                        None => continue,
                    }
                }
            }
            last_tick = Instant::now();
            if let Err(e) = self.tick().await {
                metrics::counter!("nimbus_autoscaler_tick_failures_total").increment(1);
                tracing::warn!(error = %e, "an autoscaler tick failed");
            } else if let Err(e) = self.refresh_if_due().await {
                tracing::warn!(error = %e, "re-reading versions and assignments failed; the next tick reads them");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u128, zone: &str) -> placement::Node {
        placement::Node {
            id: Uuid::from_u128(n),
            zone: zone.into(),
            memory_mb: 4096,
            slots: 100,
            schedulable: true,
            labels: BTreeMap::new(),
            dedicated_to: None,
        }
    }

    fn version(n: u128, scaling: Scaling, routed: bool) -> VersionInput {
        VersionInput {
            id: Uuid::from_u128(n),
            tenant: Uuid::from_u128(1),
            function: Uuid::from_u128(n + 1000),
            label: ("f".into(), 1),
            memory_mb: 128,
            kpa: scaling.config(10, 0, 0),
            rules: PlacementRules::default(),
            routed,
        }
    }

    fn inputs(versions: Vec<VersionInput>) -> Inputs {
        Inputs { versions, nodes: vec![node(1, "a"), node(2, "b")], ..Inputs::default() }
    }

    fn placed(o: &Outcome, v: u128) -> u32 {
        o.assignments.iter().filter(|((_, x), _)| *x == Uuid::from_u128(v)).map(|(_, n)| n).sum()
    }

    #[test]
    fn a_routed_version_starts_at_its_initial_scale_and_an_unrouted_idle_one_is_left_alone() {
        let mut states = HashMap::new();
        let i = inputs(vec![version(10, Scaling::default(), true), version(20, Scaling::default(), false)]);
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), 1_000_000);
        assert_eq!((placed(&o, 10), placed(&o, 20)), (1, 0));
        assert_eq!(o.decided.len(), 1, "only the routed version is active");
        assert!(states.contains_key(&Uuid::from_u128(10)) && !states.contains_key(&Uuid::from_u128(20)));
    }

    #[test]
    fn held_requests_ask_for_as_many_instances_as_they_need_spread_over_zones() {
        let mut states = HashMap::new();
        let zero = Scaling { initial_scale: Some(0), ..Scaling::default() };
        let i = inputs(vec![version(10, zero, true)]);
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), 1_000_000);
        assert_eq!(placed(&o, 10), 0, "initial scale 0: nothing until demand");
        // 200 held, 7 per instance (10 × 0.7): 29 instances at once, in panic mode.
        let held = HashMap::from([(Uuid::from_u128(10), 200)]);
        let o = compute(&i, &mut states, &HashMap::new(), &held, 1_002_000);
        assert_eq!(placed(&o, 10), 29);
        assert!(o.decided[0].panicking);
        let per_node: Vec<u32> = o.assignments.values().copied().collect();
        assert_eq!(per_node.len(), 2, "both zones: {per_node:?}");
        assert!(per_node.iter().all(|n| *n >= 14), "{per_node:?}");
    }

    #[test]
    fn without_demand_a_version_parks_after_the_grace_period_and_keeps_its_nodes() {
        let mut states = HashMap::new();
        let s = Scaling {
            scale_to_zero_grace_s: Some(10),
            stable_window_s: Some(6),
            panic_window_s: Some(6),
            ..Scaling::default()
        };
        let mut i = inputs(vec![version(10, s, true)]);
        let t0 = 1_000_000;
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), t0);
        assert_eq!(placed(&o, 10), 1);
        i.current = o.assignments.clone();
        i.ready = HashMap::from([(Uuid::from_u128(10), 1)]);
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), t0 + 4_000);
        assert_eq!(placed(&o, 10), 1, "within the grace period");
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), t0 + 12_000);
        assert_eq!(placed(&o, 10), 0, "scaled to zero after the grace period");
        assert_eq!(o.assignments.len(), 1, "parked: the node keeps the version at 0 instances");
    }

    #[test]
    fn observed_concurrency_scales_up_and_the_state_survives_a_new_leader() {
        let mut states = HashMap::new();
        let i = inputs(vec![version(10, Scaling::default(), true)]);
        let now = 2_000_000u64;
        // 35 in flight for the last 60 seconds: 5 instances at 7 each.
        let samples = HashMap::from([(Uuid::from_u128(10), (1..=60).map(|s| (now - s * 1000, 35.0)).collect())]);
        let o = compute(&i, &mut states, &samples, &HashMap::new(), now);
        assert_eq!(placed(&o, 10), 5);
        // A new leader reads the stored state (JSON) and decides the same.
        let stored = serde_json::to_string(&states[&Uuid::from_u128(10)]).unwrap();
        let mut resumed = HashMap::from([(Uuid::from_u128(10), serde_json::from_str(&stored).unwrap())]);
        let again = compute(&i, &mut resumed, &samples, &HashMap::new(), now + 2000);
        assert_eq!(placed(&again, 10), 5);
    }

    #[test]
    fn a_draining_node_keeps_its_instances_until_they_are_ready_elsewhere() {
        let mut states = HashMap::new();
        let mut i = inputs(vec![version(10, Scaling { initial_scale: Some(1), ..Scaling::default() }, true)]);
        let (old, new, v) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(10));
        i.nodes[0].schedulable = false;
        i.winding_down.insert(old);
        i.current = placement::Assignments::from([((old, v), 1)]);
        i.ready = HashMap::from([(v, 1)]);
        i.ready_on = HashMap::from([((old, v), 1)]);
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), 1_000_000);
        assert_eq!(o.assignments.get(&(new, v)), Some(&1), "the replacement is placed at once");
        assert_eq!(o.assignments.get(&(old, v)), Some(&1), "the draining node keeps serving meanwhile");
        assert_eq!(o.decided[0].placed, 1, "what stays behind is not counted as placed");
        // The replacement is ready: the draining node lets go.
        i.current = o.assignments.clone();
        i.ready = HashMap::from([(v, 2)]);
        i.ready_on.insert((new, v), 1);
        let o = compute(&i, &mut states, &HashMap::new(), &HashMap::new(), 1_002_000);
        assert_eq!(o.assignments, placement::Assignments::from([((new, v), 1)]));
    }

    #[test]
    fn pokes_parse_and_sum_the_latest_count_of_each_replica_while_fresh() {
        let v = Uuid::from_u128(7);
        let (r1, r2) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert_eq!(parse_poke(&poke_payload(v, 12, r1)), Some((v, 12, r1)));
        assert_eq!(parse_poke("nope 1"), None);
        let held = Held::default();
        held.poke(v, r1, 5, 1000);
        held.poke(v, r2, 4, 1200);
        assert_eq!(held.current(2000)[&v], 9, "summed over gateway replicas");
        held.poke(v, r1, 1, 1500);
        assert_eq!(held.current(2000)[&v], 5, "a replica's latest count replaces its last");
        assert!(held.current(1500 + POKE_TTL_MS).is_empty(), "stale pokes are forgotten");
    }
}
