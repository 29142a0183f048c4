//! The Nimbus worker-node agent: function runtimes (WebAssembly on wasmtime, native processes)
//! behind one handler contract, and the code cache. Joining the control plane, reconciliation,
//! the invocation listener and usage shipping build on these (see ARCHITECTURE.md).

pub mod cache;
pub mod runtime;
