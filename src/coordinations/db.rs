//! The coordination rounds' SQL.

use serde_json::Value;
use sqlx::{Row, SqliteConnection};

use crate::error::{Error, Result};

pub struct RoundRow {
    pub coordination_id: String,
    pub topic: String,
    pub payload: Value,
    pub agents: Vec<String>,
    pub status: String,
    pub created_at: i64,
    pub deadline: i64,
    pub finished_at: Option<i64>,
}

pub struct ResponseRow {
    pub agent_id: String,
    pub success: bool,
    pub result: Value,
    pub at: i64,
}

fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Internal(e.to_string()))
}

pub async fn insert(conn: &mut SqliteConnection, r: &RoundRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO coordination (coordination_id, topic, payload, agents, status, created_at, deadline)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&r.coordination_id)
    .bind(&r.topic)
    .bind(r.payload.to_string())
    .bind(Value::from(r.agents.clone()).to_string())
    .bind(&r.status)
    .bind(r.created_at)
    .bind(r.deadline)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(
    conn: impl sqlx::SqliteExecutor<'_>,
    coordination_id: &str,
) -> Result<Option<RoundRow>> {
    let row = sqlx::query(
        "SELECT coordination_id, topic, payload, agents, status, created_at, deadline, finished_at
         FROM coordination WHERE coordination_id = ?",
    )
    .bind(coordination_id)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(RoundRow {
            coordination_id: r.try_get("coordination_id")?,
            topic: r.try_get("topic")?,
            payload: decode(r.try_get("payload")?)?,
            agents: decode(r.try_get("agents")?)?,
            status: r.try_get("status")?,
            created_at: r.try_get("created_at")?,
            deadline: r.try_get("deadline")?,
            finished_at: r.try_get("finished_at")?,
        })
    })
    .transpose()
}

pub async fn responses(
    conn: impl sqlx::SqliteExecutor<'_>,
    coordination_id: &str,
) -> Result<Vec<ResponseRow>> {
    let rows = sqlx::query(
        "SELECT agent_id, success, result, at FROM coordination_response WHERE coordination_id = ? ORDER BY at, agent_id",
    )
    .bind(coordination_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ResponseRow {
                agent_id: r.try_get("agent_id")?,
                success: r.try_get("success")?,
                result: decode(r.try_get("result")?)?,
                at: r.try_get("at")?,
            })
        })
        .collect()
}

/// Records an answer; false when this agent already answered.
pub async fn respond(
    conn: &mut SqliteConnection,
    coordination_id: &str,
    r: &ResponseRow,
) -> Result<bool> {
    let outcome = sqlx::query(
        "INSERT INTO coordination_response (coordination_id, agent_id, success, result, at)
         VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(coordination_id)
    .bind(&r.agent_id)
    .bind(r.success)
    .bind(r.result.to_string())
    .bind(r.at)
    .execute(conn)
    .await?;
    Ok(outcome.rows_affected() == 1)
}

/// Ends a collecting round with `status`; false when it was no longer collecting.
pub async fn finish(
    conn: &mut SqliteConnection,
    coordination_id: &str,
    status: &str,
    now: i64,
) -> Result<bool> {
    let outcome = sqlx::query(
        "UPDATE coordination SET status = ?, finished_at = ? WHERE coordination_id = ? AND status = 'collecting'",
    )
    .bind(status)
    .bind(now)
    .bind(coordination_id)
    .execute(conn)
    .await?;
    Ok(outcome.rows_affected() == 1)
}

/// Whether any collecting round is past its deadline (for `Store::any_due`).
pub const ANY_DUE: &str =
    "SELECT EXISTS (SELECT 1 FROM coordination WHERE status = 'collecting' AND deadline <= ?)";

/// Collecting rounds past their deadline, up to `batch`.
pub async fn due(conn: &mut SqliteConnection, now: i64, batch: u32) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT coordination_id FROM coordination WHERE status = 'collecting' AND deadline <= ? LIMIT ?",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(conn)
    .await?)
}
