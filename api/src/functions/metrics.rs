//! A function's metrics: per version, the requests, errors, cold starts, average concurrency and
//! latency percentiles of a recent window, from the per-minute rollups agents' reports become
//! (`version_metrics`), the requests gateways held while an instance started (queue time), and
//! the autoscaler's desired and ready instances now (`autoscaler_state`).

use axum::{Json, extract::State};
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use nimbus_protocol::LATENCY_BUCKETS_MS;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::{
    auth::Principal,
    authz::{self, Action, nrn},
    error::{ApiError, ApiResult, FieldError},
    extract::{Path, Query},
    names::Name,
    startup::AppState,
};

/// Longest window, minutes (a day).
pub const MAX_WINDOW_MINUTES: i64 = 1440;

/// One version's figures over the window.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionFigures {
    /// The version's number.
    pub version: i32,
    /// Its id.
    pub version_id: Uuid,
    /// Invocations.
    pub requests: i64,
    /// Of which failed.
    pub errors: i64,
    /// Of which started an instance first.
    pub cold_starts: i64,
    /// Requests per second over the window.
    pub requests_per_second: f64,
    /// Average invocations in flight (all nodes).
    pub concurrency: f64,
    /// Median latency, ms (the upper bound of the histogram bucket it falls in).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms (same resolution).
    pub p99_ms: Option<f64>,
    /// Requests the gateways held while an instance started (the cold path).
    pub queued: i64,
    /// Their average wait, ms.
    pub queue_ms_avg: Option<f64>,
    /// Instances the autoscaler wants now (absent when it does not track the version).
    pub desired_instances: Option<i32>,
    /// Instances ready on nodes now, as the autoscaler last saw them.
    pub ready_instances: Option<i32>,
}

#[derive(sqlx::FromRow)]
struct FiguresRow {
    id: Uuid,
    number: i32,
    requests: i64,
    errors: i64,
    cold_starts: i64,
    concurrency_sum: f64,
    buckets: Vec<i64>,
    queued: i64,
    queue_ms_sum: f64,
    desired: Option<i32>,
    ready: Option<i32>,
}

/// A function's metrics.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FunctionMetrics {
    /// Start of the window.
    pub from: DateTime<Utc>,
    /// End of the window (now).
    pub to: DateTime<Utc>,
    /// Per version that had traffic in the window or that the autoscaler tracks.
    pub versions: Vec<VersionFigures>,
}

/// Query of the metrics.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// Window: minutes (`15m`) or hours (`1h`), 1 minute to 24 hours; default `1h`.
    #[serde(default)]
    pub window: Option<String>,
}

fn parse_window(w: Option<&str>) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::InvalidQuery(vec![FieldError::new("window", "duration", "must be like 15m or 6h, from 1m to 24h")])
    };
    let Some(w) = w else { return Ok(60) };
    let (n, unit) = w.split_at(w.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let minutes = match unit {
        "m" => n,
        "h" => n.checked_mul(60).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if (1..=MAX_WINDOW_MINUTES).contains(&minutes) { Ok(minutes) } else { Err(bad()) }
}

/// The upper bound of the bucket holding the `q` quantile of a histogram.
fn quantile(buckets: &[i64], q: f64) -> Option<f64> {
    let total: i64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            // The last bucket is open-ended: report the largest bound.
            return Some(
                LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.len() - 1]),
            );
        }
    }
    None
}

/// Version id, number, requests, errors, cold starts, concurrency sum, latency buckets.
/// Routes of this module.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_metrics))
}

