//! What the one decision point knows of a principal in a tenant: its role there (or that it is
//! not in the tenant), its identity policies, its permissions boundary and the tenant's
//! guardrails, compiled, loaded in the request's transaction and cached per process.
//!
//! **Where policies come from.** A membership's or an API key's role stands for managed
//! policies ([`Role::managed`]); to those come the policies attached to the member or key and
//! to the member's groups (`policy_attachments`: managed ones by name, the tenant's own at their
//! default version). A
//! `boundary` attachment caps them. The tenant's guardrail (`tenant_guardrails`) must allow
//! every request in the tenant.
//!
//! **Caching.** Loaded policies are kept per (principal, tenant) and compiled documents per
//! (policy, version). Every entry is stamped with the cache's generation; [`invalidate`] moves
//! the generation on (every IAM write calls it after committing, and every replica calls it when
//! the routing channel announces a change of policies, attachments, guardrails, memberships or
//! API keys), so a change is in force at once in the replica that made it and within a
//! notification's delay in the others.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, LazyLock, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use nimbus_iam::{CompiledPolicy, Context, PolicyKind, PolicySet, Request};
use uuid::Uuid;

use super::{Action, Role};
use crate::{auth::Principal, db::Tx, error::ApiError};

/// Entries kept at most; the cache starts over when full (it refills on demand).
const MAX_ENTRIES: usize = 100_000;

