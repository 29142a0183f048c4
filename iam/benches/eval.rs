//! Policy evaluation latency (target: p99 < 10 µs for a principal with 100 statements, uncached).
//!
//! `cargo bench -p nimbus-iam --bench eval` (release profile). A principal has four identity
//! policies of 25 statements each, 100 in all: exact actions and wildcards, resources with
//! wildcards, a third of them with conditions (`StringEquals` on a principal tag, `StringLike` on
//! a resource tag, `IpAddress`, `DateLessThan`, `BoolIfExists`), ten with `${nimbus:username}` in
//! the resource, and twenty Denies that do not apply. Each case evaluates one request 200,000
//! times after 20,000 warm-up evaluations, timing every evaluation on its own:
//!
//! - **allowed late**: the first Allow that applies is statement 95 of 100;
//! - **implicit deny**: nothing allows it, so every statement is read (the worst case);
//! - **variables**: allowed by a statement whose resource uses `${nimbus:username}`.
//!
//! For comparison, in the same run: the allowed request against a single statement, and the
//! allowed request compiling the four documents from JSON on every evaluation (what caching the
//! compiled policies saves).

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use nimbus_iam::{CompiledPolicy, Context, Decision, Effect, PolicyKind, PolicySet, Principal, Request, evaluate};

const ITERATIONS: usize = 200_000;
const WARMUP: usize = 20_000;
const T: &str = "0190f2c4-7d1e-7000-8000-000000000001";

