//! Tenant isolation: through the API (a stranger gets 404 on every tenant-B resource) and in
//! the database itself (row-level security hides other tenants' rows from a query that forgets
//! its tenant filter, when run as the application role).

use axum::http::StatusCode;
use nimbus_api::db::{self, Scope};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::spawn_app;

#[tokio::test]
async fn user_of_tenant_a_cannot_reach_tenant_b() {
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    let (b_key_id, _) = app.create_key(&b.token, b.tenant, "viewer").await;
    let (_, a_key) = app.create_key(&a.token, a.tenant, "admin").await;
    let t = b.tenant;

    for token in [&a.token, &a_key] {
        let cases = [
            app.get(&format!("/v1/tenants/{t}")).token(token).send().await,
            app.patch(&format!("/v1/tenants/{t}")).token(token).json(json!({"display_name": "pwned"})).send().await,
            app.get(&format!("/v1/tenants/{t}/members")).token(token).send().await,
            app.post(&format!("/v1/tenants/{t}/members"))
                .token(token)
                .json(json!({"email": "a@example.com", "role": "admin"}))
                .send()
                .await,
            app.patch(&format!("/v1/tenants/{t}/members/{}", b.id))
                .token(token)
                .json(json!({"role": "viewer"}))
                .send()
                .await,
            app.delete(&format!("/v1/tenants/{t}/members/{}", b.id)).token(token).send().await,
            app.get(&format!("/v1/tenants/{t}/api-keys")).token(token).send().await,
            app.post(&format!("/v1/tenants/{t}/api-keys"))
                .token(token)
                .json(json!({"name": "x", "role": "viewer"}))
                .send()
                .await,
            app.delete(&format!("/v1/tenants/{t}/api-keys/{b_key_id}")).token(token).send().await,
            app.get(&format!("/v1/tenants/{t}/audit-log")).token(token).send().await,
        ];
        for res in cases {
            res.assert_problem(StatusCode::NOT_FOUND, "not_found");
        }
    }
    // Tenant B is untouched and not listed for A.
    let got = app.get(&format!("/v1/tenants/{t}")).token(&b.token).send().await;
    assert_eq!(got.body["display_name"], "tenant-b");
    let members = app.get(&format!("/v1/tenants/{t}/members")).token(&b.token).send().await;
    assert_eq!(members.body["items"].as_array().unwrap().len(), 1);
    let mine = app.get("/v1/tenants").token(&a.token).send().await;
    assert!(!mine.text.contains(&t.to_string()));
    let keys = app.get(&format!("/v1/tenants/{t}/api-keys")).token(&b.token).send().await;
    assert!(keys.body["items"][0]["revoked_at"].is_null());
}

#[tokio::test]
async fn the_application_role_is_subject_to_rls() {
    let app = spawn_app().await;
    let mut conn = db::begin(&app.state.pool, &Scope::default()).await.unwrap();
    let (user, superuser, bypass): (String, bool, bool) =
        sqlx::query_as("SELECT current_user::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!((user.as_str(), superuser, bypass), ("nimbus_app", false, false));
    // RESET ROLE returns to the session's startup role, not to the login role.
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    let user: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&mut *conn).await.unwrap();
    assert_eq!(user, "nimbus_app");
    // The audit log is append-only for the application.
    let err = sqlx::query("UPDATE audit_log SET action = 'x'").execute(&mut *conn).await.unwrap_err();
    assert!(err.to_string().contains("permission denied"), "{err}");
}

