//! The local runner behind `nimbus-api local`: a private PostgreSQL started from the machine's
//! own binaries in a data folder of the project (reused on the next run, stopped on exit), a
//! first admin user and tenant on first run, and the API.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{
    auth::session::{self, SignUpRequest},
    auth::{RequestContext, secret},
    config::{LocalArgs, Secret},
    names::{DisplayName, Email, Name, NewPassword},
    startup::{Application, shutdown_signal},
};

/// E-mail of the first admin.
pub const ADMIN_EMAIL: &str = "admin@nimbus.local";

/// A private PostgreSQL server run from a data folder.
pub struct LocalPostgres {
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    run_as: Option<String>,
}

impl LocalPostgres {
    /// Finds `initdb`/`pg_ctl` on PATH or under /usr/lib/postgresql/*/bin.
    pub fn find_binaries() -> anyhow::Result<PathBuf> {
        let mut candidates: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort();
            versions.reverse();
            candidates.extend(versions);
        }
        candidates
            .into_iter()
            .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
            .context("no PostgreSQL binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin; install PostgreSQL or set DATABASE_URL")
    }

    /// Prepares (and on first use initialises) a server in `root/postgres`.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let bin = Self::find_binaries()?;
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = root.canonicalize()?;
        let data = root.join("postgres");
        let socket_dir = root.join("run");
        std::fs::create_dir_all(&socket_dir)?;
        // PostgreSQL refuses to run as root; run it as the `postgres` system user then.
        let run_as = if is_root() { Some("postgres".to_owned()) } else { None };
        let pg = LocalPostgres { bin, data, socket_dir, run_as };
        if let Some(user) = &pg.run_as {
            chown(&pg.socket_dir, user)?;
        }
        if !pg.data.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&pg.data)?;
            if let Some(user) = &pg.run_as {
                chown(&pg.data, user)?;
            }
            eprintln!("initialising a private PostgreSQL in {}", pg.data.display());
            pg.run(
                "initdb",
                &["-D", path(&pg.data), "-U", "nimbus", "--auth=trust", "-E", "UTF8", "--no-instructions"],
            )?;
        }
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).output().with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the server unless it is already running; listens only on a Unix socket.
    pub fn start(&self) -> anyhow::Result<()> {
        if self.data.join("postmaster.pid").exists() && self.run("pg_ctl", &["status", "-D", path(&self.data)]).is_ok()
        {
            return Ok(());
        }
        let opts = format!("-c listen_addresses='' -k {} -p 5432", self.socket_dir.display());
        let log = self.data.join("server.log");
        self.run("pg_ctl", &["start", "-w", "-t", "60", "-D", path(&self.data), "-l", path(&log), "-o", &opts])
    }

    /// Stops the server.
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run("pg_ctl", &["stop", "-m", "fast", "-w", "-D", path(&self.data)])
    }

    /// URL of the `nimbus` database (created on first use).
    pub async fn database_url(&self) -> anyhow::Result<String> {
        let base = format!("postgres://nimbus@localhost/{{db}}?host={}&port=5432", self.socket_dir.display());
        let admin = base.replace("{db}", "postgres");
        let mut conn: sqlx::PgConnection =
            sqlx::Connection::connect(&admin).await.context("connecting to the private PostgreSQL")?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'nimbus')")
            .fetch_one(&mut conn)
            .await?;
        if !exists {
            sqlx::query("CREATE DATABASE nimbus").execute(&mut conn).await?;
        }
        Ok(base.replace("{db}", "nimbus"))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn chown(p: &Path, user: &str) -> anyhow::Result<()> {
    let st = Command::new("chown").arg("-R").arg(user).arg(p).status()?;
    if !st.success() {
        bail!("chown {} to {user} failed", p.display());
    }
    Ok(())
}

/// Runs the platform locally until Ctrl-C or SIGTERM.
pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    let (url, app_url, pg) = match &args.database_url {
        Some(url) => (url.expose().to_owned(), None, None),
        None => {
            let pg = LocalPostgres::new(&args.data_dir)?;
            pg.start()?;
            let url = pg.database_url().await?;
            // The private server trusts its own socket, so the API can log in as `nimbus_app`
            // itself: no more powerful role to return to with SET ROLE NONE.
            crate::db::migrate(&url).await?;
            let mut admin: sqlx::PgConnection = sqlx::Connection::connect(&url).await?;
            sqlx::query("ALTER ROLE nimbus_app LOGIN").execute(&mut admin).await?;
            let app_url = url.replacen("postgres://nimbus@", "postgres://nimbus_app@", 1);
            (url, Some(app_url), Some(pg))
        }
    };
    let result = serve(&args, &url, app_url.as_deref()).await;
    if let Some(pg) = pg {
        if let Err(e) = pg.stop() {
            eprintln!("stopping the private PostgreSQL: {e:#}");
        }
    }
    result
}

async fn serve(args: &LocalArgs, url: &str, app_url: Option<&str>) -> anyhow::Result<()> {
    let mut settings = args.server.clone();
    if settings.package_dir.is_none() && settings.s3_bucket.is_none() {
        settings.package_dir = Some(args.data_dir.join("packages"));
    }
    if settings.secrets_keys.is_none() {
        settings.secrets_keys = Some(Secret::new(local_secrets_key(&args.data_dir)?));
    }
    let app = Application::build(url, app_url, 8, settings).await?;
    let login = first_run(&app, &args.data_dir).await?;
    let base = app.public_url().to_owned();
    let agents = start_agents(&app, &args.data_dir, args.agents).await?;
    println!("Nimbus is running.");
    println!("  console:  {base}/console");
    println!("  API docs: {base}/docs");
    println!("  login:    {} / {}", login.0, login.1);
    for (name, _) in &agents {
        println!("  agent:    {name} (nimbus-worker-agent, joining)");
    }
    println!("Press Ctrl-C to stop.");
    // Agents drain while the API still serves: they ship their usage and leave first.
    app.run_until(async move {
        shutdown_signal().await;
        stop_agents(agents).await;
    })
    .await
}

