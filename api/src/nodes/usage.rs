//! Usage ingest: batches of invocation records and log lines from agents, stored once each.
//!
//! A batch is one transaction of two statements (records, then log lines), each an
//! `INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`: the invocation id (and for log
//! lines the pair invocation id, seq) is the key, so a retried, duplicated or partly stored batch
//! leaves every record exactly once. Rows are written with the node's scope; the policies only let
//! a node write rows naming itself.

use nimbus_protocol::{LogLine, MAX_LOG_LINE, MAX_LOG_LINES, MAX_USAGE_RECORDS, UsageAck, UsageBatch, UsageRecord};
use uuid::Uuid;

use crate::{
    db,
    error::{ApiError, FieldError},
};

fn status_name(r: &UsageRecord) -> &'static str {
    use nimbus_protocol::UsageStatus::*;
    match r.status {
        Ok => "ok",
        Timeout => "timeout",
        MemoryLimit => "memory_limit",
        Crash => "crash",
        ExitCode => "exit_code",
        ResponseTooLarge => "response_too_large",
        InvalidResponse => "invalid_response",
        StartFailed => "start_failed",
    }
}

/// Checks a batch: its size, and that every record's billed duration follows from its duration.
pub fn validate(batch: &UsageBatch) -> Result<(), ApiError> {
    let mut errors = Vec::new();
    if batch.records.len() > MAX_USAGE_RECORDS {
        errors.push(FieldError::new("records", "max_items", format!("at most {MAX_USAGE_RECORDS} records a batch")));
    }
    if batch.logs.len() > MAX_LOG_LINES {
        errors.push(FieldError::new("logs", "max_items", format!("at most {MAX_LOG_LINES} log lines a batch")));
    }
    for (i, r) in batch.records.iter().enumerate() {
        if r.billed_ms != nimbus_protocol::billed_ms(r.duration_us) {
            errors.push(FieldError::new(
                format!("records[{i}].billed_ms"),
                "billing",
                "must be the duration rounded up to whole milliseconds, at least 1",
            ));
        }
        if i64::try_from(r.duration_us).is_err() || r.memory_mb == 0 || i32::try_from(r.memory_mb).is_err() {
            errors.push(FieldError::new(format!("records[{i}]"), "range", "duration or memory out of range"));
        }
        if errors.len() >= 20 {
            break;
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(ApiError::Validation(errors)) }
}

/// A log line as PostgreSQL can store it: no NUL characters, at most [`MAX_LOG_LINE`] bytes.
fn storable(line: &str) -> String {
    let mut s: String = line.replace('\0', "\u{fffd}");
    if s.len() > MAX_LOG_LINE {
        let mut cut = MAX_LOG_LINE;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Stores a batch from `node`; returns how many records were new and how many were known.
pub async fn ingest(pool: &db::Db, node: Uuid, batch: &UsageBatch) -> Result<UsageAck, ApiError> {
    validate(batch)?;
    let mut tx = db::begin(pool, &db::Scope::node(node)).await?;
    let accepted = insert_records(&mut tx, node, &batch.records).await?;
    insert_logs(&mut tx, node, &batch.logs).await?;
    tx.commit().await?;
    let duplicates = batch.records.len() as u64 - accepted;
    metrics::counter!("nimbus_usage_records_total", "outcome" => "stored").increment(accepted);
    metrics::counter!("nimbus_usage_records_total", "outcome" => "duplicate").increment(duplicates);
    Ok(UsageAck { accepted, duplicates })
}

async fn insert_records(tx: &mut db::Tx, node: Uuid, records: &[UsageRecord]) -> Result<u64, sqlx::Error> {
    if records.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&UsageRecord) -> Uuid| records.iter().map(f).collect::<Vec<Uuid>>();
    let r = sqlx::query(
        "INSERT INTO usage_records (invocation_id, tenant_id, function_id, version_id, version, node_id, \
         started_at, duration_us, billed_ms, memory_mb, http_status, status, cold_start) \
         SELECT i, t, f, v, n, $6, s, d, b, m, h, st, c FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], \
         $4::uuid[], $5::int[], $7::timestamptz[], $8::bigint[], $9::bigint[], $10::int[], $11::smallint[], \
         $12::text[], $13::bool[]) AS u(i, t, f, v, n, s, d, b, m, h, st, c) \
         ON CONFLICT (invocation_id) DO NOTHING",
    )
    .bind(col(|r| r.invocation_id))
    .bind(col(|r| r.tenant_id))
    .bind(col(|r| r.function_id))
    .bind(col(|r| r.version_id))
    .bind(records.iter().map(|r| i32::try_from(r.version).unwrap_or(i32::MAX)).collect::<Vec<_>>())
    .bind(node)
    .bind(records.iter().map(|r| r.started_at).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.duration_us as i64).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.billed_ms as i64).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.memory_mb as i32).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.http_status as i16).collect::<Vec<_>>())
    .bind(records.iter().map(status_name).collect::<Vec<_>>())
    .bind(records.iter().map(|r| r.cold_start).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}

async fn insert_logs(tx: &mut db::Tx, node: Uuid, logs: &[LogLine]) -> Result<u64, sqlx::Error> {
    if logs.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "INSERT INTO function_logs (id, tenant_id, function_id, version, invocation_id, seq, node_id, time, line) \
         SELECT id, t, f, v, i, q, $7, tm, l FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::int[], \
         $5::uuid[], $6::int[], $8::timestamptz[], $9::text[]) AS u(id, t, f, v, i, q, tm, l) \
         ON CONFLICT (invocation_id, seq) DO NOTHING",
    )
    .bind(logs.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| l.tenant_id).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| l.function_id).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| i32::try_from(l.version).unwrap_or(i32::MAX)).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| l.invocation_id).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| i32::try_from(l.seq).unwrap_or(i32::MAX)).collect::<Vec<_>>())
    .bind(node)
    .bind(logs.iter().map(|l| l.time).collect::<Vec<_>>())
    .bind(logs.iter().map(|l| storable(&l.line)).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_made_storable() {
        assert_eq!(storable("a\0b"), "a\u{fffd}b");
        let long = "é".repeat(MAX_LOG_LINE);
        let s = storable(&long);
        assert!(s.len() <= MAX_LOG_LINE && s.chars().all(|c| c == 'é'));
    }
}
