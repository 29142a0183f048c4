//! The one authorization function every handler calls ([`authorize`], through [`begin`]), the
//! gateway and the console included: the principal's policies in the tenant
//! ([`policies::load`]) are evaluated by `nimbus_iam::evaluate` for the action (named in
//! `nimbus_iam::catalogue`) and the resource's NRN. Platform actions are decided by
//! [`begin_platform`] (platform admins only).

pub mod activity;
pub mod policies;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Principal,
    db::{self, Scope, Tx},
    error::ApiError,
};

/// A member's or API key's role in a tenant, ordered by what it may do: it stands for managed
/// policies ([`Role::managed`]), to which attachments add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No policies of its own: exactly what is attached to the member or key.
    None,
    /// Reads the tenant's configuration (the managed `Viewer`).
    Viewer,
    /// Also builds and deploys functions and manages API keys up to its own role (`Developer`
    /// and `Viewer`).
    Developer,
    /// Everything in the tenant (`TenantAdmin`).
    Admin,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> anyhow::Result<Role> {
        match s {
            "none" => Ok(Role::None),
            "viewer" => Ok(Role::Viewer),
            "developer" => Ok(Role::Developer),
            "admin" => Ok(Role::Admin),
            other => Err(anyhow::anyhow!("unknown role {other:?} in the database")),
        }
    }
}

impl Role {
    /// The managed policies the role stands for.
    pub fn managed(self) -> &'static [&'static str] {
        match self {
            Role::None => &[],
            Role::Viewer => &["Viewer"],
            Role::Developer => &["Developer", "Viewer"],
            Role::Admin => &["TenantAdmin"],
        }
    }
}

impl TryFrom<String> for Role {
    type Error = anyhow::Error;
    fn try_from(s: String) -> anyhow::Result<Role> {
        Role::parse(&s)
    }
}

