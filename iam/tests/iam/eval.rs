//! Evaluation semantics as one table: every row is a request, the policies that apply, and the
//! expected effect and reason.

use nimbus_iam::{
    CompiledPolicy, Context, ContextValue, Effect, PolicyKind, PolicySet, Principal, Reason, Request, evaluate,
};

use super::{doc, now};

const T1: &str = "t1";
const HELLO: &str = "nrn:nimbus:functions:t1:function/hello";

/// Who makes the request.
#[derive(Debug, Clone, Copy)]
enum Who {
    /// User `alice` of t1.
    Alice,
    /// User `bob` of t2.
    Bob,
    /// API key `nk1` of t1.
    Key,
    /// Nobody signed in.
    Anon,
}

/// A context value.
#[derive(Debug, Clone, Copy)]
enum V {
    One(&'static str),
    Many(&'static [&'static str]),
}

#[derive(Debug, Clone, Copy)]
struct Case {
    /// Identity statements, each its own policy.
    id: &'static [&'static str],
    boundary: Option<&'static str>,
    guard: &'static [&'static str],
    /// The resource policy's statements.
    res: Option<&'static str>,
    who: Who,
    action: &'static str,
    resource: &'static str,
    rt: Option<&'static str>,
    ctx: &'static [(&'static str, V)],
    want: Effect,
    why: Reason,
}

const BASE: Case = Case {
    id: &[],
    boundary: None,
    guard: &[],
    res: None,
    who: Who::Alice,
    action: "functions:InvokeFunction",
    resource: HELLO,
    rt: Some(T1),
    ctx: &[],
    want: Effect::Allow,
    why: Reason::AllowedByIdentity,
};

const DENY: Effect = Effect::ExplicitDeny;
const NONE: Effect = Effect::ImplicitDeny;

const ALL: &str = r#"{"Effect": "Allow", "Action": "*", "Resource": "*"}"#;
const INVOKE: &str = r#"{"Effect": "Allow", "Action": "functions:InvokeFunction", "Resource": "*"}"#;

fn check(name: &str, c: &Case) -> Result<(), String> {
    let compile = |statements: &str, kind, id: &str| {
        CompiledPolicy::compile(&doc(statements), kind, id, 1).unwrap_or_else(|e| panic!("{name}: {id}: {e}"))
    };
    let identity: Vec<CompiledPolicy> =
        c.id.iter().enumerate().map(|(i, s)| compile(s, PolicyKind::Identity, &format!("id{i}"))).collect();
    let boundary = c.boundary.map(|s| compile(s, PolicyKind::Boundary, "boundary"));
    let guardrails: Vec<CompiledPolicy> =
        c.guard.iter().enumerate().map(|(i, s)| compile(s, PolicyKind::Guardrail, &format!("g{i}"))).collect();
    let resource = c.res.map(|s| compile(s, PolicyKind::Resource, "resource"));
    let set = PolicySet {
        identity: identity.iter().collect(),
        boundary: boundary.as_ref(),
        guardrails: guardrails.iter().collect(),
        resource: resource.as_ref(),
    };
    let principal = match c.who {
        Who::Alice => Principal::user(T1, "alice"),
        Who::Bob => Principal::user("t2", "bob"),
        Who::Key => Principal::api_key(T1, "nk1"),
        Who::Anon => Principal::anonymous(),
    };
    let mut context = Context::new(now());
    for (k, v) in c.ctx {
        let value = match v {
            V::One(s) => ContextValue::from(*s),
            V::Many(vs) => ContextValue::from(*vs),
        };
        context.insert(k, value);
    }
    let req = Request {
        principal: &principal,
        action: c.action,
        resource: c.resource,
        resource_tenant: c.rt,
        context: &context,
    };
    let d = evaluate(&req, &set);
    // Allows must name what allowed, denies every Deny that applied.
    let explained = match d.effect {
        Effect::Allow | Effect::ExplicitDeny => !d.matched.is_empty(),
        Effect::ImplicitDeny => true,
    };
    if (d.effect, d.reason) == (c.want, c.why) && explained {
        Ok(())
    } else {
        Err(format!("{name}: want {:?} ({:?}), got {:?} ({:?}) {:?}", c.want, c.why, d.effect, d.reason, d.matched))
    }
}

