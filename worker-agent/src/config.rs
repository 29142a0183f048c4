//! The agent's settings: every one a flag with a `NIMBUS_AGENT_*` environment fallback and a
//! documented default. The agent reads only `NIMBUS_AGENT_*` variables and rejects unknown ones,
//! so a typo is an error; other `NIMBUS_*` variables belong to the control plane and are ignored.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum};
use nimbus_protocol::{Capacity, MAX_NODE_NAME};

/// Prefix of every environment variable the agent reads.
pub const ENV_PREFIX: &str = "NIMBUS_AGENT_";
/// Most labels on a node (the control plane's limit).
pub const MAX_LABELS: usize = 32;
/// Longest label key and value (the control plane's limit).
pub const MAX_LABEL_LEN: usize = 63;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How process functions are kept apart from the agent and from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProcessIsolation {
    /// Every invocation runs under its own unprivileged uid and gid from a pool (the agent must
    /// run as root).
    Uid,
    /// Invocations run as the agent's own user: they can read its credentials, every tenant's
    /// usage and logs, and each other's environment. Only for functions that are all trusted.
    None,
}

/// Settings of `nimbus-worker-agent`.
#[derive(Debug, Clone, Parser)]
#[command(name = "nimbus-worker-agent", version, about = "Nimbus worker-node agent")]
pub struct Settings {
    /// Base URL of the control plane (`http(s)://host:port`; https trusts the machine's CA store).
    #[arg(long, env = "NIMBUS_AGENT_CONTROL_PLANE_URL", default_value = "http://127.0.0.1:8080")]
    pub control_plane_url: String,
    /// Join token a platform admin created; needed only when the data directory holds no
    /// identity yet (or the control plane refuses it).
    #[arg(long, env = "NIMBUS_AGENT_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<Secret>,
    /// Name of this node, a DNS label unique in the fleet [default: the host name, made a DNS
    /// label].
    #[arg(long, env = "NIMBUS_AGENT_NAME")]
    pub name: Option<String>,
    /// Zone this node is in (a DNS label).
    #[arg(long, env = "NIMBUS_AGENT_ZONE", default_value = "local")]
    pub zone: String,
    /// A label of this node, `key=value` (repeatable; the environment variable takes a
    /// comma-separated list), e.g. `pool=spot`. Placement rules match labels; the `pool` label
    /// names the node's pool. Sent at every join.
    #[arg(long = "label", env = "NIMBUS_AGENT_LABELS", value_name = "KEY=VALUE", value_delimiter = ',')]
    pub labels: Vec<Label>,
    /// Memory offered to functions, MiB.
    #[arg(long, env = "NIMBUS_AGENT_MEMORY_MB", default_value_t = 4096)]
    pub memory_mb: u64,
    /// CPU offered to functions, thousandths of a core [default: 1000 × the CPUs of the host].
    #[arg(long, env = "NIMBUS_AGENT_CPU_MILLIS")]
    pub cpu_millis: Option<u32>,
    /// Instances that can be warm at once.
    #[arg(long, env = "NIMBUS_AGENT_INSTANCE_SLOTS", default_value_t = 256)]
    pub instance_slots: u32,
    /// Directory of the node's state: identity, code cache, usage spool, process scratch space.
    #[arg(long, env = "NIMBUS_AGENT_DATA_DIR", default_value = ".nimbus-agent")]
    pub data_dir: PathBuf,
    /// Address of the invocation listener (port 0 picks a free port).
    #[arg(long, env = "NIMBUS_AGENT_LISTEN", default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// URL the gateway reaches the invocation listener at [default: `http://<bound listen
    /// address>`].
    #[arg(long, env = "NIMBUS_AGENT_INVOKE_URL")]
    pub invoke_url: Option<String>,
    /// Disk the code cache may use (packages, compiled modules, unpacked archives), bytes.
    #[arg(long, env = "NIMBUS_AGENT_CACHE_BUDGET_BYTES", default_value_t = 4 << 30)]
    pub cache_budget_bytes: u64,
    /// Take wasm instances from the pooling allocator (falls back to on-demand allocation when
    /// the host cannot reserve the pool).
    #[arg(long, env = "NIMBUS_AGENT_WASM_POOLING", default_value_t = true, action = clap::ArgAction::Set)]
    pub wasm_pooling: bool,
    /// wasm instances that can exist at once (pool slots; every running invocation holds one).
    #[arg(long, env = "NIMBUS_AGENT_WASM_POOL_SLOTS", default_value_t = 256)]
    pub wasm_pool_slots: u32,
    /// Largest memory a wasm function may have, MiB (the size of a pool slot).
    #[arg(long, env = "NIMBUS_AGENT_WASM_MAX_MEMORY_MB", default_value_t = 1024)]
    pub wasm_max_memory_mb: u64,
    /// How often usage records are shipped to the control plane.
    #[arg(long, env = "NIMBUS_AGENT_USAGE_FLUSH_INTERVAL", default_value = "1s")]
    pub usage_flush_interval: HumanDuration,
    /// Usage records that trigger a shipment before the flush interval is up.
    #[arg(long, env = "NIMBUS_AGENT_USAGE_BATCH_SIZE", default_value_t = 1000)]
    pub usage_batch_size: usize,
    /// How often the agent reports [default: what the control plane says at join, else 1s].
    #[arg(long, env = "NIMBUS_AGENT_REPORT_INTERVAL")]
    pub report_interval: Option<HumanDuration>,
    /// Invocations of one version that may wait for a free slot; more are refused with 429.
    #[arg(long, env = "NIMBUS_AGENT_MAX_QUEUED", default_value_t = 64)]
    pub max_queued: usize,
    /// Largest invocation request body, bytes (more is refused with 413).
    #[arg(long, env = "NIMBUS_AGENT_MAX_BODY_BYTES", default_value_t = 6 << 20)]
    pub max_body_bytes: usize,
    /// How long a shutdown waits for running invocations, and then for usage to be shipped.
    #[arg(long, env = "NIMBUS_AGENT_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: HumanDuration,
    /// How process functions are isolated: `uid` runs every invocation under its own
    /// unprivileged uid (needs the agent to run as root), `none` runs them as the agent itself
    /// (not isolated from the agent nor from each other).
    #[arg(long, env = "NIMBUS_AGENT_PROCESS_ISOLATION", value_enum, default_value_t = ProcessIsolation::Uid)]
    pub process_isolation: ProcessIsolation,
    /// First uid (and gid) of the pool process invocations run under; the range must be reserved
    /// for this agent (no accounts, no other agent, no container sub-uid range), because the
    /// agent kills every process of a uid it takes back.
    #[arg(long, env = "NIMBUS_AGENT_PROCESS_UID_BASE", default_value_t = 200_000)]
    pub process_uid_base: u32,
    /// Number of uids in the pool: process invocations that can run at once (more wait for a
    /// free uid).
    #[arg(long, env = "NIMBUS_AGENT_PROCESS_UIDS", default_value_t = 256)]
    pub process_uids: u32,
    /// Log format.
    #[arg(long, env = "NIMBUS_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "NIMBUS_AGENT_LOG", default_value = "info")]
    pub log: String,
}