/// Every action that is authorized inside a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read a tenant.
    GetTenant,
    /// Rename a tenant.
    UpdateTenant,
    /// List a tenant's members.
    ListMembers,
    /// Add a member.
    AddMember,
    /// Change a member's role.
    UpdateMember,
    /// Remove a member.
    RemoveMember,
    /// Create an API key.
    CreateApiKey,
    /// List API keys.
    ListApiKeys,
    /// Revoke an API key.
    RevokeApiKey,
    /// Read the audit log.
    ListAuditEvents,
    /// Create a function.
    CreateFunction,
    /// List functions.
    ListFunctions,
    /// Read a function.
    GetFunction,
    /// Change a function's configuration.
    UpdateFunction,
    /// Delete a function with its versions and aliases.
    DeleteFunction,
    /// Upload a code package (directly or through a presigned upload).
    UpdateFunctionCode,
    /// List and read a function's code packages.
    ListPackages,
    /// Publish a version.
    CreateVersion,
    /// List and read versions.
    ListVersions,
    /// Delete a version.
    DeleteVersion,
    /// Create an alias.
    CreateAlias,
    /// List and read aliases and their routing events.
    ListAliases,
    /// Change an alias's routing.
    UpdateAlias,
    /// Delete an alias.
    DeleteAlias,
    /// Read a function's logs.
    GetFunctionLogs,
    /// Invoke a function through the gateway.
    InvokeFunction,
    /// Create a join token for worker nodes (platform).
    CreateJoinToken,
    /// List join tokens (platform).
    ListJoinTokens,
    /// Revoke a join token (platform).
    RevokeJoinToken,
    /// List and read worker nodes (platform).
    ListNodes,
    /// Drain a node: no new instances (platform).
    DrainNode,
    /// Remove a node: its credential stops working (platform).
    RemoveNode,
    /// Set the versions a node keeps warm (platform).
    PutAssignments,
    /// Change a node's labels (platform).
    UpdateNode,
    /// List the pools nodes form with their `pool` label, and their dedications (platform).
    ListPools,
    /// Dedicate a pool to one tenant (platform).
    DedicatePool,
    /// End a pool's dedication (platform).
    UndedicatePool,
    /// Create a policy.
    CreatePolicy,
    /// List policies.
    ListPolicies,
    /// Read a policy.
    GetPolicy,
    /// Delete a policy.
    DeletePolicy,
    /// Add a version to a policy.
    CreatePolicyVersion,
    /// List and read a policy's versions.
    ListPolicyVersions,
    /// Choose the version of a policy in force.
    SetDefaultPolicyVersion,
    /// Validate a policy document.
    ValidatePolicy,
    /// Simulate decisions for a principal.
    SimulatePolicy,
    /// List the policies attached to a principal.
    ListAttachedPolicies,
    /// Attach a policy to a member.
    AttachUserPolicy,
    /// Detach a policy from a member.
    DetachUserPolicy,
    /// Attach a policy to an API key.
    AttachApiKeyPolicy,
    /// Detach a policy from an API key.
    DetachApiKeyPolicy,
    /// Set a principal's permissions boundary.
    PutPermissionsBoundary,
    /// Remove a principal's permissions boundary.
    DeletePermissionsBoundary,
    /// Read a tenant's guardrail (platform).
    GetGuardrails,
    /// Set or remove a tenant's guardrail (platform).
    PutGuardrails,
    /// Read a function's resource policy.
    GetFunctionPolicy,
    /// Set a function's resource policy.
    PutFunctionPolicy,
    /// Remove a function's resource policy.
    DeleteFunctionPolicy,
    /// Read a principal's access report (last used, unused).
    GetAccessReport,
    /// Generate a policy from a principal's activity.
    GeneratePolicy,
    /// Create a group.
    CreateGroup,
    /// List groups.
    ListGroups,
    /// Read a group with its members and policies.
    GetGroup,
    /// Delete a group.
    DeleteGroup,
    /// Add a member to a group.
    AddUserToGroup,
    /// Remove a member from a group.
    RemoveUserFromGroup,
    /// Attach a policy to a group.
    AttachGroupPolicy,
    /// Detach a policy from a group.
    DetachGroupPolicy,
    /// Create a role.
    CreateRole,
    /// List roles.
    ListRoles,
    /// Read a role with its policies and the functions using it.
    GetRole,
    /// Delete a role no function uses.
    DeleteRole,
    /// Attach a policy to a role.
    AttachRolePolicy,
    /// Detach a policy from a role.
    DetachRolePolicy,
    /// Give a role to a function as its execution role.
    PassRole,
    /// Set a member's principal tags.
    TagPrincipal,
    /// Remove a member's principal tag.
    UntagPrincipal,
}

