//! Nimbus IAM: the catalogue of actions, resource names, and AWS-IAM-style policies — parsed,
//! validated and evaluated — inside one tenant. Pure: no I/O, no async, no database; the API
//! gathers the policies and the request context and asks [`evaluate`].
//!
//! # Evaluation
//!
//! [`evaluate`] decides a [`Request`] (principal, action, resource, resource tenant, context)
//! against a [`PolicySet`] (identity policies, an optional permissions boundary, guardrails, an
//! optional resource policy):
//!
//! 1. An applicable Deny statement in any of the policies — identity, boundary, guardrail or
//!    resource — gives [`Effect::ExplicitDeny`], whatever allows the request.
//! 2. When guardrails are given, every one of them must have an applicable Allow; otherwise
//!    [`Effect::ImplicitDeny`] ([`Reason::GuardrailDoesNotAllow`]). Guardrails apply to every
//!    principal, anonymous ones included; the caller passes the guardrails of the principal's
//!    tenant and, for a cross-tenant request, those of the resource's tenant too.
//! 3. Same tenant (the principal's tenant equals the resource's, `None` equal to `None`): allowed
//!    if an identity policy allows it or the resource policy allows the principal. When a
//!    boundary is set it limits both: it must allow too ([`Reason::BoundaryDoesNotAllow`]), so a
//!    principal never exceeds its boundary, even through a resource policy.
//! 4. Cross-tenant (the tenants differ, including a tenant principal on a resource outside
//!    tenants): an identity policy must allow it (within the boundary) **and** the resource policy
//!    must allow the principal, by its NRN, its tenant root `nrn:nimbus:iam:<tenant>:root`, or `*`.
//! 5. Anonymous principals: only the resource policy can allow (a `Principal` of `*`); identity
//!    policies are ignored for them except for their Denies.
//!
//! Anything else is [`Effect::ImplicitDeny`]. The [`Decision`] carries the statements that decided
//! and a [`Reason`] that displays as a sentence.
//!
//! # Matching
//!
//! Actions match case-insensitively, resources and principals case-sensitively. `*` matches any
//! run of characters (empty, `/` and `:` included) and `?` exactly one; patterns are anchored at
//! both ends. Condition semantics are in [`condition`].
//!
//! # Policy variables
//!
//! `${key}` in `Resource`/`NotResource` and in string condition values is replaced by the value
//! of any context key (`${nimbus:username}`, `${nimbus:PrincipalTag/team}`, `${nimbus:TenantId}`,
//! ...); `${*}`, `${?}` and `${$}` are a literal `*`, `?` and `$`. Substituted text is literal: a
//! user name containing `*` is not a wildcard. A variable that cannot be resolved (the key is
//! absent or multi-valued) never makes a statement apply — for Allow **and for Deny**, as in AWS:
//! a `Resource` entry with it matches nothing, a `NotResource` entry with it keeps the statement
//! from applying, and a condition value with it matches nothing (a negated operator with it is
//! false). A Deny that must hold when a key is absent should say so with a `Null` condition in a
//! second Deny statement.

pub mod catalogue;
pub mod condition;
mod context;
mod eval;
pub mod glob;
pub mod managed;
pub mod nrn;
pub mod policy;
pub mod validate;

pub use catalogue::{ACTIONS, AccessLevel, ActionSpec, GLOBAL_CONDITION_KEYS, lookup};
pub use context::{Context, ContextValue};
pub use eval::{
    ANONYMOUS_NRN, Decision, Effect, Matched, PolicySet, Principal, PrincipalKind, Reason, Request, evaluate,
};
pub use nrn::{Nrn, NrnError};
pub use policy::{CompiledPolicy, InvalidPolicy, PolicyError, PolicyKind, Rule, Statement, StatementEffect};
pub use validate::{Finding, FindingCode, Report, validate};
