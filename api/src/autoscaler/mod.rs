//! Autoscaling (DESIGN §6): Knative KPA semantics over the concurrency agents report. The
//! decision is the pure [`kpa::decide`]; the loop that feeds it (every 2 s, one replica at a time
//! under an advisory lock, state resumable by a new leader) and placement build on it.

pub mod kpa;
