//! The managed policies Nimbus ships: minimal identity policies for the common roles, as JSON
//! documents that the validator accepts without a single finding.
//!
//! Every one lists its actions explicitly (no service wildcards), so an action added to the
//! catalogue is granted by none of them until someone decides it should be, and every one is
//! scoped to the principal's own tenant with `${nimbus:TenantId}`. The choices:
//!
//! - **TenantAdmin**: every action in the tenant; no platform action (nodes, guardrails).
//! - **Developer**: functions — configuration, code, versions, aliases, invoking, logs, and
//!   reading the function policy (changing it is permissions management, and tagging can steer
//!   attribute-based grants, so both stay with admins); API keys (a key never carries more than
//!   its creator, which the API enforces when it creates one); reading the tenant. No IAM policy
//!   management and nothing about members, not even listing them.
//! - **Deployer**: ships what developers uploaded: publishes versions and moves aliases
//!   (`CreateVersion`, `CreateAlias`, `UpdateAlias`) with the reads that needs. It does not
//!   upload code (`UpdateFunctionCode` is the Developer's), delete anything or invoke. Rollout
//!   actions do not exist yet; when they do, they belong here.
//! - **Viewer**: every Read and List action on the tenant's configuration, except what reveals
//!   data or activity rather than configuration — function logs (they carry request data and
//!   whatever functions print), the audit log, access reports and generated policies (both built
//!   from activity) — and billing, which is the BillingAdmin's.
//! - **BillingAdmin**: all billing actions and reading the tenant.
//! - **Invoker**: `functions:InvokeFunction` only.

use crate::policy::{CompiledPolicy, PolicyKind};

/// A managed policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManagedPolicy {
    /// Its name, e.g. `Developer`.
    pub name: &'static str,
    /// What it is for, for the console.
    pub description: &'static str,
    /// The identity policy document.
    pub document: &'static str,
}

impl ManagedPolicy {
    /// Its NRN, outside any tenant: `nrn:nimbus:iam::policy/<name>`.
    pub fn nrn(&self) -> String {
        format!("nrn:nimbus:iam::policy/{}", self.name)
    }

    /// The compiled document, reported by its NRN at version 1.
    pub fn compile(&self) -> CompiledPolicy {
        CompiledPolicy::compile(self.document, PolicyKind::Identity, self.nrn(), 1)
            .expect("managed policies compile (tested)")
    }
}

/// Every managed policy.
pub static MANAGED: &[ManagedPolicy] = &[
    ManagedPolicy {
        name: "TenantAdmin",
        description: "Everything in the tenant, except platform operations.",
        document: TENANT_ADMIN,
    },
    ManagedPolicy {
        name: "Developer",
        description: "Builds functions: configuration, code, versions, aliases, invoking, logs; own API keys.",
        document: DEVELOPER,
    },
    ManagedPolicy {
        name: "Deployer",
        description: "Publishes versions and moves aliases; does not upload code.",
        document: DEPLOYER,
    },
    ManagedPolicy {
        name: "Viewer",
        description: "Reads the tenant's configuration; no logs, audit events or billing.",
        document: VIEWER,
    },
    ManagedPolicy {
        name: "BillingAdmin",
        description: "Usage, invoices and billing settings.",
        document: BILLING_ADMIN,
    },
    ManagedPolicy { name: "Invoker", description: "Invokes functions, nothing else.", document: INVOKER },
];

/// A managed policy by name (case-sensitive).
pub fn managed(name: &str) -> Option<&'static ManagedPolicy> {
    MANAGED.iter().find(|m| m.name == name)
}