impl Action {
    /// Every action, for catalogue checks.
    pub const ALL: &'static [Action] = &[
        Action::GetTenant,
        Action::UpdateTenant,
        Action::ListMembers,
        Action::AddMember,
        Action::UpdateMember,
        Action::RemoveMember,
        Action::CreateApiKey,
        Action::ListApiKeys,
        Action::RevokeApiKey,
        Action::ListAuditEvents,
        Action::CreateFunction,
        Action::ListFunctions,
        Action::GetFunction,
        Action::UpdateFunction,
        Action::DeleteFunction,
        Action::UpdateFunctionCode,
        Action::ListPackages,
        Action::CreateVersion,
        Action::ListVersions,
        Action::DeleteVersion,
        Action::CreateAlias,
        Action::ListAliases,
        Action::UpdateAlias,
        Action::DeleteAlias,
        Action::GetFunctionLogs,
        Action::InvokeFunction,
        Action::CreateJoinToken,
        Action::ListJoinTokens,
        Action::RevokeJoinToken,
        Action::ListNodes,
        Action::DrainNode,
        Action::RemoveNode,
        Action::PutAssignments,
        Action::UpdateNode,
        Action::ListPools,
        Action::DedicatePool,
        Action::UndedicatePool,
        Action::CreatePolicy,
        Action::ListPolicies,
        Action::GetPolicy,
        Action::DeletePolicy,
        Action::CreatePolicyVersion,
        Action::ListPolicyVersions,
        Action::SetDefaultPolicyVersion,
        Action::ValidatePolicy,
        Action::SimulatePolicy,
        Action::ListAttachedPolicies,
        Action::AttachUserPolicy,
        Action::DetachUserPolicy,
        Action::AttachApiKeyPolicy,
        Action::DetachApiKeyPolicy,
        Action::PutPermissionsBoundary,
        Action::DeletePermissionsBoundary,
        Action::GetGuardrails,
        Action::PutGuardrails,
        Action::GetFunctionPolicy,
        Action::PutFunctionPolicy,
        Action::DeleteFunctionPolicy,
        Action::GetAccessReport,
        Action::GeneratePolicy,
        Action::CreateGroup,
        Action::ListGroups,
        Action::GetGroup,
        Action::DeleteGroup,
        Action::AddUserToGroup,
        Action::RemoveUserFromGroup,
        Action::AttachGroupPolicy,
        Action::DetachGroupPolicy,
        Action::CreateRole,
        Action::ListRoles,
        Action::GetRole,
        Action::DeleteRole,
        Action::AttachRolePolicy,
        Action::DetachRolePolicy,
        Action::PassRole,
        Action::TagPrincipal,
        Action::UntagPrincipal,
    ];

    /// The action's name, `<service>:<Verb><Noun>`.
    pub fn name(self) -> &'static str {
        match self {
            Action::GetTenant => "tenants:GetTenant",
            Action::UpdateTenant => "tenants:UpdateTenant",
            Action::ListMembers => "tenants:ListMembers",
            Action::AddMember => "tenants:AddMember",
            Action::UpdateMember => "tenants:UpdateMember",
            Action::RemoveMember => "tenants:RemoveMember",
            Action::CreateApiKey => "iam:CreateApiKey",
            Action::ListApiKeys => "iam:ListApiKeys",
            Action::RevokeApiKey => "iam:RevokeApiKey",
            Action::ListAuditEvents => "audit:ListAuditEvents",
            Action::CreateFunction => "functions:CreateFunction",
            Action::ListFunctions => "functions:ListFunctions",
            Action::GetFunction => "functions:GetFunction",
            Action::UpdateFunction => "functions:UpdateFunction",
            Action::DeleteFunction => "functions:DeleteFunction",
            Action::UpdateFunctionCode => "functions:UpdateFunctionCode",
            Action::ListPackages => "functions:ListPackages",
            Action::CreateVersion => "functions:CreateVersion",
            Action::ListVersions => "functions:ListVersions",
            Action::DeleteVersion => "functions:DeleteVersion",
            Action::CreateAlias => "functions:CreateAlias",
            Action::ListAliases => "functions:ListAliases",
            Action::UpdateAlias => "functions:UpdateAlias",
            Action::DeleteAlias => "functions:DeleteAlias",
            Action::GetFunctionLogs => "functions:GetFunctionLogs",
            Action::InvokeFunction => "functions:InvokeFunction",
            Action::CreateJoinToken => "nodes:CreateJoinToken",
            Action::ListJoinTokens => "nodes:ListJoinTokens",
            Action::RevokeJoinToken => "nodes:RevokeJoinToken",
            Action::ListNodes => "nodes:ListNodes",
            Action::DrainNode => "nodes:DrainNode",
            Action::RemoveNode => "nodes:RemoveNode",
            Action::PutAssignments => "nodes:PutAssignments",
            Action::UpdateNode => "nodes:UpdateNode",
            Action::ListPools => "nodes:ListPools",
            Action::DedicatePool => "nodes:DedicatePool",
            Action::UndedicatePool => "nodes:UndedicatePool",
            Action::CreatePolicy => "iam:CreatePolicy",
            Action::ListPolicies => "iam:ListPolicies",
            Action::GetPolicy => "iam:GetPolicy",
            Action::DeletePolicy => "iam:DeletePolicy",
            Action::CreatePolicyVersion => "iam:CreatePolicyVersion",
            Action::ListPolicyVersions => "iam:ListPolicyVersions",
            Action::SetDefaultPolicyVersion => "iam:SetDefaultPolicyVersion",
            Action::ValidatePolicy => "iam:ValidatePolicy",
            Action::SimulatePolicy => "iam:SimulatePolicy",
            Action::ListAttachedPolicies => "iam:ListAttachedPolicies",
            Action::AttachUserPolicy => "iam:AttachUserPolicy",
            Action::DetachUserPolicy => "iam:DetachUserPolicy",
            Action::AttachApiKeyPolicy => "iam:AttachApiKeyPolicy",
            Action::DetachApiKeyPolicy => "iam:DetachApiKeyPolicy",
            Action::PutPermissionsBoundary => "iam:PutPermissionsBoundary",
            Action::DeletePermissionsBoundary => "iam:DeletePermissionsBoundary",
            Action::GetGuardrails => "tenants:GetGuardrails",
            Action::PutGuardrails => "tenants:PutGuardrails",
            Action::GetFunctionPolicy => "functions:GetFunctionPolicy",
            Action::PutFunctionPolicy => "functions:PutFunctionPolicy",
            Action::DeleteFunctionPolicy => "functions:DeleteFunctionPolicy",
            Action::GetAccessReport => "iam:GetAccessReport",
            Action::GeneratePolicy => "iam:GeneratePolicy",
            Action::CreateGroup => "iam:CreateGroup",
            Action::ListGroups => "iam:ListGroups",
            Action::GetGroup => "iam:GetGroup",
            Action::DeleteGroup => "iam:DeleteGroup",
            Action::AddUserToGroup => "iam:AddUserToGroup",
            Action::RemoveUserFromGroup => "iam:RemoveUserFromGroup",
            Action::AttachGroupPolicy => "iam:AttachGroupPolicy",
            Action::DetachGroupPolicy => "iam:DetachGroupPolicy",
            Action::CreateRole => "iam:CreateRole",
            Action::ListRoles => "iam:ListRoles",
            Action::GetRole => "iam:GetRole",
            Action::DeleteRole => "iam:DeleteRole",
            Action::AttachRolePolicy => "iam:AttachRolePolicy",
            Action::DetachRolePolicy => "iam:DetachRolePolicy",
            Action::PassRole => "iam:PassRole",
            Action::TagPrincipal => "iam:TagPrincipal",
            Action::UntagPrincipal => "iam:UntagPrincipal",
        }
    }

    /// Whether the action acts on the platform (nodes, join tokens) rather than in a tenant:
    /// only platform admins may perform it, through [`authorize_platform`].
    pub fn is_platform(self) -> bool {
        self.spec().platform
    }

    /// The action's entry in the catalogue.
    pub fn spec(self) -> &'static nimbus_iam::ActionSpec {
        nimbus_iam::lookup(self.name()).expect("every action is in the catalogue (tested)")
    }
}

