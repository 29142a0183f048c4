//! The managed policies against the whole catalogue: each allows exactly its intended actions,
//! so adding an action to the catalogue forces a decision about every one of them.

use std::collections::BTreeSet;

use nimbus_iam::{
    ACTIONS, AccessLevel, CompiledPolicy, Context, Effect, PolicyKind, PolicySet, Principal, Reason, Request, evaluate,
    managed::{MANAGED, managed},
    nrn, validate,
};

use super::{doc, now};

const T1: &str = "t1";

/// Read and List actions the Viewer deliberately does not get (see `managed`'s documentation).
const VIEWER_EXCLUDED: &[&str] = &[
    "functions:GetFunctionLogs",
    "audit:ListAuditEvents",
    "iam:GetAccessReport",
    "iam:GeneratePolicy",
    "billing:GetUsage",
    "billing:ListInvoices",
    "billing:GetInvoice",
    "billing:GetBillingSettings",
];

fn intended(name: &str) -> BTreeSet<&'static str> {
    let explicit: &[&str] = match name {
        "TenantAdmin" => return ACTIONS.iter().filter(|a| !a.platform).map(|a| a.name).collect(),
        "Developer" => &[
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
            "functions:GetFunctionPolicy",
            "iam:CreateApiKey",
            "iam:ListApiKeys",
            "iam:RevokeApiKey",
            "tenants:GetTenant",
        ],
        "Deployer" => &[
            "functions:ListFunctions",
            "functions:GetFunction",
            "functions:ListPackages",
            "functions:CreateVersion",
            "functions:ListVersions",
            "functions:CreateAlias",
            "functions:ListAliases",
            "functions:UpdateAlias",
        ],
        "Viewer" => &[
            "tenants:GetTenant",
            "tenants:ListMembers",
            "iam:ListApiKeys",
            "iam:GetPolicy",
            "iam:ListPolicies",
            "iam:ListPolicyVersions",
            "iam:GetPolicyVersion",
            "iam:ValidatePolicy",
            "iam:ListAttachedPolicies",
            "iam:GetGroup",
            "iam:ListGroups",
            "iam:GetRole",
            "iam:ListRoles",
            "iam:SimulatePolicy",
            "functions:ListFunctions",
            "functions:GetFunction",
            "functions:ListPackages",
            "functions:ListVersions",
            "functions:ListAliases",
            "functions:GetFunctionPolicy",
        ],
        "BillingAdmin" => &[
            "billing:GetUsage",
            "billing:ListInvoices",
            "billing:GetInvoice",
            "billing:GetBillingSettings",
            "billing:UpdateBillingSettings",
            "tenants:GetTenant",
        ],
        "Invoker" => &["functions:InvokeFunction"],
        other => panic!("no intended actions for {other}"),
    };
    explicit.iter().copied().collect()
}

/// A resource of the action's usual type: in `tenant`, or outside tenants for platform actions.
fn resource_for(action: &nimbus_iam::ActionSpec, tenant: &str) -> (String, Option<String>) {
    let ty = action.resource_types[0];
    let tenant = if action.platform { "" } else { tenant };
    // A function's versions, aliases, packages and logs are named under the function.
    let nrn = match ty {
        "version" => nrn::version(tenant, "f", 1),
        "alias" => nrn::alias(tenant, "f", "live"),
        "package" => nrn::package(tenant, "f", "p1"),
        "logs" => nrn::logs(tenant, "f"),
        _ => format!("nrn:nimbus:{}:{tenant}:{ty}/x", action.service()),
    };
    (nrn, Some(tenant.to_owned()).filter(|t| !t.is_empty()))
}

#[test]
fn managed_policies_validate_without_errors_or_findings() {
    assert_eq!(MANAGED.len(), 6);
    for m in MANAGED {
        let report = validate(m.document, PolicyKind::Identity);
        assert!(report.errors.is_empty(), "{}: {:?}", m.name, report.errors);
        assert!(report.findings.is_empty(), "{}: {:?}", m.name, report.findings);
        assert_eq!(managed(m.name).map(|x| x.name), Some(m.name));
        let doc: serde_json::Value = serde_json::from_str(m.document).unwrap();
        for statement in doc["Statement"].as_array().unwrap() {
            for action in statement["Action"].as_array().unwrap() {
                assert!(!action.as_str().unwrap().contains(['*', '?']), "{}: {action} is a wildcard", m.name);
            }
        }
    }
    assert!(managed("Root").is_none());
}

#[test]
fn managed_policies_allow_exactly_their_intended_actions() {
    let alice = Principal::user(T1, "alice");
    let ctx = Context::new(now());
    for m in MANAGED {
        let policy = m.compile();
        let want = intended(m.name);
        for name in &want {
            assert!(nimbus_iam::lookup(name).is_some(), "{}: {name} is not catalogued", m.name);
        }
        let set = PolicySet { identity: vec![&policy], ..Default::default() };
        let mut got = BTreeSet::new();
        for action in ACTIONS {
            let (resource, tenant) = resource_for(action, T1);
            let req = Request {
                principal: &alice,
                action: action.name,
                resource: &resource,
                resource_tenant: tenant.as_deref(),
                context: &ctx,
            };
            if evaluate(&req, &set).is_allowed() {
                got.insert(action.name);
            }
        }
        let extra: Vec<_> = got.difference(&want).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(extra.is_empty() && missing.is_empty(), "{}: allows {extra:?} too, not {missing:?}", m.name);
    }
}

#[test]
fn viewer_exclusions_are_deliberate() {
    // A new Read or List action must either join the Viewer or be excluded here on purpose.
    let viewer = intended("Viewer");
    for a in ACTIONS.iter().filter(|a| !a.platform) {
        let read = matches!(a.access, AccessLevel::Read | AccessLevel::List);
        assert_eq!(read, viewer.contains(a.name) || VIEWER_EXCLUDED.contains(&a.name), "{}", a.name);
    }
}

#[test]
fn managed_policies_stay_in_their_tenant() {
    let admin = managed("TenantAdmin").unwrap().compile();
    let open = CompiledPolicy::compile(
        &doc(r#"{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}"#),
        PolicyKind::Resource,
        "open",
        1,
    )
    .unwrap();
    let alice = Principal::user(T1, "alice");
    let ctx = Context::new(now());
    let req = Request {
        principal: &alice,
        action: "functions:InvokeFunction",
        resource: "nrn:nimbus:functions:t2:function/hello",
        resource_tenant: Some("t2"),
        context: &ctx,
    };
    let d = evaluate(&req, &PolicySet { identity: vec![&admin], resource: Some(&open), ..Default::default() });
    assert_eq!((d.effect, d.reason), (Effect::ImplicitDeny, Reason::CrossTenantNeedsIdentityPolicy));
    assert_eq!(admin.id(), "nrn:nimbus:iam::policy/TenantAdmin");
}
