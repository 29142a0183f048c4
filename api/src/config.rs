//! Command-line interface and configuration: every setting is a flag with a `NIMBUS_*`
//! environment fallback and a documented default; unknown `NIMBUS_*` variables are an error.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// The `nimbus-api` command line.
#[derive(Debug, Parser)]
#[command(name = "nimbus-api", version, about = "Nimbus control plane")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of `nimbus-api`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API against an existing PostgreSQL (applies pending migrations first).
    Serve(ServeArgs),
    /// Run the whole platform on this machine: a private PostgreSQL when `DATABASE_URL` is unset,
    /// a first admin user and tenant, and the API; prints the console URL and the login.
    Local(LocalArgs),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseArgs),
    /// Retire the current access-token signing key and start signing with a new one.
    RotateSigningKey(DatabaseArgs),
    /// Print the OpenAPI document (or write it to a file).
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Where the database is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL of a role that may run migrations; the API itself acts as the
    /// `nimbus_app` role, to which row-level security applies.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,
    /// PostgreSQL URL the API's own queries use: a login role that is a member of `nimbus_app`
    /// and neither a superuser nor BYPASSRLS (e.g. `nimbus_app` itself with LOGIN and a
    /// password). Without it the API logs in with `DATABASE_URL` and switches to `nimbus_app`,
    /// and a `SET ROLE NONE` could return to that more powerful login role.
    #[arg(long, env = "NIMBUS_APP_DATABASE_URL", hide_env_values = true)]
    pub app_database_url: Option<Secret>,
    /// Maximum connections in the application pool.
    #[arg(long, env = "NIMBUS_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
}

