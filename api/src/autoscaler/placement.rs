//! Placement as a pure function: desired instance counts per version in, per-node assignments
//! out. It is deterministic (every tie is broken by version or node id) and moves as little as
//! it can: instances that can stay where they are stay; only the shortfall is placed and only
//! the surplus removed.
//!
//! **Eligibility.** A node may hold a version's instances only when it is schedulable (not
//! lost, left, removed or draining), carries every label of the function's
//! [`required`](PlacementRules::required) labels, and belongs to the right pool: a node
//! dedicated to a tenant ([`Node::dedicated_to`]) is used by that tenant's versions only, and a
//! tenant with a dedicated pool ([`Demand::dedicated`]) uses nodes of that pool only. Instances
//! on nodes that stopped being eligible (drained, labels changed, pool re-dedicated) are placed
//! elsewhere. A version that wants instances but has no eligible node at all is reported in
//! [`Placement::unschedulable`] with the rule that excludes every node (and counts as wholly
//! [`unplaced`](Placement::unplaced)); its assignments are dropped.
//!
//! **Parked versions.** A version wanted at zero instances keeps its assignments on eligible
//! nodes at count 0: they cost no memory or slot, but the node keeps the code cached, so the
//! next request starts from disk and growth prefers that node. No new parked entries are made.
//!
//! **Order.** Versions are handled by priority (critical first), then larger instances first (so
//! big instances find room before small ones fill it), then version id — first to keep what can
//! stay (within capacity, dropping the surplus from the zone with the most instances of the
//! version), then to place the shortfall.
//!
//! **Placing** one instance at a time, the candidate is the eligible node with room (memory and
//! a slot) that (a) carries most of the preferred labels — the function's
//! [`preferred`](PlacementRules::preferred) labels, plus `pool=reserved` for critical and
//! `pool=spot` for low priority unless the function prefers a `pool` itself; (b) is in the zone
//! with the fewest instances of the version; (c) holds the fewest instances of the version itself
//! (spread over the nodes of a zone); (d) already has the version's code (assigned now or before,
//! parked included); (e) has the most free memory; (f) has the lowest id.
//!
//! **Eviction.** When no eligible node has room, instances of strictly lower priority are
//! evicted from an eligible node to make room: the node needing the lowest priority class to be
//! evicted, then the fewest evictions (then preferred labels, zone spread, id); on it, the lowest
//! priority first and the smallest instance that frees enough memory (else the largest).
//! Evictions are reported in [`Placement::evicted`]; the evicted version, handled later, places
//! them elsewhere when it can and reports the rest as unplaced. Equal or higher priorities are
//! never evicted, so critical instances never make way for normal or low ones.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use rustc_hash::{FxHashMap as HashMap, FxHashSet};

use uuid::Uuid;

use crate::autoscaler::{PlacementRules, Priority};

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its id.
    pub id: Uuid,
    /// Its zone.
    pub zone: String,
    /// Memory for functions, MiB.
    pub memory_mb: u64,
    /// Instance slots.
    pub slots: u32,
    /// Whether it may take instances (ready and not draining).
    pub schedulable: bool,
    /// Its labels (matched against the functions' required and preferred labels).
    pub labels: BTreeMap<String, String>,
    /// The tenant the node's pool is dedicated to, if any.
    pub dedicated_to: Option<Uuid>,
}

/// What one version needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The version.
    pub version: Uuid,
    /// The tenant owning it.
    pub tenant: Uuid,
    /// Instances wanted (0: parked, see the module docs).
    pub instances: u32,
    /// Memory of one instance, MiB.
    pub memory_mb: u64,
    /// The function's placement rules.
    pub rules: PlacementRules,
    /// The tenant has a dedicated pool: only nodes dedicated to it qualify.
    pub dedicated: bool,
}

/// Instances per (node, version).
pub type Assignments = BTreeMap<(Uuid, Uuid), u32>;

/// The outcome: the new assignments, and per version what could not be done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Instances per (node, version); parked versions at 0.
    pub assignments: Assignments,
    /// Versions short of instances, with how many could not be placed.
    pub unplaced: BTreeMap<Uuid, u32>,
    /// Versions no schedulable node matches at all, with the reason for people.
    pub unschedulable: BTreeMap<Uuid, String>,
    /// Instances evicted per version to make room for higher priorities.
    pub evicted: BTreeMap<Uuid, u32>,
}

impl Node {
    /// Whether the node's pool is open to the demand's tenant.
    fn in_pool_of(&self, d: &Demand) -> bool {
        self.dedicated_to.is_none_or(|t| t == d.tenant) && (!d.dedicated || self.dedicated_to == Some(d.tenant))
    }

    /// Whether the node may hold the demand's instances.
    fn admits(&self, d: &Demand) -> bool {
        self.schedulable && self.in_pool_of(d) && d.rules.required.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// What is left on a usable node.
struct Room {
    memory: u64,
    slots: u32,
}

/// One placement's working state. Usable nodes are numbered in ascending id order and demands
/// by their position in the input ("slots"), so that the per-version and per-node bookkeeping
/// is small vectors instead of maps keyed by ids.
struct Work<'a> {
    /// The schedulable nodes, ascending id.
    nodes: &'a [&'a Node],
    /// Each node's zone, numbered.
    zone_of: Vec<usize>,
    /// Zones there are.
    zones: usize,
    room: Vec<Room>,
    demands: &'a [Demand],
    /// Per slot: its instances, `(node, count)`; a count is 0 only for parked entries.
    placed: Vec<Vec<(usize, u32)>>,
    /// Per node: the slots given instances there at some point (read their counts in `placed`).
    on_node: Vec<Vec<usize>>,
}

