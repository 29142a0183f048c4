//! Whole-system test support: start the real `nimbus-api` binary as a child process (against
//! the machine's PostgreSQL, or with its own private one), read what it prints, and stop it
//! with a signal the way an operator would.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, bail};

/// The `nimbus-api` binary built next to the test executable.
pub fn api_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target/<profile>/deps");
    let bin = dir.join("nimbus-api");
    assert!(bin.is_file(), "{} is missing: build the workspace first (cargo build --workspace)", bin.display());
    bin
}

/// The `nimbus-worker-agent` binary built next to the test executable.
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target/<profile>/deps");
    let bin = dir.join("nimbus-worker-agent");
    assert!(bin.is_file(), "{} is missing: build the workspace first (cargo build --workspace)", bin.display());
    bin
}

/// The privileged URL of the machine's PostgreSQL used by tests.
pub fn admin_url() -> String {
    std::env::var("NIMBUS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> anyhow::Result<(String, String)> {
    use sqlx::Connection;
    let name = format!("nimbus_test_{}", uuid::Uuid::now_v7().simple());
    let mut c = sqlx::PgConnection::connect(&admin_url()).await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await?;
    let base = admin_url();
    let (head, _) = base.rsplit_once('/').context("a database URL")?;
    Ok((name.clone(), format!("{head}/{name}")))
}

/// Drops a test database.
pub async fn drop_database(name: &str) {
    use sqlx::Connection;
    if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
    }
}

/// A running child process whose standard output is read line by line.
pub struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Everything read so far.
    pub seen: Vec<String>,
}