/// A principal as the decision point sees it in one tenant.
#[derive(Debug)]
pub struct Loaded {
    /// Its role in the tenant; `None`: not in the tenant.
    pub role: Option<Role>,
    /// The principal for the evaluator (NRN, tenant, kind).
    pub principal: nimbus_iam::Principal,
    /// The tenant, as the evaluator compares it.
    pub tenant: String,
    /// The tenant's id.
    pub tenant_id: Uuid,
    /// `user` or `api_key`, and its id (for the access log).
    pub who: (&'static str, Uuid),
    /// Identity policies: the role's managed ones, then the attached ones.
    pub identity: Vec<Arc<CompiledPolicy>>,
    /// The permissions boundary, if any.
    pub boundary: Option<Arc<CompiledPolicy>>,
    /// The tenant's guardrail, if any.
    pub guardrails: Vec<Arc<CompiledPolicy>>,
    /// The context keys that come from the principal (user name and id, principal tags).
    pub context: Context,
    generation: u64,
}

/// Facts about the request the decision point may use in conditions, set by the
/// [`request_facts`](super::request_facts) middleware for the handler's task.
#[derive(Debug, Clone, Default)]
pub struct RequestFacts {
    /// The client address (`nimbus:SourceIp`).
    pub source_ip: Option<IpAddr>,
}

tokio::task_local! {
    /// The current request's facts.
    pub static REQUEST: RequestFacts;
}

struct Cache {
    generation: AtomicU64,
    principals: RwLock<HashMap<(Uuid, Uuid, Uuid), Arc<Loaded>>>,
    compiled: Mutex<HashMap<(Uuid, i32), Arc<CompiledPolicy>>>,
    managed: HashMap<&'static str, Arc<CompiledPolicy>>,
}

static CACHE: LazyLock<Cache> = LazyLock::new(|| Cache {
    generation: AtomicU64::new(1),
    principals: RwLock::default(),
    compiled: Mutex::default(),
    managed: nimbus_iam::managed::MANAGED.iter().map(|m| (m.name, Arc::new(m.compile()))).collect(),
});

/// Drops every cached principal: the next decision for each loads its policies again.
pub fn invalidate() {
    CACHE.generation.fetch_add(1, Ordering::AcqRel);
    CACHE.principals.write().unwrap_or_else(|p| p.into_inner()).clear();
}

/// A managed policy, compiled.
pub fn managed(name: &str) -> Option<Arc<CompiledPolicy>> {
    CACHE.managed.get(name).cloned()
}

/// The key of a principal in the cache: its id and, for a role, the function holding it (what
/// is loaded depends on the function still having the role).
fn key(principal: &Principal) -> (Uuid, Uuid) {
    match principal {
        Principal::User { user_id, .. } => (*user_id, Uuid::nil()),
        Principal::ApiKey { key_id, .. } => (*key_id, Uuid::nil()),
        Principal::Role { role_id, function_id, .. } => (*role_id, *function_id),
    }
}

/// The cached view of `principal` in `tenant`, if it is still current.
pub fn cached(principal: &Principal, tenant: Uuid) -> Option<Arc<Loaded>> {
    let generation = CACHE.generation.load(Ordering::Acquire);
    let map = CACHE.principals.read().unwrap_or_else(|p| p.into_inner());
    map.get(&{
        let (id, function) = key(principal);
        (id, function, tenant)
    })
    .filter(|l| l.generation == generation)
    .cloned()
}

/// `principal` in `tenant`: from the cache, or read in `tx` (scoped to the tenant) and cached.
pub async fn load(tx: &mut Tx, principal: &Principal, tenant: Uuid) -> Result<Arc<Loaded>, ApiError> {
    if let Some(l) = cached(principal, tenant) {
        return Ok(l);
    }
    let generation = CACHE.generation.load(Ordering::Acquire);
    let loaded = Arc::new(read(tx, principal, tenant, generation).await?);
    let mut map = CACHE.principals.write().unwrap_or_else(|p| p.into_inner());
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    // A change committed while this was read moved the generation on: the entry is then stale
    // at once and the next request reads again.
    let (id, function) = key(principal);
    map.insert((id, function, tenant), loaded.clone());
    Ok(loaded)
}

/// A membership's role and tags, with the member's e-mail address.
type MemberRow = (String, sqlx::types::Json<HashMap<String, String>>, String);

#[derive(sqlx::FromRow)]
struct Attachment {
    purpose: String,
    managed_policy: Option<String>,
    policy_id: Option<Uuid>,
    name: Option<String>,
    version: Option<i32>,
    document: Option<String>,
    /// The principal's own (not, for a key that inherits, its creator's).
    own: Option<bool>,
}

async fn read(tx: &mut Tx, principal: &Principal, tenant: Uuid, generation: u64) -> Result<Loaded, ApiError> {
    let t = tenant.to_string();
    let mut context = Context::new(chrono::Utc::now());
    let mut void = false;
    let (role, who, iam_principal) = match principal {
        Principal::User { user_id, .. } => {
            let row: Option<MemberRow> = sqlx::query_as(
                "SELECT m.role, m.tags, u.email FROM memberships m JOIN users u ON u.id = m.user_id \
                 WHERE m.tenant_id = $1 AND m.user_id = $2",
            )
            .bind(tenant)
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?;
            let role = match &row {
                Some((r, ..)) => Some(Role::parse(r).map_err(ApiError::Internal)?),
                None => None,
            };
            if let Some((_, tags, email)) = row {
                context.insert("nimbus:username", email.as_str());
                for (k, v) in tags.0 {
                    context.insert(&format!("nimbus:PrincipalTag/{k}"), v);
                }
            }
            context.insert("nimbus:userid", user_id.to_string());
            (role, *user_id, nimbus_iam::Principal::user(&t, &user_id.to_string()))
        }
        Principal::ApiKey { key_id, tenant_id, role, .. } => {
            let role = (*tenant_id == tenant).then_some(*role);
            (role, *key_id, nimbus_iam::Principal::api_key(&t, &key_id.to_string()))
        }
        Principal::Role { role_id, tenant_id, function_id } => {
            // A role is in its tenant while the function holding the credential still has it
            // as its execution role: changing or removing the role voids credentials at once.
            // Without a function (the simulator, access reports): the role as such.
            let name: Option<String> = if *tenant_id == tenant && function_id.is_nil() {
                sqlx::query_scalar("SELECT name FROM roles WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant)
                    .bind(role_id)
                    .fetch_optional(&mut **tx)
                    .await?
            } else if *tenant_id == tenant {
                sqlx::query_scalar(
                    "SELECT r.name FROM roles r JOIN functions f ON f.tenant_id = r.tenant_id AND f.execution_role_id = r.id \
                     WHERE r.tenant_id = $1 AND r.id = $2 AND f.id = $3",
                )
                .bind(tenant)
                .bind(role_id)
                .bind(function_id)
                .fetch_optional(&mut **tx)
                .await?
            } else {
                None
            };
            context.insert("nimbus:userid", role_id.to_string());
            // A void credential (the role is gone or the function has another) is still of the
            // tenant but is granted nothing: every decision is a 403 naming what it asked.
            void = name.is_none();
            let nrn_name = name.unwrap_or_else(|| role_id.to_string());
            ((*tenant_id == tenant).then_some(Role::None), *role_id, nimbus_iam::Principal::role(&t, &nrn_name))
        }
    };
    context.insert("nimbus:MultiFactorAuthPresent", false);
    let mut loaded = Loaded {
        role,
        principal: iam_principal,
        tenant: t,
        tenant_id: tenant,
        who: (principal.actor().0, who),
        identity: Vec::new(),
        boundary: None,
        guardrails: Vec::new(),
        context,
        generation,
    };
    let Some(mut role) = role else { return Ok(loaded) };
    if void {
        return Ok(loaded);
    }
    // A key that inherits acts with its creator's role, attachments and groups (the key's own
    // boundary still applies; its own attachments do not).
    let mut grants = who;
    if let Principal::ApiKey { key_id, .. } = principal {
        let row: Option<(bool, Option<Uuid>)> =
            sqlx::query_as("SELECT inherits, created_by FROM api_keys WHERE tenant_id = $1 AND id = $2")
                .bind(tenant)
                .bind(key_id)
                .fetch_optional(&mut **tx)
                .await?;
        if let Some((true, creator)) = row {
            let creator_role: Option<String> =
                sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
                    .bind(tenant)
                    .bind(creator)
                    .fetch_optional(&mut **tx)
                    .await?;
            role = match creator_role {
                Some(r) => Role::parse(&r).map_err(ApiError::Internal)?,
                None => Role::None,
            };
            grants = creator.unwrap_or(Uuid::nil());
        }
    }
    loaded.identity.extend(role.managed().iter().filter_map(|m| managed(m)));

    let attachments: Vec<Attachment> = sqlx::query_as(
        "SELECT a.purpose, a.managed_policy, a.policy_id, p.name, p.default_version AS version, v.document, \
         (a.user_id = $3 OR a.api_key_id = $3 OR a.role_id = $3) AS own \
         FROM policy_attachments a \
         LEFT JOIN policies p ON p.tenant_id = a.tenant_id AND p.id = a.policy_id \
         LEFT JOIN policy_versions v ON v.policy_id = p.id AND v.version = p.default_version \
         WHERE a.tenant_id = $1 AND ((a.purpose = 'identity' AND (a.user_id = $2 OR a.api_key_id = $2 OR a.role_id = $2 \
           OR a.group_id IN (SELECT g.group_id FROM group_members g WHERE g.tenant_id = $1 AND g.user_id = $2))) \
           OR (a.purpose = 'boundary' AND (a.user_id = $3 OR a.api_key_id = $3 OR a.role_id = $3 OR a.user_id = $2))) \
         ORDER BY a.id",
    )
    .bind(tenant)
    .bind(grants)
    .bind(who)
    .fetch_all(&mut **tx)
    .await?;
    for a in attachments {
        let kind = if a.purpose == "boundary" { PolicyKind::Boundary } else { PolicyKind::Identity };
        let policy = match (a.managed_policy, a.policy_id, a.name, a.version, a.document) {
            (Some(name), ..) => managed(&name),
            (None, Some(id), Some(name), Some(version), Some(doc)) => Some(compiled(id, &name, version, &doc)?),
            _ => None,
        };
        let Some(policy) = policy else { continue };
        if kind == PolicyKind::Boundary && a.own == Some(true) {
            loaded.boundary = Some(policy);
        } else if kind == PolicyKind::Boundary {
            // The creator's boundary bounds a key acting with the creator's policies too; as a
            // second boundary it must allow as well, which is what a guardrail is.
            loaded.guardrails.push(policy);
        } else {
            loaded.identity.push(policy);
        }
    }
    let guardrail: Option<String> = sqlx::query_scalar("SELECT document FROM tenant_guardrails WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(doc) = guardrail {
        let g = CompiledPolicy::compile(&doc, PolicyKind::Guardrail, format!("guardrail:{tenant}"), 1)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("a stored guardrail does not compile: {e:?}")))?;
        loaded.guardrails.push(Arc::new(g));
    }
    Ok(loaded)
}