impl Work<'_> {
    fn count(&self, slot: usize, node: usize) -> u32 {
        self.placed[slot].iter().find(|(n, _)| *n == node).map_or(0, |(_, c)| *c)
    }

    fn total(&self, slot: usize) -> u32 {
        self.placed[slot].iter().map(|(_, c)| c).sum()
    }

    /// Sets a slot's count on a node it has nothing on yet.
    fn set(&mut self, slot: usize, node: usize, n: u32) {
        self.placed[slot].push((node, n));
        self.on_node[node].push(slot);
    }

    /// One more instance of `slot` on `node`.
    fn add_one(&mut self, slot: usize, node: usize) {
        match self.placed[slot].iter_mut().find(|(n, _)| *n == node) {
            Some((_, c)) => *c += 1,
            None => self.set(slot, node, 1),
        }
    }

    /// One instance of `slot` fewer on `node` (which has at least one).
    fn take_one(&mut self, slot: usize, node: usize) {
        let at = self.placed[slot].iter().position(|(n, _)| *n == node).expect("placed");
        let c = &mut self.placed[slot][at].1;
        *c -= 1;
        if *c == 0 {
            self.placed[slot].swap_remove(at);
        }
    }

    /// Instances of `slot` per zone, into `zones`.
    fn zone_counts(&self, slot: usize, zones: &mut Vec<u32>) {
        zones.clear();
        zones.resize(self.zones, 0);
        for &(n, c) in &self.placed[slot] {
            zones[self.zone_of[n]] += c;
        }
    }
}

/// Places `demands` on `nodes`, starting from `current`.
pub fn place(nodes: &[Node], demands: &[Demand], current: &Assignments) -> Placement {
    let mut usable: Vec<&Node> = nodes.iter().filter(|n| n.schedulable).collect();
    usable.sort_by_key(|n| n.id);
    usable.dedup_by_key(|n| n.id);
    let index_of: HashMap<Uuid, usize> = usable.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut zone_names: Vec<&str> = Vec::new();
    let zone_of: Vec<usize> = usable
        .iter()
        .map(|n| match zone_names.iter().position(|z| *z == n.zone) {
            Some(z) => z,
            None => {
                zone_names.push(&n.zone);
                zone_names.len() - 1
            }
        })
        .collect();
    let slot_of: HashMap<Uuid, usize> = demands.iter().enumerate().map(|(i, d)| (d.version, i)).collect();
    // Per slot, its current instances on usable nodes, ascending node id (`current` is ordered
    // by node, then version).
    let mut current_of: Vec<Vec<(usize, u32)>> = vec![Vec::new(); demands.len()];
    let mut last: Option<(Uuid, Option<usize>)> = None;
    for (&(node, version), &n) in current {
        let ix = match last {
            Some((id, ix)) if id == node => ix,
            _ => {
                let ix = index_of.get(&node).copied();
                last = Some((node, ix));
                ix
            }
        };
        if let (Some(ix), Some(&slot)) = (ix, slot_of.get(&version)) {
            current_of[slot].push((ix, n));
        }
    }
    let mut w = Work {
        room: usable.iter().map(|n| Room { memory: n.memory_mb, slots: n.slots }).collect(),
        on_node: vec![Vec::new(); usable.len()],
        zones: zone_names.len(),
        zone_of,
        nodes: &usable,
        demands,
        placed: vec![Vec::new(); demands.len()],
    };
    let mut out = Placement::default();

    // Critical first, then larger versions, so that big instances find room before small ones fill it.
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&demands[a], &demands[b]);
        b.rules.priority.cmp(&a.rules.priority).then(b.memory_mb.cmp(&a.memory_mb)).then(a.version.cmp(&b.version))
    });
    let mut eligibility = Eligibility::new(&usable);
    let mut zones = Vec::new();

    for &s in &order {
        let d = &demands[s];
        let eligible = eligibility.of(d);
        if eligible.is_empty() {
            if d.instances > 0 {
                out.unschedulable.insert(d.version, unschedulable_reason(nodes, d));
                out.unplaced.insert(d.version, d.instances);
            }
            continue;
        }

        // 1. Keep what can stay: on eligible nodes, within capacity; parked versions at 0.
        for &(node, n) in &current_of[s] {
            if eligible.binary_search(&node).is_err() {
                continue;
            }
            if d.instances == 0 {
                w.set(s, node, 0);
                continue;
            }
            let r = &mut w.room[node];
            let fits = u64::from(r.slots.min(n)).min(r.memory / d.memory_mb.max(1)) as u32;
            if fits > 0 {
                r.slots -= fits;
                r.memory -= u64::from(fits) * d.memory_mb;
                w.set(s, node, fits);
            }
        }

        // 2. Remove the surplus, from the zone with the most instances of the version first.
        let mut surplus = w.total(s).saturating_sub(d.instances);
        while surplus > 0 {
            w.zone_counts(s, &mut zones);
            let Some(&(node, _)) = w.placed[s].iter().max_by_key(|(n, c)| (zones[w.zone_of[*n]], *c, Reverse(*n)))
            else {
                break;
            };
            w.take_one(s, node);
            let r = &mut w.room[node];
            r.slots += 1;
            r.memory += d.memory_mb;
            surplus -= 1;
        }
    }

    // 3. Place the shortfall one instance at a time (see the module docs for the ranking),
    //    evicting lower priorities when no eligible node has room.
    for &s in &order {
        let d = &demands[s];
        if d.instances == 0 || out.unschedulable.contains_key(&d.version) {
            continue;
        }
        let mut missing = d.instances.saturating_sub(w.total(s));
        if missing == 0 {
            continue;
        }
        let eligible = eligibility.of(d);
        let preferred = preferred_labels(&d.rules);
        let prefers: Vec<usize> = eligible.iter().map(|&n| matches(w.nodes[n], &preferred)).collect();
        while missing > 0 {
            w.zone_counts(s, &mut zones);
            let candidate = eligible
                .iter()
                .zip(&prefers)
                .filter(|(n, _)| w.room[**n].slots > 0 && w.room[**n].memory >= d.memory_mb)
                .min_by_key(|&(&n, &prefer)| {
                    let here = w.count(s, n);
                    let cached = here > 0 || current_of[s].iter().any(|(x, _)| *x == n);
                    (Reverse(prefer), zones[w.zone_of[n]], here, !cached, Reverse(w.room[n].memory), n)
                })
                .map(|(n, _)| *n);
            let candidate = candidate.or_else(|| evict_for(s, &eligible, &prefers, &zones, &mut w, &mut out));
            let Some(node) = candidate else { break };
            let r = &mut w.room[node];
            r.slots -= 1;
            r.memory -= d.memory_mb;
            w.add_one(s, node);
            missing -= 1;
        }
        if missing > 0 {
            out.unplaced.insert(d.version, missing);
        }
    }

    let mut rows: Vec<((Uuid, Uuid), u32)> = Vec::with_capacity(w.placed.iter().map(Vec::len).sum());
    for (s, placed) in w.placed.iter().enumerate() {
        rows.extend(placed.iter().map(|&(n, c)| ((w.nodes[n].id, demands[s].version), c)));
    }
    rows.sort_unstable_by_key(|r| r.0);
    out.assignments = rows.into_iter().collect();
    out
}

