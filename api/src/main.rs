//! The `nimbus-api` binary: serve, run locally, migrate, rotate keys, print the OpenAPI document.

use anyhow::Context;
use clap::Parser;
use nimbus_api::{
    config::{Cli, Command, LogFormat, reject_unknown_env},
    db, local, openapi,
    startup::{Application, shutdown_signal},
    telemetry,
};

// mimalloc: fewer cycles per request than the system allocator under many small allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    reject_unknown_env(std::env::vars()).map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Serve(args) => {
            telemetry::init_logging(args.server.log_format, &args.server.log);
            tracing::debug!(settings = ?args, "starting");
            let app = Application::build(
                args.db.database_url.expose(),
                args.db.app_database_url.as_ref().map(|s| s.expose()),
                args.db.db_max_connections,
                args.server,
            )
            .await?;
            // Printed for process supervisors and the end-to-end tests, which bind port 0.
            println!("listening on {}", app.public_url());
            app.run_until(shutdown_signal()).await
        }
        Command::Local(args) => {
            telemetry::init_logging(args.server.log_format, &args.server.log);
            local::run(args).await
        }
        Command::Migrate(args) => {
            telemetry::init_logging(LogFormat::Text, "info");
            db::migrate(args.database_url.expose()).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::RotateSigningKey(args) => {
            telemetry::init_logging(LogFormat::Text, "info");
            db::migrate(args.database_url.expose()).await?;
            let pool = db::connect_app(args.database_url.expose(), 2).await?;
            // The issuer does not matter for rotation; keys are shared by every replica.
            let keys =
                nimbus_api::auth::keys::KeyRing::load(pool, String::new(), std::time::Duration::from_secs(900)).await?;
            let kid = keys.rotate().await?;
            println!("new signing key {kid}; the previous key keeps verifying until its tokens expire");
            Ok(())
        }
        Command::Openapi { out } => {
            let json = openapi::document_json();
            match out {
                Some(path) => std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?,
                None => print!("{json}"),
            }
            Ok(())
        }
    }
}