/// Resource names, `nrn:nimbus:<service>:<tenant>:<type>/<path>`.
pub mod nrn {
    use uuid::Uuid;

    /// A tenant.
    pub fn tenant(t: Uuid) -> String {
        format!("nrn:nimbus:tenants:{t}:tenant/{t}")
    }
    /// A member of a tenant, or every member with `*`.
    pub fn member(t: Uuid, user: impl std::fmt::Display) -> String {
        format!("nrn:nimbus:tenants:{t}:member/{user}")
    }
    /// An API key, or every key with `*`.
    pub fn api_key(t: Uuid, key: &str) -> String {
        format!("nrn:nimbus:iam:{t}:api-key/{key}")
    }
    /// A tenant's audit log.
    pub fn audit_log(t: Uuid) -> String {
        format!("nrn:nimbus:audit:{t}:audit-log/*")
    }
    /// A function, or every function with `*`.
    pub fn function(t: Uuid, name: &str) -> String {
        format!("nrn:nimbus:functions:{t}:function/{name}")
    }
    /// A version of a function, or every version with `*`.
    pub fn version(t: Uuid, function: &str, version: impl std::fmt::Display) -> String {
        format!("nrn:nimbus:functions:{t}:function/{function}/version/{version}")
    }
    /// An alias of a function, or every alias with `*`.
    pub fn alias(t: Uuid, function: &str, alias: &str) -> String {
        format!("nrn:nimbus:functions:{t}:function/{function}/alias/{alias}")
    }
    /// A code package of a function, or every package with `*`.
    pub fn package(t: Uuid, function: &str, package: impl std::fmt::Display) -> String {
        format!("nrn:nimbus:functions:{t}:function/{function}/package/{package}")
    }
    /// A user (outside any tenant).
    pub fn user(u: Uuid) -> String {
        format!("nrn:nimbus:iam::user/{u}")
    }
    /// A function's logs.
    pub fn logs(t: Uuid, function: &str) -> String {
        format!("nrn:nimbus:functions:{t}:function/{function}/logs")
    }
    /// A worker node (a platform resource, outside any tenant), or every node with `*`.
    pub fn node(node: impl std::fmt::Display) -> String {
        format!("nrn:nimbus:nodes::node/{node}")
    }
    /// A join token, or every token with `*`.
    pub fn join_token(token: impl std::fmt::Display) -> String {
        format!("nrn:nimbus:nodes::join-token/{token}")
    }
    /// A tenant's policy, or every policy with `*`.
    pub fn policy(t: Uuid, name: &str) -> String {
        format!("nrn:nimbus:iam:{t}:policy/{name}")
    }
    /// A group, or every group with `*`.
    pub fn group(t: Uuid, name: &str) -> String {
        format!("nrn:nimbus:iam:{t}:group/{name}")
    }
    /// A role (a resource of the `iam:*Role*` actions and a principal), or every role with `*`.
    pub fn role(t: Uuid, name: &str) -> String {
        format!("nrn:nimbus:iam:{t}:role/{name}")
    }
    /// A member as an IAM principal.
    pub fn tenant_user(t: Uuid, user: Uuid) -> String {
        format!("nrn:nimbus:iam:{t}:user/{user}")
    }
    /// An API key as an IAM principal, by id.
    pub fn api_key_principal(t: Uuid, key: Uuid) -> String {
        format!("nrn:nimbus:iam:{t}:api-key/{key}")
    }
    /// A tenant's guardrail.
    pub fn guardrail(t: Uuid) -> String {
        format!("nrn:nimbus:tenants:{t}:tenant/{t}")
    }
    /// A pool of nodes (the value of their `pool` label), or every pool with `*`.
    pub fn pool(pool: &str) -> String {
        format!("nrn:nimbus:nodes::pool/{pool}")
    }
}