/// The eligible nodes of each demand (node numbers ascending, i.e. ids ascending), computed once
/// per distinct eligibility: demands requiring the same labels and seeing the same pools share
/// one list, so that ten thousand versions do not each test every node.
struct Eligibility<'a> {
    nodes: &'a [&'a Node],
    /// Tenants some node is dedicated to: only their demands see pools the others do not.
    owners: FxHashSet<Uuid>,
    lists: HashMap<EligibilityKey<'a>, std::rc::Rc<[usize]>>,
}

/// What decides a demand's eligible nodes: its required labels, whether its tenant has a
/// dedicated pool, and its tenant when some node is dedicated to it.
type EligibilityKey<'a> = (&'a BTreeMap<String, String>, bool, Option<Uuid>);

impl<'a> Eligibility<'a> {
    fn new(nodes: &'a [&'a Node]) -> Self {
        let owners = nodes.iter().filter_map(|n| n.dedicated_to).collect();
        Eligibility { nodes, owners, lists: HashMap::default() }
    }

    fn of(&mut self, d: &'a Demand) -> std::rc::Rc<[usize]> {
        // Whether a node admits `d` depends on its required labels, on whether its tenant has
        // a dedicated pool, and on its tenant only when some node is dedicated to that tenant.
        let tenant = (d.dedicated || self.owners.contains(&d.tenant)).then_some(d.tenant);
        let nodes = self.nodes;
        self.lists
            .entry((&d.rules.required, d.dedicated, tenant))
            .or_insert_with(|| nodes.iter().enumerate().filter(|(_, n)| n.admits(d)).map(|(i, _)| i).collect())
            .clone()
    }
}

/// The labels a demand prefers: its own, plus the pool its priority prefers unless it names one.
fn preferred_labels(rules: &PlacementRules) -> Vec<(&str, &str)> {
    let mut labels: Vec<(&str, &str)> = rules.preferred.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if !rules.preferred.contains_key("pool") {
        match rules.priority {
            Priority::Critical => labels.push(("pool", "reserved")),
            Priority::Low => labels.push(("pool", "spot")),
            Priority::Normal => {}
        }
    }
    labels
}

fn matches(node: &Node, labels: &[(&str, &str)]) -> usize {
    labels.iter().filter(|(k, v)| node.labels.get(*k).is_some_and(|x| x == v)).count()
}

/// Why no schedulable node admits `d`, naming the rule that excludes them.
fn unschedulable_reason(nodes: &[Node], d: &Demand) -> String {
    let ready: Vec<&Node> = nodes.iter().filter(|n| n.schedulable).collect();
    if ready.is_empty() {
        return "no ready node".into();
    }
    if !ready.iter().any(|n| n.in_pool_of(d)) {
        return if d.dedicated {
            "no ready node in the tenant's dedicated pool".into()
        } else {
            "no ready node available to the tenant".into()
        };
    }
    let labels: Vec<String> = d.rules.required.iter().map(|(k, v)| format!("{k}={v}")).collect();
    // Nothing about other tenants' pools is told: only what this tenant may use.
    let pool = if d.dedicated { " in the tenant's dedicated pool" } else { " available to the tenant" };
    format!("no ready node{pool} has the labels {}", labels.join(", "))
}

