//! The gateway's routing table: tenants by name, functions with their versions and aliases, and
//! the nodes with a ready instance of each version — held in memory, so that an invocation reads
//! no database to find its way.
//!
//! The table is rebuilt as a whole from PostgreSQL (the `nimbus.gateway` read scope) when a
//! `nimbus_routing` notification says something changed (triggers on tenants, functions,
//! versions, aliases and nodes; node reports notify only when their set of ready versions
//! changes), debounced, and every [`FULL_RELOAD`] besides, so a lost notification only delays a
//! change. Per-node counters of outstanding requests live outside the table and survive reloads.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nimbus_protocol::{InstanceState, VersionStatus};
use uuid::Uuid;

use crate::{
    auth::Principal,
    db::{self, Scope},
    functions::versions::StoredConfig,
    routing::RoutingConfig,
};

/// The channel routing changes are announced on.
pub const CHANNEL: &str = "nimbus_routing";
/// The table is rebuilt at least this often.
pub const FULL_RELOAD: Duration = Duration::from_secs(30);
/// Notifications arriving within this window cause one rebuild.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// A node that refused a connection is skipped for this long.
pub const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// A version the gateway can route to.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    /// Its id.
    pub id: Uuid,
    /// Its number.
    pub number: u32,
    /// Its timeout: the gateway waits this long (plus a margin) for the agent.
    pub timeout: Duration,
    /// Its metric handles, registered by the first invocation after the table was built (a
    /// rebuild re-registers the same series, so their values carry on).
    pub metrics: std::sync::OnceLock<Arc<super::VersionMetrics>>,
}

/// A function as the gateway sees it.
#[derive(Debug, Clone)]
pub struct FunctionEntry {
    /// Its id.
    pub id: Uuid,
    /// Its tenant.
    pub tenant_id: Uuid,
    /// Versions by number.
    pub versions: HashMap<u32, VersionEntry>,
    /// Aliases by name.
    pub aliases: HashMap<String, RoutingConfig>,
    /// Its reserved concurrency: the most invocations in flight at once, when set.
    pub reserved_concurrency: Option<u32>,
    /// Its resource policy, compiled (who besides the tenant's own principals may invoke it:
    /// anyone with `Principal: "*"`, other tenants' keys it names).
    pub policy: Option<Arc<nimbus_iam::CompiledPolicy>>,
    /// Its tags as condition keys (`nimbus:ResourceTag/<key>`), when it has any.
    pub tags: Option<nimbus_iam::Context>,
    /// Its execution role: invocations get a credential for it.
    pub execution_role: Option<Uuid>,
}

/// A node serving invocations.
#[derive(Debug)]
pub struct Target {
    /// The node.
    pub node_id: Uuid,
    /// Its zone.
    pub zone: String,
    /// Its invocation listener, parsed once per table (each request clones it and sets the
    /// path and query).
    pub base: url::Url,
    /// Its pooled connections (kept across table rebuilds while its listener stays the same).
    pub links: Arc<super::upstream::Links>,
    /// `Bearer <the secret its listener wants>`, marked sensitive.
    pub authorization: axum::http::HeaderValue,
    /// Requests in flight to it, from this replica.
    pub outstanding: Arc<AtomicU32>,
    /// When a connection to it last failed (milliseconds since the gateway started; 0: never).
    pub failed_at: Arc<AtomicU64>,
}

/// The whole routing table.
#[derive(Debug, Default)]
pub struct Table {
    /// Tenant ids by name.
    pub tenants: HashMap<String, Uuid>,
    /// Functions by (tenant, name).
    pub functions: HashMap<(Uuid, String), FunctionEntry>,
    /// Nodes with a ready instance, by version id.
    pub instances: HashMap<Uuid, Vec<Arc<Target>>>,
    /// Tenants' guardrails, compiled (they bind anonymous invocations too).
    pub guardrails: HashMap<Uuid, Arc<nimbus_iam::CompiledPolicy>>,
}

impl Table {
    /// The target for `version`: the fewest outstanding requests, ties broken toward `zone`,
    /// skipping nodes that failed within [`FAILURE_HOLD`] unless no other is left.
    pub fn pick(&self, version: Uuid, zone: Option<&str>, now_ms: u64) -> Option<Arc<Target>> {
        self.pick_among(version, zone, now_ms, None)
    }

