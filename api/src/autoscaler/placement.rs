//! Placement as a pure function: desired instance counts per version in, per-node assignments
//! out, respecting each node's capacity (memory and instance slots), spreading each version
//! across zones, preferring nodes that already hold the version (its code is cached there, its
//! instances warm), and never using nodes that are lost, left, removed or draining — whose
//! instances are therefore placed elsewhere on the next tick.
//!
//! It is deterministic (ties broken by node id), and moves as little as it can: instances that
//! can stay where they are stay; only the shortfall is placed and only the surplus removed.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

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
}

/// What one version needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The version.
    pub version: Uuid,
    /// Instances wanted.
    pub instances: u32,
    /// Memory of one instance, MiB.
    pub memory_mb: u64,
}

/// Instances per (node, version).
pub type Assignments = BTreeMap<(Uuid, Uuid), u32>;

/// The outcome: the new assignments, and per version the instances that found no room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Instances per (node, version).
    pub assignments: Assignments,
    /// Versions short of instances, with how many could not be placed.
    pub unplaced: BTreeMap<Uuid, u32>,
}

struct Room {
    memory: u64,
    slots: u32,
}

/// Places `demands` on `nodes`, starting from `current`.
pub fn place(nodes: &[Node], demands: &[Demand], current: &Assignments) -> Placement {
    let usable: HashMap<Uuid, &Node> = nodes.iter().filter(|n| n.schedulable).map(|n| (n.id, n)).collect();
    let memory_of: HashMap<Uuid, u64> = demands.iter().map(|d| (d.version, d.memory_mb)).collect();
    let wanted: HashMap<Uuid, u32> = demands.iter().map(|d| (d.version, d.instances)).collect();
    let mut room: BTreeMap<Uuid, Room> =
        usable.values().map(|n| (n.id, Room { memory: n.memory_mb, slots: n.slots })).collect();
    let mut out = Placement::default();

    // 1. Keep what can stay: on usable nodes, for versions still wanted, within capacity.
    for (&(node, version), &n) in current {
        let (Some(r), Some(&mem)) = (room.get_mut(&node), memory_of.get(&version)) else { continue };
        if wanted.get(&version).copied().unwrap_or(0) == 0 {
            continue;
        }
        let fits = (r.slots.min((r.memory / mem.max(1)) as u32)).min(n);
        if fits > 0 {
            r.slots -= fits;
            r.memory -= u64::from(fits) * mem;
            out.assignments.insert((node, version), fits);
        }
    }

    // Larger versions first, so that big instances find room before small ones fill it.
    let mut order: Vec<&Demand> = demands.iter().collect();
    order.sort_by(|a, b| b.memory_mb.cmp(&a.memory_mb).then(a.version.cmp(&b.version)));
    for d in order {
        let placed_on = |out: &Placement| -> Vec<(Uuid, u32)> {
            out.assignments.iter().filter(|((_, v), _)| *v == d.version).map(|((n, _), c)| (*n, *c)).collect()
        };
        let have: u32 = placed_on(&out).iter().map(|(_, c)| c).sum();

        // 2. Remove the surplus, from the zone with the most instances of the version first.
        let mut surplus = have.saturating_sub(d.instances);
        while surplus > 0 {
            let zones = zone_counts(&placed_on(&out), &usable);
            let Some((node, _)) = placed_on(&out)
                .into_iter()
                .max_by_key(|(n, c)| (zones.get(&usable[n].zone).copied().unwrap_or(0), *c, std::cmp::Reverse(*n)))
            else {
                break;
            };
            let count = out.assignments.get_mut(&(node, d.version)).expect("placed");
            *count -= 1;
            if *count == 0 {
                out.assignments.remove(&(node, d.version));
            }
            let r = room.get_mut(&node).expect("usable");
            r.slots += 1;
            r.memory += d.memory_mb;
            surplus -= 1;
        }

        // 3. Place the shortfall one instance at a time: the zone with the fewest instances of
        //    the version, then a node already holding it, then the node with the most room.
        let mut missing = d.instances.saturating_sub(have);
        while missing > 0 {
            let zones = zone_counts(&placed_on(&out), &usable);
            let held: HashMap<Uuid, u32> = placed_on(&out).into_iter().collect();
            let candidate = room
                .iter()
                .filter(|(_, r)| r.slots > 0 && r.memory >= d.memory_mb)
                .min_by_key(|(id, r)| {
                    let zone = zones.get(&usable[*id].zone).copied().unwrap_or(0);
                    let cached = held.get(*id).copied().unwrap_or(0) > 0
                        || current.get(&(**id, d.version)).copied().unwrap_or(0) > 0;
                    (zone, !cached, std::cmp::Reverse(r.memory), **id)
                })
                .map(|(id, _)| *id);
            let Some(node) = candidate else { break };
            let r = room.get_mut(&node).expect("usable");
            r.slots -= 1;
            r.memory -= d.memory_mb;
            *out.assignments.entry((node, d.version)).or_insert(0) += 1;
            missing -= 1;
        }
        if missing > 0 {
            out.unplaced.insert(d.version, missing);
        }
    }
    out
}

fn zone_counts(placed: &[(Uuid, u32)], nodes: &HashMap<Uuid, &Node>) -> HashMap<String, u32> {
    let mut zones: HashMap<String, u32> = HashMap::new();
    for n in nodes.values() {
        zones.entry(n.zone.clone()).or_insert(0);
    }
    for (node, c) in placed {
        *zones.entry(nodes[node].zone.clone()).or_insert(0) += c;
    }
    zones
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn node(n: u128, zone: &str, memory_mb: u64, slots: u32) -> Node {
        Node { id: id(n), zone: zone.into(), memory_mb, slots, schedulable: true }
    }

    fn demand(v: u128, instances: u32, memory_mb: u64) -> Demand {
        Demand { version: id(v), instances, memory_mb }
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
        let current = Assignments::from([((id(2), id(10)), 1)]);
        let p = place(&nodes, &[demand(10, 2, 128)], &current);
        assert_eq!(p.assignments, Assignments::from([((id(2), id(10)), 2)]), "code cached on node 2");
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
        assert_eq!(p.assignments, Assignments::from([((id(1), id(11)), 2)]));
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
}