/// Settings of the `serve` command.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Database settings.
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Server settings.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Settings of the `local` command.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Use this PostgreSQL instead of starting a private one.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Working folder for the private PostgreSQL and other local state.
    #[arg(long, env = "NIMBUS_DATA_DIR", default_value = ".nimbus")]
    pub data_dir: PathBuf,
    /// Worker agents to start beside the API (`nimbus-worker-agent`, found next to this binary),
    /// each with its data in `<data-dir>/agent-<n>`.
    #[arg(long, env = "NIMBUS_LOCAL_AGENTS", default_value_t = 1)]
    pub agents: u32,
    /// Server settings.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Settings of the HTTP server and the identity services.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "NIMBUS_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Public base URL of this deployment, used as the token issuer and in printed links.
    /// Defaults to `http://<listen address>`.
    #[arg(long, env = "NIMBUS_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Log format.
    #[arg(long, env = "NIMBUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "NIMBUS_LOG", default_value = "info")]
    pub log: String,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "NIMBUS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Longest a request may take before it is answered 503, e.g. `30s`.
    #[arg(long, env = "NIMBUS_REQUEST_TIMEOUT", default_value = "30s")]
    pub request_timeout: HumanDuration,
    /// Lifetime of access tokens.
    #[arg(long, env = "NIMBUS_ACCESS_TOKEN_TTL", default_value = "15m")]
    pub access_token_ttl: HumanDuration,
    /// Lifetime of refresh tokens (each rotation issues a token with a fresh lifetime).
    #[arg(long, env = "NIMBUS_REFRESH_TOKEN_TTL", default_value = "30d")]
    pub refresh_token_ttl: HumanDuration,
    /// Age at which the signing key is rotated automatically.
    #[arg(long, env = "NIMBUS_SIGNING_KEY_MAX_AGE", default_value = "30d")]
    pub signing_key_max_age: HumanDuration,
    /// Failed sign-ins allowed per account within the throttle window.
    #[arg(long, env = "NIMBUS_SIGNIN_MAX_FAILURES_PER_ACCOUNT", default_value_t = 5)]
    pub signin_max_failures_per_account: u32,
    /// Failed sign-ins allowed per source address within the throttle window.
    #[arg(long, env = "NIMBUS_SIGNIN_MAX_FAILURES_PER_ADDRESS", default_value_t = 20)]
    pub signin_max_failures_per_address: u32,
    /// Length of the sign-in throttle window.
    #[arg(long, env = "NIMBUS_SIGNIN_THROTTLE_WINDOW", default_value = "15m")]
    pub signin_throttle_window: HumanDuration,
    /// Take the client address from the last `X-Forwarded-For` entry (only behind a trusted proxy).
    #[arg(long, env = "NIMBUS_TRUST_FORWARDED_FOR", default_value_t = false)]
    pub trust_forwarded_for: bool,
    /// Allow anyone who can reach the API to sign up (create a user and a tenant).
    #[arg(long, env = "NIMBUS_ALLOW_SIGNUP", default_value_t = true, action = clap::ArgAction::Set)]
    pub allow_signup: bool,
    /// How long stored `Idempotency-Key` responses are kept.
    #[arg(long, env = "NIMBUS_IDEMPOTENCY_TTL", default_value = "24h")]
    pub idempotency_ttl: HumanDuration,
    /// Directory of the local code-package store, used when no S3 bucket is set
    /// [default: `nimbus-packages`; `<data-dir>/packages` for `local`].
    #[arg(long, env = "NIMBUS_PACKAGE_DIR")]
    pub package_dir: Option<PathBuf>,
    /// Largest code package accepted, in bytes.
    #[arg(long, env = "NIMBUS_MAX_PACKAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_package_bytes: u64,
    /// S3 bucket for code packages; when set, packages go to S3 instead of the local directory.
    #[arg(long, env = "NIMBUS_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 endpoint URL (an S3-protocol server); unset means AWS S3.
    #[arg(long, env = "NIMBUS_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "NIMBUS_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Path-style S3 addressing (`endpoint/bucket/key`), which most self-hosted servers need.
    #[arg(long, env = "NIMBUS_S3_PATH_STYLE", default_value_t = false)]
    pub s3_path_style: bool,
    /// S3 access key id [default: `AWS_ACCESS_KEY_ID`].
    #[arg(long, env = "NIMBUS_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key [default: `AWS_SECRET_ACCESS_KEY`].
    #[arg(long, env = "NIMBUS_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<Secret>,
    /// Create the S3 bucket at startup when it does not exist.
    #[arg(long, env = "NIMBUS_S3_CREATE_BUCKET", default_value_t = false)]
    pub s3_create_bucket: bool,
    /// Directory uploads are spooled to before they are validated and sent to S3
    /// [default: the system's temporary directory].
    #[arg(long, env = "NIMBUS_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Longest code-package upload (`PUT .../code`, completing a presigned upload); other
    /// requests get `--request-timeout`.
    #[arg(long, env = "NIMBUS_UPLOAD_TIMEOUT", default_value = "10m")]
    pub upload_timeout: HumanDuration,
    /// How long a presigned upload URL stays valid.
    #[arg(long, env = "NIMBUS_UPLOAD_URL_TTL", default_value = "15m")]
    pub upload_url_ttl: HumanDuration,
    /// Keys sealing secrets at rest (function environment secrets): `id:base64url-32-bytes[,...]`,
    /// the first seals, all open. Without keys, secret values cannot be written.
    #[arg(long, env = "NIMBUS_SECRETS_KEYS", hide_env_values = true)]
    pub secrets_keys: Option<Secret>,
    /// A worker node that has not reported for this long is marked `lost`.
    #[arg(long, env = "NIMBUS_NODE_HEARTBEAT_TIMEOUT", default_value = "15s")]
    pub node_heartbeat_timeout: HumanDuration,
    /// How often agents report (heartbeat and per-second metrics).
    #[arg(long, env = "NIMBUS_NODE_REPORT_INTERVAL", default_value = "1s")]
    pub node_report_interval: HumanDuration,
    /// Lifetime of a node credential; agents renew it at half-life.
    #[arg(long, env = "NIMBUS_NODE_CREDENTIAL_TTL", default_value = "1h")]
    pub node_credential_ttl: HumanDuration,
    /// Most invocations of one tenant in flight at once through this replica's gateway (429
    /// beyond).
    #[arg(long, env = "NIMBUS_TENANT_MAX_CONCURRENCY", default_value_t = 1000)]
    pub tenant_max_concurrency: u32,
    /// Most invocations per second of one tenant through this replica's gateway, with bursts of
    /// twice as many (429 beyond; 0: no rate limit).
    #[arg(long, env = "NIMBUS_TENANT_RATE_LIMIT", default_value_t = 10_000)]
    pub tenant_rate_limit: u32,
    /// Run the autoscaler (in the one replica holding its lock): it decides instance counts and
    /// writes nodes' assignments. `false` leaves assignments to `PUT /v1/nodes/{id}/assignments`.
    #[arg(long, env = "NIMBUS_AUTOSCALER", default_value_t = true, action = clap::ArgAction::Set)]
    pub autoscaler: bool,
    /// Longest a gateway holds a request for a version no node serves yet (scale from zero)
    /// before answering 503.
    #[arg(long, env = "NIMBUS_GATEWAY_HOLD_TIMEOUT", default_value = "10s")]
    pub gateway_hold_timeout: HumanDuration,
    /// Most requests a gateway holds per version while an instance starts (503 beyond).
    #[arg(long, env = "NIMBUS_GATEWAY_HOLD_QUEUE", default_value_t = 1000)]
    pub gateway_hold_queue: u32,
    /// How long function log lines are kept.
    #[arg(long, env = "NIMBUS_LOG_RETENTION", default_value = "7d")]
    pub log_retention: HumanDuration,
}