/// Makes room for one instance of slot `s` on one of its `eligible` nodes (with how many of its
/// preferred labels each carries) by evicting instances of strictly lower priority (see the
/// module docs), and returns that node.
fn evict_for(
    s: usize,
    eligible: &[usize],
    prefers: &[usize],
    zones: &[u32],
    w: &mut Work<'_>,
    out: &mut Placement,
) -> Option<usize> {
    let d = &w.demands[s];
    let fits = |slots: u32, memory: u64| slots > 0 && memory >= d.memory_mb;
    // Which node: (highest priority evicted, evictions, preferred labels, zone spread, node).
    type Key = (Priority, usize, Reverse<usize>, u32, usize);
    // The instances to evict: (priority, memory, slot).
    type Evictions = Vec<(Priority, u64, usize)>;
    let mut best: Option<(Key, Evictions)> = None;
    for (&n, &prefer) in eligible.iter().zip(prefers) {
        let node = w.nodes[n];
        if !fits(node.slots, node.memory_mb) {
            continue;
        }
        // (priority, memory, version, count, slot) of the instances that may make way, on this node.
        let mut candidates = w.on_node[n].clone();
        candidates.sort_unstable();
        candidates.dedup();
        let mut victims: Vec<(Priority, u64, Uuid, u32, usize)> = candidates
            .into_iter()
            .filter_map(|v| {
                let vd = &w.demands[v];
                let c = w.count(v, n);
                // Another tenant's instances make way only when they are `low` (evictable by
                // choice): a tenant cannot push others' normal work off by calling its own critical.
                let evictable = vd.rules.priority < d.rules.priority
                    && (vd.tenant == d.tenant || vd.rules.priority == Priority::Low);
                (c > 0 && evictable).then_some((vd.rules.priority, vd.memory_mb, vd.version, c, v))
            })
            .collect();
        let (mut slots, mut memory) = (w.room[n].slots, w.room[n].memory);
        let mut chosen: Evictions = Vec::new();
        while !fits(slots, memory) {
            let Some(p) = victims.iter().filter(|x| x.3 > 0).map(|x| x.0).min() else { break };
            let deficit = d.memory_mb.saturating_sub(memory);
            let class = || victims.iter().enumerate().filter(|(_, x)| x.3 > 0 && x.0 == p);
            let pick = class()
                .filter(|(_, x)| x.1 >= deficit)
                .min_by_key(|(_, x)| (x.1, x.2))
                .or_else(|| class().max_by_key(|(_, x)| (x.1, Reverse(x.2))))
                .map(|(i, _)| i)
                .expect("a victim of that priority");
            let victim = &mut victims[pick];
            victim.3 -= 1;
            slots += 1;
            memory += victim.1;
            chosen.push((p, victim.1, victim.4));
        }
        if !fits(slots, memory) {
            continue;
        }
        // Give back the instances that turned out not to be needed, the last taken first.
        for i in (0..chosen.len()).rev() {
            let (_, mem, _) = chosen[i];
            if fits(slots - 1, memory - mem) {
                slots -= 1;
                memory -= mem;
                chosen.remove(i);
            }
        }
        let worst = chosen.iter().map(|c| c.0).max().unwrap_or(Priority::Low);
        let key = (worst, chosen.len(), Reverse(prefer), zones[w.zone_of[n]], n);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, chosen));
        }
    }
    let ((.., node), chosen) = best?;
    for (_, mem, victim) in chosen {
        w.take_one(victim, node);
        let r = &mut w.room[node];
        r.slots += 1;
        r.memory += mem;
        *out.evicted.entry(w.demands[victim].version).or_insert(0) += 1;
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tenant of [`demand`]s unless told otherwise.
    const TENANT: u128 = 1000;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn node(n: u128, zone: &str, memory_mb: u64, slots: u32) -> Node {
        Node {
            id: id(n),
            zone: zone.into(),
            memory_mb,
            slots,
            schedulable: true,
            labels: BTreeMap::new(),
            dedicated_to: None,
        }
    }

    fn demand(v: u128, instances: u32, memory_mb: u64) -> Demand {
        Demand {
            version: id(v),
            tenant: id(TENANT),
            instances,
            memory_mb,
            rules: PlacementRules::default(),
            dedicated: false,
        }
    }

    impl Node {
        fn label(mut self, k: &str, v: &str) -> Self {
            self.labels.insert(k.into(), v.into());
            self
        }

        fn pool_of(mut self, tenant: u128) -> Self {
            self.dedicated_to = Some(id(tenant));
            self
        }

        fn unschedulable(mut self) -> Self {
            self.schedulable = false;
            self
        }
    }

    impl Demand {
        fn at(mut self, priority: Priority) -> Self {
            self.rules.priority = priority;
            self
        }

        fn requiring(mut self, k: &str, v: &str) -> Self {
            self.rules.required.insert(k.into(), v.into());
            self
        }

        fn preferring(mut self, k: &str, v: &str) -> Self {
            self.rules.preferred.insert(k.into(), v.into());
            self
        }

        fn of(mut self, tenant: u128) -> Self {
            self.tenant = id(tenant);
            self
        }

        fn in_dedicated_pool(mut self) -> Self {
            self.dedicated = true;
            self
        }
    }

    /// Assignments from `(node, version, count)`.
    fn a(entries: &[(u128, u128, u32)]) -> Assignments {
        entries.iter().map(|&(n, v, c)| ((id(n), id(v)), c)).collect()
    }

    /// Per-version counts from `(version, count)`.
    fn counts(entries: &[(u128, u32)]) -> BTreeMap<Uuid, u32> {
        entries.iter().map(|&(v, c)| (id(v), c)).collect()
    }

    /// Instances of version `v` per zone.
    fn per_zone(p: &Placement, nodes: &[Node], v: u128) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for ((n, ver), c) in &p.assignments {
            if *ver == id(v) {
                let zone = nodes.iter().find(|x| x.id == *n).unwrap().zone.clone();
                *out.entry(zone).or_insert(0) += c;
            }
        }
        out
    }

    fn total(p: &Placement, v: u128) -> u32 {
        p.assignments.iter().filter(|((_, ver), _)| *ver == id(v)).map(|(_, c)| c).sum()
    }

    #[test]
    fn instances_spread_across_zones() {
        let nodes = [node(1, "a", 4096, 10), node(2, "a", 4096, 10), node(3, "b", 4096, 10)];
        let p = place(&nodes, &[demand(10, 4, 128)], &Assignments::new());
        assert_eq!(per_zone(&p, &nodes, 10), BTreeMap::from([("a".into(), 2), ("b".into(), 2)]));
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn capacity_is_respected_and_the_shortfall_is_reported() {
        let nodes = [node(1, "a", 1024, 10), node(2, "b", 4096, 1)];
        // 512 MiB each: node 1 holds 2 by memory, node 2 holds 1 by slots.
        let p = place(&nodes, &[demand(10, 5, 512)], &Assignments::new());
        assert_eq!(p.assignments, Assignments::from([((id(1), id(10)), 2), ((id(2), id(10)), 1)]));
        assert_eq!(p.unplaced, BTreeMap::from([(id(10), 2)]));
    }

    #[test]
    fn a_lost_or_draining_nodes_instances_are_placed_elsewhere() {
        let mut nodes = vec![node(1, "a", 4096, 10), node(2, "b", 4096, 10), node(3, "b", 4096, 10)];
        let current = Assignments::from([((id(1), id(10)), 1), ((id(2), id(10)), 1)]);
        nodes[1].schedulable = false;
        let p = place(&nodes, &[demand(10, 2, 128)], &current);
        assert_eq!(p.assignments, Assignments::from([((id(1), id(10)), 1), ((id(3), id(10)), 1)]), "zone b kept");
    }

    #[test]
    fn instances_that_can_stay_stay() {
        let nodes = [node(1, "a", 4096, 10), node(2, "a", 4096, 10), node(3, "b", 4096, 10)];
        let current = Assignments::from([((id(2), id(10)), 1), ((id(3), id(10)), 1)]);
        let p = place(&nodes, &[demand(10, 2, 128)], &current);
        assert_eq!(p.assignments, current, "nothing moves when the demand is already met");
    }

    #[test]
    fn growth_prefers_nodes_that_already_hold_the_version() {
        let nodes = [node(1, "a", 8192, 10), node(2, "a", 4096, 10)];
        // Parked on node 2: its code is there, so the first instance goes there despite less room.
        let current = Assignments::from([((id(2), id(10)), 0)]);
        let p = place(&nodes, &[demand(10, 1, 128)], &current);
        assert_eq!(p.assignments, Assignments::from([((id(2), id(10)), 1)]), "code cached on node 2");
    }

    #[test]
    fn instances_spread_over_the_nodes_of_a_zone() {
        let nodes = [node(1, "a", 8192, 10), node(2, "a", 4096, 10), node(3, "b", 4096, 10)];
        let p = place(&nodes, &[demand(10, 3, 128)], &Assignments::new());
        assert_eq!(
            p.assignments,
            Assignments::from([((id(1), id(10)), 1), ((id(2), id(10)), 1), ((id(3), id(10)), 1)]),
            "one per node, not two on the roomiest"
        );
    }

    #[test]
    fn shrinking_removes_from_the_most_crowded_zone() {
        let nodes = [node(1, "a", 4096, 10), node(2, "a", 4096, 10), node(3, "b", 4096, 10)];
        let current = Assignments::from([((id(1), id(10)), 2), ((id(2), id(10)), 1), ((id(3), id(10)), 1)]);
        let p = place(&nodes, &[demand(10, 2, 128)], &current);
        assert_eq!(per_zone(&p, &nodes, 10), BTreeMap::from([("a".into(), 1), ("b".into(), 1)]));
    }

    #[test]
    fn zero_removes_a_version_and_frees_its_room_for_others() {
        let nodes = [node(1, "a", 1024, 10)];
        let current = Assignments::from([((id(1), id(10)), 2)]);
        let p = place(&nodes, &[demand(10, 0, 512), demand(11, 2, 512)], &current);
        // Version 10 stays parked at 0 on its node (see `parked_versions_keep_their_nodes_at_no_cost`).
        assert_eq!(p.assignments, Assignments::from([((id(1), id(10)), 0), ((id(1), id(11)), 2)]));
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn big_instances_are_placed_before_small_ones_fill_the_room() {
        let nodes = [node(1, "a", 1024, 10)];
        let p = place(&nodes, &[demand(10, 4, 128), demand(11, 1, 1024)], &Assignments::new());
        assert_eq!(total(&p, 11), 1);
        assert_eq!(p.unplaced, BTreeMap::from([(id(10), 4)]));
    }

    #[test]
    fn no_schedulable_node_places_nothing() {
        let mut nodes = vec![node(1, "a", 4096, 10)];
        nodes[0].schedulable = false;
        let p = place(&nodes, &[demand(10, 3, 128)], &Assignments::new());
        assert!(p.assignments.is_empty());
        assert_eq!(p.unplaced, BTreeMap::from([(id(10), 3)]));
    }

    #[test]
    fn required_labels_limit_the_nodes_used() {
        let nodes = [
            node(1, "a", 1024, 10).label("accelerator", "gpu"),
            node(2, "b", 8192, 10),
            node(3, "b", 8192, 10).label("accelerator", "tpu"),
        ];
        let cases = [
            (
                "gpu only, short of room",
                demand(10, 3, 512).requiring("accelerator", "gpu"),
                a(&[(1, 10, 2)]),
                counts(&[(10, 1)]),
            ),
            ("tpu only", demand(10, 2, 512).requiring("accelerator", "tpu"), a(&[(3, 10, 2)]), counts(&[])),
            ("no requirement, spread", demand(10, 2, 512), a(&[(1, 10, 1), (2, 10, 1)]), counts(&[])),
        ];
        for (name, d, assignments, unplaced) in cases {
            let p = place(&nodes, &[d], &Assignments::new());
            assert_eq!(p.assignments, assignments, "{name}");
            assert_eq!(p.unplaced, unplaced, "{name}");
            assert!(p.unschedulable.is_empty(), "{name}");
        }
    }

    #[test]
    fn preferred_labels_are_used_when_they_have_room_and_ignored_when_not() {
        // Without a preference that matches, instances spread over both nodes.
        let nodes = [node(1, "a", 512, 10).label("region", "eu"), node(2, "a", 8192, 10).label("region", "us")];
        let cases = [
            ("room for one on eu", demand(10, 3, 512).preferring("region", "eu"), a(&[(1, 10, 1), (2, 10, 2)])),
            ("no eu room at all", demand(10, 2, 1024).preferring("region", "eu"), a(&[(2, 10, 2)])),
            ("no node matches", demand(10, 2, 512).preferring("region", "ap"), a(&[(1, 10, 1), (2, 10, 1)])),
        ];
        for (name, d, assignments) in cases {
            let p = place(&nodes, &[d], &Assignments::new());
            assert_eq!(p.assignments, assignments, "{name}");
            assert!(p.unplaced.is_empty() && p.unschedulable.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_version_no_node_matches_is_unschedulable_with_the_reason() {
        let shared = node(1, "a", 4096, 10);
        let others = node(2, "a", 4096, 10).label("accelerator", "gpu").pool_of(2000);
        let down = node(3, "a", 4096, 10).label("accelerator", "gpu").unschedulable();
        let all = vec![shared.clone(), others.clone(), down];
        let cases = [
            (
                "required label on no ready node",
                all.clone(),
                demand(10, 2, 128).requiring("accelerator", "tpu"),
                "no ready node available to the tenant has the labels accelerator=tpu",
            ),
            (
                "tenant without a ready pool node",
                all.clone(),
                demand(10, 2, 128).of(3000).in_dedicated_pool(),
                "no ready node in the tenant's dedicated pool",
            ),
            (
                "labels missing in the pool",
                all.clone(),
                demand(10, 2, 128).of(2000).in_dedicated_pool().requiring("accelerator", "tpu"),
                "no ready node in the tenant's dedicated pool has the labels accelerator=tpu",
            ),
            (
                "only other tenants' pools",
                vec![others.clone()],
                demand(10, 2, 128),
                "no ready node available to the tenant",
            ),
            (
                "the labelled nodes are other tenants'",
                all.clone(),
                demand(10, 2, 128).requiring("accelerator", "gpu"),
                "no ready node available to the tenant has the labels accelerator=gpu",
            ),
        ];
        for (name, nodes, d, reason) in cases {
            // Its current instance (on the shared node, when there is one) is dropped too.
            let p = place(&nodes, &[d], &a(&[(1, 10, 1)]));
            assert_eq!(p.unschedulable, BTreeMap::from([(id(10), reason.to_string())]), "{name}");
            assert_eq!(p.unplaced, counts(&[(10, 2)]), "{name}");
            assert!(p.assignments.is_empty(), "{name}");
        }
        // A parked version is not unschedulable (it wants nothing); its entries just go.
        let p = place(&all, &[demand(10, 0, 128).requiring("accelerator", "gpu")], &a(&[(1, 10, 1)]));
        assert_eq!(p, Placement::default());
    }

    #[test]
    fn dedicated_pools_are_never_shared() {
        // Node 1 is tenant 2000's pool and has all the room; node 2 is shared and holds one.
        let nodes = [node(1, "a", 8192, 10).pool_of(2000), node(2, "b", 512, 10)];
        let other = || demand(10, 3, 512);
        let owner = || demand(20, 2, 512).of(2000).in_dedicated_pool();
        let cases = [
            (
                "other tenant, only the pool has room",
                vec![other()],
                a(&[(1, 10, 1)]),
                a(&[(2, 10, 1)]),
                counts(&[(10, 2)]),
            ),
            ("owner, only its pool despite zone spread", vec![owner()], a(&[]), a(&[(1, 20, 2)]), counts(&[])),
            (
                "both",
                vec![other(), owner()],
                a(&[(1, 10, 1), (2, 20, 1)]),
                a(&[(1, 20, 2), (2, 10, 1)]),
                counts(&[(10, 2)]),
            ),
            // Tenant 2000 without a dedicated pool may still use its own nodes and shared ones.
            (
                "owner, not dedicated",
                vec![demand(20, 2, 512).of(2000)],
                a(&[]),
                a(&[(1, 20, 1), (2, 20, 1)]),
                counts(&[]),
            ),
        ];
        for (name, demands, current, assignments, unplaced) in cases {
            let p = place(&nodes, &demands, &current);
            assert_eq!(p.assignments, assignments, "{name}");
            assert_eq!(p.unplaced, unplaced, "{name}");
            assert!(p.evicted.is_empty() && p.unschedulable.is_empty(), "{name}");
        }
    }

    #[test]
    fn higher_priorities_are_placed_and_kept_first_under_shortage() {
        use Priority::*;
        let nodes = [node(1, "a", 1024, 10)];
        let cases = [
            // Without priorities the larger low instance would be placed first.
            (
                "critical placed before a larger low",
                vec![demand(10, 1, 1024).at(Low), demand(20, 1, 256).at(Critical)],
                a(&[]),
                a(&[(1, 20, 1)]),
                counts(&[(10, 1)]),
            ),
            (
                "normal placed before a larger low",
                vec![demand(10, 1, 1024).at(Low), demand(20, 1, 256).at(Normal)],
                a(&[]),
                a(&[(1, 20, 1)]),
                counts(&[(10, 1)]),
            ),
            // The node shrank: only one of the two may stay, and it is the critical one (no eviction needed).
            (
                "critical kept before low",
                vec![demand(10, 1, 1024).at(Low), demand(20, 1, 1024).at(Critical)],
                a(&[(1, 10, 1), (1, 20, 1)]),
                a(&[(1, 20, 1)]),
                counts(&[(10, 1)]),
            ),
        ];
        for (name, demands, current, assignments, unplaced) in cases {
            let p = place(&nodes, &demands, &current);
            assert_eq!(p.assignments, assignments, "{name}");
            assert_eq!(p.unplaced, unplaced, "{name}");
            assert!(p.evicted.is_empty(), "{name}");
        }
    }

    #[test]
    fn only_strictly_lower_priorities_are_evicted() {
        use Priority::*;
        // Version 10 fills the only node; version 20 wants one more instance of the same size.
        let nodes = [node(1, "a", 1024, 10)];
        let current = a(&[(1, 10, 2)]);
        let cases = [
            (Low, Critical, true),
            (Low, Normal, true),
            (Normal, Critical, true),
            (Low, Low, false),
            (Normal, Normal, false),
            (Critical, Critical, false),
            (Normal, Low, false),
            (Critical, Low, false),
            (Critical, Normal, false),
        ];
        for (held, wanting, evicts) in cases {
            let p = place(&nodes, &[demand(10, 2, 512).at(held), demand(20, 1, 512).at(wanting)], &current);
            let name = format!("{held:?} for {wanting:?}");
            if evicts {
                assert_eq!(p.assignments, a(&[(1, 10, 1), (1, 20, 1)]), "{name}");
                assert_eq!(p.evicted, counts(&[(10, 1)]), "{name}");
                assert_eq!(p.unplaced, counts(&[(10, 1)]), "{name}");
            } else {
                assert_eq!(p.assignments, current, "{name}");
                assert!(p.evicted.is_empty(), "{name}");
                assert_eq!(p.unplaced, counts(&[(20, 1)]), "{name}");
            }
        }
    }

    #[test]
    fn eviction_takes_the_lowest_priority_and_the_fewest_instances() {
        use Priority::*;
        let low = |v, n, mb| demand(v, n, mb).at(Low);
        let cases = [
            // Node 1 holds two lows, node 2 one normal: the lows go (though it takes two), and
            // one of them finds room again beside the normal.
            (
                "lowest priority first, evicted placed elsewhere",
                vec![node(1, "a", 1024, 10), node(2, "a", 1024, 10)],
                vec![low(10, 2, 512), demand(11, 1, 512), demand(20, 1, 1024).at(Critical)],
                a(&[(1, 10, 2), (2, 11, 1)]),
                a(&[(1, 20, 1), (2, 10, 1), (2, 11, 1)]),
                counts(&[(10, 2)]),
                counts(&[(10, 1)]),
            ),
            // The smallest instance that frees enough room goes, not the larger one.
            (
                "smallest sufficient instance",
                vec![node(1, "a", 1024, 10)],
                vec![low(10, 1, 768), low(11, 1, 256), demand(20, 1, 256).at(Critical)],
                a(&[(1, 10, 1), (1, 11, 1)]),
                a(&[(1, 10, 1), (1, 20, 1)]),
                counts(&[(11, 1)]),
                counts(&[(11, 1)]),
            ),
            // Two nodes of lows: the one where a single eviction is enough.
            (
                "fewest evictions",
                vec![node(1, "a", 1024, 10), node(2, "a", 1024, 10)],
                vec![low(10, 2, 512), low(11, 1, 1024), demand(20, 1, 1024).at(Critical)],
                a(&[(1, 10, 2), (2, 11, 1)]),
                a(&[(1, 10, 2), (2, 20, 1)]),
                counts(&[(11, 1)]),
                counts(&[(11, 1)]),
            ),
        ];
        for (name, nodes, demands, current, assignments, evicted, unplaced) in cases {
            let p = place(&nodes, &demands, &current);
            assert_eq!(p.assignments, assignments, "{name}");
            assert_eq!(p.evicted, evicted, "{name}");
            assert_eq!(p.unplaced, unplaced, "{name}");
        }
    }

    #[test]
    fn priorities_prefer_their_pool_unless_the_function_names_one() {
        use Priority::*;
        // Same zone; the unlabelled node has the most memory, so it wins every other tie.
        let nodes = [
            node(1, "a", 2048, 10).label("pool", "reserved"),
            node(2, "a", 2048, 10).label("pool", "spot"),
            node(3, "a", 8192, 10),
        ];
        let cases = [
            ("critical on reserved", demand(10, 1, 128).at(Critical), 1),
            ("low on spot", demand(10, 1, 128).at(Low), 2),
            ("normal anywhere", demand(10, 1, 128).at(Normal), 3),
            ("critical preferring spot", demand(10, 1, 128).at(Critical).preferring("pool", "spot"), 2),
            ("low preferring another pool", demand(10, 1, 128).at(Low).preferring("pool", "general"), 3),
        ];
        for (name, d, on) in cases {
            let p = place(&nodes, &[d], &Assignments::new());
            assert_eq!(p.assignments, a(&[(on, 10, 1)]), "{name}");
        }
    }

    #[test]
    fn parked_versions_keep_their_nodes_at_no_cost() {
        let nodes = [
            node(1, "a", 1024, 2).label("accelerator", "gpu"),
            node(2, "a", 4096, 10).label("accelerator", "gpu").unschedulable(),
            node(3, "a", 4096, 10),
            node(4, "b", 512, 1).label("accelerator", "gpu"),
        ];
        // Version 10 is parked; its entries on the drained node 2 and the no-longer-matching
        // node 3 go, the one on node 1 stays at 0 without taking the room version 11 needs,
        // and no entry is made on node 4.
        let current = a(&[(1, 10, 3), (2, 10, 1), (3, 10, 1)]);
        let demands =
            [demand(10, 0, 512).requiring("accelerator", "gpu"), demand(11, 3, 512).requiring("accelerator", "gpu")];
        let p = place(&nodes, &demands, &current);
        assert_eq!(p.assignments, a(&[(1, 10, 0), (1, 11, 2), (4, 11, 1)]));
        assert!(p.unplaced.is_empty() && p.unschedulable.is_empty() && p.evicted.is_empty());

        // Waking up, a parked version goes back to the node that has its code (though node 5 has more memory).
        let nodes = [node(5, "a", 8192, 10), node(6, "a", 4096, 10)];
        let p = place(&nodes, &[demand(12, 1, 128)], &a(&[(6, 12, 0)]));
        assert_eq!(p.assignments, a(&[(6, 12, 1)]));
    }

    #[test]
    fn a_label_change_moves_instances_off() {
        // Node 1 lost its gpu label; node 2 gained it.
        let nodes = [node(1, "a", 4096, 10), node(2, "a", 4096, 10).label("accelerator", "gpu")];
        let current = a(&[(1, 10, 2), (1, 11, 1)]);
        let demands = [
            demand(10, 2, 128).requiring("accelerator", "gpu"),
            // Preferences are soft: an instance that may stay does.
            demand(11, 1, 128).preferring("accelerator", "gpu"),
        ];
        let p = place(&nodes, &demands, &current);
        assert_eq!(p.assignments, a(&[(1, 11, 1), (2, 10, 2)]));
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn another_tenants_instances_make_way_only_when_low() {
        use Priority::*;
        let nodes = [node(1, "a", 1024, 10)];
        for (victim, evicted) in [(Normal, false), (Low, true)] {
            // Tenant 3000's critical version wants the room tenant 1000's version holds.
            let current = Assignments::from([((id(1), id(10)), 2)]);
            let demands = [demand(10, 2, 512).at(victim), demand(20, 1, 512).at(Critical).of(3000)];
            let p = place(&nodes, &demands, &current);
            let name = format!("{victim:?}");
            assert_eq!(p.evicted.contains_key(&id(10)), evicted, "{name}");
            assert_eq!(p.assignments.get(&(id(1), id(20))).copied().unwrap_or(0), u32::from(evicted), "{name}");
        }
    }
}
