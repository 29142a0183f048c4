//! IAM through the API: a tenant's policies (validated on save, versioned, deletable only when
//! detached), attachments and boundaries deciding what members and keys may do at once,
//! guardrails set by the platform, and the simulator's explanations.

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    functions::{create_function, functions_path},
    helpers::{TestApp, User, spawn_app},
};

fn policies(u: &User) -> String {
    format!("/v1/tenants/{}/policies", u.tenant)
}

fn doc(statements: Value) -> Value {
    json!({"Version": "2012-10-17", "Statement": statements})
}

async fn put(app: &TestApp, token: &str, path: &str, body: Value) -> crate::helpers::TestResponse {
    app.req(Method::PUT, path).token(token).json(body).send().await
}

#[tokio::test]
async fn policies_are_validated_versioned_and_deleted_only_when_detached() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;

    // Errors name the JSON path and the rule; nothing is stored.
    for (statements, field, rule) in [
        (
            json!([{"Effect": "Allow", "Action": "functions:Nope", "Resource": "*"}]),
            "document.Statement[0].Action",
            "unknown_action",
        ),
        (
            json!([{"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"},
                   {"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*",
                    "Condition": {"IpAddress": {"nimbus:SourceIp": "not-a-cidr"}}}]),
            "document.Statement[1].Condition.IpAddress.nimbus:SourceIp",
            "value",
        ),
    ] {
        let bad = app
            .post(&policies(&owner))
            .token(&owner.token)
            .json(json!({"name": "broken", "document": doc(statements)}))
            .send()
            .await;
        bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        let e = &bad.body["errors"][0];
        assert!(e["field"].as_str().unwrap().starts_with(field), "{}", bad.text);
        assert_eq!(e["rule"], rule, "{}", bad.text);
    }
    let none = app.get(&format!("{}/broken", policies(&owner))).token(&owner.token).send().await;
    none.assert_problem(StatusCode::NOT_FOUND, "not_found");
    let managed_name = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "Viewer", "document": doc(json!([{"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"}]))}))
        .send()
        .await;
    managed_name.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    // A valid but over-broad policy is saved, with the finding.
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "everything", "document": doc(json!([{"Effect": "Allow", "Action": "*", "Resource": "*"}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(created.body["findings"][0]["code"], "allow_all", "{}", created.text);
    assert_eq!(created.body["nrn"], format!("nrn:nimbus:iam:{}:policy/everything", owner.tenant));

    // Versions: a second one in force, back to the first, at most five.
    let v2 = app
        .post(&format!("{}/everything/versions", policies(&owner)))
        .token(&owner.token)
        .json(
            json!({"document": doc(json!([{"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"}]))}),
        )
        .send()
        .await;
    assert_eq!((v2.status, v2.body["version"].as_i64()), (StatusCode::CREATED, Some(2)), "{}", v2.text);
    let back =
        put(&app, &owner.token, &format!("{}/everything/default-version", policies(&owner)), json!({"version": 1}))
            .await;
    assert_eq!((back.status, back.body["default_version"].as_i64()), (StatusCode::OK, Some(1)), "{}", back.text);
    for _ in 3..=5 {
        let v = app
            .post(&format!("{}/everything/versions", policies(&owner)))
            .token(&owner.token)
            .json(json!({"document": doc(json!([{"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"}])), "set_as_default": false}))
            .send()
            .await;
        assert_eq!(v.status, StatusCode::CREATED, "{}", v.text);
    }
    let sixth = app
        .post(&format!("{}/everything/versions", policies(&owner)))
        .token(&owner.token)
        .json(
            json!({"document": doc(json!([{"Effect": "Allow", "Action": "functions:GetFunction", "Resource": "*"}]))}),
        )
        .send()
        .await;
    sixth.assert_problem(StatusCode::CONFLICT, "too_many_versions");
    let listed = app.get(&format!("{}/everything/versions", policies(&owner))).token(&owner.token).send().await;
    assert_eq!(listed.body["versions"].as_array().unwrap().len(), 5);
    let list = app.get(&policies(&owner)).token(&owner.token).send().await;
    let names: Vec<&str> =
        list.body["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"TenantAdmin") && names.contains(&"everything"), "{names:?}");

    // Attached: not deletable; detached: gone.
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "none").await;
    let attach = format!("/v1/tenants/{}/members/{}/policies/everything", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    let refused = app.delete(&format!("{}/everything", policies(&owner))).token(&owner.token).send().await;
    refused.assert_problem(StatusCode::CONFLICT, "policy_attached");
    assert_eq!(app.delete(&attach).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    let gone = app.delete(&format!("{}/everything", policies(&owner))).token(&owner.token).send().await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text);
    let after = app.get(&format!("{}/everything", policies(&owner))).token(&owner.token).send().await;
    after.assert_problem(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn attachments_boundaries_and_guardrails_decide_at_once() {
    let app = spawn_app().await;
    let admin = app.platform_admin().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    assert_eq!(
        create_function(&app, &owner, json!({"name": "web", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "none").await;
    let get_web =
        || async { app.get(&format!("{}/web", functions_path(owner.tenant))).token(&member.token).send().await };

    // Nothing attached: 403 naming the action and the resource.
    let denied = get_web().await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:GetFunction");
    assert_eq!(denied.body["resource"], format!("nrn:nimbus:functions:{}:function/web", owner.tenant));

    // A policy of the tenant's own, scoped to `web*` functions.
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "read-web", "document": doc(json!([{"Effect": "Allow",
            "Action": ["functions:GetFunction", "functions:ListFunctions"],
            "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/web*"}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let attach = format!("/v1/tenants/{}/members/{}/policies/read-web", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    assert_eq!(get_web().await.status, StatusCode::OK, "allowed as soon as it is attached");
    let in_acme = |u: &User, name: &str| {
        let req =
            app.post(&functions_path(owner.tenant)).token(&u.token).json(json!({"name": name, "runtime": "wasm"}));
        req.send()
    };
    let other = in_acme(&member, "web2").await;
    other.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(other.body["action"], "functions:CreateFunction");

    // A boundary caps even an admin's role: Viewer reads, never writes.
    let developer = app.sign_up("builder@example.com", "builder-home").await;
    app.add_member(&owner, owner.tenant, &developer, "developer").await;
    let boundary = format!("/v1/tenants/{}/members/{}/boundary", owner.tenant, developer.id);
    assert_eq!(put(&app, &owner.token, &boundary, json!({"policy": "Viewer"})).await.status, StatusCode::NO_CONTENT);
    let capped = in_acme(&developer, "capped").await;
    capped.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let read = app.get(&format!("{}/web", functions_path(owner.tenant))).token(&developer.token).send().await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    let shown = app
        .get(&format!("/v1/tenants/{}/members/{}/policies", owner.tenant, developer.id))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(shown.body, json!({"from_role": ["Developer", "Viewer"], "policies": [], "boundary": "Viewer"}));
    assert_eq!(app.delete(&boundary).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    let uncapped = in_acme(&developer, "uncapped").await;
    assert_eq!(uncapped.status, StatusCode::CREATED, "{}", uncapped.text);

    // A guardrail binds the tenant's admin too; only platform admins set it.
    let guardrail = format!("/v1/tenants/{}/guardrails", owner.tenant);
    let rail = json!({"document": doc(json!([
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "functions:DeleteFunction", "Resource": "*"}]))});
    put(&app, &owner.token, &guardrail, rail.clone()).await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let set = put(&app, &admin.token, &guardrail, rail).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text);
    let blocked = app.delete(&format!("{}/web", functions_path(owner.tenant))).token(&owner.token).send().await;
    blocked.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(app.delete(&guardrail).token(&admin.token).send().await.status, StatusCode::NO_CONTENT);
    let deleted = app
        .req(Method::DELETE, &format!("{}/web", functions_path(owner.tenant)))
        .token(&owner.token)
        .header("if-match", "*")
        .send()
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text);
}

#[tokio::test]
async fn the_simulator_explains_which_statement_decided() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "viewer").await;
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "deploy-from-office", "document": doc(json!([{"Sid": "OfficeDeploys", "Effect": "Allow",
            "Action": "functions:UpdateAlias", "Resource": "*",
            "Condition": {"IpAddress": {"nimbus:SourceIp": "10.0.0.0/8"}}}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let attach = format!("/v1/tenants/{}/members/{}/policies/deploy-from-office", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);

    let alias = format!("nrn:nimbus:functions:{}:function/web/alias/live", owner.tenant);
    let simulate = |ip: &'static str| {
        let body = json!({"principal": {"user_id": member.id}, "actions": ["functions:UpdateAlias", "functions:ListFunctions"],
                          "resources": [alias.clone()], "context": {"nimbus:SourceIp": ip}});
        let path = format!("/v1/tenants/{}/iam/simulate", owner.tenant);
        let token = owner.token.clone();
        let app = &app;
        async move { app.post(&path).token(&token).json(body).send().await }
    };
    let inside = simulate("10.1.2.3").await;
    assert_eq!(inside.status, StatusCode::OK, "{}", inside.text);
    let r = &inside.body["results"];
    assert_eq!(
        (r[0]["action"].as_str(), r[0]["decision"].as_str()),
        (Some("functions:UpdateAlias"), Some("allowed")),
        "{r}"
    );
    assert_eq!(r[0]["matched"][0]["policy"], "deploy-from-office", "{r}");
    assert_eq!(r[0]["matched"][0]["sid"], "OfficeDeploys", "{r}");
    assert_eq!(r[1]["decision"], "allowed", "the Viewer role lists functions: {r}");
    assert_eq!(r[1]["matched"][0]["policy"], "nrn:nimbus:iam::policy/Viewer", "{r}");
    let outside = simulate("192.0.2.1").await;
    assert_eq!(outside.body["results"][0]["decision"], "implicit_deny", "{}", outside.text);

    // Bad requests name the field.
    let bad = app
        .post(&format!("/v1/tenants/{}/iam/simulate", owner.tenant))
        .token(&owner.token)
        .json(json!({"principal": {"user_id": member.id}, "actions": ["functions:Nope"], "resources": ["*"]}))
        .send()
        .await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "actions[0]", "{}", bad.text);

    // The validator answers without saving.
    let v = app
        .post(&format!("/v1/tenants/{}/iam/validate", owner.tenant))
        .token(&owner.token)
        .json(json!({"document": doc(json!([{"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}]))}))
        .send()
        .await;
    assert_eq!((v.status, v.body["valid"].as_bool()), (StatusCode::OK, Some(true)), "{}", v.text);
    assert!(v.body["findings"].as_array().unwrap().iter().any(|f| f["code"] == "allow_not_action"), "{}", v.text);
}

#[tokio::test]
async fn access_reports_and_generated_policies_follow_recorded_activity() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let dev = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &dev, "developer").await;
    assert_eq!(
        create_function(&app, &owner, json!({"name": "api", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );

    // What the developer does in acme.
    let fns = functions_path(owner.tenant);
    let created = app.post(&fns).token(&dev.token).json(json!({"name": "web", "runtime": "wasm"})).send().await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    assert_eq!(app.get(&format!("{fns}/web")).token(&dev.token).send().await.status, StatusCode::OK);
    assert_eq!(app.get(&fns).token(&dev.token).send().await.status, StatusCode::OK);
    assert!(nimbus_api::authz::activity::flush(&app.state.pool).await.unwrap() >= 3);

    // The report: last used per action, and granted actions never used.
    let report = app
        .get(&format!("/v1/tenants/{}/iam/access-report?user_id={}&days=30", owner.tenant, dev.id))
        .token(&owner.token)
        .send()
        .await;
    assert_eq!(report.status, StatusCode::OK, "{}", report.text);
    let used: Vec<&str> =
        report.body["used"].as_array().unwrap().iter().map(|u| u["action"].as_str().unwrap()).collect();
    for a in ["functions:CreateFunction", "functions:GetFunction", "functions:ListFunctions"] {
        assert!(used.contains(&a), "{a} in {used:?}");
    }
    let unused: Vec<&str> = report.body["unused"].as_array().unwrap().iter().map(|u| u.as_str().unwrap()).collect();
    assert!(unused.contains(&"functions:DeleteFunction") && !unused.contains(&"functions:GetFunction"), "{unused:?}");
    assert!(!unused.iter().any(|a| a.starts_with("nodes:")), "platform actions are never granted: {unused:?}");

    // The generated policy, attached to a member with nothing else, allows the same and no more.
    let generated = app
        .post(&format!("/v1/tenants/{}/iam/generate-policy", owner.tenant))
        .token(&owner.token)
        .json(json!({"principal": {"user_id": dev.id}, "days": 30}))
        .send()
        .await;
    assert_eq!(generated.status, StatusCode::OK, "{}", generated.text);
    let saved = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "dev-activity", "document": generated.body["document"]}))
        .send()
        .await;
    assert_eq!(saved.status, StatusCode::CREATED, "{}", saved.text);
    let twin = app.sign_up("twin@example.com", "twin-home").await;
    app.add_member(&owner, owner.tenant, &twin, "none").await;
    let attach = format!("/v1/tenants/{}/members/{}/policies/dev-activity", owner.tenant, twin.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    assert_eq!(app.get(&format!("{fns}/web")).token(&twin.token).send().await.status, StatusCode::OK);
    assert_eq!(app.get(&fns).token(&twin.token).send().await.status, StatusCode::OK);
    let again = app.post(&fns).token(&twin.token).json(json!({"name": "web", "runtime": "wasm"})).send().await;
    again.assert_problem(StatusCode::CONFLICT, "function_name_taken");
    for denied in [
        app.get(&format!("{fns}/api")).token(&twin.token).send().await,
        app.req(Method::DELETE, &format!("{fns}/web")).token(&twin.token).header("if-match", "*").send().await,
        app.post(&fns).token(&twin.token).json(json!({"name": "other", "runtime": "wasm"})).send().await,
    ] {
        denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    }

    // A principal with no activity has nothing to generate from.
    let none = app
        .post(&format!("/v1/tenants/{}/iam/generate-policy", owner.tenant))
        .token(&owner.token)
        .json(json!({"principal": {"user_id": twin.id}, "days": 1}))
        .send()
        .await;
    none.assert_problem(StatusCode::CONFLICT, "no_activity");
}

#[tokio::test]
async fn a_groups_policies_apply_to_its_members_while_they_are_in_it() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    assert_eq!(
        create_function(&app, &owner, json!({"name": "web", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "none").await;
    let groups = format!("/v1/tenants/{}/groups", owner.tenant);
    let created = app.post(&groups).token(&owner.token).json(json!({"name": "readers"})).send().await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    app.post(&groups)
        .token(&owner.token)
        .json(json!({"name": "readers"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "group_exists");
    let get_web =
        || async { app.get(&format!("{}/web", functions_path(owner.tenant))).token(&member.token).send().await };

    assert_eq!(
        put(&app, &owner.token, &format!("{groups}/readers/policies/Viewer"), json!({})).await.status,
        StatusCode::NO_CONTENT
    );
    get_web().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let join = format!("{groups}/readers/members/{}", member.id);
    assert_eq!(put(&app, &owner.token, &join, json!({})).await.status, StatusCode::NO_CONTENT);
    assert_eq!(get_web().await.status, StatusCode::OK, "the group's Viewer applies");
    let shown = app.get(&format!("{groups}/readers")).token(&owner.token).send().await;
    assert_eq!(
        (shown.body["members"].clone(), shown.body["policies"].clone()),
        (json!([member.id]), json!(["Viewer"]))
    );
    // Someone outside the tenant cannot be added.
    let stranger = app.sign_up("stranger@example.com", "elsewhere").await;
    put(&app, &owner.token, &format!("{groups}/readers/members/{}", stranger.id), json!({}))
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");

    assert_eq!(app.delete(&join).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    get_web().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(put(&app, &owner.token, &join, json!({})).await.status, StatusCode::NO_CONTENT);
    assert_eq!(
        app.delete(&format!("{groups}/readers")).token(&owner.token).send().await.status,
        StatusCode::NO_CONTENT
    );
    get_web().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn conditions_see_what_a_request_asks_for() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "none").await;
    // Only small wasm functions, and only with a `team` tag.
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "small-wasm", "document": doc(json!([{"Effect": "Allow", "Action": "functions:CreateFunction",
            "Resource": "*", "Condition": {
                "StringEquals": {"functions:Runtime": "wasm"},
                "NumericLessThanEquals": {"functions:MemorySize": 256},
                "ForAnyValue:StringEquals": {"nimbus:TagKeys": "team"}}}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let attach = format!("/v1/tenants/{}/members/{}/policies/small-wasm", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    let create = |body: Value| {
        let req = app.post(&functions_path(owner.tenant)).token(&member.token).json(body);
        req.send()
    };
    let ok = create(json!({"name": "a", "runtime": "wasm", "memory_mb": 128, "tags": {"team": "web"}})).await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.text);
    for denied in [
        json!({"name": "b", "runtime": "wasm", "memory_mb": 512, "tags": {"team": "web"}}),
        json!({"name": "c", "runtime": "process", "entry": "run", "memory_mb": 128, "tags": {"team": "web"}}),
        json!({"name": "d", "runtime": "wasm", "memory_mb": 128}),
    ] {
        create(denied.clone()).await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    }

    // Changes too: growing past 256 MiB is refused, shrinking is not.
    let updates = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "small-updates", "document": doc(json!([{"Effect": "Allow", "Action": "functions:UpdateFunction",
            "Resource": "*", "Condition": {"NumericLessThanEquals": {"functions:MemorySize": 256}}}]))}))
        .send()
        .await;
    assert_eq!(updates.status, StatusCode::CREATED, "{}", updates.text);
    let attach = format!("/v1/tenants/{}/members/{}/policies/small-updates", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    let update = |memory: u32| {
        let req = app
            .patch(&format!("{}/a", functions_path(owner.tenant)))
            .token(&member.token)
            .header("if-match", "*")
            .json(json!({"memory_mb": memory}));
        req.send()
    };
    update(1024).await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(update(64).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_key_that_inherits_acts_with_its_creators_policies_as_they_change() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    assert_eq!(
        create_function(&app, &owner, json!({"name": "web", "runtime": "wasm"})).await.status,
        StatusCode::CREATED
    );
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, owner.tenant, &member, "developer").await;
    let created = app
        .post(&format!("/v1/tenants/{}/api-keys", owner.tenant))
        .token(&member.token)
        .json(json!({"name": "ci", "role": "none", "inherit": true}))
        .send()
        .await;
    assert_eq!(
        (created.status, created.body["inherits"].as_bool()),
        (StatusCode::CREATED, Some(true)),
        "{}",
        created.text
    );
    let key = created.body["secret"].as_str().unwrap().to_owned();
    let get_web = || async { app.get(&format!("{}/web", functions_path(owner.tenant))).token(&key).send().await };
    assert_eq!(get_web().await.status, StatusCode::OK, "the creator's Developer and Viewer");

    // The creator's boundary bounds the key too; lifting it lifts the key's.
    let boundary = format!("/v1/tenants/{}/members/{}/boundary", owner.tenant, member.id);
    assert_eq!(put(&app, &owner.token, &boundary, json!({"policy": "Invoker"})).await.status, StatusCode::NO_CONTENT);
    get_web().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(app.delete(&boundary).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    assert_eq!(get_web().await.status, StatusCode::OK);

    // The creator's role goes down to none: so does the key.
    let demoted = app
        .req(Method::PATCH, &format!("/v1/tenants/{}/members/{}", owner.tenant, member.id))
        .token(&owner.token)
        .json(json!({"role": "none"}))
        .send()
        .await;
    assert_eq!(demoted.status, StatusCode::OK, "{}", demoted.text);
    get_web().await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn attaching_can_be_delegated_for_named_policies_only() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let lead = app.sign_up("lead@example.com", "lead-home").await;
    let newcomer = app.sign_up("new@example.com", "new-home").await;
    app.add_member(&owner, owner.tenant, &lead, "none").await;
    app.add_member(&owner, owner.tenant, &newcomer, "none").await;
    // The team lead may hand out Viewer, and nothing else.
    let delegate = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "grant-viewer", "document": doc(json!([{"Effect": "Allow",
            "Action": ["iam:AttachUserPolicy", "iam:DetachUserPolicy"], "Resource": "*",
            "Condition": {"StringEquals": {"iam:PolicyNrn": "nrn:nimbus:iam::policy/Viewer"}}}]))}))
        .send()
        .await;
    assert_eq!(delegate.status, StatusCode::CREATED, "{}", delegate.text);
    let attach = |policy: &str| format!("/v1/tenants/{}/members/{}/policies/{policy}", owner.tenant, newcomer.id);
    assert_eq!(
        put(
            &app,
            &owner.token,
            &format!("/v1/tenants/{}/members/{}/policies/grant-viewer", owner.tenant, lead.id),
            json!({})
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(put(&app, &lead.token, &attach("Viewer"), json!({})).await.status, StatusCode::NO_CONTENT);
    let refused = put(&app, &lead.token, &attach("TenantAdmin"), json!({})).await;
    refused.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(refused.body["action"], "iam:AttachUserPolicy");
    assert_eq!(app.delete(&attach("Viewer")).token(&lead.token).send().await.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn rest_calls_on_a_function_see_its_tags_and_its_resource_policy() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let t = owner.tenant;
    for (name, env) in [("shop", "prod"), ("sandbox", "dev")] {
        let res = create_function(&app, &owner, json!({"name": name, "runtime": "wasm", "tags": {"env": env}})).await;
        assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    }
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, t, &member, "none").await;

    // Everything on functions, except changing production ones.
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "not-prod", "document": doc(json!([
            {"Effect": "Allow", "Action": ["functions:GetFunction", "functions:UpdateFunction"],
             "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/*"},
            {"Effect": "Deny", "Action": "functions:UpdateFunction",
             "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/*",
             "Condition": {"StringEquals": {"nimbus:ResourceTag/env": "prod"}}}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let attach = format!("/v1/tenants/{t}/members/{}/policies/not-prod", member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    let update = |name: &'static str| {
        app.req(Method::PATCH, &format!("{}/{name}", functions_path(t)))
            .token(&member.token)
            .header("if-match", "*")
            .json(json!({"memory_mb": 256}))
            .send()
    };
    let denied = update("shop").await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "functions:UpdateFunction");
    let fine = update("sandbox").await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.text);
    assert_eq!(fine.body["memory_mb"], 256);

    // A resource policy can allow a principal of the tenant what its identity policies do not.
    let reader = app.sign_up("reader@example.com", "reader-home").await;
    app.add_member(&owner, t, &reader, "none").await;
    let get = |name: &'static str| app.get(&format!("{}/{name}", functions_path(t))).token(&reader.token).send();
    get("shop").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let policy = json!({"document": doc(json!([{"Effect": "Allow", "Principal": {"Nimbus": format!("nrn:nimbus:iam:{t}:user/{}", reader.id)},
        "Action": "functions:GetFunction", "Resource": format!("nrn:nimbus:functions:{t}:function/shop")}]))});
    let set = put(&app, &owner.token, &format!("{}/shop/policy", functions_path(t)), policy).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text);
    assert_eq!(get("shop").await.status, StatusCode::OK, "the function's policy allows it");
    get("sandbox").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    // Only what the resource policy names: not changing it.
    app.req(Method::PATCH, &format!("{}/shop", functions_path(t)))
        .token(&reader.token)
        .header("if-match", "*")
        .json(json!({"memory_mb": 512}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn principal_tags_are_set_by_api_and_decide_through_policy_variables() {
    let app = spawn_app().await;
    let owner = app.sign_up("owner@example.com", "acme").await;
    let t = owner.tenant;
    for name in ["payments-api", "search-api"] {
        assert_eq!(
            create_function(&app, &owner, json!({"name": name, "runtime": "wasm"})).await.status,
            StatusCode::CREATED
        );
    }
    let member = app.sign_up("dev@example.com", "dev-home").await;
    app.add_member(&owner, t, &member, "none").await;
    let created = app
        .post(&policies(&owner))
        .token(&owner.token)
        .json(json!({"name": "own-team", "document": doc(json!([{"Effect": "Allow", "Action": "functions:GetFunction",
            "Resource": "nrn:nimbus:functions:${nimbus:TenantId}:function/${nimbus:PrincipalTag/team}-*"}]))}))
        .send()
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let attach = format!("/v1/tenants/{t}/members/{}/policies/own-team", member.id);
    assert_eq!(put(&app, &owner.token, &attach, json!({})).await.status, StatusCode::NO_CONTENT);
    let get = |name: &'static str| app.get(&format!("{}/{name}", functions_path(t))).token(&member.token).send();

    // No tag: the variable does not resolve, the statement does not apply.
    get("payments-api").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    let tags = format!("/v1/tenants/{t}/members/{}/tags", member.id);
    let set = put(&app, &owner.token, &tags, json!({"tags": {"team": "payments"}})).await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.text);
    assert_eq!(set.body["tags"], json!({"team": "payments"}));
    assert_eq!(get("payments-api").await.status, StatusCode::OK, "in force at once");
    get("search-api").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(put(&app, &owner.token, &tags, json!({"tags": {"team": "search"}})).await.status, StatusCode::OK);
    assert_eq!(get("search-api").await.status, StatusCode::OK);
    get("payments-api").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");

    // Rules, and who may tag.
    let bad = put(&app, &owner.token, &tags, json!({"tags": {"nimbus:team": "x"}})).await;
    bad.assert_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(bad.body["errors"][0]["field"], "tags.nimbus:team");
    assert_eq!(get("search-api").await.status, StatusCode::OK, "a refused change changes nothing");
    let denied = put(&app, &member.token, &tags, json!({"tags": {"team": "payments"}})).await;
    denied.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(denied.body["action"], "iam:TagPrincipal");
    let listed = app.get(&format!("/v1/tenants/{t}/members")).token(&owner.token).send().await;
    let shown =
        listed.body["items"].as_array().unwrap().iter().find(|m| m["user_id"] == member.id.to_string()).cloned();
    assert_eq!(shown.unwrap()["tags"], json!({"team": "search"}));

    assert_eq!(app.delete(&format!("{tags}/team")).token(&owner.token).send().await.status, StatusCode::NO_CONTENT);
    get("search-api").await.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    app.delete(&format!("{tags}/team"))
        .token(&owner.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
}