/// Decides whether `principal` may perform `action` on `resource` in `tenant`, and returns the
/// principal's role there. A principal that is not in the tenant gets 404 (it cannot list the
/// tenant, so its existence is not confirmed); one that is in it but whose policies do not allow
/// the action gets 403 naming the action and the resource.
///
/// The transaction must already be scoped to `tenant` (see [`crate::db::Scope::tenant`]).
#[tracing::instrument(skip(tx, principal), fields(action = action.name()))]
pub async fn authorize(
    tx: &mut Tx,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: &str,
) -> Result<Role, ApiError> {
    authorize_with(tx, principal, action, tenant, resource, None).await
}

/// [`authorize`] with the action's own condition keys. When `resource` is one function (or a
/// version, alias, package or the logs of one), the function's resource policy and its tags
/// (`nimbus:ResourceTag/*`) take part, read in the same transaction: a resource policy can
/// allow a principal of the tenant what its identity policies do not, and conditions can
/// look at the function's tags.
async fn authorize_with(
    tx: &mut Tx,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: &str,
    context: Option<&nimbus_iam::Context>,
) -> Result<Role, ApiError> {
    let loaded = policies::load(tx, principal, tenant).await?;
    if loaded.role.is_none() {
        return Err(ApiError::NotFound("tenant"));
    }
    match policies::function_attributes(tx, tenant, resource).await? {
        None => decide_with(&loaded, action, resource, context),
        Some(attributes) => decide_resource(&loaded, action, resource, context, &attributes),
    }
}

/// [`decide_with`] on a resource with attributes of its own (a function's resource policy and
/// tags), in the principal's tenant.
pub fn decide_resource(
    loaded: &policies::Loaded,
    action: Action,
    resource: &str,
    context: Option<&nimbus_iam::Context>,
    attributes: &policies::ResourceAttributes,
) -> Result<Role, ApiError> {
    if action.is_platform() {
        return decide_with(loaded, action, resource, context);
    }
    let role = loaded.role.ok_or(ApiError::NotFound("tenant"))?;
    let merged = policies::merged(context, attributes.tags.as_ref());
    let d = loaded.evaluate_on(action.name(), resource, &loaded.tenant, attributes.policy.as_deref(), merged.as_ref());
    if d.is_allowed() {
        activity::record(loaded.tenant_id, loaded.who.0, loaded.who.1, action.name(), resource);
        Ok(role)
    } else {
        metrics::counter!("nimbus_authz_denied_total", "action" => action.name()).increment(1);
        Err(ApiError::Forbidden { action: action.name().to_owned(), resource: resource.to_owned() })
    }
}