impl Settings {
    /// Checks what clap cannot: URLs, names, non-zero sizes. Returns the node name to use.
    pub fn validate(&self) -> Result<String, String> {
        if !(self.control_plane_url.starts_with("http://") || self.control_plane_url.starts_with("https://")) {
            return Err(format!("--control-plane-url must be an http(s) URL, not {:?}", self.control_plane_url));
        }
        if let Some(url) = self.invoke_url.as_ref().filter(|u| !(u.starts_with("http://") || u.starts_with("https://")))
        {
            return Err(format!("--invoke-url must be an http(s) URL, not {url:?}"));
        }
        if !is_dns_label(&self.zone) {
            return Err(format!("--zone must be a DNS label (a-z, 0-9, '-', at most 63), not {:?}", self.zone));
        }
        let mut keys = std::collections::BTreeSet::new();
        for label in &self.labels {
            if !keys.insert(&label.key) {
                return Err(format!("--label {} is given twice", label.key));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!("at most {MAX_LABELS} --label settings"));
        }
        let name = match &self.name {
            Some(name) if is_dns_label(name) => name.clone(),
            Some(name) => {
                return Err(format!("--name must be a DNS label (a-z, 0-9, '-', at most 63), not {name:?}"));
            }
            None => dns_label_from(&hostname()),
        };
        for (flag, zero) in [
            ("--memory-mb", self.memory_mb == 0),
            ("--instance-slots", self.instance_slots == 0),
            ("--wasm-pool-slots", self.wasm_pool_slots == 0),
            ("--wasm-max-memory-mb", self.wasm_max_memory_mb == 0),
            ("--usage-batch-size", self.usage_batch_size == 0),
            ("--max-body-bytes", self.max_body_bytes == 0),
            ("--usage-flush-interval", self.usage_flush_interval.0.is_zero()),
            ("--report-interval", self.report_interval.is_some_and(|d| d.0.is_zero())),
            ("--process-uids", self.process_uids == 0),
            ("--process-uid-base", self.process_uid_base == 0),
        ] {
            if zero {
                return Err(format!("{flag} must be more than zero"));
            }
        }
        if self.process_isolation == ProcessIsolation::Uid {
            check_uid_range(self.process_uid_base, self.process_uids)?;
        }
        Ok(name)
    }

