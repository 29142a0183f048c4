//! Execution roles with real processes: a process function (a shell script with `curl`) calls
//! the Nimbus API with the credential its invocation got (`NIMBUS_TOKEN`, `NIMBUS_API_URL`),
//! and can do exactly what its role's policies allow: invoke one function, and not another, nor
//! list the tenant's functions.

use std::time::Duration;

use nimbus_e2e::{Platform, Running, hello_wasm};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A gzip tarball holding `handler.sh`: three calls with the invocation's credential, and
/// their HTTP statuses as the answer.
fn caller_package() -> Vec<u8> {
    let script = br#"#!/bin/sh
call() { curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $NIMBUS_TOKEN" "$@"; }
echo 'Content-Type: text/plain'
echo
echo "token=${NIMBUS_TOKEN%%_*}" \
  "target=$(call -X POST "$NIMBUS_API_URL/fn/acme/target")" \
  "secret=$(call -X POST "$NIMBUS_API_URL/fn/acme/secret")" \
  "list=$(call "$NIMBUS_API_URL/v1/tenants/$TENANT_ID/functions")"
"#;
    nimbus_e2e::script_package("handler.sh", script)
}

#[tokio::test]
async fn a_process_function_calls_the_api_with_exactly_its_execution_roles_permissions() {
    let secrets = format!("e2e:{}", "A".repeat(43));
    let p = Platform::start(&[("NIMBUS_SECRETS_KEYS", &secrets), ("NIMBUS_AUTOSCALER", "false")]).await;
    let t = p.tenant.clone();
    let fns = format!("/v1/tenants/{t}/functions");
    let (target, _) = p.deploy(json!({"name": "target", "runtime": "wasm"}), "application/wasm", hello_wasm()).await;
    let (secret, _) = p.deploy(json!({"name": "secret", "runtime": "wasm"}), "application/wasm", hello_wasm()).await;
    let (caller, _) = p
        .deploy(
            json!({"name": "caller", "runtime": "process", "entry": "handler.sh", "timeout_ms": 10000,
                   "environment": {"TENANT_ID": {"value": t}}}),
            "application/gzip",
            caller_package(),
        )
        .await;
    for (f, v) in [("target", &target), ("secret", &secret), ("caller", &caller)] {
        let (s, b) = p
            .call(
                reqwest::Method::POST,
                &format!("{fns}/{f}/aliases"),
                Some(json!({"name": "live", "routing": {"weights": [{"version": 1, "weight": 100}]}})),
            )
            .await;
        assert_eq!(s, 201, "{f} {v}: {b}");
    }

    // The role: invoke `target`, nothing else.
    let (s, b) = p
        .call(
            reqwest::Method::POST,
            &format!("/v1/tenants/{t}/policies"),
            Some(json!({"name": "InvokeTarget", "document": {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                "Action": "functions:InvokeFunction", "Resource": format!("nrn:nimbus:functions:{t}:function/target")}]}})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) =
        p.call(reqwest::Method::POST, &format!("/v1/tenants/{t}/roles"), Some(json!({"name": "caller-role"}))).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) =
        p.call(reqwest::Method::PUT, &format!("/v1/tenants/{t}/roles/caller-role/policies/InvokeTarget"), None).await;
    assert_eq!(s, 204, "{b}");
    let (s, b) = p
        .call(reqwest::Method::PUT, &format!("{fns}/caller/execution-role"), Some(json!({"role": "caller-role"})))
        .await;
    assert_eq!(s, 200, "{b}");

    // One agent serving all three.
    let data = std::env::temp_dir().join(format!("nimbus-e2e-roles-{}", uuid::Uuid::now_v7().simple()));
    let token = p.join_token(1).await;
    let mut agent = Running::start_agent(
        &[],
        &[
            ("NIMBUS_AGENT_CONTROL_PLANE_URL", &p.base),
            ("NIMBUS_AGENT_JOIN_TOKEN", &token),
            ("NIMBUS_AGENT_NAME", "worker-roles"),
            ("NIMBUS_AGENT_ZONE", "zone-a"),
            ("NIMBUS_AGENT_DATA_DIR", data.to_str().unwrap()),
            ("NIMBUS_AGENT_LISTEN", "127.0.0.1:0"),
            ("NIMBUS_AGENT_WASM_POOL_SLOTS", "16"),
            // A uid range of its own: agents of other tests on this machine sweep theirs.
            ("NIMBUS_AGENT_PROCESS_UID_BASE", "612000"),
            ("NIMBUS_AGENT_PROCESS_UIDS", "16"),
            ("NIMBUS_AGENT_LOG", "warn"),
        ],
    )
    .unwrap();
    let node =
        agent.wait_for_line("joined as node", WAIT).unwrap().trim_start_matches("joined as node ").trim().to_owned();
    let assignments: Vec<Value> = ["target", "secret", "caller"]
        .iter()
        .map(|f| json!({"tenant_id": t, "function": f, "version": 1, "instances": 1}))
        .collect();
    let (s, b) = p
        .call(reqwest::Method::PUT, &format!("/v1/nodes/{node}/assignments"), Some(json!({"assignments": assignments})))
        .await;
    assert_eq!(s, 200, "{b}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, n) = p.call(reqwest::Method::GET, &format!("/v1/nodes/{node}"), None).await;
        let ready = n["versions"].as_array().map_or(0, |vs| vs.iter().filter(|v| v["state"] == "ready").count());
        if ready == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the versions never got ready: {n}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The caller as its owner invokes it; inside, it acts as its role.
    let res = p.http.post(format!("{}/fn/acme/caller", p.base)).bearer_auth(&p.token).send().await.unwrap();
    let status = res.status().as_u16();
    let body = res.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "token=nrc target=200 secret=403 list=403", "{body}");

    // Without the role, the same function gets no credential and can do nothing.
    let (s, b) = p.call(reqwest::Method::DELETE, &format!("{fns}/caller/execution-role"), None).await;
    assert_eq!(s, 204, "{b}");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let res = p.http.post(format!("{}/fn/acme/caller", p.base)).bearer_auth(&p.token).send().await.unwrap();
        let body = res.text().await.unwrap();
        // The gateway's table follows the change by notification; until then the old
        // credential is void already (the decision point checks the function's role).
        if body.trim() == "token= target=401 secret=401 list=401" {
            break;
        }
        assert!(
            body.trim() == "token=nrc target=403 secret=403 list=403",
            "a credential outlived its function's role: {body}"
        );
        assert!(tokio::time::Instant::now() < deadline, "the gateway kept handing out credentials: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    agent.terminate().unwrap();
    let _ = std::fs::remove_dir_all(&data);
    p.stop().await;
}