/// A tenant policy's version, compiled once per process.
/// Decisions name it by its name (`Matched::policy`).
fn compiled(id: Uuid, name: &str, version: i32, document: &str) -> Result<Arc<CompiledPolicy>, ApiError> {
    // Boundaries compile as identity policies do (no Principal); where one is used decides.
    let mut map = CACHE.compiled.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(&(id, version)) {
        return Ok(p.clone());
    }
    let p = CompiledPolicy::compile(document, PolicyKind::Identity, name, u32::try_from(version).unwrap_or(0))
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored policy {id} v{version} does not compile: {e:?}")))?;
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    let p = Arc::new(p);
    map.insert((id, version), p.clone());
    Ok(p)
}

impl Loaded {
    /// The evaluator's decision on `action` over `resource` in this principal's tenant, with the
    /// request's facts (when a request is being served) and the time now.
    pub fn evaluate(&self, action: Action, resource: &str) -> nimbus_iam::Decision {
        self.evaluate_with(action.name(), resource, None)
    }

    /// [`Loaded::evaluate`] for any catalogued action name, with `extra` context keys over the
    /// request's (what the simulator passes).
    pub fn evaluate_with(&self, action: &str, resource: &str, extra: Option<&Context>) -> nimbus_iam::Decision {
        self.evaluate_on(action, resource, &self.tenant, None, extra)
    }