/// The principal's role in `tenant`, `None` when it is not in the tenant.
pub async fn role_in(tx: &mut Tx, principal: &Principal, tenant: Uuid) -> Result<Option<Role>, ApiError> {
    Ok(policies::load(tx, principal, tenant).await?.role)
}

/// The decision itself, given what is loaded of the principal in the tenant (not in it → 404):
/// its policies must allow the action on the resource (403 naming both otherwise). Platform
/// actions are never decided here. Every caller — handlers through [`authorize`], the gateway
/// with its cached principals — ends up in this function.
pub fn decide(loaded: &policies::Loaded, action: Action, resource: &str) -> Result<Role, ApiError> {
    decide_with(loaded, action, resource, None)
}

/// [`decide`] with the action's own condition keys (e.g. `functions:Runtime`) in `context`.
pub fn decide_with(
    loaded: &policies::Loaded,
    action: Action,
    resource: &str,
    context: Option<&nimbus_iam::Context>,
) -> Result<Role, ApiError> {
    let forbidden = || {
        metrics::counter!("nimbus_authz_denied_total", "action" => action.name()).increment(1);
        ApiError::Forbidden { action: action.name().to_owned(), resource: resource.to_owned() }
    };
    if action.is_platform() {
        return Err(forbidden());
    }
    let role = loaded.role.ok_or(ApiError::NotFound("tenant"))?;
    if loaded.evaluate_with(action.name(), resource, context).is_allowed() {
        activity::record(loaded.tenant_id, loaded.who.0, loaded.who.1, action.name(), resource);
        Ok(role)
    } else {
        Err(forbidden())
    }
}

/// [`decide`] on a resource that carries its own policy (a function's) and condition keys
/// (its tags as `nimbus:ResourceTag/*`), in `resource_tenant`:
/// the principal's tenant (its identity policies or the resource policy may allow) or, for an
/// API key, another tenant (both must allow). A cross-tenant caller the resource policy does not
/// name gets 404 like any stranger, so that the resource's existence is not confirmed.
pub fn decide_on(
    loaded: &policies::Loaded,
    action: Action,
    resource: &str,
    resource_tenant: Uuid,
    policy: Option<&nimbus_iam::CompiledPolicy>,
    resource_context: Option<&nimbus_iam::Context>,
) -> Result<(), ApiError> {
    let cross = loaded.tenant != resource_tenant.to_string();
    if !cross {
        loaded.role.ok_or(ApiError::NotFound("tenant"))?;
    }
    let d = loaded.evaluate_on(action.name(), resource, &resource_tenant.to_string(), policy, resource_context);
    if d.is_allowed() {
        activity::record(loaded.tenant_id, loaded.who.0, loaded.who.1, action.name(), resource);
        return Ok(());
    }
    metrics::counter!("nimbus_authz_denied_total", "action" => action.name()).increment(1);
    if cross && d.reason == nimbus_iam::Reason::CrossTenantNeedsResourcePolicy {
        return Err(ApiError::NotFound("tenant"));
    }
    Err(ApiError::Forbidden { action: action.name().to_owned(), resource: resource.to_owned() })
}

/// Runs the rest of the request with its facts (the client address) where [`decide`] finds
/// them for conditions (`nimbus:SourceIp`).
pub async fn request_facts(
    axum::extract::State(state): axum::extract::State<crate::startup::AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::extract::FromRequestParts;
    let (mut parts, body) = req.into_parts();
    let source_ip = match crate::auth::RequestContext::from_request_parts(&mut parts, &state).await {
        Ok(c) => c.source_ip,
        Err(_) => None,
    };
    let req = axum::extract::Request::from_parts(parts, body);
    policies::REQUEST.scope(policies::RequestFacts { source_ip }, next.run(req)).await
}

