//! The `wasm` runtime: wasmtime with WASI preview 1, per the handler contract.
//!
//! - One [`WasmEngine`] per agent: cranelift, epoch interruption (a ticker thread advances the
//!   epoch every millisecond), and the pooling instance allocator sized from settings — or the
//!   on-demand allocator when the host cannot reserve the pool's address space.
//! - Guests run on the async runtime's own threads, each on a stack of its own (wasmtime's
//!   `call_async`, on a fiber): at every epoch tick a running guest yields to the scheduler, and
//!   once past its timeout it is stopped there. Host calls (reading a body that streams in,
//!   sleeping) wait as futures, never blocking a thread. Handing each guest to a blocking-pool
//!   thread and back instead cost two thread wake-ups per invocation (BENCHMARKS.md).
//! - A [`WarmModule`] is a compiled module already linked against WASI (`InstancePre`): what an
//!   agent keeps per warm version. Instantiating one is the cold-start cost once code is cached.
//! - Each invocation gets a fresh store and instance: stdin is the body (in memory, or a
//!   channel the body streams through as it arrives: [`WasmEngine::invoke_streaming`]), the
//!   environment is the contract's and nothing else, no arguments but the function name, no
//!   preopened directories (no filesystem), no sockets. Memory is capped by the store's limiter
//!   (growing beyond traps), the wall clock by the epoch deadline (and, for a guest waiting in the
//!   host for more of its body, by a deadline on that wait), stdout by a bounded [`Stdout`]
//!   (overflow stops the guest) that streams the response once its head is known, stderr is kept
//!   up to a bound and then dropped.
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
    cli::{IsTerminal, StdinStream, StdoutStream},
    p1::{self, WasiP1Ctx},
    p2::{InputStream, OutputStream, Pollable, StreamError, pipe::MemoryInputPipe},
};

use super::{
    FailureReason, Invocation, Limits, Outcome, Response, contract_env, contract_env_with_length,
    stream::{Io, Stdout},
};

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

/// Bytes of each pooled linear memory zeroed in place (kept resident) when its instance ends.
const KEEP_RESIDENT_MEMORY: usize = 128 << 10;
/// Bytes of each pooled table zeroed in place when its instance ends.
const KEEP_RESIDENT_TABLE: usize = 16 << 10;

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
            .max_memory_size(usize::try_from(settings.max_memory_mb << 20).unwrap_or(usize::MAX))
            // A finished instance's memory and table are zeroed with `memset` up to these sizes
            // instead of `madvise`: each `madvise` of a multi-threaded process costs a TLB
            // shootdown on every core (14 % of the agent's CPU for a trivial function at
            // concurrency 64, BENCHMARKS.md). Two wasm pages cover a small function's whole memory
            // (C's default stack and a little heap); the slots keep at most this much resident.
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE)
            // One fiber stack per running guest. They are not zeroed between guests (wasmtime's
            // default: compiled code never reads a stack slot it has not written, and zeroing
            // would cost a `madvise` or a 2 MiB `memset` per invocation).
            .total_stacks(settings.instance_slots);
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
        p1::add_to_linker_async(&mut linker, |h: &mut Host| &mut h.wasi).map_err(wt)?;
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

    /// Runs one invocation to completion, its response buffered.
    pub async fn invoke(&self, warm: &WarmModule, inv: &Invocation, limits: &Limits) -> Outcome {
        self.invoke_streaming(warm, inv, limits, Io::default()).await
    }

    /// Runs one invocation to completion (within a Tokio runtime), with the body streaming in and
    /// the response streaming out as `io` says.
    pub async fn invoke_streaming(&self, warm: &WarmModule, inv: &Invocation, limits: &Limits, io: Io) -> Outcome {
        let started = Instant::now();
        let stdout = ResponsePipe(Arc::new(Mutex::new(Stdout::new(limits.max_response_bytes, io.response))));
        let stderr = BoundedPipe::new(limits.max_log_bytes);
        let mut wasi = WasiCtxBuilder::new();
        let mut input = None;
        match io.stdin {
            Some(stdin) => {
                let deadline = tokio::time::Instant::now() + limits.timeout;
                let channel = ChannelInput::new(inv.body.clone(), stdin.chunks, deadline);
                input = Some(channel.clone());
                wasi.stdin(channel).envs(&contract_env_with_length(inv, stdin.length));
            }
            None => {
                wasi.stdin(MemoryInputPipe::new(inv.body.clone())).envs(&contract_env(inv));
            }
        }
        let wasi = wasi.stdout(stdout.clone()).stderr(stderr.clone()).arg(&inv.function).build_p1();
        let limits_store = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX))
            .trap_on_grow_failure(true)
            .instances(1)
            .build();
        let mut store = Store::new(&self.engine, Host { wasi, limits: limits_store });
        store.limiter(|h| &mut h.limits);
        // Every tick the guest yields to the scheduler, so that others (and the listener) run;
        // past its timeout it is stopped (a trap the caller sees as a timeout).
        let timeout = limits.timeout;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if started.elapsed() >= timeout {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                Ok(wasmtime::UpdateDeadline::Yield(1))
            }
        });

        let run = async {
            let instance = warm.pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        // The epoch stops a guest only while it runs its own code; one waiting in the host (a
        // sleep, say) is stopped here, by dropping it.
        let result = match tokio::time::timeout(timeout + EPOCH_TICK, run).await {
            Ok(result) => result,
            Err(_) => Err(Trap::Interrupt.into()),
        };
        let duration = started.elapsed();
        drop(store);
        let timeout = || {
            Response::failed(
                FailureReason::Timeout,
                format!("ran longer than its timeout of {} ms and was stopped", limits.timeout.as_millis()),
            )
        };
        let mut out = stdout.0.lock().unwrap_or_else(|p| p.into_inner());
        let failure = match result {
            _ if out.overflowed() => Some(Response::failed(
                FailureReason::ResponseTooLarge,
                format!("the response is larger than {} bytes", limits.max_response_bytes),
            )),
            _ if input.as_ref().is_some_and(ChannelInput::timed_out) => Some(timeout()),
            Ok(()) => None,
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => None,
                Some(I32Exit(code)) => {
                    Some(Response::failed(FailureReason::ExitCode, format!("exited with code {code}")))
                }
                None => Some(classify(&e, limits)),
            },
        };
        let response = out.finish(failure);
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