    /// The decision on a resource of `resource_tenant` (this principal's tenant or another)
    /// that carries its own `policy` (a function's resource policy).
    pub fn evaluate_on(
        &self,
        action: &str,
        resource: &str,
        resource_tenant: &str,
        policy: Option<&CompiledPolicy>,
        extra: Option<&Context>,
    ) -> nimbus_iam::Decision {
        let mut context = self.context.clone();
        context.set_now(chrono::Utc::now());
        if let Ok(Some(ip)) = REQUEST.try_with(|f| f.source_ip) {
            context.insert("nimbus:SourceIp", ip.to_string());
        }
        if let Some(extra) = extra {
            for k in extra.keys() {
                if let Some(v) = extra.get(k) {
                    context.insert(k, v.clone());
                }
            }
        }
        let set = PolicySet {
            identity: self.identity.iter().map(|p| &**p).collect(),
            boundary: self.boundary.as_deref(),
            guardrails: self.guardrails.iter().map(|p| &**p).collect(),
            resource: policy,
        };
        let request = Request {
            principal: &self.principal,
            action,
            resource,
            resource_tenant: Some(resource_tenant),
            context: &context,
        };
        nimbus_iam::evaluate(&request, &set)
    }
}

/// What a resource brings to a decision besides its name: a function's resource policy and its
/// tags as `nimbus:ResourceTag/*` keys.
#[derive(Debug, Default)]
pub struct ResourceAttributes {
    /// The resource policy, compiled.
    pub policy: Option<Arc<CompiledPolicy>>,
    /// The tags, as condition keys.
    pub tags: Option<Context>,
}

