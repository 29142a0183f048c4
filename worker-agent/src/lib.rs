//! The Nimbus worker-node agent: it joins the control plane, keeps the versions assigned to it
//! ready (code fetched, verified and compiled or unpacked through the code cache), runs their
//! invocations on its own listener within their limits (WebAssembly on wasmtime, native
//! processes, one handler contract), reports its state and per-second metrics, and ships usage
//! from an on-disk spool (see ARCHITECTURE.md and DESIGN §5).

pub mod agent;
pub mod backoff;
pub mod cache;
pub mod client;
pub mod config;
pub mod identity;
pub mod invoke;
pub mod limiter;
pub mod listener;
pub mod problem;
pub mod reconcile;
pub mod registry;
pub mod report;
pub mod runtime;
pub mod shipper;
pub mod spool;
pub mod stats;
pub mod usage;