const TENANT_ADMIN: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "TenantAdmin",
      "Effect": "Allow",
      "Action": [
        "tenants:GetTenant", "tenants:UpdateTenant", "tenants:ListMembers", "tenants:AddMember",
        "tenants:UpdateMember", "tenants:RemoveMember",
        "iam:CreateApiKey", "iam:ListApiKeys", "iam:RevokeApiKey", "iam:CreatePolicy",
        "iam:GetPolicy", "iam:ListPolicies", "iam:DeletePolicy", "iam:CreatePolicyVersion",
        "iam:ListPolicyVersions", "iam:GetPolicyVersion", "iam:SetDefaultPolicyVersion",
        "iam:DeletePolicyVersion", "iam:ValidatePolicy", "iam:AttachUserPolicy",
        "iam:DetachUserPolicy", "iam:AttachGroupPolicy", "iam:DetachGroupPolicy",
        "iam:AttachRolePolicy", "iam:DetachRolePolicy", "iam:AttachApiKeyPolicy",
        "iam:DetachApiKeyPolicy", "iam:ListAttachedPolicies", "iam:PutPermissionsBoundary",
        "iam:DeletePermissionsBoundary", "iam:CreateGroup", "iam:GetGroup", "iam:ListGroups",
        "iam:DeleteGroup", "iam:AddUserToGroup", "iam:RemoveUserFromGroup", "iam:CreateRole",
        "iam:GetRole", "iam:ListRoles", "iam:DeleteRole", "iam:PassRole", "iam:TagPrincipal",
        "iam:UntagPrincipal", "iam:SimulatePolicy", "iam:GetAccessReport", "iam:GeneratePolicy",
        "audit:ListAuditEvents",
        "functions:CreateFunction", "functions:ListFunctions", "functions:GetFunction",
        "functions:UpdateFunction", "functions:DeleteFunction", "functions:UpdateFunctionCode",
        "functions:ListPackages", "functions:CreateVersion", "functions:ListVersions",
        "functions:DeleteVersion", "functions:CreateAlias", "functions:ListAliases",
        "functions:UpdateAlias", "functions:DeleteAlias", "functions:GetFunctionLogs",
        "functions:InvokeFunction", "functions:GetFunctionPolicy", "functions:PutFunctionPolicy",
        "functions:DeleteFunctionPolicy", "functions:TagResource", "functions:UntagResource",
        "billing:GetUsage", "billing:ListInvoices", "billing:GetInvoice",
        "billing:GetBillingSettings", "billing:UpdateBillingSettings"
      ],
      "Resource": "nrn:nimbus:*:${nimbus:TenantId}:*"
    }
  ]
}"#;

const DEVELOPER: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "Functions",
      "Effect": "Allow",
      "Action": [
        "functions:CreateFunction", "functions:ListFunctions", "functions:GetFunction",
        "functions:UpdateFunction", "functions:DeleteFunction", "functions:UpdateFunctionCode",
        "functions:ListPackages", "functions:CreateVersion", "functions:ListVersions",
        "functions:DeleteVersion", "functions:CreateAlias", "functions:ListAliases",
        "functions:UpdateAlias", "functions:DeleteAlias", "functions:GetFunctionLogs",
        "functions:InvokeFunction", "functions:GetFunctionPolicy"
      ],
      "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/*"
    },
    {
      "Sid": "ApiKeys",
      "Effect": "Allow",
      "Action": [
        "iam:CreateApiKey", "iam:ListApiKeys", "iam:RevokeApiKey"
      ],
      "Resource": "nrn:nimbus:iam:${nimbus:TenantId}:api-key/*"
    },
    {
      "Sid": "Tenant",
      "Effect": "Allow",
      "Action": [
        "tenants:GetTenant"
      ],
      "Resource": "nrn:nimbus:tenants:${nimbus:TenantId}:tenant/*"
    }
  ]
}"#;

const DEPLOYER: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "Deploy",
      "Effect": "Allow",
      "Action": [
        "functions:ListFunctions", "functions:GetFunction", "functions:ListPackages",
        "functions:CreateVersion", "functions:ListVersions", "functions:CreateAlias",
        "functions:ListAliases", "functions:UpdateAlias"
      ],
      "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/*"
    }
  ]
}"#;

const VIEWER: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "ReadConfiguration",
      "Effect": "Allow",
      "Action": [
        "tenants:GetTenant", "tenants:ListMembers",
        "iam:ListApiKeys", "iam:GetPolicy", "iam:ListPolicies", "iam:ListPolicyVersions",
        "iam:GetPolicyVersion", "iam:ValidatePolicy", "iam:ListAttachedPolicies", "iam:GetGroup",
        "iam:ListGroups", "iam:GetRole", "iam:ListRoles", "iam:SimulatePolicy",
        "functions:ListFunctions", "functions:GetFunction", "functions:ListPackages",
        "functions:ListVersions", "functions:ListAliases", "functions:GetFunctionPolicy"
      ],
      "Resource": "nrn:nimbus:*:${nimbus:TenantId}:*"
    }
  ]
}"#;

const BILLING_ADMIN: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "Billing",
      "Effect": "Allow",
      "Action": [
        "billing:GetUsage", "billing:ListInvoices", "billing:GetInvoice",
        "billing:GetBillingSettings", "billing:UpdateBillingSettings"
      ],
      "Resource": "nrn:nimbus:billing:${nimbus:TenantId}:*"
    },
    {
      "Sid": "Tenant",
      "Effect": "Allow",
      "Action": [
        "tenants:GetTenant"
      ],
      "Resource": "nrn:nimbus:tenants:${nimbus:TenantId}:tenant/*"
    }
  ]
}"#;

const INVOKER: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Sid": "Invoke",
      "Effect": "Allow",
      "Action": [
        "functions:InvokeFunction"
      ],
      "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/*"
    }
  ]
}"#;