impl ServerArgs {
    /// The public base URL, without a trailing slash.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{bound}"),
        }
    }
}

/// A secret setting: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret value itself; only pass it to what needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A duration written as a number and a unit: `500ms`, `30s`, `15m`, `24h`, `30d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split =
            s.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("`{s}` has no unit (use ms, s, m, h or d)"))?;
        let (number, unit) = s.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("`{s}` does not start with a whole number"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            other => return Err(format!("unknown unit `{other}` (use ms, s, m, h or d)")),
        };
        Ok(Self(d))
    }
}

/// Rejects `NIMBUS_*` environment variables that no setting reads, so a typo is an error
/// rather than a silently ignored setting.
pub fn reject_unknown_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<(), String> {
    let known = known_env_names();
    let unknown: Vec<String> = vars
        .into_iter()
        .map(|(k, _)| k)
        // `NIMBUS_AGENT_*` belong to the worker agent (which checks them itself), so one
        // environment can configure both binaries.
        .filter(|k| k.starts_with("NIMBUS_") && !k.starts_with("NIMBUS_AGENT_") && !known.iter().any(|n| n == k))
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown setting(s) in the environment: {}; known settings are: {}",
            unknown.join(", "),
            known.join(", ")
        ))
    }
}

fn known_env_names() -> Vec<String> {
    fn walk(cmd: &clap::Command, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.push(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &mut out);
    // Read by the test harness and the local runner, not by a flag.
    out.push("NIMBUS_TEST_DATABASE_URL".to_owned());
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        let check = |s: &str, d: Duration| assert_eq!(s.parse::<HumanDuration>().unwrap().0, d);
        check("500ms", Duration::from_millis(500));
        check("30s", Duration::from_secs(30));
        check("15m", Duration::from_secs(900));
        check("24h", Duration::from_secs(86_400));
        check("30d", Duration::from_secs(30 * 86_400));
        assert!("15".parse::<HumanDuration>().is_err());
        assert!("15y".parse::<HumanDuration>().is_err());
        assert!("m".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn unknown_nimbus_env_is_rejected_and_known_accepted() {
        let env = |k: &str| (k.to_owned(), "x".to_owned());
        assert!(reject_unknown_env([env("NIMBUS_LISTEN"), env("PATH")]).is_ok());
        let err = reject_unknown_env([env("NIMBUS_LISTN")]).unwrap_err();
        assert!(err.contains("NIMBUS_LISTN"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("postgres://u:hunter2@h/db");
        assert!(!format!("{s:?}").contains("hunter2"));
        let cli = Cli::parse_from(["nimbus-api", "migrate", "--database-url", "postgres://u:hunter2@h/db"]);
        assert!(!format!("{cli:?}").contains("hunter2"));
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
