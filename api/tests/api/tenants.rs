//! Tenants and members: create, list, get, rename; add by e-mail, change role, remove; the
//! last admin stays; roles are enforced; audit rows are written.

use axum::http::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn create_list_get_rename() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let res = app
        .post("/v1/tenants")
        .token(&ada.token)
        .json(json!({"name": "second", "display_name": "Second"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::CREATED, "{}", res.text);
    let second = res.body["id"].as_str().unwrap().to_owned();
    assert_eq!(res.body["role"], "admin");

    app.post("/v1/tenants")
        .token(&ada.token)
        .json(json!({"name": "second"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "tenant_name_taken");

    // Paginated list of mine.
    let page1 = app.get("/v1/tenants?limit=1").token(&ada.token).send().await;
    assert_eq!(page1.body["items"].as_array().unwrap().len(), 1);
    let cursor = page1.body["next_cursor"].as_str().expect("a second page").to_owned();
    let page2 = app.get(&format!("/v1/tenants?limit=1&after={cursor}")).token(&ada.token).send().await;
    assert_eq!(page2.body["items"][0]["id"], second);
    assert!(page2.body["next_cursor"].is_null());

    let res = app
        .patch(&format!("/v1/tenants/{second}"))
        .token(&ada.token)
        .json(json!({"display_name": "Second Inc", "name": "second-inc"}))
        .send()
        .await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let got = app.get(&format!("/v1/tenants/{second}")).token(&ada.token).send().await;
    assert_eq!(
        (got.body["name"].as_str(), got.body["display_name"].as_str()),
        (Some("second-inc"), Some("Second Inc"))
    );

    let actions = app.audit_actions(Some(second.parse().unwrap())).await;
    assert_eq!(
        actions,
        [("tenants:CreateTenant".to_owned(), "success".to_owned()), ("tenants:UpdateTenant".into(), "success".into())]
    );
}

#[tokio::test]
async fn members_and_the_last_admin() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let bob = app.sign_up("bob@example.com", "bobs").await;
    let base = format!("/v1/tenants/{}/members", ada.tenant);

    app.post(&base)
        .token(&ada.token)
        .json(json!({"email": "nobody@example.com", "role": "viewer"}))
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");
    app.add_member(&ada, ada.tenant, &bob, "viewer").await;
    app.post(&base)
        .token(&ada.token)
        .json(json!({"email": "bob@example.com", "role": "viewer"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "already_member");

    let list = app.get(&base).token(&bob.token).send().await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 2, "{}", list.text);

    // The only admin cannot leave or step down.
    app.delete(&format!("{base}/{}", ada.id))
        .token(&ada.token)
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "last_admin");
    app.patch(&format!("{base}/{}", ada.id))
        .token(&ada.token)
        .json(json!({"role": "developer"}))
        .send()
        .await
        .assert_problem(StatusCode::CONFLICT, "last_admin");

    // With a second admin, the first may step down.
    let res = app.patch(&format!("{base}/{}", bob.id)).token(&ada.token).json(json!({"role": "admin"})).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    assert_eq!(res.body["role"], "admin");
    let res = app.delete(&format!("{base}/{}", ada.id)).token(&bob.token).send().await;
    assert_eq!(res.status, StatusCode::NO_CONTENT, "{}", res.text);
    // Ada is no longer in the tenant.
    app.get(&format!("/v1/tenants/{}", ada.tenant))
        .token(&ada.token)
        .send()
        .await
        .assert_problem(StatusCode::NOT_FOUND, "not_found");

    let actions: Vec<String> = app.audit_actions(Some(ada.tenant)).await.into_iter().map(|a| a.0).collect();
    for a in ["tenants:AddMember", "tenants:UpdateMember", "tenants:RemoveMember"] {
        assert!(actions.iter().any(|x| x == a), "{a} missing from {actions:?}");
    }
}

#[tokio::test]
async fn viewer_cannot_write_and_developer_cannot_administer() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    let vic = app.sign_up("vic@example.com", "vics").await;
    let dev = app.sign_up("dev@example.com", "devs").await;
    app.add_member(&ada, ada.tenant, &vic, "viewer").await;
    app.add_member(&ada, ada.tenant, &dev, "developer").await;
    let t = ada.tenant;

    // Reads work for a viewer.
    assert_eq!(app.get(&format!("/v1/tenants/{t}")).token(&vic.token).send().await.status, StatusCode::OK);
    assert_eq!(app.get(&format!("/v1/tenants/{t}/members")).token(&vic.token).send().await.status, StatusCode::OK);

    let res = app.patch(&format!("/v1/tenants/{t}")).token(&vic.token).json(json!({"display_name": "X"})).send().await;
    res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(res.body["action"], "tenants:UpdateTenant");
    assert_eq!(res.body["resource"], format!("nrn:nimbus:tenants:{t}:tenant/{t}"));
    app.post(&format!("/v1/tenants/{t}/api-keys"))
        .token(&vic.token)
        .json(json!({"name": "k", "role": "viewer"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");
    app.get(&format!("/v1/tenants/{t}/audit-log"))
        .token(&vic.token)
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");

    // A developer can make keys but not manage members.
    app.create_key(&dev.token, t, "viewer").await;
    let res = app
        .post(&format!("/v1/tenants/{t}/members"))
        .token(&dev.token)
        .json(json!({"email": "vic@example.com", "role": "admin"}))
        .send()
        .await;
    res.assert_problem(StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(res.body["action"], "tenants:AddMember");

    // A viewer API key cannot write either.
    let (_, viewer_key) = app.create_key(&ada.token, t, "viewer").await;
    app.patch(&format!("/v1/tenants/{t}"))
        .token(&viewer_key)
        .json(json!({"display_name": "X"}))
        .send()
        .await
        .assert_problem(StatusCode::FORBIDDEN, "forbidden");

    // Nothing changed.
    let got = app.get(&format!("/v1/tenants/{t}")).token(&ada.token).send().await;
    assert_eq!(got.body["display_name"], "acme");
}

#[tokio::test]
async fn audit_rows_record_who_what_and_where() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    app.patch(&format!("/v1/tenants/{}", ada.tenant))
        .token(&ada.token)
        .peer_ip([203, 0, 113, 9])
        .header("user-agent", "audit-test/1")
        .header("x-request-id", "req-audit-1")
        .json(json!({"display_name": "Acme"}))
        .send()
        .await;
    let res = app.get(&format!("/v1/tenants/{}/audit-log", ada.tenant)).token(&ada.token).send().await;
    assert_eq!(res.status, StatusCode::OK, "{}", res.text);
    let items = res.body["items"].as_array().unwrap();
    let row = items.iter().find(|r| r["action"] == "tenants:UpdateTenant").expect("an audit row");
    assert_eq!(row["actor_type"], "user");
    assert_eq!(row["actor_id"], ada.id.to_string());
    assert_eq!(row["source_ip"], "203.0.113.9");
    assert_eq!(row["user_agent"], "audit-test/1");
    assert_eq!(row["request_id"], "req-audit-1");
    assert_eq!(row["details"]["to"]["display_name"], "Acme");
    assert!(row["created_at"].is_string());
    // Sign-up itself is recorded outside the tenant.
    assert!(app.audit_actions(None).await.contains(&("auth:SignUp".into(), "success".into())));
}