#[tokio::test]
async fn every_tenant_table_has_forced_rls() {
    let app = spawn_app().await;
    let mut c = app.admin_conn().await;
    let tables: Vec<(String, bool, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind = 'r' AND (c.relname IN ('users', 'tenants') OR EXISTS ( \
           SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname IN ('tenant_id', 'user_id') AND NOT a.attisdropped))",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert!(tables.len() >= 6, "{tables:?}");
    for (name, enabled, forced) in tables {
        assert!(enabled && forced, "table {name} must ENABLE and FORCE row level security");
    }
}

/// Counts rows a deliberately unscoped query sees, as the application role with `scope`.
async fn unscoped(app: &crate::helpers::TestApp, scope: &Scope, table: &str, column: &str) -> Vec<Option<Uuid>> {
    let mut tx = db::begin(&app.state.pool, scope).await.unwrap();
    // No WHERE clause on purpose: this is the query that "forgot" its tenant filter.
    let rows: Vec<Option<Uuid>> =
        sqlx::query_scalar(&format!("SELECT {column} FROM {table}")).fetch_all(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    rows
}

#[tokio::test]
async fn a_query_that_forgets_its_tenant_filter_sees_nothing_of_other_tenants() {
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    app.create_key(&a.token, a.tenant, "viewer").await;
    app.create_key(&b.token, b.tenant, "viewer").await;

    // The rows exist: the privileged connection sees both tenants.
    let mut c = app.admin_conn().await;
    let all: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT tenant_id) FROM api_keys").fetch_one(&mut c).await.unwrap();
    assert_eq!(all, 2);

    let scope_b = Scope::tenant(b.tenant, Some(b.id));
    for (table, column) in
        [("api_keys", "tenant_id"), ("memberships", "tenant_id"), ("audit_log", "tenant_id"), ("tenants", "id")]
    {
        let seen = unscoped(&app, &scope_b, table, column).await;
        assert!(!seen.is_empty(), "{table}: B's own rows are visible");
        assert!(
            seen.iter().all(|t| *t == Some(b.tenant) || t.is_none()),
            "{table}: saw another tenant's rows: {seen:?}"
        );
    }
    let users = unscoped(&app, &scope_b, "users", "id").await;
    assert_eq!(users, [Some(b.id)], "only B's own user row (B's tenant has no other members)");
    let tokens = unscoped(&app, &scope_b, "refresh_tokens", "user_id").await;
    assert!(tokens.iter().all(|u| *u == Some(b.id)) && !tokens.is_empty());

    // With no scope at all, nothing is visible.
    for (table, column) in [
        ("api_keys", "tenant_id"),
        ("memberships", "tenant_id"),
        ("tenants", "id"),
        ("users", "id"),
        ("refresh_tokens", "user_id"),
        ("audit_log", "tenant_id"),
    ] {
        assert!(unscoped(&app, &Scope::default(), table, column).await.is_empty(), "{table} leaks without a scope");
    }

    // Writes are checked too: the application cannot insert a row into another tenant.
    let mut tx = db::begin(&app.state.pool, &scope_b).await.unwrap();
    let err = sqlx::query("INSERT INTO memberships (tenant_id, user_id, role) VALUES ($1, $2, 'admin')")
        .bind(a.tenant)
        .bind(b.id)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("row-level security"), "{err}");
}

#[tokio::test]
async fn writes_stay_in_the_scoped_tenant_even_where_reads_are_wider() {
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    // A is a viewer in B, so A can read B's tenant row, and B's key is found by its prefix.
    app.add_member(&b, b.tenant, &a, "viewer").await;
    let (b_key, _) = app.create_key(&b.token, b.tenant, "viewer").await;
    let mut c = app.admin_conn().await;
    let b_prefix: String =
        sqlx::query_scalar("SELECT prefix FROM api_keys WHERE id = $1").bind(b_key).fetch_one(&mut c).await.unwrap();

    let scope = Scope { api_key_prefix: Some(b_prefix), ..Scope::tenant(a.tenant, Some(a.id)) };
    let mut tx = db::begin(&app.state.pool, &scope).await.unwrap();
    let visible: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants WHERE id = $1")
        .bind(b.tenant)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible, 1, "the read policy lets A see a tenant it belongs to");
    let writes = [
        sqlx::query("DELETE FROM tenants WHERE id = $1").bind(b.tenant).execute(&mut *tx).await.unwrap(),
        sqlx::query("UPDATE tenants SET display_name = 'x' WHERE id = $1")
            .bind(b.tenant)
            .execute(&mut *tx)
            .await
            .unwrap(),
        sqlx::query("UPDATE memberships SET role = 'admin' WHERE tenant_id = $1 AND user_id = $2")
            .bind(b.tenant)
            .bind(a.id)
            .execute(&mut *tx)
            .await
            .unwrap(),
        sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE id = $1")
            .bind(b_key)
            .execute(&mut *tx)
            .await
            .unwrap(),
    ];
    for w in writes {
        assert_eq!(w.rows_affected(), 0, "a write reached another tenant's row");
    }
    tx.commit().await.unwrap();
    let role: String = sqlx::query_scalar("SELECT role FROM memberships WHERE tenant_id = $1 AND user_id = $2")
        .bind(b.tenant)
        .bind(a.id)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(role, "viewer");
}

#[tokio::test]
async fn a_login_as_nimbus_app_has_no_stronger_role_to_return_to() {
    use sqlx::ConnectOptions;
    let app = spawn_app().await;
    // The default test set-up logs in as a superuser and acts as nimbus_app; that is detected.
    assert!(app.state.pool.login_can_bypass_rls().await.unwrap());

    let mut c = app.admin_conn().await;
    sqlx::query("ALTER ROLE nimbus_app LOGIN").execute(&mut c).await.unwrap();
    let opts: sqlx::postgres::PgConnectOptions = app.db_url.parse().unwrap();
    let url = opts.username("nimbus_app").to_url_lossy().to_string();
    let pool = db::connect_app(&url, 1).await.unwrap();
    assert!(!pool.login_can_bypass_rls().await.unwrap());
    let mut tx = db::begin(&pool, &Scope::default()).await.unwrap();
    sqlx::query("SET ROLE NONE").execute(&mut *tx).await.unwrap();
    let (user, superuser, bypass): (String, bool, bool) =
        sqlx::query_as("SELECT current_user::text, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!((user.as_str(), superuser, bypass), ("nimbus_app", false, false));
}
