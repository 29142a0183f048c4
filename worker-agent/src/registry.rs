//! The versions this node serves, as the listener and the reports see them. Reconciliation puts
//! versions in and takes them out; an invocation holds an `Arc` of its [`Version`], so taking a
//! version out never disturbs invocations already running.
//!
//! A version's code is *warm* when it is in memory ready to run (a linked wasm module, an
//! unpacked process package). Reconciliation warms versions that should have instances; a
//! version with none is warmed by its first invocation, which is then a cold start, and cooled
//! again once it has been idle for [`ON_DEMAND_IDLE`].

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nimbus_protocol::{Assignment, InstanceState, VersionStatus};
use uuid::Uuid;

use crate::{
    limiter::Limiter,
    runtime::{process::ProcessPackage, wasm::WarmModule},
};

/// How long code warmed on demand (a version with no instances) stays warm without traffic.
pub const ON_DEMAND_IDLE: Duration = Duration::from_secs(30);

/// A version's code, ready to run.
#[derive(Clone)]
pub enum Code {
    /// A linked wasm module.
    Wasm(WarmModule),
    /// An unpacked process package.
    Process(ProcessPackage),
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Code::Wasm(_) => f.write_str("Code::Wasm"),
            Code::Process(p) => f.debug_tuple("Code::Process").field(p).finish(),
        }
    }
}

/// Makes a version's code warm; blocking (it runs on the blocking pool).
pub type Loader = Arc<dyn Fn() -> anyhow::Result<Code> + Send + Sync>;

/// One version the node serves.
pub struct Version {
    /// What the control plane assigned (the instance count is [`Version::instances`]).
    pub assignment: Assignment,
    limiter: Arc<Limiter>,
    instances: AtomicU32,
    warm: RwLock<Option<Code>>,
    loading: tokio::sync::Mutex<()>,
    loader: Loader,
    in_flight: AtomicU32,
    last_used: Mutex<Instant>,
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Version")
            .field("version_id", &self.assignment.version_id)
            .field("instances", &self.instances())
            .field("warm", &self.is_warm())
            .finish_non_exhaustive()
    }
}

