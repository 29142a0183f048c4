//! Autoscaling (DESIGN §6): Knative KPA semantics over the concurrency agents report, and
//! placement of the resulting instance counts on nodes. Both decisions are pure functions
//! ([`kpa::decide`], [`placement::place`]) with table-driven tests; the loop that feeds them
//! (every 2 s, one replica at a time under an advisory lock, state resumable by a new leader) and
//! writes assignments is the next slice.

pub mod kpa;
pub mod placement;
