//! The policy decision: one pure, deterministic function from a request and the policies that
//! apply to it to Allow, explicit Deny or implicit Deny, with the statements that decided.
//! The combining rules are in the crate documentation.

use std::{fmt, sync::Arc};

use crate::{
    context::{Context, Values},
    glob::Resolve,
    policy::{CompiledPolicy, Patterns, PolicyKind, PrincipalEntry, Statement, StatementEffect},
};

/// What kind of caller a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// A signed-in user acting in a tenant.
    User,
    /// An API key.
    ApiKey,
    /// A role, assumed by a user or a service.
    Role,
    /// Nobody signed in: only a resource policy naming `*` can allow it anything.
    Anonymous,
}

impl PrincipalKind {
    /// The value of `nimbus:PrincipalType`.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "User",
            PrincipalKind::ApiKey => "ApiKey",
            PrincipalKind::Role => "Role",
            PrincipalKind::Anonymous => "Anonymous",
        }
    }
}

/// Who makes a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its NRN, e.g. `nrn:nimbus:iam:<tenant>:user/<id>` (`nimbus:PrincipalNrn`).
    pub nrn: String,
    /// The tenant it belongs to (`nimbus:TenantId`); `None` for anonymous callers and platform
    /// admins acting outside tenants.
    pub tenant: Option<String>,
    /// What kind of caller it is (`nimbus:PrincipalType`).
    pub kind: PrincipalKind,
}

/// The NRN anonymous callers are given; it names nothing and no policy entry matches it.
pub const ANONYMOUS_NRN: &str = "nrn:nimbus:iam::anonymous";

impl Principal {
    /// A user acting in `tenant`.
    pub fn user(tenant: &str, id: &str) -> Principal {
        Principal { nrn: crate::nrn::tenant_user(tenant, id), tenant: Some(tenant.into()), kind: PrincipalKind::User }
    }

    /// An API key of `tenant`, by its prefix.
    pub fn api_key(tenant: &str, prefix: &str) -> Principal {
        Principal { nrn: crate::nrn::api_key(tenant, prefix), tenant: Some(tenant.into()), kind: PrincipalKind::ApiKey }
    }

    /// A role of `tenant`.
    pub fn role(tenant: &str, name: &str) -> Principal {
        Principal { nrn: crate::nrn::role(tenant, name), tenant: Some(tenant.into()), kind: PrincipalKind::Role }
    }

    /// A caller that is not signed in.
    pub fn anonymous() -> Principal {
        Principal { nrn: ANONYMOUS_NRN.into(), tenant: None, kind: PrincipalKind::Anonymous }
    }
}

/// One request to decide.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Who asks.
    pub principal: &'a Principal,
    /// The action, e.g. `functions:InvokeFunction` (matched case-insensitively).
    pub action: &'a str,
    /// The resource NRN (matched case-sensitively).
    pub resource: &'a str,
    /// The tenant the resource is in; `None` for resources outside tenants.
    pub resource_tenant: Option<&'a str>,
    /// The condition keys and the time.
    pub context: &'a Context,
}

/// The policies that apply to a request, gathered by the caller.
#[derive(Debug, Clone, Default)]
pub struct PolicySet<'a> {
    /// The principal's identity policies (its own, its groups', its role's).
    pub identity: Vec<&'a CompiledPolicy>,
    /// The principal's permissions boundary, if one is set.
    pub boundary: Option<&'a CompiledPolicy>,
    /// Guardrails; every one of them must allow. For a cross-tenant request pass both tenants'.
    pub guardrails: Vec<&'a CompiledPolicy>,
    /// The resource's policy, if it has one.
    pub resource: Option<&'a CompiledPolicy>,
}

/// The outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Allowed.
    Allow,
    /// A Deny statement applies.
    ExplicitDeny,
    /// Nothing (or not enough) allows it.
    ImplicitDeny,
}

/// A statement that took part in the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// The policy's id.
    pub policy: Arc<str>,
    /// The policy's version.
    pub version: u32,
    /// What the policy was in the set.
    pub kind: PolicyKind,
    /// The statement's `Sid`.
    pub sid: Option<Arc<str>>,
    /// The statement's index in its document.
    pub index: usize,
    /// The statement's effect.
    pub effect: StatementEffect,
}