impl Running {
    /// Starts `nimbus-api` with `args` and `env` (and no inherited `DATABASE_URL`/`NIMBUS_*`).
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_binary(&api_binary(), args, env, false)
    }

    /// Starts the worker agent; its standard error (its log) is read as lines too.
    pub fn start_agent(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_binary(&agent_binary(), args, env, true)
    }

    /// Starts `bin`; with `read_stderr` its standard error is read line by line as well.
    pub fn start_binary(
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
        read_stderr: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdout(Stdio::piped()).stderr(if read_stderr { Stdio::piped() } else { Stdio::inherit() });
        for (k, _) in std::env::vars() {
            if k == "DATABASE_URL" || k.starts_with("NIMBUS_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NIMBUS_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        if let Some(stderr) = child.stderr.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Running { child, lines, seen: Vec::new() })
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        let st = Command::new("kill").arg("-KILL").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(st.success(), "kill -KILL failed");
        self.child.wait()?;
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line containing `needle` (or the process to end, or `timeout`).
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(_) => bail!("no line with {needle:?} within {timeout:?}; output so far: {:?}", self.seen),
            }
        }
    }

    /// Sends SIGTERM, waits for the exit, and returns the status with every line the process
    /// printed (those already seen included).
    pub fn finish(mut self) -> anyhow::Result<(std::process::ExitStatus, Vec<String>)> {
        let st = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(st.success(), "kill -TERM failed");
        let status = self.child.wait()?;
        // The reader thread ends at end of output, which closes the channel.
        let mut all = std::mem::take(&mut self.seen);
        all.extend(self.lines.iter());
        Ok((status, all))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let st = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(st.success(), "kill -TERM failed");
        Ok(self.child.wait()?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP client that does not follow redirects (so tests see them).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("HTTP client")
}

/// A WASI command answering through the CGI contract and writing one log line.
pub fn hello_wasm() -> Vec<u8> {
    let out = "Status: 200 OK\nContent-Type: text/plain\nX-Runtime: wasm\n\nhello from wasm\n";
    let log = "a log line from wasm\n";
    wat::parse_str(format!(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (data (i32.const 64) "{}")
             (data (i32.const 512) "{}")
             (func (export "_start")
               (i32.store (i32.const 0) (i32.const 64))
               (i32.store (i32.const 4) (i32.const {}))
               (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
               (i32.store (i32.const 8) (i32.const 512))
               (i32.store (i32.const 12) (i32.const {}))
               (drop (call $w (i32.const 2) (i32.const 8) (i32.const 1) (i32.const 32)))))"#,
        out.replace('\n', "\\0a"),
        log.replace('\n', "\\0a"),
        out.len(),
        log.len()
    ))
    .unwrap()
}

/// A gzip tarball holding one executable file, `name`, with `script` in it (a process
/// function's package).
pub fn script_package(name: &str, script: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut header = tar::Header::new_gnu();
    header.set_size(script.len() as u64);
    header.set_mode(0o755);
    builder.append_data(&mut header, name, script).expect("a tar entry");
    builder.into_inner().expect("a tarball").finish().expect("a gzip stream")
}

/// The real API on a fresh database with a signed-up platform admin (`ops@example.com`, tenant
/// `acme`), and calls on its behalf.
pub struct Platform {
    /// The API process.
    pub api: Running,
    /// Its base URL.
    pub base: String,
    /// The database's name.
    pub db: String,
    /// The database's URL.
    pub url: String,
    /// The admin's access token.
    pub token: String,
    /// The admin's tenant id.
    pub tenant: String,
    /// The local package directory.
    pub packages: PathBuf,
    /// An HTTP client.
    pub http: reqwest::Client,
}

impl Platform {
    /// Starts `nimbus-api serve` with `env` besides the database and package directory.
    pub async fn start(env: &[(&str, &str)]) -> Platform {
        use sqlx::Connection;
        let (db, url) = fresh_database().await.expect("a test database");
        let packages = std::env::temp_dir().join(format!("nimbus-e2e-packages-{}", uuid::Uuid::now_v7().simple()));
        let mut all = vec![("DATABASE_URL", url.as_str()), ("NIMBUS_PACKAGE_DIR", packages.to_str().unwrap())];
        all.extend_from_slice(env);
        let mut api = Running::start(&["serve", "--listen", "127.0.0.1:0"], &all).expect("the API starts");
        let line = api.wait_for_line("listening on", Duration::from_secs(60)).expect("the API listens");
        let base = line.trim_start_matches("listening on ").trim().to_owned();
        let http = client();
        let res: serde_json::Value = http
            .post(format!("{base}/v1/auth/signup"))
            .json(&serde_json::json!({"email": "ops@example.com", "password": "correct horse battery",
                                      "display_name": "Ops", "tenant_name": "acme"}))
            .send()
            .await
            .expect("sign-up")
            .json()
            .await
            .expect("a sign-up answer");
        let token = res["tokens"]["access_token"].as_str().expect("a token").to_owned();
        let tenant = res["tenant"]["id"].as_str().expect("a tenant").to_owned();
        let mut c = sqlx::PgConnection::connect(&url).await.expect("the test database");
        sqlx::query("UPDATE users SET is_platform_admin = true").execute(&mut c).await.expect("admin");
        Platform { api, base, db, url, token, tenant, packages, http }
    }

    /// Calls the API as the admin; `PUT` and `PATCH` go unconditionally (`If-Match: *`).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let unconditional = method == reqwest::Method::PUT || method == reqwest::Method::PATCH;
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if unconditional {
            req = req.header("if-match", "*");
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("an API call");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Creates a function from `spec`, uploads `code` and publishes version 1; returns the
    /// version's id and the package's SHA-256.
    pub async fn deploy(&self, spec: serde_json::Value, content_type: &str, code: Vec<u8>) -> (String, String) {
        let fns = format!("/v1/tenants/{}/functions", self.tenant);
        let name = spec["name"].as_str().expect("a name").to_owned();
        let (s, b) = self.call(reqwest::Method::POST, &fns, Some(spec)).await;
        assert_eq!(s, 201, "{b}");
        let res = self
            .http
            .put(format!("{}{fns}/{name}/code", self.base))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(code)
            .send()
            .await
            .expect("an upload");
        assert!(res.status().is_success(), "{:?}", res.text().await);
        let (s, v) =
            self.call(reqwest::Method::POST, &format!("{fns}/{name}/versions"), Some(serde_json::json!({}))).await;
        assert_eq!(s, 201, "{v}");
        (v["id"].as_str().expect("an id").to_owned(), v["package"]["sha256"].as_str().expect("a hash").to_owned())
    }

    /// A join token for up to `max_uses` agents.
    pub async fn join_token(&self, max_uses: u32) -> String {
        let (s, b) = self
            .call(
                reqwest::Method::POST,
                "/v1/join-tokens",
                Some(serde_json::json!({"name": "e2e", "max_uses": max_uses})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        b["secret"].as_str().expect("a secret").to_owned()
    }

    /// Stops the API and removes its database and packages.
    pub async fn stop(self) {
        let _ = std::fs::remove_dir_all(&self.packages);
        self.api.terminate().expect("the API stops");
        drop_database(&self.db).await;
    }
}
