//! The access log, cheap on the hot path: every allowed decision is counted in memory per
//! (tenant, principal, action, resource) with the time it was last allowed, and [`flush`] adds
//! the counts to `iam_activity` (one row per day) every [`FLUSH_EVERY`]. Access reports (last
//! used, unused permissions) and policy generation read that table.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::db::{self, Scope};

/// How often each replica writes what it counted.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// Distinct keys counted between flushes at most (spread over the shards); beyond, decisions are
/// not logged (counted in `nimbus_iam_activity_dropped_total`) until the next flush.
pub const MAX_KEYS: usize = 50_000;
/// Days of activity kept.
pub const RETENTION_DAYS: i32 = 90;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tenant: Uuid,
    kind: &'static str,
    principal: Uuid,
    action: &'static str,
    resource: String,
}

/// Locks the counts are spread over, so that concurrent decisions rarely wait for each other.
const SHARDS: usize = 16;

/// Per key's hash, the keys with that hash (one, but for collisions) with how often they were
/// allowed since the last flush and when last: a decision already counted costs no allocation.
type Shard = HashMap<u64, Vec<(Key, (i64, DateTime<Utc>))>>;

static SEEN: LazyLock<[Mutex<(Shard, usize)>; SHARDS]> = LazyLock::new(|| std::array::from_fn(|_| Mutex::default()));

fn hash_of(tenant: Uuid, kind: &str, principal: Uuid, action: &str, resource: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (tenant, kind, principal, action, resource).hash(&mut h);
    h.finish()
}

/// Counts one allowed decision.
pub fn record(tenant: Uuid, kind: &'static str, principal: Uuid, action: &'static str, resource: &str) {
    add(tenant, kind, principal, action, resource, 1, Utc::now());
}

fn add(
    tenant: Uuid,
    kind: &'static str,
    principal: Uuid,
    action: &'static str,
    resource: &str,
    n: i64,
    at: DateTime<Utc>,
) {
    let h = hash_of(tenant, kind, principal, action, resource);
    let mut guard = SEEN[(h as usize) % SHARDS].lock().unwrap_or_else(|p| p.into_inner());
    let (shard, keys) = &mut *guard;
    let same = |k: &Key| {
        k.tenant == tenant && k.principal == principal && k.action == action && k.kind == kind && k.resource == resource
    };
    let entries = shard.entry(h).or_default();
    if let Some((_, counts)) = entries.iter_mut().find(|(k, _)| same(k)) {
        counts.0 += n;
        counts.1 = counts.1.max(at);
    } else if *keys < MAX_KEYS / SHARDS {
        entries.push((Key { tenant, kind, principal, action, resource: resource.to_owned() }, (n, at)));
        *keys += 1;
    } else {
        metrics::counter!("nimbus_iam_activity_dropped_total").increment(1);
    }
}

/// Writes what was counted since the last flush (adding to the day's rows) and drops days past
/// [`RETENTION_DAYS`]; returns the rows written. On failure the counts are put back.
pub async fn flush(pool: &db::Db) -> anyhow::Result<usize> {
    let mut taken: Vec<(Key, (i64, DateTime<Utc>))> = Vec::new();
    for shard in SEEN.iter() {
        let (map, _) = std::mem::take(&mut *shard.lock().unwrap_or_else(|p| p.into_inner()));
        taken.extend(map.into_values().flatten());
    }
    if taken.is_empty() {
        return Ok(0);
    }
    let result = write(pool, &taken).await;
    if result.is_err() {
        for (k, (n, at)) in taken {
            add(k.tenant, k.kind, k.principal, k.action, &k.resource, n, at);
        }
    }
    result
}

async fn write(pool: &db::Db, rows: &[(Key, (i64, DateTime<Utc>))]) -> anyhow::Result<usize> {
    // The gateway scope reads tenants (for the check that the tenant still exists).
    let mut tx = db::begin(pool, &Scope { platform: true, gateway: true, ..Scope::default() }).await?;
    sqlx::query(
        "INSERT INTO iam_activity (tenant_id, principal_kind, principal_id, action, resource, day, count, last_at) \
         SELECT t, k, p, a, r, (l AT TIME ZONE 'UTC')::date, n, l \
         FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::bigint[], $7::timestamptz[]) \
           AS u(t, k, p, a, r, n, l) \
         WHERE EXISTS (SELECT 1 FROM tenants WHERE tenants.id = u.t) \
         ON CONFLICT (tenant_id, principal_id, action, resource, day) DO UPDATE \
         SET count = iam_activity.count + EXCLUDED.count, last_at = greatest(iam_activity.last_at, EXCLUDED.last_at)",
    )
    .bind(rows.iter().map(|(k, _)| k.tenant).collect::<Vec<_>>())
    .bind(rows.iter().map(|(k, _)| k.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|(k, _)| k.principal).collect::<Vec<_>>())
    .bind(rows.iter().map(|(k, _)| k.action).collect::<Vec<_>>())
    .bind(rows.iter().map(|(k, _)| k.resource.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, (n, _))| *n).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, (_, at))| *at).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM iam_activity WHERE day < current_date - $1")
        .bind(RETENTION_DAYS)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}

/// Forever: flushes every [`FLUSH_EVERY`].
pub async fn flush_loop(pool: db::Db) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = flush(&pool).await {
            tracing::warn!(error = ?e, "writing the IAM access log failed; kept for the next flush");
        }
    }
}