/// Why the decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A Deny statement applies.
    ExplicitDeny,
    /// No policy allows it.
    NoAllow,
    /// A guardrail does not allow it.
    GuardrailDoesNotAllow,
    /// A policy allows it but the permissions boundary does not.
    BoundaryDoesNotAllow,
    /// Across tenants the identity policy allows it but no resource policy names the principal.
    CrossTenantNeedsResourcePolicy,
    /// Across tenants the resource policy allows it but no identity policy does.
    CrossTenantNeedsIdentityPolicy,
    /// An identity policy allows it.
    AllowedByIdentity,
    /// The resource policy allows it.
    AllowedByResourcePolicy,
    /// Across tenants, both an identity policy and the resource policy allow it.
    AllowedByIdentityAndResourcePolicy,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::ExplicitDeny => "explicitly denied by a Deny statement",
            Reason::NoAllow => "no policy allows it",
            Reason::GuardrailDoesNotAllow => "a tenant guardrail does not allow it",
            Reason::BoundaryDoesNotAllow => "the permissions boundary does not allow it",
            Reason::CrossTenantNeedsResourcePolicy => {
                "the resource is in another tenant and its resource policy does not allow the principal"
            }
            Reason::CrossTenantNeedsIdentityPolicy => {
                "the resource is in another tenant and no identity policy of the principal allows it"
            }
            Reason::AllowedByIdentity => "allowed by an identity policy",
            Reason::AllowedByResourcePolicy => "allowed by the resource policy",
            Reason::AllowedByIdentityAndResourcePolicy => "allowed by an identity policy and the resource policy",
        })
    }
}

/// The decision, with the statements that made it: every applicable Deny for an explicit deny;
/// the Allows that were needed (guardrails, boundary, identity and/or resource) for an allow;
/// the Allows that applied but were not enough for an implicit deny.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The outcome.
    pub effect: Effect,
    /// The deciding statements.
    pub matched: Vec<Matched>,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    /// Whether the request is allowed.
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
}

/// What statements see of a request: its context, plus the keys derived from the principal.
pub(crate) struct Env<'a> {
    req: &'a Request<'a>,
}

impl<'a> Env<'a> {
    /// A key's values by lowercased name. The principal's keys come from the request, never
    /// from the context, so a context cannot contradict the principal.
    pub(crate) fn lookup(&self, key: &str) -> Option<Values<'a>> {
        let p = self.req.principal;
        let anonymous = p.kind == PrincipalKind::Anonymous;
        match key {
            "nimbus:principalnrn" => (!anonymous).then_some(Values::One(&p.nrn)),
            "nimbus:principaltype" => Some(Values::One(p.kind.as_str())),
            "nimbus:tenantid" => p.tenant.as_deref().map(Values::One),
            _ => self.req.context.get_lower(key),
        }
    }

    /// An instant in milliseconds: the request's time for the time keys, else the value parsed.
    pub(crate) fn instant(&self, key: &str, value: &str) -> Option<i64> {
        match key {
            "nimbus:currenttime" | "nimbus:epochtime" => Some(self.req.context.now().timestamp_millis()),
            _ => crate::condition::parse_date_value(value),
        }
    }
}

impl Resolve for Env<'_> {
    fn var(&self, key: &str) -> Option<&str> {
        self.lookup(key)?.single()
    }
}

fn action_applies(p: &Patterns, action: &str) -> bool {
    p.patterns.iter().any(|pat| pat.matches_ignore_ascii_case(action)) != p.negated
}

/// An unresolvable variable never makes a statement apply: in `Resource` the entry matches
/// nothing; in `NotResource` it keeps the statement from applying at all.
fn resource_applies(p: &Patterns, resource: &str, env: &Env<'_>) -> bool {
    if p.negated {
        p.patterns.iter().all(|pat| pat.matches_with(resource, false, env) == Some(false))
    } else {
        p.patterns.iter().any(|pat| pat.matches_with(resource, false, env) == Some(true))
    }
}

fn principal_applies(entries: &[PrincipalEntry], principal: &Principal) -> bool {
    let anonymous = principal.kind == PrincipalKind::Anonymous;
    entries.iter().any(|e| match e {
        PrincipalEntry::Any => true,
        PrincipalEntry::TenantRoot(t) => !anonymous && principal.tenant.as_deref().is_some_and(|t2| t.matches(t2)),
        PrincipalEntry::Nrn(p) => !anonymous && p.matches(&principal.nrn),
    })
}