/// A function's metrics over a recent window, per version.
#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant_id}/functions/{function_name}/metrics",
    tag = "functions",
    params(("tenant_id" = Uuid, Path, description = "Tenant id"), ("function_name" = String, Path, description = "Function name"), MetricsQuery),
    responses(
        (status = 200, description = "The figures per version", body = FunctionMetrics),
        (status = 400, description = "Bad window", body = crate::error::Problem),
        (status = 404, description = "No such function", body = crate::error::Problem),
    ),
    security(("bearer" = []))
)]
pub async fn get_metrics(
    State(state): State<AppState>,
    principal: Principal,
    Path((tenant_id, name)): Path<(Uuid, Name)>,
    Query(q): Query<MetricsQuery>,
) -> ApiResult<Json<FunctionMetrics>> {
    let minutes = parse_window(q.window.as_deref())?;
    let to = Utc::now();
    let from = (to - TimeDelta::minutes(minutes)).duration_trunc(TimeDelta::minutes(1)).unwrap_or(to);
    let (mut tx, _) = authz::begin(
        &state.pool,
        &principal,
        Action::ListFunctions,
        tenant_id,
        &nrn::function(tenant_id, name.as_str()),
    )
    .await?;
    let function = super::load(&mut tx, tenant_id, name.as_str(), false).await?;
    let rows: Vec<FiguresRow> = sqlx::query_as(
        "SELECT v.id, v.number, coalesce(sum(m.requests), 0)::bigint AS requests, \
         coalesce(sum(m.errors), 0)::bigint AS errors, coalesce(sum(m.cold_starts), 0)::bigint AS cold_starts, \
         coalesce(sum(m.concurrency_sum), 0)::float8 AS concurrency_sum, \
         coalesce((SELECT array_agg(b ORDER BY i) FROM (SELECT i, sum(x)::bigint AS b FROM version_metrics m2, \
           unnest(m2.latency_buckets) WITH ORDINALITY AS u(x, i) \
           WHERE m2.version_id = v.id AND m2.minute >= $3 GROUP BY i) t), '{}') AS buckets, \
         coalesce(sum(m.queued), 0)::bigint AS queued, coalesce(sum(m.queue_ms_sum), 0)::float8 AS queue_ms_sum, \
         s.desired, s.ready \
         FROM versions v LEFT JOIN version_metrics m ON m.version_id = v.id AND m.minute >= $3 \
         LEFT JOIN autoscaler_state s ON s.version_id = v.id \
         WHERE v.tenant_id = $1 AND v.function_id = $2 AND (m.version_id IS NOT NULL OR s.version_id IS NOT NULL) \
         GROUP BY v.id, v.number, s.desired, s.ready ORDER BY v.number",
    )
    .bind(tenant_id)
    .bind(function.id)
    .bind(from)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let seconds = (to - from).num_seconds().max(1) as f64;
    let versions = rows
        .into_iter()
        .map(|r| VersionFigures {
            version: r.number,
            version_id: r.id,
            requests: r.requests,
            errors: r.errors,
            cold_starts: r.cold_starts,
            requests_per_second: r.requests as f64 / seconds,
            concurrency: r.concurrency_sum / seconds,
            p50_ms: quantile(&r.buckets, 0.5),
            p99_ms: quantile(&r.buckets, 0.99),
            queued: r.queued,
            queue_ms_avg: (r.queued > 0).then(|| r.queue_ms_sum / r.queued as f64),
            desired_instances: r.desired,
            ready_instances: r.ready,
        })
        .collect();
    Ok(Json(FunctionMetrics { from, to, versions }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_quantiles() {
        assert_eq!(parse_window(None).unwrap(), 60);
        assert_eq!(parse_window(Some("15m")).unwrap(), 15);
        assert_eq!(parse_window(Some("24h")).unwrap(), 1440);
        for bad in ["0m", "25h", "1d", "m", "x", "999999999999999999h"] {
            assert!(parse_window(Some(bad)).is_err(), "{bad}");
        }
        let mut b = vec![0i64; LATENCY_BUCKETS_MS.len() + 1];
        assert_eq!(quantile(&b, 0.5), None);
        b[1] = 98; // <= 1 ms
        b[6] = 2; // <= 50 ms
        assert_eq!(quantile(&b, 0.5), Some(1.0));
        assert_eq!(quantile(&b, 0.99), Some(50.0));
        b[LATENCY_BUCKETS_MS.len()] = 100; // beyond the last bound
        assert_eq!(quantile(&b, 0.99), Some(10_000.0));
    }
}
