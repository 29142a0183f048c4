//! The one catalogue of every API action and condition key: what policies may name, what the
//! validator checks them against, and what the managed policies and simulator enumerate.

/// What an action does, as in the AWS service authorization reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccessLevel {
    /// Reads one resource.
    Read,
    /// Lists resources.
    List,
    /// Creates, changes or deletes resources, or acts on them (invoking a function).
    Write,
    /// Changes who may do what: policies, boundaries, memberships, resource policies.
    Permissions,
    /// Changes tags, which attribute-based policies read.
    Tagging,
}

/// One API action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionSpec {
    /// `<service>:<Verb><Noun>`.
    pub name: &'static str,
    /// What it does.
    pub access: AccessLevel,
    /// The resource types (`<type>` of the NRN) it acts on; the first is the usual one.
    pub resource_types: &'static [&'static str],
    /// Condition keys the action supplies besides the global ones.
    pub condition_keys: &'static [&'static str],
    /// Only platform admins may perform it, outside any tenant.
    pub platform: bool,
}

impl ActionSpec {
    /// The service part of the name.
    pub fn service(&self) -> &'static str {
        self.name.split_once(':').map_or(self.name, |(s, _)| s)
    }
}

/// The type of a condition key's values, which decides the operators that fit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// Text (also NRNs).
    String,
    /// A number.
    Numeric,
    /// A point in time.
    Date,
    /// `true` or `false`.
    Bool,
    /// An IP address.
    Ip,
}

/// A condition key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConditionKeySpec {
    /// The name; a name ending in `/` is a family (`nimbus:PrincipalTag/<tag key>`).
    pub name: &'static str,
    /// The type of its values.
    pub ty: KeyType,
    /// Whether a request may carry several values (use `ForAnyValue:`/`ForAllValues:`).
    pub multivalued: bool,
}

const fn key(name: &'static str, ty: KeyType) -> ConditionKeySpec {
    ConditionKeySpec { name, ty, multivalued: false }
}

/// Keys every request may carry. Keys the request does not know are absent, not empty.
pub static GLOBAL_CONDITION_KEYS: &[ConditionKeySpec] = &[
    key("nimbus:SourceIp", KeyType::Ip),
    key("nimbus:CurrentTime", KeyType::Date),
    key("nimbus:EpochTime", KeyType::Date),
    key("nimbus:PrincipalTag/", KeyType::String),
    key("nimbus:ResourceTag/", KeyType::String),
    key("nimbus:RequestTag/", KeyType::String),
    ConditionKeySpec { name: "nimbus:TagKeys", ty: KeyType::String, multivalued: true },
    key("nimbus:MultiFactorAuthPresent", KeyType::Bool),
    key("nimbus:username", KeyType::String),
    key("nimbus:userid", KeyType::String),
    key("nimbus:PrincipalType", KeyType::String),
    key("nimbus:PrincipalNrn", KeyType::String),
    key("nimbus:TenantId", KeyType::String),
    key("nimbus:SecureTransport", KeyType::Bool),
];

/// Keys that only some actions supply (listed in their [`ActionSpec::condition_keys`]).
pub static SERVICE_CONDITION_KEYS: &[ConditionKeySpec] = &[
    key("functions:Runtime", KeyType::String),
    key("functions:MemorySize", KeyType::Numeric),
    key("iam:PolicyNrn", KeyType::String),
];

/// Looks up a condition key case-insensitively, tag families included.
pub fn condition_key(name: &str) -> Option<&'static ConditionKeySpec> {
    GLOBAL_CONDITION_KEYS.iter().chain(SERVICE_CONDITION_KEYS).find(|k| {
        if k.name.ends_with('/') {
            name.len() > k.name.len() && name.is_char_boundary(k.name.len()) && {
                let (family, tag) = name.split_at(k.name.len());
                family.eq_ignore_ascii_case(k.name) && !tag.is_empty()
            }
        } else {
            name.eq_ignore_ascii_case(k.name)
        }
    })
}

/// Looks up an action by name, case-insensitively as policies match them.
pub fn lookup(name: &str) -> Option<&'static ActionSpec> {
    ACTIONS.iter().find(|a| a.name.eq_ignore_ascii_case(name))
}

use AccessLevel::{List, Permissions as Perm, Read, Tagging, Write};

const fn tenant(name: &'static str, access: AccessLevel, types: &'static [&'static str]) -> ActionSpec {
    ActionSpec { name, access, resource_types: types, condition_keys: &[], platform: false }
}

const fn platform(name: &'static str, access: AccessLevel, types: &'static [&'static str]) -> ActionSpec {
    ActionSpec { name, access, resource_types: types, condition_keys: &[], platform: true }
}

const fn keyed(
    name: &'static str,
    access: AccessLevel,
    types: &'static [&'static str],
    keys: &'static [&'static str],
) -> ActionSpec {
    ActionSpec { name, access, resource_types: types, condition_keys: keys, platform: false }
}

