//! Validation: each error with its path and rule, each finding with its path and code.

use nimbus_iam::{FindingCode, PolicyKind, Rule, validate};

use super::doc;

const I: PolicyKind = PolicyKind::Identity;
const R: PolicyKind = PolicyKind::Resource;

fn error(name: &str, kind: PolicyKind, text: &str, rule: Rule, path: &str) -> Result<(), String> {
    let report = validate(text, kind);
    if report.errors.iter().any(|e| e.rule == rule && e.path == path) {
        Ok(())
    } else {
        Err(format!("{name}: want {rule} at {path:?}, got {:?}", report.errors))
    }
}

fn stmt(s: &str) -> String {
    doc(s)
}

#[test]
fn errors_name_the_path_and_the_rule() {
    let big = doc(&format!(
        r#"{{"Effect":"Allow","Action":"*","Resource":["{}"]}}"#,
        vec!["nrn:nimbus:functions:t1:function/a-rather-long-function-name"; 200].join(r#"",""#)
    ));
    let many = doc(&format!(
        "[{}]",
        vec![r#"{"Effect":"Allow","Action":"functions:GetFunction","Resource":"*"}"#; 101].join(",")
    ));
    let rows: Vec<(&str, PolicyKind, String, Rule, &str)> = vec![
        ("not JSON", I, "{".into(), Rule::Json, ""),
        (
            "duplicate key",
            I,
            r#"{"Version":"2012-10-17","Version":"2012-10-17","Statement":[]}"#.into(),
            Rule::Json,
            "",
        ),
        ("not an object", I, "[]".into(), Rule::WrongType, ""),
        ("too large", I, big, Rule::TooLarge, ""),
        ("too many statements", I, many, Rule::TooMany, "Statement"),
        (
            "unknown top-level field",
            I,
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*"},"Foo":1}"#.into(),
            Rule::UnknownField,
            "Foo",
        ),
        (
            "missing version",
            I,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into(),
            Rule::Missing,
            "Version",
        ),
        (
            "old version",
            I,
            r#"{"Version":"2008-10-17","Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#.into(),
            Rule::Version,
            "Version",
        ),
        ("missing statement", I, r#"{"Version":"2012-10-17"}"#.into(), Rule::Missing, "Statement"),
        ("empty statement list", I, doc("[]"), Rule::Empty, "Statement"),
        ("statement not an object", I, doc("[1]"), Rule::WrongType, "Statement[0]"),
        (
            "unknown statement field",
            I,
            stmt(r#"[{"Effect":"Allow","Action":"*","Resource":"*","Actions":"x"}]"#),
            Rule::UnknownField,
            "Statement[0].Actions",
        ),
        ("missing effect", I, stmt(r#"{"Action":"*","Resource":"*"}"#), Rule::Missing, "Statement.Effect"),
        ("bad effect", I, stmt(r#"{"Effect":"allow","Action":"*","Resource":"*"}"#), Rule::Effect, "Statement.Effect"),
        (
            "both Action and NotAction",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","NotAction":"*","Resource":"*"}"#),
            Rule::Conflict,
            "Statement",
        ),
        (
            "neither Action nor NotAction",
            I,
            stmt(r#"{"Effect":"Allow","Resource":"*"}"#),
            Rule::Missing,
            "Statement.Action",
        ),
        (
            "both Resource and NotResource",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"*","NotResource":"*"}"#),
            Rule::Conflict,
            "Statement",
        ),
        ("missing Resource", I, stmt(r#"{"Effect":"Allow","Action":"*"}"#), Rule::Missing, "Statement.Resource"),
        (
            "Action of the wrong type",
            I,
            stmt(r#"{"Effect":"Allow","Action":5,"Resource":"*"}"#),
            Rule::WrongType,
            "Statement.Action",
        ),
        (
            "Action entry of the wrong type",
            I,
            stmt(r#"{"Effect":"Allow","Action":["*",true],"Resource":"*"}"#),
            Rule::WrongType,
            "Statement.Action[1]",
        ),
        (
            "empty Action list",
            I,
            stmt(r#"{"Effect":"Allow","Action":[],"Resource":"*"}"#),
            Rule::Empty,
            "Statement.Action",
        ),
        (
            "action without service",
            I,
            stmt(r#"{"Effect":"Allow","Action":"InvokeFunction","Resource":"*"}"#),
            Rule::Action,
            "Statement.Action",
        ),
        (
            "unknown action",
            I,
            stmt(r#"{"Effect":"Allow","Action":"functions:Nope","Resource":"*"}"#),
            Rule::UnknownAction,
            "Statement.Action",
        ),
        (
            "unknown service",
            I,
            stmt(r#"{"Effect":"Allow","Action":["functions:GetFunction","nope:*"],"Resource":"*"}"#),
            Rule::UnknownAction,
            "Statement.Action[1]",
        ),
        (
            "unknown NotAction",
            I,
            stmt(r#"{"Effect":"Deny","NotAction":"functions:Nope*","Resource":"*"}"#),
            Rule::UnknownAction,
            "Statement.NotAction",
        ),
        (
            "bad NRN",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"arn:aws:s3:::bucket"}"#),
            Rule::Resource,
            "Statement.Resource",
        ),
        (
            "NRN missing parts",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":["*","nrn:nimbus:functions"]}"#),
            Rule::Resource,
            "Statement.Resource[1]",
        ),
        (
            "bad variable in a resource",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:function/${nimbus:username"}"#),
            Rule::Resource,
            "Statement.Resource",
        ),
        (
            "bad Sid",
            I,
            stmt(r#"{"Sid":"no spaces","Effect":"Allow","Action":"*","Resource":"*"}"#),
            Rule::Sid,
            "Statement.Sid",
        ),
        (
            "duplicate Sid",
            I,
            stmt(
                r#"[{"Sid":"A","Effect":"Allow","Action":"*","Resource":"*"},{"Sid":"A","Effect":"Deny","Action":"*","Resource":"*"}]"#,
            ),
            Rule::Sid,
            "Statement[1].Sid",
        ),
        (
            "Principal in an identity policy",
            I,
            stmt(r#"{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}"#),
            Rule::PrincipalNotAllowed,
            "Statement.Principal",
        ),
        (
            "Principal in a boundary",
            PolicyKind::Boundary,
            stmt(r#"{"Effect":"Allow","NotPrincipal":"*","Action":"*","Resource":"*"}"#),
            Rule::PrincipalNotAllowed,
            "Statement.NotPrincipal",
        ),
        (
            "missing Principal in a resource policy",
            R,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#),
            Rule::PrincipalRequired,
            "Statement.Principal",
        ),
        (
            "unknown principal type",
            R,
            stmt(r#"{"Effect":"Allow","Principal":{"AWS":"*"},"Action":"*","Resource":"*"}"#),
            Rule::Principal,
            "Statement.Principal.AWS",
        ),
        (
            "group as principal",
            R,
            stmt(
                r#"{"Effect":"Allow","Principal":{"Nimbus":["nrn:nimbus:iam:t1:root","nrn:nimbus:iam:t1:group/devs"]},"Action":"*","Resource":"*"}"#,
            ),
            Rule::Principal,
            "Statement.Principal.Nimbus[1]",
        ),
        (
            "principal outside iam",
            R,
            stmt(
                r#"{"Effect":"Allow","Principal":{"Nimbus":"nrn:nimbus:functions:t1:function/x"},"Action":"*","Resource":"*"}"#,
            ),
            Rule::Principal,
            "Statement.Principal.Nimbus",
        ),
        (
            "unknown operator",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEqualz":{"nimbus:username":"a"}}}"#,
            ),
            Rule::Operator,
            "Statement.Condition.StringEqualz",
        ),
        (
            "Null with IfExists",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NullIfExists":{"nimbus:username":true}}}"#,
            ),
            Rule::Operator,
            "Statement.Condition.NullIfExists",
        ),
        (
            "malformed condition key",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"username":"a"}}}"#),
            Rule::ConditionKey,
            "Statement.Condition.StringEquals.username",
        ),
        (
            "unknown global key",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:Whatever":"a"}}}"#,
            ),
            Rule::UnknownConditionKey,
            "Statement.Condition.StringEquals.nimbus:Whatever",
        ),
        (
            "unknown service key",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"functions:Color":"a"}}}"#,
            ),
            Rule::UnknownConditionKey,
            "Statement.Condition.StringEquals.functions:Color",
        ),
        (
            "operator does not fit the key",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:username":"10.0.0.0/8"}}}"#,
            ),
            Rule::KeyType,
            "Statement.Condition.IpAddress.nimbus:username",
        ),
        (
            "bad CIDR",
            I,
            stmt(
                r#"[{"Effect":"Allow","Action":"*","Resource":"*"},{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"IpAddress":{"nimbus:SourceIp":"10.0.0.0/33"}}}]"#,
            ),
            Rule::Value,
            "Statement[1].Condition.IpAddress.nimbus:SourceIp",
        ),
        (
            "bad date",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"DateLessThan":{"nimbus:CurrentTime":["2026-01-01","next week"]}}}"#,
            ),
            Rule::Value,
            "Statement.Condition.DateLessThan.nimbus:CurrentTime[1]",
        ),
        (
            "bad number",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"NumericLessThan":{"functions:MemorySize":"lots"}}}"#,
            ),
            Rule::Value,
            "Statement.Condition.NumericLessThan.functions:MemorySize",
        ),
        (
            "bad bool",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Bool":{"nimbus:SecureTransport":"yes"}}}"#,
            ),
            Rule::Value,
            "Statement.Condition.Bool.nimbus:SecureTransport",
        ),
        (
            "bad Null",
            I,
            stmt(r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Null":{"nimbus:username":"maybe"}}}"#),
            Rule::Value,
            "Statement.Condition.Null.nimbus:username",
        ),
        (
            "condition value of the wrong type",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:username":{"a":1}}}}"#,
            ),
            Rule::WrongType,
            "Statement.Condition.StringEquals.nimbus:username",
        ),
        (
            "empty condition values",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringEquals":{"nimbus:username":[]}}}"#,
            ),
            Rule::Empty,
            "Statement.Condition.StringEquals.nimbus:username",
        ),
        (
            "bad variable in a condition",
            I,
            stmt(
                r#"{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"StringLike":{"nimbus:username":"${}"}}}"#,
            ),
            Rule::Variable,
            "Statement.Condition.StringLike.nimbus:username",
        ),
    ];
    let failures: Vec<String> =
        rows.iter().filter_map(|(name, kind, text, rule, path)| error(name, *kind, text, *rule, path).err()).collect();
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

#[test]
fn every_error_is_reported_at_once() {
    let report = validate(
        &doc(
            r#"[{"Effect":"Maybe","Action":"x","Resource":"y"},{"Effect":"Allow","Action":"*","Resource":"*","Condition":{"Nope":{}}}]"#,
        ),
        I,
    );
    let paths: Vec<&str> = report.errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["Statement[0].Effect", "Statement[0].Action", "Statement[0].Resource", "Statement[1].Condition.Nope"]
    );
    assert!(
        report.errors[1].to_string().starts_with("Statement[0].Action: `x` is not an action"),
        "{}",
        report.errors[1]
    );
}

fn finding(name: &str, text: &str, kind: PolicyKind, code: FindingCode, path: &str) -> Result<(), String> {
    let report = validate(&doc(text), kind);
    if !report.errors.is_empty() {
        return Err(format!("{name}: errors {:?}", report.errors));
    }
    if report.findings.iter().any(|f| f.code == code && f.path == path) {
        Ok(())
    } else {
        Err(format!("{name}: want {code} at {path:?}, got {:?}", report.findings))
    }
}

#[test]
fn findings_name_the_path_and_the_code() {
    use FindingCode as F;
    let rows: &[(&str, &str, FindingCode, &str)] = &[
        ("allow all", r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#, F::AllowAll, "Statement"),
        (
            "allow NotAction",
            r#"{"Effect":"Allow","NotAction":"iam:*","Resource":"*"}"#,
            F::AllowNotAction,
            "Statement.NotAction",
        ),
        (
            "allow NotResource",
            r#"{"Effect":"Allow","Action":"functions:GetFunction","NotResource":"nrn:nimbus:functions:t1:function/x"}"#,
            F::AllowNotResource,
            "Statement.NotResource",
        ),
        (
            "service wildcard",
            r#"{"Effect":"Allow","Action":"functions:*","Resource":"*"}"#,
            F::ServiceWildcardWrite,
            "Statement.Action",
        ),
        (
            "iam wildcard",
            r#"{"Effect":"Allow","Action":["functions:GetFunction","iam:*"],"Resource":"*"}"#,
            F::ServiceWildcardWrite,
            "Statement.Action[1]",
        ),
        (
            "verb wildcard",
            r#"{"Effect":"Allow","Action":["iam:Get*","iam:Put*"],"Resource":"*"}"#,
            F::ServiceWildcardWrite,
            "Statement.Action[1]",
        ),
        (
            "star on some resources",
            r#"{"Effect":"Allow","Action":"*","Resource":"nrn:nimbus:functions:t1:*"}"#,
            F::ServiceWildcardWrite,
            "Statement.Action",
        ),
        (
            "ForAllValues without Null",
            r#"{"Effect":"Allow","Action":"functions:TagResource","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env"]}}}"#,
            F::ForAllValuesWithoutNull,
            "Statement.Condition.ForAllValues:StringEquals.nimbus:TagKeys",
        ),
        (
            "negated operator in an Allow",
            r#"{"Effect":"Allow","Action":"functions:GetFunction","Resource":"*","Condition":{"StringNotEquals":{"nimbus:PrincipalTag/team":"red"}}}"#,
            F::NegatedOperatorInAllow,
            "Statement.Condition.StringNotEquals.nimbus:PrincipalTag/team",
        ),
        (
            "wildcard in StringEquals",
            r#"{"Effect":"Deny","Action":"functions:GetFunction","Resource":"*","Condition":{"StringEquals":{"nimbus:PrincipalTag/team":"blue-*"}}}"#,
            F::WildcardInNonLike,
            "Statement.Condition.StringEquals.nimbus:PrincipalTag/team",
        ),
        (
            "redundant statement",
            r#"[{"Effect":"Allow","Action":["functions:GetFunction","functions:ListFunctions"],"Resource":"nrn:nimbus:functions:t1:*"},{"Effect":"Allow","Action":"functions:GetFunction","Resource":"nrn:nimbus:functions:t1:function/a","Condition":{"Bool":{"nimbus:SecureTransport":true}}}]"#,
            F::RedundantStatement,
            "Statement[1]",
        ),
        (
            "duplicate statement",
            r#"[{"Effect":"Deny","Action":"functions:DeleteFunction","Resource":"*"},{"Effect":"Deny","Action":"functions:DeleteFunction","Resource":"*"}]"#,
            F::RedundantStatement,
            "Statement[1]",
        ),
        (
            "key the action does not supply",
            r#"{"Effect":"Allow","Action":"functions:InvokeFunction","Resource":"*","Condition":{"StringEquals":{"functions:Runtime":"wasm"}}}"#,
            F::ConditionKeyNotApplicable,
            "Statement.Condition.StringEquals.functions:Runtime",
        ),
    ];
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|(name, text, code, path)| finding(name, text, PolicyKind::Identity, *code, path).err())
        .collect();
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

#[test]
fn careful_policies_have_no_findings() {
    for text in [
        r#"{"Effect":"Allow","Action":["functions:Get*","functions:List*"],"Resource":"nrn:nimbus:functions:t1:*"}"#,
        r#"{"Effect":"Allow","Action":"functions:CreateFunction","Resource":"*","Condition":{"StringEquals":{"functions:Runtime":"wasm"},"NumericLessThanEquals":{"functions:MemorySize":512}}}"#,
        r#"{"Effect":"Allow","Action":"functions:TagResource","Resource":"*","Condition":{"ForAllValues:StringEquals":{"nimbus:TagKeys":["env"]},"Null":{"nimbus:TagKeys":"false"}}}"#,
        r#"{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"StringNotEquals":{"nimbus:PrincipalTag/team":"${nimbus:ResourceTag/team}"},"StringEquals":{"nimbus:username":"a${*}"}}}"#,
        r#"[{"Effect":"Allow","Action":"functions:GetFunction","Resource":"nrn:nimbus:functions:t1:function/a"},{"Effect":"Allow","Action":"functions:GetFunction","Resource":"nrn:nimbus:functions:t1:function/b"}]"#,
    ] {
        let report = validate(&doc(text), PolicyKind::Identity);
        assert!(report.is_valid(), "{text}: {:?}", report.errors);
        assert!(report.findings.is_empty(), "{text}: {:?}", report.findings);
    }
    let report =
        validate(&doc(r#"{"Effect":"Allow","Principal":"*","Action":"functions:InvokeFunction","Resource":"*"}"#), R);
    assert!(report.is_valid() && report.findings.is_empty(), "{report:?}");
}