impl Version {
    /// A version served with `loader`, `warm` already when given; at most `max_queued`
    /// invocations wait for a slot.
    pub fn new(assignment: Assignment, loader: Loader, warm: Option<Code>, max_queued: usize) -> Arc<Version> {
        let limiter = Limiter::new(slots(assignment.instances, assignment.concurrency), max_queued);
        Arc::new(Version {
            instances: AtomicU32::new(assignment.instances),
            assignment,
            limiter,
            warm: RwLock::new(warm),
            loading: tokio::sync::Mutex::new(()),
            loader,
            in_flight: AtomicU32::new(0),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// The version's id.
    pub fn id(&self) -> Uuid {
        self.assignment.version_id
    }

    /// Its slots and queue.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// Warm instances the control plane wants.
    pub fn instances(&self) -> u32 {
        self.instances.load(Ordering::Relaxed)
    }

    /// Sets the wanted instances, and with them the concurrency limit:
    /// `max(instances, 1) × concurrency`.
    pub fn set_instances(&self, instances: u32) {
        self.instances.store(instances, Ordering::Relaxed);
        self.limiter.set_limit(slots(instances, self.assignment.concurrency));
    }

    /// Invocations of this version running now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether its code is in memory.
    pub fn is_warm(&self) -> bool {
        self.warm.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn warm_code(&self) -> Option<Code> {
        self.warm.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The code to run and whether this call had to load it (a cold start).
    pub async fn code(&self) -> anyhow::Result<(Code, bool)> {
        if let Some(code) = self.warm_code() {
            return Ok((code, false));
        }
        let _one_load = self.loading.lock().await;
        // Whoever held the lock before may have loaded it: waiting for that is no cold start.
        if let Some(code) = self.warm_code() {
            return Ok((code, false));
        }
        let loader = self.loader.clone();
        let code = tokio::task::spawn_blocking(move || loader())
            .await
            .map_err(|e| anyhow::anyhow!("loading the code failed: {e}"))??;
        *self.warm.write().unwrap_or_else(|p| p.into_inner()) = Some(code.clone());
        Ok((code, true))
    }

    /// Loads the code unless it is warm already (reconciliation; no invocation waits for it).
    pub async fn warm_up(&self) -> anyhow::Result<()> {
        self.code().await.map(drop)
    }

    /// Drops the code from memory when the version wants no instances and nothing used it for
    /// `idle`; returns whether it did.
    pub fn cool_if_idle(&self, idle: Duration) -> bool {
        let unused = self.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= idle;
        if self.instances() == 0 && self.in_flight() == 0 && unused && self.is_warm() {
            *self.warm.write().unwrap_or_else(|p| p.into_inner()) = None;
            return true;
        }
        false
    }

    /// Counts an invocation as running until the guard is dropped.
    pub fn enter(self: &Arc<Self>, registry: &Arc<Registry>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        registry.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { version: self.clone(), registry: registry.clone() }
    }

    fn status(&self) -> VersionStatus {
        let warm = if self.is_warm() { self.instances().max(1) } else { 0 };
        VersionStatus {
            version_id: self.id(),
            state: InstanceState::Ready,
            instances: warm,
            in_flight: self.in_flight(),
            error: None,
        }
    }
}

fn slots(instances: u32, concurrency: u32) -> usize {
    (instances.max(1) as usize).saturating_mul(concurrency.max(1) as usize)
}

/// A running invocation, counted in its version and the registry.
#[derive(Debug)]
pub struct InFlight {
    version: Arc<Version>,
    registry: Arc<Registry>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.version.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.version.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.registry.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How far a version is.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Its code is being fetched or compiled.
    Loading,
    /// It serves invocations.
    Ready(Arc<Version>),
    /// It could not be made ready.
    Failed(String),
}

/// What the listener finds for a version id.
#[derive(Debug)]
pub enum Lookup {
    /// Serve it.
    Ready(Arc<Version>),
    /// Assigned, not ready (loading or failed).
    NotReady,
    /// Not assigned to this node.
    Unknown,
}

/// The versions of the node.
#[derive(Debug, Default)]
pub struct Registry {
    entries: RwLock<HashMap<Uuid, Entry>>,
    in_flight: AtomicU32,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Uuid, Entry>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<Uuid, Entry>> {
        self.entries.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The version an invocation addresses.
    pub fn lookup(&self, version_id: Uuid) -> Lookup {
        match self.read().get(&version_id) {
            Some(Entry::Ready(v)) => Lookup::Ready(v.clone()),
            Some(_) => Lookup::NotReady,
            None => Lookup::Unknown,
        }
    }

    /// A version's entry.
    pub fn entry(&self, version_id: Uuid) -> Option<Entry> {
        self.read().get(&version_id).cloned()
    }

    /// Sets a version's entry.
    pub fn set(&self, version_id: Uuid, entry: Entry) {
        self.write().insert(version_id, entry);
    }

    /// Puts a ready version in (replacing whatever was there).
    pub fn insert(&self, version: Arc<Version>) {
        self.set(version.id(), Entry::Ready(version));
    }

    /// Takes out every version not in `keep`; returns what went.
    pub fn retain(&self, keep: &HashSet<Uuid>) -> Vec<Entry> {
        let mut entries = self.write();
        let gone: Vec<Uuid> = entries.keys().filter(|id| !keep.contains(id)).copied().collect();
        gone.into_iter().filter_map(|id| entries.remove(&id)).collect()
    }

    /// The ready versions.
    pub fn ready(&self) -> Vec<Arc<Version>> {
        self.read()
            .values()
            .filter_map(|e| match e {
                Entry::Ready(v) => Some(v.clone()),
                _ => None,
            })
            .collect()
    }

    /// Invocations running now, all versions.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Every version as reports show it.
    pub fn statuses(&self) -> Vec<VersionStatus> {
        let mut out: Vec<VersionStatus> = self
            .read()
            .iter()
            .map(|(id, e)| match e {
                Entry::Ready(v) => v.status(),
                Entry::Loading => VersionStatus {
                    version_id: *id,
                    state: InstanceState::Loading,
                    instances: 0,
                    in_flight: 0,
                    error: None,
                },
                Entry::Failed(error) => VersionStatus {
                    version_id: *id,
                    state: InstanceState::Failed,
                    instances: 0,
                    in_flight: 0,
                    error: Some(error.clone()),
                },
            })
            .collect();
        out.sort_by_key(|s| s.version_id);
        out
    }
}
