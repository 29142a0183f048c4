//! Pools for platform admins: the nodes that share a value of the `pool` label (`pool=spot`,
//! `pool=reserved`, ...), and dedicating a pool to one tenant: that tenant's functions then run
//! only on the pool's nodes, and no other tenant's function is placed there (the autoscaler reads
//! dedications every tick).

use axum::{Json, extract::State, http::StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    audit::{self, Entry},
    auth::{Principal, RequestContext},
    authz::{self, Action, nrn},
    db::{self, Scope, Tx},
    error::{ApiError, ApiResult, FieldError},
    extract::{self, Path},
    pagination::Page,
    startup::AppState,
};

/// The node label whose value names a node's pool.
pub const POOL_LABEL: &str = "pool";
/// Longest pool name.
pub const MAX_POOL_NAME: usize = 63;

/// The tenant a pool is dedicated to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PoolTenant {
    /// Tenant id.
    pub id: Uuid,
    /// Tenant name.
    pub name: String,
}

/// A pool: the nodes whose `pool` label has this value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Pool {
    /// The value of the nodes' `pool` label.
    pub name: String,
    /// Nodes in it (not removed).
    pub nodes: i64,
    /// The tenant it is dedicated to, if any.
    pub dedicated_to: Option<PoolTenant>,
    /// When it was dedicated to that tenant.
    pub dedicated_at: Option<DateTime<Utc>>,
}

/// Body of `PUT /v1/pools/{pool}/dedication`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DedicatePoolRequest {
    /// The tenant the pool is for (its id, as in node assignments).
    pub tenant_id: Uuid,
}

/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_pools)).routes(routes!(dedicate_pool, undedicate_pool))
}

/// Checks a pool name as `pool_dedications` does: 1–63 letters, digits, `.`, `_` or `-`, starting
/// with a letter or digit. A bad one is a 400 naming the `pool` path parameter.
fn check_pool(pool: &str) -> Result<(), ApiError> {
    let ok = pool.len() <= MAX_POOL_NAME
        && pool.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && pool.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidPath(vec![FieldError::new(
            "pool",
            "format",
            format!(
                "pool names are 1–{MAX_POOL_NAME} letters, digits, `.`, `_` or `-`, starting with a letter or digit"
            ),
        )]))
    }
}

/// A pool as read: name, nodes, dedicated tenant, dedicated at.
type PoolRow = (String, i64, Option<Uuid>, Option<DateTime<Utc>>);

/// Every pool, or the one named `only`: pools with nodes, and dedicated pools without any.
async fn read_pools(tx: &mut Tx, only: Option<&str>, user: Option<Uuid>) -> Result<Vec<Pool>, ApiError> {
    let rows: Vec<PoolRow> = sqlx::query_as(
        "WITH counted AS (SELECT labels->>$1 AS pool, count(*) AS nodes FROM nodes \
           WHERE state <> 'removed' AND coalesce(labels->>$1, '') <> '' GROUP BY 1) \
         SELECT coalesce(c.pool, d.pool), coalesce(c.nodes, 0), d.tenant_id, d.created_at \
         FROM counted c FULL JOIN pool_dedications d ON d.pool = c.pool \
         WHERE $2::text IS NULL OR coalesce(c.pool, d.pool) = $2 ORDER BY 1",
    )
    .bind(POOL_LABEL)
    .bind(only)
    .fetch_all(&mut **tx)
    .await?;
    let mut pools = Vec::with_capacity(rows.len());
    for (name, nodes, tenant, dedicated_at) in rows {
        let dedicated_to = match tenant {
            Some(id) => tenant_name(tx, id, user).await?.map(|name| PoolTenant { id, name }),
            None => None,
        };
        pools.push(Pool { name, nodes, dedicated_to, dedicated_at });
    }
    Ok(pools)
}

/// A tenant's name, read in that tenant's scope (the platform scope does not see tenants); the
/// transaction is back in the platform scope afterwards.
async fn tenant_name(tx: &mut Tx, tenant: Uuid, user: Option<Uuid>) -> Result<Option<String>, ApiError> {
    db::set_scope(tx, &Scope { tenant: Some(tenant), platform: true, user, ..Scope::default() }).await?;
    let name: Option<String> =
        sqlx::query_scalar("SELECT name FROM tenants WHERE id = $1").bind(tenant).fetch_optional(&mut **tx).await?;
    db::set_scope(tx, &Scope::platform(user)).await?;
    Ok(name)
}

async fn audit_pool(
    tx: &mut Tx,
    ctx: &RequestContext,
    principal: &Principal,
    action: Action,
    pool: &str,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    audit::record(
        tx,
        ctx,
        Entry {
            tenant: None,
            actor: principal.into(),
            action: action.name(),
            resource: nrn::pool(pool),
            success: true,
            details,
        },
    )
    .await
}