/// Statement `i` of the 100, by kind (`i % 10`).
fn statement(i: usize) -> String {
    let f = |path: &str| format!("nrn:nimbus:functions:{T}:function/{path}");
    match i % 10 {
        0 => {
            format!(r#"{{"Effect":"Allow","Action":"functions:GetFunction","Resource":"{}"}}"#, f(&format!("svc-{i}")))
        }
        1 => format!(r#"{{"Effect":"Allow","Action":"functions:List*","Resource":"{}"}}"#, f(&format!("team-{i}-*"))),
        2 => format!(
            r#"{{"Effect":"Allow","Action":["functions:GetFunction","functions:UpdateFunction"],"Resource":"{}","Condition":{{"StringEquals":{{"nimbus:PrincipalTag/team":"team-{i}"}}}}}}"#,
            f(&format!("svc-{i}/*"))
        ),
        3 => format!(
            r#"{{"Effect":"Allow","Action":"functions:*Alias","Resource":"{}","Condition":{{"IpAddress":{{"nimbus:SourceIp":["10.{i}.0.0/16","2001:db8:{i}::/48"]}}}}}}"#,
            f(&format!("svc-{i}/alias/*"))
        ),
        4 => format!(
            r#"{{"Effect":"Allow","Action":"functions:InvokeFunction","Resource":"{}","Condition":{{"DateLessThan":{{"nimbus:CurrentTime":"2030-01-01T00:00:00Z"}}}}}}"#,
            f(&format!("api-{i}-*"))
        ),
        5 => format!(
            r#"{{"Effect":"Deny","Action":"functions:DeleteFunction","Resource":"{}"}}"#,
            f(&format!("prod-{i}-*"))
        ),
        6 => format!(
            r#"{{"Effect":"Allow","Action":["iam:Get*","iam:List*"],"Resource":"nrn:nimbus:iam:{T}:policy/team-{i}-*"}}"#
        ),
        7 => format!(
            r#"{{"Effect":"Allow","Action":["functions:GetFunction","functions:InvokeFunction"],"Resource":"{}"}}"#,
            f(&format!("${{nimbus:username}}-{i}-*"))
        ),
        8 => format!(
            r#"{{"Effect":"Allow","Action":["functions:CreateVersion","functions:ListVersions"],"Resource":"{}","Condition":{{"StringLike":{{"nimbus:ResourceTag/env":"prod*"}}}}}}"#,
            f(&format!("svc-{i}/version/*"))
        ),
        _ => r#"{"Effect":"Deny","Action":["functions:Delete*","iam:Delete*"],"Resource":"*","Condition":{"BoolIfExists":{"nimbus:MultiFactorAuthPresent":"false"},"NotIpAddress":{"nimbus:SourceIp":"10.0.0.0/8"}}}"#
            .to_owned(),
    }
}

/// The four documents of 25 statements.
fn documents() -> Vec<String> {
    (0..4)
        .map(|p| {
            let statements: Vec<String> = (p * 25..p * 25 + 25).map(statement).collect();
            format!(r#"{{"Version":"2012-10-17","Statement":[{}]}}"#, statements.join(","))
        })
        .collect()
}

fn compile_all(docs: &[String]) -> Vec<CompiledPolicy> {
    docs.iter()
        .enumerate()
        .map(|(i, d)| CompiledPolicy::compile(d, PolicyKind::Identity, format!("p{i}"), 1).expect("benchmark policy"))
        .collect()
}

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
}

/// Times `f` `n` times after `WARMUP` untimed calls.
fn measure(n: usize, mut f: impl FnMut() -> Decision) -> Stats {
    for _ in 0..WARMUP.min(n) {
        black_box(f());
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        black_box(f());
        samples.push(start.elapsed());
    }
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    Stats { p50: samples[n / 2], p99: samples[n * 99 / 100], mean: total / n as u32 }
}

fn row(name: &str, statements: usize, s: &Stats) {
    println!(
        "| {name} | {statements} | {:.2} µs | {:.2} µs | {:.2} µs |",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.mean.as_secs_f64() * 1e6
    );
}

fn main() {
    let docs = documents();
    let policies = compile_all(&docs);
    let set = PolicySet { identity: policies.iter().collect(), ..Default::default() };
    let statements: usize = policies.iter().map(|p| p.statements().len()).sum();
    assert_eq!(statements, 100);

    let alice = Principal::user(T, "alice");
    let now = "2026-06-01T12:00:00Z".parse().expect("time");
    let ctx = Context::new(now)
        .with("nimbus:username", "alice")
        .with("nimbus:userid", "0190f2c4-7d1e-7000-8000-0000000000aa")
        .with("nimbus:PrincipalTag/team", "team-42")
        .with("nimbus:ResourceTag/env", "staging")
        .with("nimbus:SourceIp", "10.200.1.1")
        .with("nimbus:MultiFactorAuthPresent", "true");
    let request = |action: &'static str, resource: String| (action, resource);
    let cases = [
        (
            "allowed late (statement 95 of 100)",
            request("functions:InvokeFunction", format!("nrn:nimbus:functions:{T}:function/api-94-x")),
            Effect::Allow,
        ),
        (
            "implicit deny (every statement read)",
            request("functions:UpdateAlias", format!("nrn:nimbus:functions:{T}:function/svc-93/alias/live")),
            Effect::ImplicitDeny,
        ),
        (
            "variables (`${nimbus:username}`)",
            request("functions:InvokeFunction", format!("nrn:nimbus:functions:{T}:function/alice-97-prod")),
            Effect::Allow,
        ),
    ];

    println!("| case | statements | p50 | p99 | mean |");
    println!("|---|---:|---:|---:|---:|");
    let mut worst_p99 = Duration::ZERO;
    for (name, (action, resource), want) in &cases {
        let req = Request { principal: &alice, action, resource, resource_tenant: Some(T), context: &ctx };
        assert_eq!(evaluate(&req, &set).effect, *want, "{name}");
        let s = measure(ITERATIONS, || evaluate(black_box(&req), black_box(&set)));
        worst_p99 = worst_p99.max(s.p99);
        row(name, statements, &s);
    }

    // Comparison 1: the allowed request against one statement that allows it.
    let one = CompiledPolicy::compile(
        &format!(r#"{{"Version":"2012-10-17","Statement":{}}}"#, statement(94)),
        PolicyKind::Identity,
        "one",
        1,
    )
    .expect("one statement");
    let one_set = PolicySet { identity: vec![&one], ..Default::default() };
    let (action, resource) = (cases[0].1.0, cases[0].1.1.as_str());
    let req = Request { principal: &alice, action, resource, resource_tenant: Some(T), context: &ctx };
    assert!(evaluate(&req, &one_set).is_allowed());
    row("allowed, one statement", 1, &measure(ITERATIONS, || evaluate(black_box(&req), black_box(&one_set))));

    // Comparison 2: compiling the four documents from JSON for every evaluation.
    let s = measure(ITERATIONS / 10, || {
        let fresh = compile_all(black_box(&docs));
        let set = PolicySet { identity: fresh.iter().collect(), ..Default::default() };
        evaluate(&req, &set)
    });
    row("allowed late, JSON parsed and compiled each time", statements, &s);

    let bytes: usize = docs.iter().map(String::len).sum();
    println!();
    println!(
        "4 documents, {bytes} bytes of JSON in all; {ITERATIONS} timed evaluations per case ({} for the last).",
        ITERATIONS / 10
    );
    let verdict = if worst_p99 < Duration::from_micros(10) { "met" } else { "NOT met" };
    println!("target p99 < 10 µs with 100 statements: {verdict} (worst p99 {:.2} µs)", worst_p99.as_secs_f64() * 1e6);
}
