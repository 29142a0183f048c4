//! Every route in the OpenAPI document is either on the short public list or refuses a caller
//! without credentials (401), a stranger to the tenant (404/403), and — in the tenant — a member
//! and an API key with no policies at all (403 naming the action). A new route that forgets to
//! authenticate or authorize fails here.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Req, spawn_app};

/// Routes that need no credentials, by design.
const PUBLIC: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/.well-known/jwks.json"),
    ("post", "/v1/auth/signup"),
    ("post", "/v1/auth/signin"),
    ("post", "/v1/auth/refresh"),
    ("post", "/v1/auth/signout"),
    // The join token travels in the body.
    ("post", "/agent/v1/join"),
];

#[tokio::test]
async fn every_route_is_public_by_design_or_authorized() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "target").await;
    let stranger = app.sign_up("stranger@example.com", "elsewhere").await;
    let (key_id, _) = app.create_key(&owner.token, owner.tenant, "viewer").await;
    // A member and a key whose role stands for no policy, with nothing attached.
    let bare = app.sign_up("bare@example.com", "bare-home").await;
    app.add_member(&owner, owner.tenant, &bare, "none").await;
    let (_, bare_key) = app.create_key(&owner.token, owner.tenant, "none").await;
    // And a function's execution role with nothing attached, as an invocation holds it.
    let bare_role = {
        let t = owner.tenant;
        let res =
            app.post(&format!("/v1/tenants/{t}/roles")).token(&owner.token).json(json!({"name": "bare"})).send().await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        let res = app
            .post(&format!("/v1/tenants/{t}/functions"))
            .token(&owner.token)
            .json(json!({"name": "holder", "runtime": "wasm"}))
            .send()
            .await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
        let res = app
            .req(Method::PUT, &format!("/v1/tenants/{t}/functions/holder/execution-role"))
            .token(&owner.token)
            .json(json!({"role": "bare"}))
            .send()
            .await;
        assert_eq!(res.status, StatusCode::OK, "{}", res.text);
        let (role, function): (uuid::Uuid, uuid::Uuid) =
            sqlx::query_as("SELECT execution_role_id, id FROM functions WHERE name = 'holder'")
                .fetch_one(&mut app.admin_conn().await)
                .await
                .unwrap();
        let (token, _) = app.state.keys.issue_role(role, t, function, std::time::Duration::from_secs(600)).unwrap();
        format!("nrc_{token}")
    };

    let doc = serde_json::to_value(nimbus_api::openapi::document()).unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let is_public = PUBLIC.contains(&(method.as_str(), path.as_str()));
            let declares_security = op.get("security").is_some();
            assert_eq!(
                !is_public, declares_security,
                "{method} {path}: public routes must be listed in PUBLIC, all others must declare security"
            );
            if is_public {
                continue;
            }
            let concrete = path
                .replace("{tenant_id}", &owner.tenant.to_string())
                .replace("{user_id}", &owner.id.to_string())
                .replace("{key_id}", &key_id.to_string())
                .replace("{function_name}", "fn-a")
                .replace("{version}", "1")
                .replace("{alias_name}", "live")
                .replace("{package_id}", &uuid::Uuid::now_v7().to_string())
                .replace("{upload_id}", &uuid::Uuid::now_v7().to_string())
                .replace("{node_id}", &uuid::Uuid::now_v7().to_string())
                .replace("{token_id}", &uuid::Uuid::now_v7().to_string())
                .replace("{sha256}", &"a".repeat(64))
                .replace("{pool}", "spot")
                .replace("{policy_name}", "Viewer")
                .replace("{group_name}", "deployers")
                .replace("{role_name}", "worker")
                .replace("{tag_key}", "team");
            assert!(!concrete.contains('{'), "no test value for a parameter of {path}");
            let m: Method = method.to_uppercase().parse().unwrap();
            let example = op
                .pointer("/requestBody/content/application~1json/example")
                .cloned()
                .unwrap_or(Value::Object(Default::default()));

            let res = with_body(app.req(m.clone(), &concrete), &m, &example).send().await;
            res.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");

            if path.contains("{tenant_id}") {
                let res = with_body(app.req(m.clone(), &concrete).token(&stranger.token), &m, &example).send().await;
                assert!(
                    res.status == StatusCode::NOT_FOUND || res.status == StatusCode::FORBIDDEN,
                    "{method} {path} let a stranger through: {} {}",
                    res.status,
                    res.text
                );
                for (who, token) in [("a member", &bare.token), ("an API key", &bare_key), ("a role", &bare_role)] {
                    let res = with_body(app.req(m.clone(), &concrete).token(token), &m, &example).send().await;
                    assert_eq!(
                        res.status,
                        StatusCode::FORBIDDEN,
                        "{method} {path} let {who} with no policies through: {}",
                        res.text
                    );
                    // The problem names the action and the resource.
                    let action = res.body["action"].as_str().unwrap_or_default();
                    assert!(nimbus_iam::lookup(action).is_some(), "{method} {path}: {}", res.text);
                    assert!(
                        res.body["resource"].as_str().is_some_and(|r| r.starts_with("nrn:nimbus:")),
                        "{}",
                        res.text
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} routes checked");
}

fn with_body<'a>(r: Req<'a>, m: &Method, example: &Value) -> Req<'a> {
    if m == Method::GET || m == Method::DELETE { r } else { r.json(example.clone()) }
}