    /// The control-plane URL without a trailing slash.
    pub fn control_plane(&self) -> String {
        self.control_plane_url.trim_end_matches('/').to_owned()
    }

    /// What the node offers.
    pub fn capacity(&self) -> Capacity {
        let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
        Capacity {
            memory_mb: self.memory_mb,
            cpu_millis: self.cpu_millis.unwrap_or(cpus.saturating_mul(1000)),
            instance_slots: self.instance_slots,
        }
    }

    /// The node's labels, by key.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.labels.iter().map(|l| (l.key.clone(), l.value.clone())).collect()
    }

    /// The URL the gateway uses, given the address the listener is bound to.
    pub fn invoke_url(&self, bound: SocketAddr) -> String {
        match &self.invoke_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{bound}"),
        }
    }
}

/// The uid "nobody": daemons run as it, so the pool must never include it.
const NOBODY: u32 = 65_534;

/// Checks that the process uid pool `base .. base + count` is usable: not root, not `nobody`, and
/// not reaching `u32::MAX` (which means "no change" to `setresuid`).
pub fn check_uid_range(base: u32, count: u32) -> Result<(), String> {
    let Some(last) = base.checked_add(count.saturating_sub(1)).filter(|l| *l < u32::MAX) else {
        return Err(format!("--process-uid-base {base} + --process-uids {count} goes past the largest uid"));
    };
    if base == 0 {
        return Err("--process-uid-base must be more than zero (uid 0 is root)".into());
    }
    if (base..=last).contains(&NOBODY) {
        return Err(format!(
            "the process uids {base}..={last} include {NOBODY} (nobody); choose another --process-uid-base"
        ));
    }
    Ok(())
}

/// Whether `s` is a DNS label: 1 to 63 of `a-z`, `0-9`, `-`, not starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_NAME
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The closest DNS label to a host name: lower case, the first label only, other characters
/// replaced by `-`, cut to 63; `node` when nothing is left.
pub fn dns_label_from(host: &str) -> String {
    let first = host.trim().split('.').next().unwrap_or_default();
    let mapped: String = first
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(MAX_NODE_NAME)
        .collect();
    let label = mapped.trim_matches('-');
    if label.is_empty() { "node".to_owned() } else { label.to_owned() }
}

/// The host name, as the kernel knows it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default()
}

/// A node label, `key=value`: keys of 1–63 letters, digits, `.`, `_`, `-` or `/`, values of up to
/// 63 letters, digits, `.`, `_` or `-`, both starting with a letter or digit (the control plane's
/// rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// Key.
    pub key: String,
    /// Value (may be empty).
    pub value: String,
}

impl FromStr for Label {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (key, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value"))?;
        let ok = |s: &str, slash: bool| {
            s.len() <= MAX_LABEL_LEN
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || (slash && b == b'/'))
                && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        };
        if key.is_empty() || !ok(key, true) {
            return Err(format!(
                "label key `{key}` must be 1-{MAX_LABEL_LEN} letters, digits, '.', '_', '-' or '/', \
                 starting with a letter or digit"
            ));
        }
        if !ok(value, false) {
            return Err(format!(
                "label value `{value}` must be up to {MAX_LABEL_LEN} letters, digits, '.', '_' or '-', \
                 starting with a letter or digit"
            ));
        }
        Ok(Self { key: key.to_owned(), value: value.to_owned() })
    }
}

/// A secret setting: never printed by `Debug`.
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
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            other => return Err(format!("unknown unit `{other}` (use ms, s, m, h or d)")),
        };
        Ok(Self(d))
    }
}

/// Rejects `NIMBUS_AGENT_*` environment variables that no setting reads, so a typo is an error
/// rather than a silently ignored setting.
pub fn reject_unknown_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<(), String> {
    let known = known_env_names();
    let unknown: Vec<String> = vars
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(ENV_PREFIX) && !known.iter().any(|n| n == k))
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