/// Starts `count` worker agents beside the API, each joining with a fresh single-use join token
/// (valid for ten minutes) and keeping its identity and code cache in `<data dir>/agent-<n>`.
async fn start_agents(
    app: &Application,
    data_dir: &Path,
    count: u32,
) -> anyhow::Result<Vec<(String, tokio::process::Child)>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let binary = std::env::current_exe()?.with_file_name("nimbus-worker-agent");
    if !binary.is_file() {
        eprintln!(
            "no agent started: {} is missing (build it with `cargo build -p nimbus-worker-agent`, which `./dev run` does)",
            binary.display()
        );
        return Ok(Vec::new());
    }
    let mut agents = Vec::new();
    for n in 1..=count {
        let name = format!("local-{n}");
        let mut tx = crate::db::begin(&app.state().pool, &crate::db::Scope::platform(None)).await?;
        let expires = chrono::Utc::now() + chrono::Duration::minutes(10);
        let (_, token) =
            crate::nodes::tokens::issue(&mut tx, &format!("local agent {name}"), None, Some(expires), Some(1)).await?;
        tx.commit().await?;
        let mut command = tokio::process::Command::new(&binary);
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed; it makes one `prctl` system call (through rustix,
        // no allocation, no locks). It makes the agent die with this process even when this one
        // is killed with SIGKILL and cannot drain it. (The signal follows the spawning thread: a
        // tokio worker thread, which lives as long as the runtime.)
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .env("NIMBUS_AGENT_CONTROL_PLANE_URL", app.public_url())
            .env("NIMBUS_AGENT_JOIN_TOKEN", token)
            .env("NIMBUS_AGENT_NAME", &name)
            .env("NIMBUS_AGENT_ZONE", "local")
            .env("NIMBUS_AGENT_DATA_DIR", data_dir.join(format!("agent-{n}")))
            .env("NIMBUS_AGENT_LISTEN", "127.0.0.1:0")
            .env("NIMBUS_AGENT_LOG", "warn")
            // Uid isolation of process functions needs root; a developer's own machine run by
            // one user does without it rather than refuse every process function.
            .env("NIMBUS_AGENT_PROCESS_ISOLATION", if is_root() { "uid" } else { "none" })
            // The agent prints its listen address and node id; its log (stderr) stays visible.
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        agents.push((name, child));
    }
    Ok(agents)
}

/// Asks each agent to drain (SIGTERM) and waits for it, killing it after its drain time.
async fn stop_agents(agents: Vec<(String, tokio::process::Child)>) {
    for (name, mut child) in agents {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        match tokio::time::timeout(std::time::Duration::from_secs(40), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("agent {name} did not drain in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// Creates the first admin user and tenant if there is no user yet; returns the login, whose
/// password is kept in `<data dir>/admin-password` (mode 0600) so later runs can print it.
async fn first_run(app: &Application, data_dir: &Path) -> anyhow::Result<(String, String)> {
    std::fs::create_dir_all(data_dir)?;
    let pw_file = data_dir.join("admin-password");
    let state = app.state();
    // The application role sees a user outside its tenants only through the e-mail lookup.
    let mut tx = crate::db::begin(
        &state.pool,
        &crate::db::Scope { lookup_email: Some(ADMIN_EMAIL.to_owned()), ..Default::default() },
    )
    .await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE email = $1)")
        .bind(ADMIN_EMAIL)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    if exists {
        let pw = std::fs::read_to_string(&pw_file).unwrap_or_else(|_| "(set on first run; see admin-password)".into());
        return Ok((ADMIN_EMAIL.to_owned(), pw.trim().to_owned()));
    }
    let password = secret::random_token()[..20].to_owned();
    let req = SignUpRequest {
        email: Email::try_from(ADMIN_EMAIL.to_owned()).map_err(anyhow::Error::msg)?,
        password: NewPassword::try_from(password.clone()).map_err(anyhow::Error::msg)?,
        display_name: DisplayName::try_from("Admin".to_owned()).map_err(anyhow::Error::msg)?,
        tenant_name: Name::try_from("default".to_owned()).map_err(anyhow::Error::msg)?,
        tenant_display_name: None,
    };
    let ctx = RequestContext { request_id: None, source_ip: None, user_agent: Some("nimbus-api local".into()) };
    session::create_user_with_tenant(state, &ctx, req, true)
        .await
        .map_err(|e| anyhow::anyhow!("creating the first admin: {e}"))?;
    write_private(&pw_file, &password)?;
    Ok((ADMIN_EMAIL.to_owned(), password))
}

/// The secrets key of the local platform, generated on first use and kept in
/// `<data dir>/secrets-key` (mode 0600), so sealed values open again on the next run.
fn local_secrets_key(data_dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(data_dir)?;
    let file = data_dir.join("secrets-key");
    if let Ok(existing) = std::fs::read_to_string(&file) {
        return Ok(existing.trim().to_owned());
    }
    let spec = format!("local1:{}", crate::secrets::generate_key());
    write_private(&file, &spec)?;
    Ok(spec)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::{fs::OpenOptions, io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    writeln!(f, "{contents}")?;
    Ok(())
}