    /// Like [`Table::pick`], but never `node` (a retry goes elsewhere).
    pub fn pick_other(&self, version: Uuid, zone: Option<&str>, now_ms: u64, node: Uuid) -> Option<Arc<Target>> {
        self.pick_among(version, zone, now_ms, Some(node))
    }

    fn pick_among(&self, version: Uuid, zone: Option<&str>, now_ms: u64, not: Option<Uuid>) -> Option<Arc<Target>> {
        let targets: Vec<&Arc<Target>> =
            self.instances.get(&version)?.iter().filter(|t| Some(t.node_id) != not).collect();
        let hold = FAILURE_HOLD.as_millis() as u64;
        let healthy = |t: &&Arc<Target>| {
            let f = t.failed_at.load(Ordering::Relaxed);
            f == 0 || now_ms.saturating_sub(f) > hold
        };
        let best = |it: &mut dyn Iterator<Item = &&Arc<Target>>| {
            it.min_by_key(|t| (t.outstanding.load(Ordering::Relaxed), zone.is_some_and(|z| z != t.zone)))
                .map(|t| Arc::clone(t))
        };
        best(&mut targets.iter().filter(|t| healthy(t))).or_else(|| best(&mut targets.iter()))
    }
}

/// Requests held for one version while an instance starts.
#[derive(Debug, Default)]
struct HoldEntry {
    /// Held now.
    held: u32,
    /// When the autoscaler was last poked for it, and with what count.
    poked: Option<(Instant, u32)>,
}

/// Why a request could not be held until an instance was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldRefusal {
    /// The version's hold queue is full.
    Full,
    /// No instance became ready in time.
    Timeout,
}

/// Pokes go out at most this often per version while its held count does not grow ...
const POKE_EVERY: Duration = Duration::from_millis(500);
/// ... and at most this often while it grows.
const POKE_GROWTH: Duration = Duration::from_millis(20);

/// Gives a held request's place back when it is answered or dropped.
struct HoldGuard<'a> {
    routes: &'a Routes,
    version: Uuid,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        let mut holds = self.routes.holds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = holds.get_mut(&self.version) {
            e.held = e.held.saturating_sub(1);
            if e.held == 0 {
                holds.remove(&self.version);
            }
        }
    }
}

/// A node's outstanding-request counter, last failure and connections, shared by every table
/// built.
#[derive(Default)]
struct NodeCounters {
    outstanding: Arc<AtomicU32>,
    failed_at: Arc<AtomicU64>,
    links: Option<Arc<super::upstream::Links>>,
}

/// How long the gateway trusts an authentication it looked up. Changes of API keys also clear
/// the cache at once (through the `nimbus_routing` notification); the bound covers a missed
/// notification.
pub const AUTH_TTL: Duration = Duration::from_secs(5);
/// Most entries of each authentication cache (emptied when full).
const AUTH_CACHE_MAX: usize = 100_000;

/// API keys' authentications by the SHA-256 of the presented key, with when they were made.
type KeyCache = HashMap<Vec<u8>, (Principal, Instant)>;

/// The routing table of this replica and what keeps it fresh, with the gateway's caches of
/// authentications (API keys by the SHA-256 of the presented key).
#[derive(Clone)]
pub struct Routes {
    table: Arc<RwLock<Arc<Table>>>,
    /// Bumped after every rebuild; held requests wait on it.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    holds: Arc<Mutex<HashMap<Uuid, HoldEntry>>>,
    counters: Arc<Mutex<HashMap<Uuid, NodeCounters>>>,
    keys: Arc<RwLock<KeyCache>>,
    /// Role credentials per (function, role), with when they expire.
    credentials: Arc<Mutex<Credentials>>,
    started: Instant,
    replica: Uuid,
}

impl Default for Routes {
    fn default() -> Self {
        Routes {
            table: Arc::default(),
            generation: Arc::new(tokio::sync::watch::Sender::new(0)),
            holds: Arc::default(),
            counters: Arc::default(),
            keys: Arc::default(),
            credentials: Arc::default(),
            started: Instant::now(),
            replica: Uuid::now_v7(),
        }
    }
}

/// A function's id, tenant, name, reserved concurrency, resource policy, tags and execution role.
type FunctionRow =
    (Uuid, Uuid, String, Option<i32>, Option<String>, sqlx::types::Json<BTreeMap<String, String>>, Option<Uuid>);