/// Every environment variable a flag reads.
pub fn known_env_names() -> Vec<String> {
    let mut out: Vec<String> = Settings::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_are_well_formed() {
        Settings::command().debug_assert();
        let s = Settings::parse_from(["nimbus-worker-agent", "--zone", "eu-1", "--name", "n1"]);
        assert_eq!(s.zone, "eu-1");
        assert_eq!(s.control_plane_url, "http://127.0.0.1:8080");
        assert_eq!(s.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(s.usage_flush_interval.0, Duration::from_secs(1));
        assert_eq!(s.max_body_bytes, 6 << 20);
        assert_eq!(s.process_isolation, ProcessIsolation::Uid);
        assert_eq!((s.process_uid_base, s.process_uids), (200_000, 256));
        assert_eq!(s.validate().unwrap(), "n1");
        assert_eq!(s.invoke_url("127.0.0.1:4000".parse().unwrap()), "http://127.0.0.1:4000");
        assert!(known_env_names().iter().all(|n| n.starts_with(ENV_PREFIX)));
    }

    #[test]
    fn bad_values_are_refused() {
        let check = |args: &[&str]| {
            let mut all = vec!["nimbus-worker-agent"];
            all.extend_from_slice(args);
            if !args.iter().any(|a| a.starts_with("--name")) {
                all.extend(["--name", "n1"]);
            }
            Settings::parse_from(all).validate().unwrap_err()
        };
        assert!(check(&["--control-plane-url", "ftp://x"]).contains("--control-plane-url"));
        assert!(check(&["--control-plane-url", "ftp://x"]).contains("http(s)"));
        let https =
            Settings::parse_from(["nimbus-worker-agent", "--name", "n1", "--control-plane-url", "https://cp.example"]);
        assert!(https.validate().is_ok(), "https is accepted");
        assert!(check(&["--zone", "EU_1"]).contains("--zone"));
        assert!(check(&["--name=-bad"]).contains("--name"));
        assert!(check(&["--usage-batch-size", "0"]).contains("--usage-batch-size"));
        assert!(check(&["--report-interval", "0s"]).contains("--report-interval"));
        assert!(check(&["--process-uids", "0"]).contains("--process-uids"));
        assert!(check(&["--process-uid-base", "0"]).contains("--process-uid-base"));
        assert!(check(&["--process-uid-base", "65000", "--process-uids", "1000"]).contains("nobody"));
        assert!(check(&["--process-uid-base", "4294967290", "--process-uids", "10"]).contains("largest uid"));
        // Without uid isolation the pool is not used, so its range does not matter.
        let s = Settings::parse_from([
            "nimbus-worker-agent",
            "--name",
            "n1",
            "--process-isolation",
            "none",
            "--process-uid-base",
            "65000",
            "--process-uids",
            "1000",
        ]);
        assert_eq!(s.process_isolation, ProcessIsolation::None);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn labels_are_repeatable_or_a_comma_separated_list_and_checked() {
        let s =
            Settings::parse_from(["nimbus-worker-agent", "--name", "n1", "--label", "pool=spot", "--label", "gpu="]);
        assert_eq!(s.labels(), BTreeMap::from([("pool".into(), "spot".into()), ("gpu".into(), String::new())]));
        assert!(s.validate().is_ok());
        let s = Settings::parse_from(["nimbus-worker-agent", "--label", "pool=spot,nimbus.dev/zone=eu-1"]);
        assert_eq!(s.labels().len(), 2);
        let twice = Settings::parse_from(["nimbus-worker-agent", "--name", "n1", "--label", "a=1,a=2"]);
        assert!(twice.validate().unwrap_err().contains("--label a"));
        for bad in ["pool", "=x", "-a=b", "a=b/c", "a=-b", "a b=c"] {
            assert!(Settings::try_parse_from(["nimbus-worker-agent", "--label", bad]).is_err(), "{bad}");
            assert!(bad.parse::<Label>().is_err(), "{bad}");
        }
        assert!(format!("k={}", "v".repeat(64)).parse::<Label>().is_err());
    }

    #[test]
    fn host_names_become_dns_labels() {
        assert_eq!(dns_label_from("Worker_01.example.com\n"), "worker-01");
        assert_eq!(dns_label_from("---"), "node");
        assert_eq!(dns_label_from(""), "node");
        assert_eq!(dns_label_from(&"a".repeat(100)).len(), 63);
        assert!(is_dns_label(&dns_label_from("ÄÖ-host")));
    }

    #[test]
    fn unknown_agent_env_is_rejected_and_the_rest_ignored() {
        let env = |k: &str| (k.to_owned(), "x".to_owned());
        assert!(reject_unknown_env([env("NIMBUS_AGENT_ZONE"), env("NIMBUS_LISTEN"), env("PATH")]).is_ok());
        let err = reject_unknown_env([env("NIMBUS_AGENT_ZOEN")]).unwrap_err();
        assert!(err.contains("NIMBUS_AGENT_ZOEN"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Settings::parse_from(["nimbus-worker-agent", "--join-token", "njt_hunter2"]);
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.join_token.unwrap().expose(), "njt_hunter2");
    }

    #[test]
    fn durations_parse_with_units() {
        let check = |s: &str, d: Duration| assert_eq!(s.parse::<HumanDuration>().unwrap().0, d);
        check("500ms", Duration::from_millis(500));
        check("30s", Duration::from_secs(30));
        check("2m", Duration::from_secs(120));
        assert!("15".parse::<HumanDuration>().is_err());
        assert!("15y".parse::<HumanDuration>().is_err());
    }
}
