//! Roles and execution roles: a function's invocations get a credential for its role (through
//! the gateway, seen here by a stand-in agent) that can do exactly what the role's policies
//! allow; giving a role needs `iam:PassRole`; a credential is void once its function no longer
//! has the role.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    functions::{create_function, functions_path, publish, upload, wasm_module},
    gateway::{ready_node, stand_in_agent},
    helpers::{TestApp, User, spawn_app},
};

fn roles_path(u: &User) -> String {
    format!("/v1/tenants/{}/roles", u.tenant)
}

async fn function_with_version(app: &TestApp, owner: &User, name: &str) -> uuid::Uuid {
    assert_eq!(create_function(app, owner, json!({"name": name, "runtime": "wasm"})).await.status, StatusCode::CREATED);
    assert!(upload(app, owner, name, "application/wasm", wasm_module(1)).await.status.is_success());
    let v = publish(app, owner, name).await;
    assert_eq!(v.status, StatusCode::CREATED, "{}", v.text);
    v.body["id"].as_str().unwrap().parse().unwrap()
}

/// `PUT .../execution-role` of the function at `fpath`, as `user`.
async fn give_role(app: &TestApp, user: &User, fpath: &str, role: &str) -> crate::helpers::TestResponse {
    app.req(Method::PUT, &format!("{fpath}/execution-role")).token(&user.token).json(json!({"role": role})).send().await
}

