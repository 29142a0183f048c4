//! The `wasm` runtime: wasmtime with WASI preview 1, per the handler contract.
//!
//! - One [`WasmEngine`] per agent: cranelift, epoch interruption (a ticker thread advances the
//!   epoch every millisecond; a store's deadline is its timeout in ticks), and the pooling
//!   instance allocator sized from settings — or the on-demand allocator when the host cannot
//!   reserve the pool's address space.
//! - A [`WarmModule`] is a compiled module already linked against WASI (`InstancePre`): what an
//!   agent keeps per warm version. Instantiating one is the cold-start cost once code is cached.
//! - Each invocation gets a fresh store and instance: stdin is the body, the environment is the
//!   contract's and nothing else, no arguments but the function name, no preopened directories
//!   (no filesystem), no sockets. Memory is capped by the store's limiter (growing beyond traps),
//!   the wall clock by the epoch deadline, stdout by a bounded pipe (overflow stops the guest),
//!   stderr is kept up to a bound and then dropped.
//! - Every way a guest can fail becomes a [`Response::failed`] with its reason; nothing a guest
//!   does can crash the agent.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, PoolingAllocationConfig, Store,
    StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::{
    I32Exit, WasiCtxBuilder,
    cli::{IsTerminal, StdoutStream},
    p1::{self, WasiP1Ctx},
    p2::{OutputStream, Pollable, StreamError, pipe::MemoryInputPipe},
};

use super::{FailureReason, Invocation, Limits, Outcome, Response, cgi, contract_env};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct WasmSettings {
    /// Instances that can exist at once (pool slots).
    pub instance_slots: u32,
    /// Largest memory any function may have, MiB (each pool slot can hold this much).
    pub max_memory_mb: u64,
    /// Use the pooling allocator (falls back to on-demand when the host refuses it).
    pub pooling: bool,
}

impl Default for WasmSettings {
    fn default() -> Self {
        WasmSettings { instance_slots: 256, max_memory_mb: 1024, pooling: true }
    }
}