fn applies(s: &Statement, env: &Env<'_>) -> bool {
    let req = env.req;
    action_applies(&s.actions, req.action)
        && resource_applies(&s.resources, req.resource, env)
        && s.principals.as_ref().is_none_or(|p| principal_applies(&p.entries, req.principal) != p.negated)
        && s.conditions.iter().all(|c| c.holds(env))
}

fn matched(policy: &CompiledPolicy, index: usize, s: &Statement) -> Matched {
    Matched {
        policy: policy.id.clone(),
        version: policy.version,
        kind: policy.kind,
        sid: s.sid.clone(),
        index,
        effect: s.effect,
    }
}

/// Scans one policy: every applicable Deny goes to `denies`; the first applicable Allow is
/// returned when `want_allow` (later Allows cannot change the outcome, so they are skipped).
fn scan(policy: &CompiledPolicy, env: &Env<'_>, want_allow: bool, denies: &mut Vec<Matched>) -> Option<Matched> {
    let mut allow = None;
    for (i, s) in policy.statements.iter().enumerate() {
        match s.effect {
            StatementEffect::Deny if applies(s, env) => denies.push(matched(policy, i, s)),
            StatementEffect::Allow if want_allow && allow.is_none() && applies(s, env) => {
                allow = Some(matched(policy, i, s));
            }
            _ => {}
        }
    }
    allow
}

/// Decides a request. See the crate documentation for the rules.
pub fn evaluate(req: &Request<'_>, set: &PolicySet<'_>) -> Decision {
    let env = Env { req };
    let mut denies = Vec::new();
    let guardrails: Vec<Option<Matched>> = set.guardrails.iter().map(|g| scan(g, &env, true, &mut denies)).collect();
    let boundary = set.boundary.map(|b| scan(b, &env, true, &mut denies));
    let anonymous = req.principal.kind == PrincipalKind::Anonymous;
    let mut identity = None;
    for p in &set.identity {
        let found = scan(p, &env, identity.is_none() && !anonymous, &mut denies);
        identity = identity.or(found);
    }
    let resource = set.resource.and_then(|r| scan(r, &env, true, &mut denies));

    if !denies.is_empty() {
        return Decision { effect: Effect::ExplicitDeny, matched: denies, reason: Reason::ExplicitDeny };
    }
    let guardrails_allow = guardrails.iter().all(Option::is_some);
    let boundary_allows = boundary.as_ref().is_none_or(Option::is_some);
    let same_tenant = !anonymous && req.principal.tenant.as_deref() == req.resource_tenant;
    let mut allows: Vec<Matched> = guardrails.into_iter().flatten().collect();
    allows.extend(boundary.flatten());
    let (has_identity, has_resource) = (identity.is_some(), resource.is_some());
    allows.extend(identity);
    allows.extend(resource);

    let granted = if anonymous {
        if has_resource { Ok(Reason::AllowedByResourcePolicy) } else { Err(Reason::NoAllow) }
    } else if same_tenant {
        match (has_identity, has_resource) {
            (true, _) => Ok(Reason::AllowedByIdentity),
            (false, true) => Ok(Reason::AllowedByResourcePolicy),
            (false, false) => Err(Reason::NoAllow),
        }
    } else {
        match (has_identity, has_resource) {
            (true, true) => Ok(Reason::AllowedByIdentityAndResourcePolicy),
            (true, false) => Err(Reason::CrossTenantNeedsResourcePolicy),
            (false, true) => Err(Reason::CrossTenantNeedsIdentityPolicy),
            (false, false) => Err(Reason::NoAllow),
        }
    };
    let reason = if !guardrails_allow {
        Err(Reason::GuardrailDoesNotAllow)
    } else {
        match granted {
            Ok(_) if !boundary_allows => Err(Reason::BoundaryDoesNotAllow),
            other => other,
        }
    };
    match reason {
        Ok(reason) => Decision { effect: Effect::Allow, matched: allows, reason },
        Err(reason) => Decision { effect: Effect::ImplicitDeny, matched: allows, reason },
    }
}