#[rustfmt::skip]
const ROWS: &[(&str, Case)] = &[
    // Actions: wildcards, anchoring, case.
    ("exact action", Case { id: &[INVOKE], ..BASE }),
    ("no policy at all", Case { want: NONE, why: Reason::NoAllow, ..BASE }),
    ("service wildcard", Case { id: &[r#"{"Effect":"Allow","Action":"functions:*","Resource":"*"}"#], ..BASE }),
    ("prefix wildcard", Case { id: &[r#"{"Effect":"Allow","Action":"functions:Invoke*","Resource":"*"}"#], ..BASE }),
    ("other prefix", Case { id: &[r#"{"Effect":"Allow","Action":"functions:Get*","Resource":"*"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("question mark", Case { id: &[r#"{"Effect":"Allow","Action":"functions:?nvokeFunction","Resource":"*"}"#], ..BASE }),
    ("action anchored at the end", Case { id: &[r#"{"Effect":"Allow","Action":"functions:InvokeFunctio","Resource":"*"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("star action", Case { id: &[ALL], ..BASE }),
    ("policy action case-insensitive", Case { id: &[r#"{"Effect":"Allow","Action":"FUNCTIONS:invokefunction","Resource":"*"}"#], ..BASE }),
    ("request action case-insensitive", Case { id: &[INVOKE], action: "Functions:INVOKEFUNCTION", ..BASE }),
    ("second action of a list", Case { id: &[r#"{"Effect":"Allow","Action":["functions:GetFunction","functions:InvokeFunction"],"Resource":"*"}"#], ..BASE }),
    // Resources.
    ("resource case-sensitive", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/Hello"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("resource star", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/*"}"#], ..BASE }),
    ("star crosses slashes", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/*"}"#], resource: "nrn:nimbus:functions:t1:function/hello/version/3", ..BASE }),
    ("star matches empty", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/hello*"}"#], ..BASE }),
    ("question one char", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/h?llo"}"#], ..BASE }),
    ("question not zero chars", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/h?llo"}"#], resource: "nrn:nimbus:functions:t1:function/hllo", want: NONE, why: Reason::NoAllow, ..BASE }),
    ("resource anchored at the end", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/hel"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("tenant wildcard", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:*:function/hello"}"#], ..BASE }),
    ("second resource of a list", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":["nrn:nimbus:functions:t1:function/a","nrn:nimbus:functions:t1:function/hello"]}"#], ..BASE }),
    // NotAction and NotResource.
    ("allow NotAction other", Case { id: &[r#"{"Effect":"Allow","NotAction":"functions:DeleteFunction","Resource":"*"}"#], ..BASE }),
    ("allow NotAction this", Case { id: &[r#"{"Effect":"Allow","NotAction":"functions:InvokeFunction","Resource":"*"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("deny NotAction other", Case { id: &[ALL, r#"{"Effect":"Deny","NotAction":"functions:GetFunction","Resource":"*"}"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny NotAction this", Case { id: &[ALL, r#"{"Effect":"Deny","NotAction":"functions:Invoke*","Resource":"*"}"#], ..BASE }),
    ("allow NotResource other", Case { id: &[r#"{"Effect":"Allow","Action":"*","NotResource":"nrn:nimbus:functions:t1:function/other"}"#], ..BASE }),
    ("allow NotResource this", Case { id: &[r#"{"Effect":"Allow","Action":"*","NotResource":"nrn:nimbus:functions:t1:function/h*"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("deny NotResource other", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"*","NotResource":"nrn:nimbus:functions:t1:function/safe-*"}"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny NotResource this", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"*","NotResource":"nrn:nimbus:functions:t1:function/h*"}"#], ..BASE }),
    // Explicit deny beats everything.
    ("deny beats allow", Case { id: &[r#"[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"functions:InvokeFunction","Resource":"*"}]"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny in another policy", Case { id: &[INVOKE, r#"{"Effect":"Deny","Action":"*","Resource":"*"}"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny in resource policy", Case { id: &[ALL], res: Some(r#"{"Effect":"Deny","Principal":"*","Action":"*","Resource":"*"}"#), want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny in boundary", Case { id: &[ALL], boundary: Some(r#"[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"functions:*","Resource":"*"}]"#), want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny in guardrail", Case { id: &[ALL], guard: &[r#"[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Deny","Action":"*","Resource":"nrn:nimbus:functions:t1:*"}]"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny that does not match", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"functions:Delete*","Resource":"*"}"#], ..BASE }),
    // String conditions.
    ("StringEquals tag", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("StringEquals other value", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("red"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("StringEquals values are ORed", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":["red","blue"]}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("StringNotEquals values are NORed (none)", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotEquals":{"nimbus:PrincipalTag/team":["red","green"]}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("StringNotEquals values are NORed (one)", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotEquals":{"nimbus:PrincipalTag/team":["red","blue"]}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("negated operator, key absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotEquals":{"nimbus:PrincipalTag/team":"red"}}}"#], ..BASE }),
    ("positive operator, key absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"red"}}}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("StringEqualsIgnoreCase", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEqualsIgnoreCase":{"nimbus:PrincipalTag/team":"BLUE"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("Blue"))], ..BASE }),
    ("StringEquals is case-sensitive", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"BLUE"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("StringNotEqualsIgnoreCase", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotEqualsIgnoreCase":{"nimbus:PrincipalTag/team":"BLUE"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("StringLike star", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringLike":{"nimbus:PrincipalTag/team":"bl*"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("StringLike question", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringLike":{"nimbus:PrincipalTag/team":"b?e"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("StringNotLike", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotLike":{"nimbus:PrincipalTag/team":"r*"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("StringEquals star is literal", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"*"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    // Numeric conditions.
    ("NumericLessThanEquals", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLessThanEquals":{"functions:MemorySize":512}}}"#], ctx: &[("functions:MemorySize", V::One("256"))], ..BASE }),
    ("NumericLessThanEquals over", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLessThanEquals":{"functions:MemorySize":"512"}}}"#], ctx: &[("functions:MemorySize", V::One("1024"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("NumericEquals as numbers", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericEquals":{"functions:MemorySize":256}}}"#], ctx: &[("functions:MemorySize", V::One("256.0"))], ..BASE }),
    ("Numeric on a non-number", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericGreaterThan":{"functions:MemorySize":128}}}"#], ctx: &[("functions:MemorySize", V::One("lots"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("NumericNotEquals NOR", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericNotEquals":{"functions:MemorySize":[128,256]}}}"#], ctx: &[("functions:MemorySize", V::One("512"))], ..BASE }),
    // Date conditions.
    ("DateLessThan ISO", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateLessThan":{"nimbus:CurrentTime":"2027-01-01T00:00:00Z"}}}"#], ..BASE }),
    ("DateGreaterThan ISO", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateGreaterThan":{"nimbus:CurrentTime":"2027-01-01"}}}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("DateLessThan epoch value", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateLessThan":{"nimbus:CurrentTime":1800000000}}}"#], ..BASE }),
    ("DateGreaterThanEquals on EpochTime", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateGreaterThanEquals":{"nimbus:EpochTime":"2026-06-01T12:00:00Z"}}}"#], ..BASE }),
    ("Date on a context string", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateLessThan":{"nimbus:RequestTag/expires":"2026-03-01"}}}"#], ctx: &[("nimbus:RequestTag/expires", V::One("2026-02-01T00:00:00Z"))], ..BASE }),
    // Bool, IfExists.
    ("Bool true", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Bool":{"nimbus:MultiFactorAuthPresent":true}}}"#], ctx: &[("nimbus:MultiFactorAuthPresent", V::One("true"))], ..BASE }),
    ("Bool false", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Bool":{"nimbus:MultiFactorAuthPresent":"true"}}}"#], ctx: &[("nimbus:MultiFactorAuthPresent", V::One("false"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("Bool absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Bool":{"nimbus:MultiFactorAuthPresent":true}}}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("BoolIfExists absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"BoolIfExists":{"nimbus:MultiFactorAuthPresent":true}}}"#], ..BASE }),
    ("deny without MFA, IfExists", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"BoolIfExists":{"nimbus:MultiFactorAuthPresent":false}}}"#], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("StringEqualsIfExists absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEqualsIfExists":{"nimbus:PrincipalTag/team":"blue"}}}"#], ..BASE }),
    ("StringEqualsIfExists present", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEqualsIfExists":{"nimbus:PrincipalTag/team":"blue"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("red"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    // IP addresses.
    ("IpAddress in range", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:SourceIp", V::One("10.1.2.3"))], ..BASE }),
    ("IpAddress out of range", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:SourceIp", V::One("192.168.1.1"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("IpAddress bare address", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"203.0.113.7"}}}"#], ctx: &[("nimbus:SourceIp", V::One("203.0.113.7"))], ..BASE }),
    ("IpAddress IPv6", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"2001:db8::/32"}}}"#], ctx: &[("nimbus:SourceIp", V::One("2001:db8::1"))], ..BASE }),
    ("IpAddress IPv4-mapped", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:SourceIp", V::One("::ffff:10.0.0.1"))], ..BASE }),
    ("IpAddress not an address", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:SourceIp", V::One("localhost"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("NotIpAddress NOR", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NotIpAddress":{"nimbus:SourceIp":["10.0.0.0/8","192.168.0.0/16"]}}}"#], ctx: &[("nimbus:SourceIp", V::One("172.16.0.1"))], ..BASE }),
    ("deny outside the network", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"NotIpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:SourceIp", V::One("8.8.8.8"))], want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    // Null.
    ("Null true, absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Null":{"nimbus:RequestTag/env":"true"}}}"#], ..BASE }),
    ("Null true, present", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Null":{"nimbus:RequestTag/env":true}}}"#], ctx: &[("nimbus:RequestTag/env", V::One("prod"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("Null false, present", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Null":{"nimbus:RequestTag/env":false}}}"#], ctx: &[("nimbus:RequestTag/env", V::One("prod"))], ..BASE }),
    // Multi-valued keys.
    ("ForAnyValue one matches", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"nimbus:TagKeys":["env","team"]}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&["team", "cost"]))], ..BASE }),
    ("ForAnyValue absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"nimbus:TagKeys":["env","team"]}}}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("ForAnyValue empty", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAnyValue:StringEquals":{"nimbus:TagKeys":["env","team"]}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&[]))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("ForAllValues all match", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env","team"]}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&["env"]))], ..BASE }),
    ("ForAllValues one does not", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env","team"]}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&["env", "cost"]))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("ForAllValues absent", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env"]}}}"#], ..BASE }),
    ("ForAllValues empty", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env"]}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&[]))], ..BASE }),
    ("ForAllValues with a Null guard", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env"]},"Null":{"nimbus:TagKeys":false}}}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("ForAnyValue negated", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAnyValue:StringNotEquals":{"nimbus:TagKeys":"env"}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&["env", "cost"]))], ..BASE }),
    ("ForAllValues negated", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"ForAllValues:StringNotLike":{"nimbus:TagKeys":"secret*"}}}"#], ctx: &[("nimbus:TagKeys", V::Many(&["env", "secret-x"]))], want: NONE, why: Reason::NoAllow, ..BASE }),
    // Several operators and keys are ANDed.
    ("two operators, both hold", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue"},"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue")), ("nimbus:SourceIp", V::One("10.0.0.1"))], ..BASE }),
    ("two operators, one fails", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue"},"IpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue")), ("nimbus:SourceIp", V::One("11.0.0.1"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("two keys, one fails", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue","nimbus:ResourceTag/env":"prod"}}}"#], ctx: &[("nimbus:PrincipalTag/team", V::One("blue")), ("nimbus:ResourceTag/env", V::One("dev"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    // Policy variables.
    ("variable resolved", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:username}-*"}"#], resource: "nrn:nimbus:functions:t1:function/alice-api", ctx: &[("nimbus:username", V::One("alice"))], ..BASE }),
    ("variable resolved, other resource", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:username}-*"}"#], resource: "nrn:nimbus:functions:t1:function/bob-api", ctx: &[("nimbus:username", V::One("alice"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("variable unresolvable", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:username}*"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("substituted star is literal", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:username}"}"#], ctx: &[("nimbus:username", V::One("*"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("escape matches a literal star", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${*}"}"#], resource: "nrn:nimbus:functions:t1:function/*", ..BASE }),
    ("escape is not a wildcard", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${*}"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("principal tag variable", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:PrincipalTag/team}/*"}"#], resource: "nrn:nimbus:functions:t1:function/blue/x", ctx: &[("nimbus:PrincipalTag/team", V::One("blue"))], ..BASE }),
    ("tenant variable from the principal", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:*:${nimbus:TenantId}:*"}"#], ctx: &[("nimbus:TenantId", V::One("t9"))], ..BASE }),
    ("variable in a condition value", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:ResourceTag/owner":"${nimbus:userid}"}}}"#], ctx: &[("nimbus:userid", V::One("u1")), ("nimbus:ResourceTag/owner", V::One("u1"))], ..BASE }),
    ("variable in a condition, other value", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:ResourceTag/owner":"${nimbus:userid}"}}}"#], ctx: &[("nimbus:userid", V::One("u1")), ("nimbus:ResourceTag/owner", V::One("u2"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("unresolvable in a negated condition", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringNotEquals":{"nimbus:ResourceTag/owner":"${nimbus:userid}"}}}"#], ctx: &[("nimbus:ResourceTag/owner", V::One("u2"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("unresolvable deny does not apply", Case { id: &[ALL, r#"{"Effect":"Deny","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:PrincipalTag/team}*"}"#], ..BASE }),
    ("unresolvable NotResource does not apply", Case { id: &[r#"{"Effect":"Allow","Action":"*","NotResource":"nrn:nimbus:functions:t1:function/${nimbus:username}"}"#], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("principal type cannot be overridden", Case { id: &[r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalType":"User"}}}"#], who: Who::Key, ctx: &[("nimbus:PrincipalType", V::One("User"))], want: NONE, why: Reason::NoAllow, ..BASE }),
    // Permissions boundaries.
    ("boundary allows too", Case { id: &[INVOKE], boundary: Some(r#"{"Effect":"Allow","Action":"functions:*","Resource":"*"}"#), ..BASE }),
    ("boundary does not allow", Case { id: &[ALL], boundary: Some(r#"{"Effect":"Allow","Action":"functions:Get*","Resource":"*"}"#), want: NONE, why: Reason::BoundaryDoesNotAllow, ..BASE }),
    ("boundary alone grants nothing", Case { boundary: Some(ALL), want: NONE, why: Reason::NoAllow, ..BASE }),
    ("boundary limits the resource policy", Case { boundary: Some(r#"{"Effect":"Allow","Action":"functions:Get*","Resource":"*"}"#), res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:user/alice"},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::BoundaryDoesNotAllow, ..BASE }),
    // Guardrails.
    ("guardrail allows", Case { id: &[INVOKE], guard: &[ALL], ..BASE }),
    ("guardrail does not allow", Case { id: &[ALL], guard: &[r#"{"Effect":"Allow","Action":"functions:Get*","Resource":"*"}"#], want: NONE, why: Reason::GuardrailDoesNotAllow, ..BASE }),
    ("every guardrail must allow", Case { id: &[ALL], guard: &[ALL, r#"{"Effect":"Allow","Action":"billing:*","Resource":"*"}"#], want: NONE, why: Reason::GuardrailDoesNotAllow, ..BASE }),
    ("guardrails bind anonymous callers", Case { who: Who::Anon, rt: Some(T1), guard: &[r#"{"Effect":"Allow","Action":"functions:Get*","Resource":"*"}"#], res: Some(r#"{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}"#), want: NONE, why: Reason::GuardrailDoesNotAllow, ..BASE }),
    // Resource policies.
    ("resource policy names the principal", Case { res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:user/alice"},"Action":"functions:InvokeFunction","Resource":"*"}"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    ("resource policy star, anonymous", Case { who: Who::Anon, res: Some(r#"{"Effect":"Allow","Principal":"*","Action":"functions:InvokeFunction","Resource":"*"}"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    ("Nimbus star, anonymous", Case { who: Who::Anon, res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"*"},"Action":"*","Resource":"*"}"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    ("resource policy NRN, anonymous", Case { who: Who::Anon, res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:user/*"},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::NoAllow, ..BASE }),
    ("anonymous ignores identity allows", Case { who: Who::Anon, id: &[ALL], want: NONE, why: Reason::NoAllow, ..BASE }),
    ("tenant root, user", Case { res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:root"},"Action":"*","Resource":"*"}"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    ("tenant root, API key", Case { who: Who::Key, res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:root"},"Action":"*","Resource":"*"}"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    ("resource policy names someone else", Case { res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":["nrn:nimbus:iam:t1:user/carol","nrn:nimbus:iam:t1:api-key/nk1"]},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::NoAllow, ..BASE }),
    ("user wildcard excludes API keys", Case { who: Who::Key, res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:user/*"},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::NoAllow, ..BASE }),
    ("deny NotPrincipal", Case { who: Who::Key, res: Some(r#"[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"},{"Effect":"Deny","NotPrincipal":{"Nimbus":"nrn:nimbus:iam:t1:user/alice"},"Action":"*","Resource":"*"}]"#), want: DENY, why: Reason::ExplicitDeny, ..BASE }),
    ("deny NotPrincipal spares the named", Case { res: Some(r#"[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"},{"Effect":"Deny","NotPrincipal":{"Nimbus":"nrn:nimbus:iam:t1:user/alice"},"Action":"*","Resource":"*"}]"#), why: Reason::AllowedByResourcePolicy, ..BASE }),
    // Across tenants both sides must allow.
    ("cross-tenant, identity only", Case { who: Who::Bob, id: &[ALL], want: NONE, why: Reason::CrossTenantNeedsResourcePolicy, ..BASE }),
    ("cross-tenant, resource policy only", Case { who: Who::Bob, res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t2:user/bob"},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::CrossTenantNeedsIdentityPolicy, ..BASE }),
    ("cross-tenant, both", Case { who: Who::Bob, id: &[INVOKE], res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t2:user/bob"},"Action":"*","Resource":"*"}"#), why: Reason::AllowedByIdentityAndResourcePolicy, ..BASE }),
    ("cross-tenant, tenant root", Case { who: Who::Bob, id: &[INVOKE], res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t2:root"},"Action":"*","Resource":"*"}"#), why: Reason::AllowedByIdentityAndResourcePolicy, ..BASE }),
    ("cross-tenant, star", Case { who: Who::Bob, id: &[INVOKE], res: Some(r#"{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}"#), why: Reason::AllowedByIdentityAndResourcePolicy, ..BASE }),
    ("cross-tenant, the resource's own root", Case { who: Who::Bob, id: &[INVOKE], res: Some(r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:iam:t1:root"},"Action":"*","Resource":"*"}"#), want: NONE, why: Reason::CrossTenantNeedsResourcePolicy, ..BASE }),
    ("cross-tenant, boundary", Case { who: Who::Bob, id: &[INVOKE], boundary: Some(r#"{"Effect":"Allow","Action":"billing:*","Resource":"*"}"#), res: Some(r#"{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}"#), want: NONE, why: Reason::BoundaryDoesNotAllow, ..BASE }),
    ("tenant principal, platform resource", Case { id: &[ALL], action: "nodes:DrainNode", resource: "nrn:nimbus:nodes::node/n1", rt: None, want: NONE, why: Reason::CrossTenantNeedsResourcePolicy, ..BASE }),
];

#[test]
fn evaluation_table() {
    assert!(ROWS.len() >= 80, "{} rows", ROWS.len());
    let mut names = std::collections::HashSet::new();
    let failures: Vec<String> = ROWS
        .iter()
        .inspect(|(name, _)| assert!(names.insert(*name), "duplicate row {name}"))
        .filter_map(|(name, case)| check(name, case).err())
        .collect();
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), ROWS.len(), failures.join("\n"));
}

#[test]
fn decisions_name_the_deciding_statements() {
    let identity = CompiledPolicy::compile(
        &doc(r#"[{"Sid":"Read","Effect":"Allow","Action":"functions:Get*","Resource":"*"},
                 {"Sid":"Invoke","Effect":"Allow","Action":"functions:InvokeFunction","Resource":"*"},
                 {"Sid":"Also","Effect":"Allow","Action":"*","Resource":"*"}]"#),
        PolicyKind::Identity,
        "dev",
        3,
    )
    .unwrap();
    let boundary = CompiledPolicy::compile(&doc(ALL), PolicyKind::Boundary, "edge", 1).unwrap();
    let denies =
        CompiledPolicy::compile(&doc(r#"[{"Sid":"A","Effect":"Deny","Action":"*","Resource":"*"},{"Sid":"B","Effect":"Deny","Action":"functions:*","Resource":"*"}]"#), PolicyKind::Identity, "no", 2)
            .unwrap();
    let alice = Principal::user(T1, "alice");
    let ctx = Context::new(now());
    let req = Request {
        principal: &alice,
        action: "functions:InvokeFunction",
        resource: HELLO,
        resource_tenant: Some(T1),
        context: &ctx,
    };
    let d = evaluate(&req, &PolicySet { identity: vec![&identity], boundary: Some(&boundary), ..Default::default() });
    assert_eq!(d.effect, Effect::Allow);
    let named: Vec<(&str, u32, Option<&str>, usize)> =
        d.matched.iter().map(|m| (&*m.policy, m.version, m.sid.as_deref(), m.index)).collect();
    // The boundary's statement and the first identity Allow that applies; later Allows are not read.
    assert_eq!(named, [("edge", 1, None, 0), ("dev", 3, Some("Invoke"), 1)]);
    assert_eq!(d.reason.to_string(), "allowed by an identity policy");

    let d = evaluate(&req, &PolicySet { identity: vec![&identity, &denies], ..Default::default() });
    assert_eq!(d.effect, Effect::ExplicitDeny);
    let sids: Vec<Option<&str>> = d.matched.iter().map(|m| m.sid.as_deref()).collect();
    assert_eq!(sids, [Some("A"), Some("B")], "every applicable Deny is reported");
    assert!(!d.is_allowed());
}