/// List pools (platform admins): every value of the `pool` label among nodes that are not
/// removed, with its node count and dedication, and dedicated pools that have no nodes. The list
/// is short (one entry per pool) and comes in one page.
#[utoipa::path(
    get,
    path = "/v1/pools",
    tag = "nodes",
    responses(
        (status = 200, description = "Every pool", body = Page<Pool>),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list_pools(State(state): State<AppState>, principal: Principal) -> ApiResult<Json<Page<Pool>>> {
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::ListPools, &nrn::pool("*")).await?;
    let items = read_pools(&mut tx, None, principal.user_id()).await?;
    tx.commit().await?;
    Ok(Json(Page { items, next_cursor: None }))
}

/// Dedicate a pool to a tenant (platform admins), replacing any earlier dedication. The pool
/// need not have nodes yet: nodes that join with its label belong to the tenant at once.
#[utoipa::path(
    put,
    path = "/v1/pools/{pool}/dedication",
    tag = "nodes",
    params(("pool" = String, Path, description = "Pool name (the nodes' `pool` label)")),
    request_body(content = DedicatePoolRequest, example = json!({"tenant_id": "0190f0e0-0000-7000-8000-000000000001"})),
    responses(
        (status = 200, description = "The dedicated pool", body = Pool),
        (status = 400, description = "Invalid pool name", body = crate::error::Problem),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 422, description = "Invalid field or unknown tenant", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn dedicate_pool(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(pool): Path<String>,
    extract::Json(req): extract::Json<DedicatePoolRequest>,
) -> ApiResult<Json<Pool>> {
    check_pool(&pool)?;
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::DedicatePool, &nrn::pool(&pool)).await?;
    let user = principal.user_id();
    if tenant_name(&mut tx, req.tenant_id, user).await?.is_none() {
        return Err(ApiError::Validation(vec![FieldError::new(
            "tenant_id",
            "exists",
            format!("there is no tenant {}", req.tenant_id),
        )]));
    }
    let previous: Option<Uuid> =
        sqlx::query_scalar("SELECT tenant_id FROM pool_dedications WHERE pool = $1 FOR UPDATE")
            .bind(&pool)
            .fetch_optional(&mut *tx)
            .await?;
    if previous != Some(req.tenant_id) {
        sqlx::query(
            "INSERT INTO pool_dedications (pool, tenant_id, created_by) VALUES ($1, $2, $3) \
             ON CONFLICT (pool) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, created_by = EXCLUDED.created_by, \
             created_at = now()",
        )
        .bind(&pool)
        .bind(req.tenant_id)
        .bind(user)
        .execute(&mut *tx)
        .await?;
        audit_pool(
            &mut tx,
            &ctx,
            &principal,
            Action::DedicatePool,
            &pool,
            json!({ "tenant_id": req.tenant_id, "previous_tenant_id": previous }),
        )
        .await?;
    }
    let out = read_pools(&mut tx, Some(&pool), user).await?.pop().ok_or(ApiError::NotFound("pool"))?;
    tx.commit().await?;
    Ok(Json(out))
}

/// End a pool's dedication (platform admins): its nodes take any tenant's functions again, and
/// the tenant's functions may run anywhere.
#[utoipa::path(
    delete,
    path = "/v1/pools/{pool}/dedication",
    tag = "nodes",
    params(("pool" = String, Path, description = "Pool name (the nodes' `pool` label)")),
    responses(
        (status = 204, description = "No longer dedicated"),
        (status = 400, description = "Invalid pool name", body = crate::error::Problem),
        (status = 403, description = "Not a platform admin", body = crate::error::Problem),
        (status = 404, description = "The pool is not dedicated", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn undedicate_pool(
    State(state): State<AppState>,
    principal: Principal,
    ctx: RequestContext,
    Path(pool): Path<String>,
) -> ApiResult<StatusCode> {
    check_pool(&pool)?;
    let mut tx = authz::begin_platform(&state.pool, &principal, Action::UndedicatePool, &nrn::pool(&pool)).await?;
    let removed: Option<Uuid> = sqlx::query_scalar("DELETE FROM pool_dedications WHERE pool = $1 RETURNING tenant_id")
        .bind(&pool)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(tenant_id) = removed else { return Err(ApiError::NotFound("pool dedication")) };
    audit_pool(&mut tx, &ctx, &principal, Action::UndedicatePool, &pool, json!({ "tenant_id": tenant_id })).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_follow_the_table_check() {
        for good in ["spot", "reserved", "a", "Pool_1.eu-west", &"p".repeat(63)] {
            assert!(check_pool(good).is_ok(), "{good}");
        }
        for bad in ["", "-spot", ".x", "a/b", "a b", "ü", &"p".repeat(64)] {
            assert!(matches!(check_pool(bad), Err(ApiError::InvalidPath(e)) if e[0].field == "pool"), "{bad}");
        }
    }
}