/// How long a role credential is valid.
pub const CREDENTIAL_TTL: Duration = crate::auth::keys::ROLE_CREDENTIAL_TTL;
/// A cached credential is handed out while at least this much of its life is left: more than
/// the longest an invocation may run (15 minutes), so that no invocation outlives its credential.
pub const CREDENTIAL_MIN_LEFT: Duration = Duration::from_secs(20 * 60);
/// Role credentials per (function, role), as header values, with when they expire.
type Credentials = HashMap<(Uuid, Uuid), (axum::http::HeaderValue, Instant)>;
/// Most credentials kept at once (one per function with a role).
const CREDENTIALS_MAX: usize = 100_000;

#[derive(sqlx::FromRow)]
struct NodeRow {
    id: Uuid,
    zone: String,
    invoke_url: String,
    invoke_secret: String,
    versions: sqlx::types::Json<Vec<VersionStatus>>,
}

impl Routes {
    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The principal an API key authenticated as within [`AUTH_TTL`], if cached.
    pub fn cached_key(&self, digest: &[u8]) -> Option<Principal> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.get(digest).filter(|(_, at)| at.elapsed() < AUTH_TTL).map(|(p, _)| p.clone())
    }

    /// Remembers an API key's authentication.
    pub fn cache_key(&self, digest: Vec<u8>, principal: Principal) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= AUTH_CACHE_MAX {
            keys.clear();
        }
        keys.insert(digest, (principal, Instant::now()));
    }

    /// Forgets every cached authentication and every principal's cached policies (an API key, a
    /// membership, a policy, an attachment or a guardrail may have changed).
    pub fn clear_auth(&self) {
        self.keys.write().unwrap_or_else(|p| p.into_inner()).clear();
        crate::authz::policies::invalidate();
    }

    /// The credential for `function`'s execution `role` that an invocation takes along: one
    /// per function and role, signed once and handed out while [`CREDENTIAL_MIN_LEFT`] of it is
    /// left (so a busy function costs no signature per invocation).
    pub fn credential(
        &self,
        keys: &crate::auth::keys::KeyRing,
        tenant: Uuid,
        function: Uuid,
        role: Uuid,
    ) -> anyhow::Result<axum::http::HeaderValue> {
        let now = Instant::now();
        let mut cache = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, expires)) = cache.get(&(function, role)) {
            if expires.saturating_duration_since(now) >= CREDENTIAL_MIN_LEFT {
                return Ok(token.clone());
            }
        }
        let (token, _) = keys.issue_role(role, tenant, function, CREDENTIAL_TTL)?;
        let mut token = axum::http::HeaderValue::from_str(&format!("{}{token}", crate::auth::ROLE_CREDENTIAL_PREFIX))?;
        token.set_sensitive(true);
        if cache.len() >= CREDENTIALS_MAX {
            cache.clear();
        }
        cache.insert((function, role), (token.clone(), now + CREDENTIAL_TTL));
        Ok(token)
    }

    /// This replica's id (in pokes, so the autoscaler can sum what every replica holds).
    pub fn replica(&self) -> Uuid {
        self.replica
    }

    /// Whether any request is held.
    pub fn holding(&self) -> bool {
        !self.holds.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Requests held per version now.
    pub fn held(&self) -> HashMap<Uuid, u32> {
        self.holds.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(v, e)| (*v, e.held)).collect()
    }

    /// Holds a request for `version` until a node has it ready (the cold path): at most `max`
    /// requests per version, for at most `timeout`. `poke(held)` asks the autoscaler for an
    /// instance: once at once, again as the held count grows (so that a burst asks for as many
    /// instances as it needs, not one per request), and every [`POKE_EVERY`] while waiting.
    pub async fn hold(
        &self,
        version: Uuid,
        zone: Option<&str>,
        max: u32,
        timeout: Duration,
        poke: impl Fn(u32),
    ) -> Result<Arc<Target>, HoldRefusal> {
        let mut generation = self.generation.subscribe();
        {
            let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
            let e = holds.entry(version).or_default();
            if e.held >= max {
                return Err(HoldRefusal::Full);
            }
            e.held += 1;
        }
        let _guard = HoldGuard { routes: self, version };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = self.table().pick(version, zone, self.now_ms()) {
                return Ok(t);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HoldRefusal::Timeout);
            }
            let due = {
                let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
                let e = holds.entry(version).or_default();
                let due = match e.poked {
                    None => true,
                    Some((at, count)) => at.elapsed() >= POKE_EVERY || (e.held > count && at.elapsed() >= POKE_GROWTH),
                };
                if due {
                    e.poked = Some((Instant::now(), e.held));
                }
                due.then_some(e.held)
            };
            if let Some(held) = due {
                poke(held);
            }
            let wait =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + POKE_GROWTH), generation.changed());
            match wait.await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(HoldRefusal::Timeout),
                Err(_) if tokio::time::Instant::now() >= deadline => return Err(HoldRefusal::Timeout),
                Err(_) => {}
            }
        }
    }

    /// Milliseconds since this replica's gateway started (the clock of `failed_at`).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Rebuilds the table from PostgreSQL and forgets cached authentications.
    pub async fn reload(&self, pool: &db::Db) -> Result<(), sqlx::Error> {
        self.clear_auth();
        self.rebuild(pool).await
    }

    /// Rebuilds the table from PostgreSQL, keeping cached authentications and policies (what a
    /// change of nodes alone needs: their reports move routes, never permissions).
    async fn rebuild(&self, pool: &db::Db) -> Result<(), sqlx::Error> {
        let started = Instant::now();
        let mut tx = db::begin(pool, &Scope { gateway: true, ..Scope::default() }).await?;
        let tenants: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM tenants").fetch_all(&mut *tx).await?;
        let functions: Vec<FunctionRow> = sqlx::query_as(
            "SELECT id, tenant_id, name, reserved_concurrency, resource_policy, tags, execution_role_id FROM functions",
        )
        .fetch_all(&mut *tx)
        .await?;
        let versions: Vec<(Uuid, Uuid, i32, sqlx::types::Json<StoredConfig>)> =
            sqlx::query_as("SELECT id, function_id, number, config FROM versions").fetch_all(&mut *tx).await?;
        let aliases: Vec<(Uuid, String, sqlx::types::Json<RoutingConfig>)> =
            sqlx::query_as("SELECT function_id, name, routing FROM aliases").fetch_all(&mut *tx).await?;
        let guardrails: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT tenant_id, document FROM tenant_guardrails").fetch_all(&mut *tx).await?;
        let nodes: Vec<NodeRow> =
            sqlx::query_as("SELECT id, zone, invoke_url, invoke_secret, versions FROM nodes WHERE state = 'ready'")
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;

        let mut by_id: HashMap<Uuid, FunctionEntry> = functions
            .iter()
            .map(|(id, tenant_id, name, reserved, policy, tags, role)| {
                let tags = crate::authz::policies::tag_context(&tags.0);
                // Stored policies were validated on save; one that no longer compiles allows
                // nothing (and says so), rather than failing the whole table.
                let policy = policy.as_deref().and_then(|doc| {
                    match nimbus_iam::CompiledPolicy::compile(
                        doc,
                        nimbus_iam::PolicyKind::Resource,
                        format!("function:{name}"),
                        1,
                    ) {
                        Ok(p) => Some(Arc::new(p)),
                        Err(e) => {
                            tracing::warn!(function = %id, error = ?e, "a function's resource policy does not compile");
                            None
                        }
                    }
                });
                let entry = FunctionEntry {
                    id: *id,
                    tenant_id: *tenant_id,
                    versions: HashMap::new(),
                    aliases: HashMap::new(),
                    reserved_concurrency: reserved.and_then(|r| u32::try_from(r).ok()),
                    policy,
                    tags,
                    execution_role: *role,
                };
                (*id, entry)
            })
            .collect();
        for (id, function_id, number, config) in versions {
            if let (Some(f), Ok(number)) = (by_id.get_mut(&function_id), u32::try_from(number)) {
                let timeout = Duration::from_millis(u64::from(config.0.timeout_ms));
                f.versions.insert(number, VersionEntry { id, number, timeout, metrics: Default::default() });
            }
        }
        for (function_id, name, routing) in aliases {
            if let Some(f) = by_id.get_mut(&function_id) {
                f.aliases.insert(name, routing.0);
            }
        }
        let mut table = Table {
            tenants: tenants.into_iter().map(|(id, name)| (name, id)).collect(),
            functions: HashMap::with_capacity(functions.len()),
            instances: HashMap::new(),
            guardrails: guardrails
                .into_iter()
                .filter_map(|(tenant, doc)| {
                    let name = format!("guardrail:{tenant}");
                    match nimbus_iam::CompiledPolicy::compile(&doc, nimbus_iam::PolicyKind::Guardrail, name, 1) {
                        Ok(p) => Some((tenant, Arc::new(p))),
                        Err(e) => {
                            // Fail closed: an anonymous call in that tenant is then never allowed.
                            tracing::warn!(tenant = %tenant, error = ?e, "a tenant's guardrail does not compile");
                            let deny_all = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]}"#;
                            nimbus_iam::CompiledPolicy::compile(deny_all, nimbus_iam::PolicyKind::Guardrail, "guardrail:invalid", 1)
                                .ok()
                                .map(|p| (tenant, Arc::new(p)))
                        }
                    }
                })
                .collect(),
        };
        for (id, tenant_id, name, ..) in functions {
            if let Some(f) = by_id.remove(&id) {
                table.functions.insert((tenant_id, name), f);
            }
        }
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        counters.retain(|id, _| nodes.iter().any(|n| n.id == *id));
        for n in nodes {
            let base = url::Url::parse(&n.invoke_url).ok().filter(|u| !u.cannot_be_a_base());
            let authorization = axum::http::HeaderValue::from_str(&format!("Bearer {}", n.invoke_secret)).ok();
            let (Some(base), Some(mut authorization)) = (base, authorization) else {
                tracing::warn!(node = %n.id, "a node's invoke URL or secret is not usable; it gets no invocations");
                continue;
            };
            authorization.set_sensitive(true);
            let shared = counters.entry(n.id).or_default();
            let links = match &shared.links {
                Some(links) if links.serve(&base) => links.clone(),
                _ => match super::upstream::Links::new(&base) {
                    Some(links) => shared.links.insert(Arc::new(links)).clone(),
                    None => {
                        tracing::warn!(node = %n.id, url = %base, "a node's invoke URL is not plain http; it gets no invocations");
                        continue;
                    }
                },
            };
            let (outstanding, failed_at) = (shared.outstanding.clone(), shared.failed_at.clone());
            let target =
                Arc::new(Target { node_id: n.id, zone: n.zone, base, authorization, links, outstanding, failed_at });
            for v in n.versions.0.iter().filter(|v| v.state == InstanceState::Ready) {
                table.instances.entry(v.version_id).or_default().push(target.clone());
            }
        }
        drop(counters);
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.generation.send_modify(|g| *g += 1);
        metrics::histogram!("nimbus_gateway_table_reload_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Keeps the table fresh: LISTENs on [`CHANNEL`] and rebuilds after each burst of
    /// notifications, and every [`FULL_RELOAD`]; reconnects after failures.
    pub async fn refresh_loop(self, pool: db::Db, database_url: String) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect(&database_url).await?;
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = match listener.await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "the routing table cannot listen for changes; retrying");
                    self.reload_logged(&pool).await;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            // Changes made before LISTEN took effect are covered by this rebuild.
            self.reload_logged(&pool).await;
            loop {
                match tokio::time::timeout(FULL_RELOAD, listener.try_recv()).await {
                    // The connection dropped and the listener reconnects on the next call:
                    // notifications in between are lost, so rebuild now.
                    Ok(Ok(None)) => self.reload_logged(&pool).await,
                    Ok(Ok(Some(n))) => {
                        // Coalesce a burst (one transaction touching several tables), unless
                        // requests are held waiting for an instance.
                        if !self.holding() {
                            tokio::time::sleep(DEBOUNCE).await;
                        }
                        let mut only_nodes = n.payload() == "nodes";
                        while let Some(n) = listener.next_buffered() {
                            only_nodes &= n.payload() == "nodes";
                        }
                        // Nodes' reports change routes every few seconds under churn; they
                        // never change who may do what, so the caches stay.
                        if only_nodes {
                            if let Err(e) = self.rebuild(&pool).await {
                                metrics::counter!("nimbus_gateway_table_reload_failures_total").increment(1);
                                tracing::warn!(error = %e, "rebuilding the routing table failed; keeping the previous one");
                            }
                        } else {
                            self.reload_logged(&pool).await;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the routing-table listener lost its connection");
                        break;
                    }
                    Err(_) => self.reload_logged(&pool).await,
                }
            }
        }
    }

    async fn reload_logged(&self, pool: &db::Db) {
        if let Err(e) = self.reload(pool).await {
            metrics::counter!("nimbus_gateway_table_reload_failures_total").increment(1);
            tracing::warn!(error = %e, "rebuilding the routing table failed; keeping the previous one");
        }
    }
}
