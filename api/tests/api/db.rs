//! The application pool and its transactions: a transaction dropped without COMMIT is rolled
//! back before its connection is reused, and a query cancelled half-way leaves nothing behind
//! for the next user of the connection.

use std::time::Duration;

use nimbus_api::db::{self, Scope};
use uuid::Uuid;

use crate::helpers::spawn_app;

#[tokio::test]
async fn dropped_transactions_roll_back_and_settings_do_not_leak() {
    let app = spawn_app().await;
    let ada = app.sign_up("ada@example.com", "acme").await;
    // One connection, so every step below reuses it.
    let pool = db::connect_app(&app.db_url, 1).await.unwrap();

    let mut tx = db::begin(&pool, &Scope::tenant(ada.tenant, Some(ada.id))).await.unwrap();
    sqlx::query("UPDATE tenants SET display_name = 'changed' WHERE id = $1")
        .bind(ada.tenant)
        .execute(&mut *tx)
        .await
        .unwrap();
    drop(tx);

    let mut tx = db::begin(&pool, &Scope::default()).await.unwrap();
    let (tenant, user): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT nullif(current_setting('nimbus.tenant_id', true), ''), nullif(current_setting('nimbus.user_id', true), '')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!((tenant, user), (None, None), "the previous transaction's scope is gone");
    tx.commit().await.unwrap();

    let mut c = app.admin_conn().await;
    let name: String = sqlx::query_scalar("SELECT display_name FROM tenants WHERE id = $1")
        .bind(ada.tenant)
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(name, "acme", "the dropped transaction was rolled back");
}

#[tokio::test]
async fn a_cancelled_query_leaves_the_connection_clean() {
    let app = spawn_app().await;
    let pool = db::connect_app(&app.db_url, 1).await.unwrap();
    let mut tx = db::begin(&pool, &Scope::default()).await.unwrap();
    let slow = sqlx::query_scalar::<_, i32>("SELECT 7 FROM pg_sleep(0.3)").fetch_one(&mut *tx);
    assert!(tokio::time::timeout(Duration::from_millis(20), slow).await.is_err(), "the query was cut off");
    drop(tx);

    // The next user of the only connection gets its own answer, not the leftover one.
    let id = Uuid::now_v7();
    let mut tx = db::begin(&pool, &Scope::default()).await.unwrap();
    let echoed: Uuid = sqlx::query_scalar("SELECT $1::uuid").bind(id).fetch_one(&mut *tx).await.unwrap();
    assert_eq!(echoed, id);
    tx.commit().await.unwrap();
}

#[derive(sqlx::FromRow, Debug, PartialEq)]
struct UserRow {
    id: Uuid,
    email: String,
}

#[tokio::test]
async fn hot_reads_are_scoped_by_rls_and_leave_nothing_behind() {
    use nimbus_api::db::Hot;
    let app = spawn_app().await;
    let a = app.sign_up("a@example.com", "tenant-a").await;
    let b = app.sign_up("b@example.com", "tenant-b").await;
    let pool = db::connect_app(&app.db_url, 1).await.unwrap();

    let own: Vec<UserRow> = db::read_hot(&pool, &Scope::user(a.id), Hot::UserById, &a.id.to_string()).await.unwrap();
    assert_eq!(own, [UserRow { id: a.id, email: "a@example.com".into() }]);
    // B's row is invisible to A: the statement runs under A's scope, as the application role.
    let other: Vec<UserRow> = db::read_hot(&pool, &Scope::user(a.id), Hot::UserById, &b.id.to_string()).await.unwrap();
    assert!(other.is_empty());
    let unscoped: Vec<UserRow> =
        db::read_hot(&pool, &Scope::default(), Hot::UserById, &a.id.to_string()).await.unwrap();
    assert!(unscoped.is_empty());

    // Nothing of the scope survives the read on the (only) connection.
    let mut tx = db::begin(&pool, &Scope::default()).await.unwrap();
    let left: Option<String> = sqlx::query_scalar("SELECT nullif(current_setting('nimbus.user_id', true), '')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(left, None);
    tx.commit().await.unwrap();

    // Values that are not plain are refused before anything is sent; a failing read leaves the
    // connection usable.
    let quote = db::read_hot::<UserRow>(&pool, &Scope::user(a.id), Hot::UserById, "x'; DROP TABLE users; --").await;
    assert!(quote.is_err());
    assert!(db::read_hot::<UserRow>(&pool, &Scope::user(a.id), Hot::UserById, "not-a-uuid").await.is_err());
    let again: Vec<UserRow> = db::read_hot(&pool, &Scope::user(b.id), Hot::UserById, &b.id.to_string()).await.unwrap();
    assert_eq!(again.len(), 1);
}