/// A bounded in-memory output stream for stderr: what fits is kept, the rest dropped (a log may
/// be cut).
#[derive(Clone)]
struct BoundedPipe {
    buf: Arc<Mutex<Vec<u8>>>,
    limit: usize,
    overflowed: Arc<AtomicBool>,
}

impl BoundedPipe {
    fn new(limit: usize) -> Self {
        BoundedPipe { buf: Arc::default(), limit, overflowed: Arc::default() }
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Appends what fits (never an error: a log may be cut).
    fn append(&self, bytes: &[u8]) -> Result<(), ()> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let room = self.limit.saturating_sub(buf.len());
        if bytes.len() > room {
            self.overflowed.store(true, Ordering::Relaxed);
        }
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        Ok(())
    }
}

/// Stdout: the response, bounded (a write beyond the limit stops the guest: a response must be
/// whole or cut off visibly) and streamed once its head is known.
#[derive(Clone)]
struct ResponsePipe(Arc<Mutex<Stdout>>);

impl ResponsePipe {
    fn append(&self, bytes: &[u8]) -> Result<(), ()> {
        if self.0.lock().unwrap_or_else(|p| p.into_inner()).push(bytes) { Ok(()) } else { Err(()) }
    }
}

/// The WASI output traits for a pipe with `fn append(&self, &[u8]) -> Result<(), ()>` (Err: the
/// bytes went beyond what the pipe takes, and the guest is stopped).
macro_rules! output_pipe {
    ($pipe:ty) => {
        impl IsTerminal for $pipe {
            fn is_terminal(&self) -> bool {
                false
            }
        }

        impl StdoutStream for $pipe {
            fn p2_stream(&self) -> Box<dyn OutputStream> {
                Box::new(self.clone())
            }
            fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
                Box::new(self.clone())
            }
        }

        #[wasmtime_wasi::async_trait]
        impl Pollable for $pipe {
            async fn ready(&mut self) {}
        }

        impl OutputStream for $pipe {
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

        impl tokio::io::AsyncWrite for $pipe {
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
    };
}

output_pipe!(BoundedPipe);
output_pipe!(ResponsePipe);

/// Stdin fed from a channel: the start of the body, then its chunks as they arrive. A guest
/// that waits for more than its timeout allows is stopped (the epoch deadline cannot interrupt
/// it while it waits in the host).
#[derive(Clone)]
struct ChannelInput {
    state: Arc<Mutex<InputState>>,
    timed_out: Arc<AtomicBool>,
    deadline: tokio::time::Instant,
}

struct InputState {
    pending: bytes::Bytes,
    chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    closed: bool,
}

impl InputState {
    /// Ready when something is pending or the body has ended.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while self.pending.is_empty() && !self.closed {
            match self.chunks.poll_recv(cx) {
                Poll::Ready(Some(chunk)) => self.pending = chunk,
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    fn take(&mut self, size: usize) -> bytes::Bytes {
        self.pending.split_to(size.min(self.pending.len()))
    }
}

impl ChannelInput {
    fn new(start: Vec<u8>, chunks: tokio::sync::mpsc::Receiver<bytes::Bytes>, deadline: tokio::time::Instant) -> Self {
        ChannelInput {
            state: Arc::new(Mutex::new(InputState { pending: start.into(), chunks, closed: false })),
            timed_out: Arc::default(),
            deadline,
        }
    }

    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InputState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl IsTerminal for ChannelInput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdinStream for ChannelInput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncRead + Send + Sync> {
        Box::new(self.clone())
    }
    fn p2_stream(&self) -> Box<dyn InputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for ChannelInput {
    async fn ready(&mut self) {
        let fill = std::future::poll_fn(|cx| self.state().poll_fill(cx));
        if tokio::time::timeout_at(self.deadline, fill).await.is_err() {
            self.timed_out.store(true, Ordering::Relaxed);
        }
    }
}

impl InputStream for ChannelInput {
    fn read(&mut self, size: usize) -> Result<bytes::Bytes, StreamError> {
        if self.timed_out() {
            return Err(StreamError::trap("waited for the request body beyond the timeout"));
        }
        let mut state = self.state();
        if state.pending.is_empty() && !state.closed {
            // Whatever arrived since the last look, without waiting.
            let _ = state.poll_fill(&mut Context::from_waker(std::task::Waker::noop()));
        }
        if state.pending.is_empty() && state.closed {
            return Err(StreamError::Closed);
        }
        Ok(state.take(size))
    }
}

impl tokio::io::AsyncRead for ChannelInput {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut state = self.state();
        if state.poll_fill(cx).is_pending() {
            return Poll::Pending;
        }
        let chunk = state.take(buf.remaining());
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}