async fn tenant_policy(app: &TestApp, owner: &User, name: &str, document: Value) {
    let res = app
        .post(&format!("/v1/tenants/{}/policies", owner.tenant))
        .token(&owner.token)
        .json(json!({"name": name, "document": document}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
}

#[tokio::test]
async fn roles_are_created_listed_attached_and_not_deleted_while_a_function_uses_them() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let res = app
        .post(&roles_path(&owner))
        .token(&owner.token)
        .json(json!({"name": "worker", "description": "runs the queue"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    assert_eq!(res.body["nrn"], format!("nrn:nimbus:iam:{}:role/worker", owner.tenant));
    app.post(&roles_path(&owner))
        .token(&owner.token)
        .json(json!({"name": "worker"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "role_exists");
    let bad = app.post(&roles_path(&owner)).token(&owner.token).json(json!({"name": "Not A Label"})).send().await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "name");
    let long = "x".repeat(1001);
    let bad =
        app.post(&roles_path(&owner)).token(&owner.token).json(json!({"name": "w2", "description": long})).send().await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "description");

    let path = format!("{}/worker", roles_path(&owner));
    let res = app.req(Method::PUT, &format!("{path}/policies/Invoker")).token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    let res = app
        .req(Method::PUT, &format!("{path}/boundary"))
        .token(&owner.token)
        .json(json!({"policy": "Viewer"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    app.req(Method::PUT, &format!("{path}/policies/NoSuchPolicy"))
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");

    assert_eq!(
        create_function(&app, &owner, json!({"name": "jobs", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let fpath = format!("{}/jobs", functions_path(owner.tenant));
    let res = give_role(&app, &owner, &fpath, "worker").await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    give_role(&app, &owner, &fpath, "nobody").await.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let f = app.get(&fpath).token(&owner.token).send().await;
    assert_eq!(f.body["execution_role"], "worker");

    let role = app.get(&path).token(&owner.token).send().await;
    assert_eq!(role.status, StatusCode::OK, "{}", role.text);
    assert_eq!(role.body["policies"], json!(["Invoker"]));
    assert_eq!(role.body["boundary"], "Viewer");
    assert_eq!(role.body["functions"], json!(["jobs"]));
    let list = app.get(&roles_path(&owner)).token(&owner.token).send().await;
    assert_eq!(list.body["roles"].as_array().unwrap().len(), 1);

    app.delete(&path).token(&owner.token).send().await.assert_problem(StatusCode::CONFLICT, "role_in_use");
    assert_eq!(app.get(&path).token(&owner.token).send().await.status, StatusCode::OK, "nothing was deleted");
    let res = app.delete(&format!("{fpath}/execution-role")).token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    assert_eq!(app.get(&fpath).token(&owner.token).send().await.body["execution_role"], Value::Null);
    assert_eq!(app.delete(&path).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    app.get(&path).token(&owner.token).send().await.assert_problem(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn giving_a_function_a_role_needs_pass_role_on_that_role() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let dev = app.sign_up("dev@example.com", "devs").await;
    app.add_member(&owner, owner.tenant, &dev, "developer").await;
    for name in ["worker", "admin-like"] {
        let res = app.post(&roles_path(&owner)).token(&owner.token).json(json!({"name": name})).send().await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    }
    assert_eq!(
        create_function(&app, &owner, json!({"name": "jobs", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let fpath = format!("{}/jobs", functions_path(owner.tenant));
    // A developer may change functions but not pass roles (the managed Developer has no PassRole).
    let denied = give_role(&app, &dev, &fpath, "worker").await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "iam:PassRole");
    assert_eq!(denied.body["resource"], format!("nrn:nimbus:iam:{}:role/worker", owner.tenant));
    // Allowed to pass exactly one role.
    tenant_policy(
        &app,
        &owner,
        "PassWorker",
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "iam:PassRole",
            "Resource": format!("nrn:nimbus:iam:{}:role/worker", owner.tenant)}]}),
    )
    .await;
    let res = app
        .req(Method::PUT, &format!("/v1/tenants/{}/members/{}/policies/PassWorker", owner.tenant, dev.id))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    let res = give_role(&app, &dev, &fpath, "worker").await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    give_role(&app, &dev, &fpath, "admin-like").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(app.get(&fpath).token(&owner.token).send().await.body["execution_role"], "worker");
}

#[tokio::test]
async fn an_invocation_credential_does_what_the_role_allows_and_nothing_else() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let caller = function_with_version(&app, &owner, "caller").await;
    let target = function_with_version(&app, &owner, "target").await;
    let (url, seen) = stand_in_agent().await;
    ready_node(&app, &admin, "w1", &url, &[caller, target]).await;
    let t = owner.tenant;
    tenant_policy(
        &app,
        &owner,
        "CallTarget",
        json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
            "Action": ["functions:InvokeFunction", "functions:GetFunction"],
            "Resource": format!("nrn:nimbus:functions:{t}:function/target")}]}),
    )
    .await;
    assert_eq!(
        app.post(&roles_path(&owner)).token(&owner.token).json(json!({"name": "worker"})).send().await.status,
        StatusCode::CREATED
    );
    let res = app
        .req(Method::PUT, &format!("/v1/tenants/{t}/roles/worker/policies/CallTarget"))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);

    // Without an execution role, an invocation gets no credential.
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let res =
        app.post("/fn/acme/caller:1").token(&owner.token).header("x-nimbus-credential", "nrc_forged").send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(seen.lock().unwrap().last().unwrap().role_credential, None, "a caller's header never reaches the agent");

    let fpath = format!("{}/caller", functions_path(t));
    let res = give_role(&app, &owner, &fpath, "worker").await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    app.state.routes.reload(&app.state.pool).await.unwrap();
    let res = app.post("/fn/acme/caller:1").token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let credential = seen.lock().unwrap().last().unwrap().role_credential.clone().expect("a credential");
    assert!(credential.starts_with("nrc_"), "{credential}");
    // The next invocation takes the same credential along (signed once per function).
    app.post("/fn/acme/caller:1").token(&owner.token).send().await;
    assert_eq!(seen.lock().unwrap().last().unwrap().role_credential.as_deref(), Some(credential.as_str()));

    // Who the credential is.
    let me = app.get("/v1/me").token(&credential).send().await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    assert_eq!(me.body["principal_type"], "role");
    assert_eq!(me.body["role"]["tenant_id"], t.to_string());

    // What the role allows.
    let got = app.get(&format!("{}/target", functions_path(t))).token(&credential).send().await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    let before = seen.lock().unwrap().len();
    let res = app.post("/fn/acme/target:1").token(&credential).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(seen.lock().unwrap().len(), before + 1, "the invocation reached the agent");
    // And nothing else.
    let denied = app.get(&format!("{}/caller", functions_path(t))).token(&credential).send().await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:GetFunction");
    app.post("/fn/acme/caller:1").token(&credential).send().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let denied = app.get(&functions_path(t)).token(&credential).send().await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:ListFunctions");
    app.post(&format!("/v1/tenants/{t}/api-keys"))
        .token(&credential)
        .json(json!({"name": "escape", "role": "none"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let other = app.sign_up("other@example.com", "globex").await;
    app.get(&functions_path(other.tenant))
        .token(&credential)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    // A forged or tampered credential is refused.
    let mut tampered = credential.clone();
    tampered.pop();
    tampered.push(if credential.ends_with('A') { 'B' } else { 'A' });
    app.get("/v1/me").token(&tampered).send().await.assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");
    // An access token is not a role credential, whatever prefix it gets.
    app.get("/v1/me")
        .token(&format!("nrc_{}", owner.token))
        .send()
        .await
        .assert_problem(StatusCode::UNAUTHORIZED, "unauthenticated");

    // The simulator explains the role's decisions.
    let sim = app
        .post(&format!("/v1/tenants/{t}/iam/simulate"))
        .token(&owner.token)
        .json(json!({"principal": {"role": "worker"}, "actions": ["functions:GetFunction"],
            "resources": [format!("nrn:nimbus:functions:{t}:function/target"), format!("nrn:nimbus:functions:{t}:function/caller")]}))
        .send()
        .await;
    assert_eq!(sim.status, StatusCode::OK, "{}", sim.text);
    let effects: Vec<&str> =
        sim.body["results"].as_array().unwrap().iter().map(|r| r["decision"].as_str().unwrap()).collect();
    assert_eq!(effects, ["allowed", "implicit_deny"], "{}", sim.text);

    // Policies changed on the role apply to credentials already out.
    let res = app.delete(&format!("/v1/tenants/{t}/roles/worker/policies/CallTarget")).token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    app.get(&format!("{}/target", functions_path(t)))
        .token(&credential)
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let res = app
        .req(Method::PUT, &format!("/v1/tenants/{t}/roles/worker/policies/CallTarget"))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.get(&format!("{}/target", functions_path(t))).token(&credential).send().await.status,
        StatusCode::OK
    );

    // Once the function no longer has the role, its credentials are void.
    let res = app.delete(&format!("{fpath}/execution-role")).token(&owner.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT);
    let void = app.get(&format!("{}/target", functions_path(t))).token(&credential).send().await;
    void.assert_problem(StatusCode::FORBIDDEN, "forbidden");
}