/// wasmtime's errors as the agent's (`{:#}` keeps the whole chain).
fn wt(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// Epoch tick: the resolution of timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

struct Host {
    wasi: WasiP1Ctx,
    limits: StoreLimits,
}

/// A module compiled and linked, ready to instantiate.
#[derive(Clone)]
pub struct WarmModule {
    pre: InstancePre<Host>,
}

/// The wasm runtime of an agent.
pub struct WasmEngine {
    engine: Engine,
    linker: Linker<Host>,
    pooled: bool,
}

fn config(settings: &WasmSettings, pooling: bool) -> Config {
    let mut c = Config::new();
    c.epoch_interruption(true);
    // Guest stacks are bounded; deep recursion traps instead of growing.
    c.max_wasm_stack(512 * 1024);
    if pooling {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(settings.instance_slots)
            .total_memories(settings.instance_slots)
            .total_tables(settings.instance_slots)
            .max_memory_size(usize::try_from(settings.max_memory_mb << 20).unwrap_or(usize::MAX));
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl WasmEngine {
    /// An engine for `settings`, with the epoch ticker running.
    pub fn new(settings: &WasmSettings) -> anyhow::Result<WasmEngine> {
        let (engine, pooled) = if settings.pooling {
            match Engine::new(&config(settings, true)) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(error = %e, "the pooling allocator is not available here; using on-demand allocation");
                    (Engine::new(&config(settings, false)).map_err(wt)?, false)
                }
            }
        } else {
            (Engine::new(&config(settings, false)).map_err(wt)?, false)
        };
        let mut linker = Linker::new(&engine);
        p1::add_to_linker_sync(&mut linker, |h: &mut Host| &mut h.wasi).map_err(wt)?;
        let weak = engine.weak();
        std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
        Ok(WasmEngine { engine, linker, pooled })
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooled(&self) -> bool {
        self.pooled
    }

    /// A key for artifacts this engine can load: precompiled code is only reused by an engine
    /// with the same settings and wasmtime version.
    pub fn artifact_key(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Compiles a module to a precompiled artifact (what the code cache keeps on disk).
    pub fn precompile(&self, wasm: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.engine.precompile_module(wasm).map_err(wt)
    }

    /// Compiles a module in memory.
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<Module> {
        Module::new(&self.engine, wasm).map_err(wt)
    }

    /// Loads a precompiled artifact written by [`WasmEngine::precompile`] of an engine with the
    /// same [`WasmEngine::artifact_key`].
    pub fn load_artifact(&self, path: &Path) -> anyhow::Result<Module> {
        // SAFETY: wasmtime requires that the file is an artifact it produced itself and that it
        // does not change while mapped. Artifacts are written only by this agent's code cache
        // (temporary file, then rename, never rewritten in place) into a directory only the agent
        // writes, and named by the engine's compatibility key, which wasmtime checks again.
        #[allow(unsafe_code)]
        let module = unsafe { Module::deserialize_file(&self.engine, path) };
        module.map_err(|e| anyhow::anyhow!("loading the artifact {}: {e:#}", path.display()))
    }

    /// Links a module against WASI: the warm form of a version.
    pub fn prepare(&self, module: &Module) -> anyhow::Result<WarmModule> {
        Ok(WarmModule { pre: self.linker.instantiate_pre(module).map_err(wt)? })
    }

    /// Runs one invocation to completion on the calling thread (a blocking-pool thread).
    pub fn invoke(&self, warm: &WarmModule, inv: &Invocation, limits: &Limits) -> Outcome {
        let started = Instant::now();
        let stdout = BoundedPipe::new(limits.max_response_bytes, Overflow::Stop);
        let stderr = BoundedPipe::new(limits.max_log_bytes, Overflow::Truncate);
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(inv.body.clone()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .envs(&contract_env(inv))
            .arg(&inv.function)
            .build_p1();
        let limits_store = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .instances(1)
            .build();
        let mut store = Store::new(&self.engine, Host { wasi, limits: limits_store });
        store.limiter(|h| &mut h.limits);
        let ticks = (limits.timeout.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let result = warm.pre.instantiate(&mut store).and_then(|instance| {
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call(&mut store, ())
        });
        let duration = started.elapsed();
        let response = match result {
            _ if stdout.overflowed() => Response::failed(
                FailureReason::ResponseTooLarge,
                format!("the response is larger than {} bytes", limits.max_response_bytes),
            ),
            Ok(()) => cgi::parse(stdout.take()),
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => cgi::parse(stdout.take()),
                Some(I32Exit(code)) => Response::failed(FailureReason::ExitCode, format!("exited with code {code}")),
                None => classify(&e, limits),
            },
        };
        let (log, log_truncated) = (stderr.take(), stderr.overflowed());
        Outcome { response, log, log_truncated, cold_start: false, duration }
    }
}

/// Maps a wasmtime error to the reason the caller sees.
fn classify(e: &wasmtime::Error, limits: &Limits) -> Response {
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Response::failed(
            FailureReason::Timeout,
            format!("ran longer than its timeout of {} ms and was stopped", limits.timeout.as_millis()),
        ),
        Some(Trap::StackOverflow) => Response::failed(FailureReason::Crash, "stack overflow"),
        Some(trap) => Response::failed(FailureReason::Crash, format!("trapped: {trap}")),
        None => {
            let text = format!("{e:#}");
            if text.contains("memory") && (text.contains("limit") || text.contains("grow") || text.contains("exceed")) {
                Response::failed(
                    FailureReason::MemoryLimit,
                    format!("needed more than its memory limit of {} MiB", limits.memory_bytes >> 20),
                )
            } else if text.contains("instantiat") || text.contains("resource limit") {
                Response::failed(FailureReason::StartFailed, format!("could not start: {text}"))
            } else {
                Response::failed(FailureReason::Crash, text)
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Overflow {
    /// Fail the write (the guest stops): a response must be whole or nothing.
    Stop,
    /// Keep what fits and drop the rest: a log may be cut.
    Truncate,
}

/// A bounded in-memory output stream for stdout and stderr.
#[derive(Clone)]
struct BoundedPipe {
    buf: Arc<Mutex<Vec<u8>>>,
    limit: usize,
    overflowed: Arc<AtomicBool>,
    mode: Overflow,
}

impl BoundedPipe {
    fn new(limit: usize, mode: Overflow) -> Self {
        BoundedPipe { buf: Arc::default(), limit, overflowed: Arc::default(), mode }
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Appends what fits; Err when the bytes did not all fit and the mode stops the guest.
    fn append(&self, bytes: &[u8]) -> Result<(), ()> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.limit.saturating_sub(buf.len());
        if bytes.len() <= room {
            buf.extend_from_slice(bytes);
            return Ok(());
        }
        self.overflowed.store(true, Ordering::Relaxed);
        match self.mode {
            Overflow::Stop => Err(()),
            Overflow::Truncate => {
                buf.extend_from_slice(&bytes[..room]);
                Ok(())
            }
        }
    }
}

impl IsTerminal for BoundedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for BoundedPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.append(&bytes).map_err(|()| StreamError::trap("output beyond its limit"))
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept a write: overflow is decided (and recorded) in `write`.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for BoundedPipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(match self.append(buf) {
            Ok(()) => Ok(buf.len()),
            Err(()) => Err(io::Error::other("output beyond its limit")),
        })
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