/// Opens a transaction scoped to `tenant` (and the principal's user) and authorizes `action`
/// in it: the way every tenant handler starts.
pub async fn begin(
    pool: &db::Db,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: &str,
) -> Result<(Tx, Role), ApiError> {
    begin_in(pool, Scope::tenant(tenant, principal.user_id()), principal, action, tenant, resource).await
}

/// [`begin`] with the action's own condition keys (what the request asks for, e.g. a function's
/// `functions:Runtime` and `functions:MemorySize`).
pub async fn begin_with(
    pool: &db::Db,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: &str,
    context: &nimbus_iam::Context,
) -> Result<(Tx, Role), ApiError> {
    let mut tx = db::begin(pool, &Scope::tenant(tenant, principal.user_id())).await?;
    let role = authorize_with(&mut tx, principal, action, tenant, resource, Some(context)).await?;
    Ok((tx, role))
}

/// [`begin`] with extra scope settings (for example an e-mail the handler will look up).
pub async fn begin_in(
    pool: &db::Db,
    scope: Scope,
    principal: &Principal,
    action: Action,
    tenant: Uuid,
    resource: &str,
) -> Result<(Tx, Role), ApiError> {
    let mut tx = db::begin(pool, &Scope { tenant: Some(tenant), user: principal.user_id(), ..scope }).await?;
    let role = authorize(&mut tx, principal, action, tenant, resource).await?;
    Ok((tx, role))
}

/// Decides whether `principal` may perform the platform action `action` on `resource`: only a
/// signed-in platform admin may (API keys are tenant-bound and never can). Opens and returns a
/// transaction with the platform scope, which widens exactly the policies naming
/// `nimbus_platform()`; a denial is 403 naming the action and the resource.
#[tracing::instrument(skip(pool, principal), fields(action = action.name()))]
pub async fn begin_platform(
    pool: &db::Db,
    principal: &Principal,
    action: Action,
    resource: &str,
) -> Result<Tx, ApiError> {
    let denied = || {
        metrics::counter!("nimbus_authz_denied_total", "action" => action.name()).increment(1);
        ApiError::Forbidden { action: action.name().to_owned(), resource: resource.to_owned() }
    };
    let Principal::User { user_id, .. } = principal else { return Err(denied()) };
    if !action.is_platform() {
        return Err(denied());
    }
    let mut tx = db::begin(pool, &Scope::user(*user_id)).await?;
    let admin: Option<bool> = sqlx::query_scalar("SELECT is_platform_admin FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    if admin != Some(true) {
        return Err(denied());
    }
    db::set_scope(&mut tx, &Scope::platform(Some(*user_id))).await?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_names_follow_the_convention_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for a in Action::ALL {
            let (service, verb_noun) = a.name().split_once(':').expect("service:Action");
            assert!(service.chars().all(|c| c.is_ascii_lowercase()), "{}", a.name());
            assert!(verb_noun.starts_with(|c: char| c.is_ascii_uppercase()), "{}", a.name());
            assert!(seen.insert(a.name()), "duplicate {}", a.name());
        }
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::None < Role::Viewer && Role::Viewer < Role::Developer && Role::Developer < Role::Admin);
        for r in [Role::None, Role::Viewer, Role::Developer, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()).unwrap(), r);
        }
    }

    #[test]
    fn every_action_is_in_the_catalogue_and_platform_actions_are_the_fleets_and_guardrails() {
        for a in Action::ALL {
            let spec = nimbus_iam::lookup(a.name()).unwrap_or_else(|| panic!("{} is not catalogued", a.name()));
            assert_eq!(spec.name, a.name());
            assert_eq!(
                a.is_platform(),
                a.name().starts_with("nodes:") || a.name().ends_with("Guardrails"),
                "{}",
                a.name()
            );
        }
    }

    #[test]
    fn roles_stand_for_managed_policies_that_exist() {
        for r in [Role::None, Role::Viewer, Role::Developer, Role::Admin] {
            for m in r.managed() {
                assert!(policies::managed(m).is_some(), "{m}");
            }
        }
        assert!(Role::None.managed().is_empty());
    }
}
