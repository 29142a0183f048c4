//! The `nimbus-worker-agent` binary: reads its settings (flags, `NIMBUS_AGENT_*` variables),
//! sets up logging, and runs the agent until SIGTERM or Ctrl-C, then drains and exits 0.
//! Exit codes: 0 after a drain, 1 when the agent cannot start or join, 2 for bad settings.

use std::process::ExitCode;

use clap::Parser;
use nimbus_worker_agent::{
    agent,
    config::{LogFormat, Settings, reject_unknown_env},
};
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

// mimalloc, as in the API: glibc's malloc and free were ~12 % of the agent's CPU per invocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to standard error; standard output carries only the lines supervisors wait for.
    let layer = fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Json => registry.with(layer.json().with_current_span(true)).try_init(),
        LogFormat::Text => registry.with(layer).try_init(),
    };
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed at once (inside the runtime), so a
/// signal that comes while the agent is still starting drains it rather than killing it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}

fn main() -> ExitCode {
    let settings = Settings::parse();
    if let Err(e) = reject_unknown_env(std::env::vars()).and_then(|()| settings.validate().map(drop)) {
        eprintln!("nimbus-worker-agent: {e}");
        return ExitCode::from(2);
    }
    init_logging(settings.log_format, &settings.log);
    tracing::debug!(settings = ?settings, "starting");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nimbus-worker-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async { agent::run(settings, shutdown_signal()).await });
    // A guest still running past the drain timeout must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "the agent stopped");
            eprintln!("nimbus-worker-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
