//! The one authorization function every handler calls, and the catalogue of actions it knows.
//!
//! Until the IAM policy engine lands, a principal's permissions in a tenant come from its role
//! (`viewer` < `developer` < `admin`); each action names the least role that may perform it.
//! The IAM work replaces the role check inside [`authorize`] with policy evaluation, leaving
//! every caller as it is.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::Principal,
    db::{self, Scope, Tx},
    error::ApiError,
};

/// A role in a tenant, ordered by what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything in the tenant.
    Viewer,
    /// Also deploys and manages API keys up to its own role.
    Developer,
    /// Also manages members and the tenant itself.
    Admin,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> anyhow::Result<Role> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "developer" => Ok(Role::Developer),
            "admin" => Ok(Role::Admin),
            other => Err(anyhow::anyhow!("unknown role {other:?} in the database")),
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
        }
    }

    /// The least role allowed to perform the action.
    pub fn min_role(self) -> Role {
        match self {
            Action::GetTenant | Action::ListMembers | Action::ListApiKeys => Role::Viewer,
            Action::ListFunctions
            | Action::GetFunction
            | Action::ListPackages
            | Action::ListVersions
            | Action::ListAliases
            | Action::GetFunctionLogs => Role::Viewer,
            Action::CreateApiKey | Action::RevokeApiKey => Role::Developer,
            Action::CreateFunction
            | Action::UpdateFunction
            | Action::DeleteFunction
            | Action::UpdateFunctionCode
            | Action::CreateVersion
            | Action::DeleteVersion
            | Action::CreateAlias
            | Action::UpdateAlias
            | Action::DeleteAlias
            | Action::InvokeFunction => Role::Developer,
            Action::UpdateTenant
            | Action::AddMember
            | Action::UpdateMember
            | Action::RemoveMember
            | Action::ListAuditEvents => Role::Admin,
            // Platform actions are not a tenant role's to grant (see `is_platform`).
            Action::CreateJoinToken
            | Action::ListJoinTokens
            | Action::RevokeJoinToken
            | Action::ListNodes
            | Action::DrainNode
            | Action::RemoveNode
            | Action::PutAssignments
            | Action::UpdateNode
            | Action::ListPools
            | Action::DedicatePool
            | Action::UndedicatePool => Role::Admin,
        }
    }

    /// Whether the action acts on the platform (nodes, join tokens) rather than in a tenant:
    /// only platform admins may perform it, through [`authorize_platform`].
    pub fn is_platform(self) -> bool {
        self.name().starts_with("nodes:")
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
    /// A pool of nodes (the value of their `pool` label), or every pool with `*`.
    pub fn pool(pool: &str) -> String {
        format!("nrn:nimbus:nodes::pool/{pool}")
    }
}

/// Decides whether `principal` may perform `action` on `resource` in `tenant`, and returns the
/// principal's role there. A principal that is not in the tenant gets 404 (it cannot list the
/// tenant, so its existence is not confirmed); one that is in it but lacks the permission gets
/// 403 naming the action and the resource.
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
    let role = role_in(tx, principal, tenant).await?;
    decide(role, action, resource)
}

/// The principal's role in `tenant`, `None` when it is not in the tenant. An API key's role is
/// its own (no query); a user's comes from its membership.
pub async fn role_in(tx: &mut Tx, principal: &Principal, tenant: Uuid) -> Result<Option<Role>, ApiError> {
    if let Some(role) = own_role(principal, tenant) {
        return Ok(role);
    }
    match principal {
        Principal::User { user_id, .. } => {
            let role: Option<String> =
                sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
                    .bind(tenant)
                    .bind(user_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            role.map(|r| Role::parse(&r)).transpose().map_err(ApiError::Internal)
        }
        Principal::ApiKey { .. } => Ok(None),
    }
}

/// The role a principal carries itself, needing no lookup: an API key's (`Some(None)` when the
/// key belongs to another tenant). `None` for users, whose role is their membership's.
pub fn own_role(principal: &Principal, tenant: Uuid) -> Option<Option<Role>> {
    match principal {
        Principal::ApiKey { tenant_id, role, .. } => Some((*tenant_id == tenant).then_some(*role)),
        Principal::User { .. } => None,
    }
}

/// The decision itself, given the principal's role in the tenant (`None`: not in it → 404):
/// the role must reach the action's least role (403 naming the action and resource otherwise).
/// Platform actions are never decided here. Every caller — handlers through [`authorize`], the
/// gateway with its cached roles — ends up in this function.
pub fn decide(role: Option<Role>, action: Action, resource: &str) -> Result<Role, ApiError> {
    let forbidden = || ApiError::Forbidden { action: action.name().to_owned(), resource: resource.to_owned() };
    if action.is_platform() {
        return Err(forbidden());
    }
    let role = role.ok_or(ApiError::NotFound("tenant"))?;
    if role >= action.min_role() {
        Ok(role)
    } else {
        metrics::counter!("nimbus_authz_denied_total", "action" => action.name()).increment(1);
        Err(forbidden())
    }
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
        assert!(Role::Viewer < Role::Developer && Role::Developer < Role::Admin);
        for r in [Role::Viewer, Role::Developer, Role::Admin] {
            assert_eq!(Role::parse(r.as_str()).unwrap(), r);
        }
    }

    #[test]
    fn writes_need_more_than_viewer() {
        let check = |a: Action, least: Role| assert_eq!(a.min_role(), least, "{}", a.name());
        check(Action::GetTenant, Role::Viewer);
        check(Action::ListMembers, Role::Viewer);
        check(Action::CreateApiKey, Role::Developer);
        check(Action::RevokeApiKey, Role::Developer);
        check(Action::UpdateTenant, Role::Admin);
        check(Action::AddMember, Role::Admin);
        check(Action::RemoveMember, Role::Admin);
        check(Action::ListAuditEvents, Role::Admin);
    }
}