/// The function `resource` names in `tenant` (itself, or one of its versions, aliases, packages
/// or its logs), if it names exactly one that exists: its resource policy and tags, read in `tx`.
pub async fn function_attributes(
    tx: &mut Tx,
    tenant: Uuid,
    resource: &str,
) -> Result<Option<ResourceAttributes>, ApiError> {
    let prefix = format!("nrn:nimbus:functions:{tenant}:function/");
    let Some(name) = resource.strip_prefix(&prefix).and_then(|rest| rest.split('/').next()) else {
        return Ok(None);
    };
    if name.is_empty() || name.contains(['*', '?']) {
        return Ok(None);
    }
    type Row = (Option<String>, sqlx::types::Json<HashMap<String, String>>);
    let row: Option<Row> =
        sqlx::query_as("SELECT resource_policy, tags FROM functions WHERE tenant_id = $1 AND name = $2")
            .bind(tenant)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?;
    let Some((policy, tags)) = row else { return Ok(None) };
    Ok(Some(ResourceAttributes {
        policy: policy.map(|doc| resource_policy(&doc, name)).transpose()?,
        tags: tag_context(&tags.0),
    }))
}

/// Tags as `nimbus:ResourceTag/<key>` condition keys; `None` when there are none.
pub fn tag_context<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> Option<Context> {
    let mut c = Context::new(chrono::Utc::now());
    let mut any = false;
    for (k, v) in tags {
        c.insert(&format!("nimbus:ResourceTag/{k}"), v.as_str());
        any = true;
    }
    any.then_some(c)
}

/// A function's resource policy, compiled once per process per document.
fn resource_policy(document: &str, function: &str) -> Result<Arc<CompiledPolicy>, ApiError> {
    static COMPILED: LazyLock<Mutex<HashMap<Vec<u8>, Arc<CompiledPolicy>>>> = LazyLock::new(Mutex::default);
    let digest = crate::auth::secret::sha256(document.as_bytes());
    let mut map = COMPILED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = map.get(&digest) {
        return Ok(p.clone());
    }
    let p = CompiledPolicy::compile(document, PolicyKind::Resource, format!("function:{function}"), 1)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("a stored resource policy does not compile: {e:?}")))?;
    if map.len() >= MAX_ENTRIES {
        map.clear();
    }
    let p = Arc::new(p);
    map.insert(digest, p.clone());
    Ok(p)
}

/// `a`'s keys over `b`'s, or whichever is given.
pub fn merged(a: Option<&Context>, b: Option<&Context>) -> Option<Context> {
    match (a, b) {
        (None, None) => None,
        (Some(one), None) | (None, Some(one)) => Some(one.clone()),
        (Some(a), Some(b)) => {
            let mut c = b.clone();
            for k in a.keys() {
                if let Some(v) = a.get(k) {
                    c.insert(k, v.clone());
                }
            }
            Some(c)
        }
    }
}

/// Whether a caller without credentials may perform `action` on `resource` of `tenant`: only
/// the resource's own `policy` can allow it (a statement with `Principal: "*"`), and the
/// tenant's `guardrail` must allow it too.
pub fn anonymous_allowed(
    action: Action,
    resource: &str,
    tenant: Uuid,
    policy: &CompiledPolicy,
    resource_context: Option<&Context>,
    guardrail: Option<&CompiledPolicy>,
) -> bool {
    let mut context = Context::new(chrono::Utc::now());
    if let Some(extra) = resource_context {
        for k in extra.keys() {
            if let Some(v) = extra.get(k) {
                context.insert(k, v.clone());
            }
        }
    }
    if let Ok(Some(ip)) = REQUEST.try_with(|f| f.source_ip) {
        context.insert("nimbus:SourceIp", ip.to_string());
    }
    let principal = nimbus_iam::Principal::anonymous();
    let tenant = tenant.to_string();
    let request = Request {
        principal: &principal,
        action: action.name(),
        resource,
        resource_tenant: Some(&tenant),
        context: &context,
    };
    let set = PolicySet { resource: Some(policy), guardrails: guardrail.into_iter().collect(), ..PolicySet::default() };
    nimbus_iam::evaluate(&request, &set).is_allowed()
}