const FN: &[&str] = &["function"];
const FN_CONFIG: &[&str] = &["functions:Runtime", "functions:MemorySize"];
const POLICY_NRN: &[&str] = &["iam:PolicyNrn"];
const PRINCIPALS: &[&str] = &["user", "role", "api-key"];

/// Every action, grouped by service.
pub static ACTIONS: &[ActionSpec] = &[
    tenant("tenants:GetTenant", Read, &["tenant"]),
    tenant("tenants:UpdateTenant", Write, &["tenant"]),
    tenant("tenants:ListMembers", List, &["member"]),
    tenant("tenants:AddMember", Perm, &["member"]),
    tenant("tenants:UpdateMember", Perm, &["member"]),
    tenant("tenants:RemoveMember", Perm, &["member"]),
    platform("tenants:GetGuardrails", Read, &["tenant"]),
    platform("tenants:PutGuardrails", Perm, &["tenant"]),
    tenant("iam:CreateApiKey", Write, &["api-key"]),
    tenant("iam:ListApiKeys", List, &["api-key"]),
    tenant("iam:RevokeApiKey", Write, &["api-key"]),
    tenant("iam:CreatePolicy", Perm, &["policy"]),
    tenant("iam:GetPolicy", Read, &["policy"]),
    tenant("iam:ListPolicies", List, &["policy"]),
    tenant("iam:DeletePolicy", Perm, &["policy"]),
    tenant("iam:CreatePolicyVersion", Perm, &["policy"]),
    tenant("iam:ListPolicyVersions", List, &["policy"]),
    tenant("iam:GetPolicyVersion", Read, &["policy"]),
    tenant("iam:SetDefaultPolicyVersion", Perm, &["policy"]),
    tenant("iam:DeletePolicyVersion", Perm, &["policy"]),
    tenant("iam:ValidatePolicy", Read, &["policy"]),
    keyed("iam:AttachUserPolicy", Perm, &["user"], POLICY_NRN),
    keyed("iam:DetachUserPolicy", Perm, &["user"], POLICY_NRN),
    keyed("iam:AttachGroupPolicy", Perm, &["group"], POLICY_NRN),
    keyed("iam:DetachGroupPolicy", Perm, &["group"], POLICY_NRN),
    keyed("iam:AttachRolePolicy", Perm, &["role"], POLICY_NRN),
    keyed("iam:DetachRolePolicy", Perm, &["role"], POLICY_NRN),
    keyed("iam:AttachApiKeyPolicy", Perm, &["api-key"], POLICY_NRN),
    keyed("iam:DetachApiKeyPolicy", Perm, &["api-key"], POLICY_NRN),
    tenant("iam:ListAttachedPolicies", List, &["user", "group", "role", "api-key"]),
    keyed("iam:PutPermissionsBoundary", Perm, PRINCIPALS, POLICY_NRN),
    keyed("iam:DeletePermissionsBoundary", Perm, PRINCIPALS, POLICY_NRN),
    tenant("iam:CreateGroup", Write, &["group"]),
    tenant("iam:GetGroup", Read, &["group"]),
    tenant("iam:ListGroups", List, &["group"]),
    tenant("iam:DeleteGroup", Write, &["group"]),
    tenant("iam:AddUserToGroup", Perm, &["group"]),
    tenant("iam:RemoveUserFromGroup", Perm, &["group"]),
    tenant("iam:CreateRole", Write, &["role"]),
    tenant("iam:GetRole", Read, &["role"]),
    tenant("iam:ListRoles", List, &["role"]),
    tenant("iam:DeleteRole", Write, &["role"]),
    tenant("iam:PassRole", Write, &["role"]),
    tenant("iam:TagPrincipal", Tagging, PRINCIPALS),
    tenant("iam:UntagPrincipal", Tagging, PRINCIPALS),
    tenant("iam:SimulatePolicy", Read, PRINCIPALS),
    tenant("iam:GetAccessReport", Read, PRINCIPALS),
    tenant("iam:GeneratePolicy", Read, PRINCIPALS),
    tenant("audit:ListAuditEvents", List, &["audit-log"]),
    keyed("functions:CreateFunction", Write, FN, FN_CONFIG),
    tenant("functions:ListFunctions", List, FN),
    tenant("functions:GetFunction", Read, FN),
    keyed("functions:UpdateFunction", Write, FN, FN_CONFIG),
    tenant("functions:DeleteFunction", Write, FN),
    tenant("functions:UpdateFunctionCode", Write, FN),
    tenant("functions:ListPackages", List, &["package"]),
    tenant("functions:CreateVersion", Write, &["version"]),
    tenant("functions:ListVersions", List, &["version"]),
    tenant("functions:DeleteVersion", Write, &["version"]),
    tenant("functions:CreateAlias", Write, &["alias"]),
    tenant("functions:ListAliases", List, &["alias"]),
    tenant("functions:UpdateAlias", Write, &["alias"]),
    tenant("functions:DeleteAlias", Write, &["alias"]),
    tenant("functions:GetFunctionLogs", Read, &["logs"]),
    tenant("functions:InvokeFunction", Write, FN),
    tenant("functions:GetFunctionPolicy", Read, FN),
    tenant("functions:PutFunctionPolicy", Perm, FN),
    tenant("functions:DeleteFunctionPolicy", Perm, FN),
    tenant("functions:TagResource", Tagging, FN),
    tenant("functions:UntagResource", Tagging, FN),
    tenant("billing:GetUsage", Read, &["usage"]),
    tenant("billing:ListInvoices", List, &["invoice"]),
    tenant("billing:GetInvoice", Read, &["invoice"]),
    tenant("billing:GetBillingSettings", Read, &["billing-settings"]),
    tenant("billing:UpdateBillingSettings", Write, &["billing-settings"]),
    platform("nodes:CreateJoinToken", Write, &["join-token"]),
    platform("nodes:ListJoinTokens", List, &["join-token"]),
    platform("nodes:RevokeJoinToken", Write, &["join-token"]),
    platform("nodes:ListNodes", List, &["node"]),
    platform("nodes:DrainNode", Write, &["node"]),
    platform("nodes:RemoveNode", Write, &["node"]),
    platform("nodes:PutAssignments", Write, &["node"]),
    platform("nodes:UpdateNode", Write, &["node"]),
    platform("nodes:ListPools", List, &["pool"]),
    platform("nodes:DedicatePool", Write, &["pool"]),
    platform("nodes:UndedicatePool", Write, &["pool"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for a in ACTIONS {
            let (service, verb_noun) = a.name.split_once(':').expect("service:Action");
            assert!(!service.is_empty() && service.chars().all(|c| c.is_ascii_lowercase()), "{}", a.name);
            assert!(verb_noun.starts_with(|c: char| c.is_ascii_uppercase()), "{}", a.name);
            assert!(verb_noun.chars().all(|c| c.is_ascii_alphanumeric()), "{}", a.name);
            assert!(seen.insert(a.name.to_ascii_lowercase()), "duplicate {}", a.name);
            assert!(!a.resource_types.is_empty(), "{} names no resource type", a.name);
            for k in a.condition_keys {
                assert!(SERVICE_CONDITION_KEYS.iter().any(|s| s.name == *k), "{}: unknown key {k}", a.name);
            }
        }
    }

    #[test]
    fn the_existing_api_actions_are_all_here() {
        // The names `nimbus_api::authz::Action::name` returns today.
        let existing = [
            "tenants:GetTenant",
            "tenants:UpdateTenant",
            "tenants:ListMembers",
            "tenants:AddMember",
            "tenants:UpdateMember",
            "tenants:RemoveMember",
            "iam:CreateApiKey",
            "iam:ListApiKeys",
            "iam:RevokeApiKey",
            "audit:ListAuditEvents",
            "functions:CreateFunction",
            "functions:ListFunctions",
            "functions:GetFunction",
            "functions:UpdateFunction",
            "functions:DeleteFunction",
            "functions:UpdateFunctionCode",
            "functions:ListPackages",
            "functions:CreateVersion",
            "functions:ListVersions",
            "functions:DeleteVersion",
            "functions:CreateAlias",
            "functions:ListAliases",
            "functions:UpdateAlias",
            "functions:DeleteAlias",
            "functions:GetFunctionLogs",
            "functions:InvokeFunction",
            "nodes:CreateJoinToken",
            "nodes:ListJoinTokens",
            "nodes:RevokeJoinToken",
            "nodes:ListNodes",
            "nodes:DrainNode",
            "nodes:RemoveNode",
            "nodes:PutAssignments",
            "nodes:UpdateNode",
            "nodes:ListPools",
            "nodes:DedicatePool",
            "nodes:UndedicatePool",
        ];
        for name in existing {
            let spec = lookup(name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(spec.name, name);
            assert_eq!(spec.platform, name.starts_with("nodes:"), "{name}");
        }
        assert_eq!(lookup("FUNCTIONS:invokefunction").map(|a| a.name), Some("functions:InvokeFunction"));
        assert!(lookup("functions:Nope").is_none());
    }

    #[test]
    fn condition_keys_resolve_case_insensitively_with_tag_families() {
        assert_eq!(condition_key("nimbus:sourceip").map(|k| k.ty), Some(KeyType::Ip));
        assert_eq!(condition_key("nimbus:PrincipalTag/team").map(|k| k.name), Some("nimbus:PrincipalTag/"));
        assert!(condition_key("nimbus:PrincipalTag/").is_none());
        assert!(condition_key("nimbus:Whatever").is_none());
        assert!(condition_key("functions:memorysize").is_some());
        assert!(condition_key("nimbus:TagKeys").unwrap().multivalued);
    }
}
