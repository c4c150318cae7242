//! The checkpoints' SQL.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use serde_json::value::RawValue;

use super::Checkpoint;
use crate::common::rfc3339;
use crate::error::{Error, Result};

const COLUMNS: &str = "seq, checkpoint_id, coordination_id, state, agents, status, created_at";

fn from_row(row: &SqliteRow) -> Result<(i64, Checkpoint)> {
    let json = |column: &str| -> Result<serde_json::Value> {
        serde_json::from_str(row.try_get(column)?)
            .map_err(|e| Error::Internal(format!("{column}: {e}")))
    };
    Ok((
        row.try_get("seq")?,
        Checkpoint {
            checkpoint_id: row.try_get("checkpoint_id")?,
            coordination_id: row.try_get("coordination_id")?,
            state: RawValue::from_string(row.try_get("state")?)
                .map_err(|e| Error::Internal(format!("state: {e}")))?,
            agents: serde_json::from_value(json("agents")?)
                .map_err(|e| Error::Internal(e.to_string()))?,
            status: row.try_get("status")?,
            created_at: rfc3339(row.try_get("created_at")?),
            source: None,
        },
    ))
}

pub async fn insert(conn: &mut SqliteConnection, c: &Checkpoint, created_at: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO checkpoint (checkpoint_id, coordination_id, state, agents, status, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&c.checkpoint_id)
    .bind(&c.coordination_id)
    .bind(c.state.get())
    .bind(serde_json::Value::from(c.agents.clone()).to_string())
    .bind(&c.status)
    .bind(created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes a coordination's checkpoints beyond the newest `keep`; returns their ids.
pub async fn trim(
    conn: &mut SqliteConnection,
    coordination_id: &str,
    keep: u32,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "DELETE FROM checkpoint WHERE coordination_id = ? AND seq < (
             SELECT MIN(seq) FROM (SELECT seq FROM checkpoint WHERE coordination_id = ?
                                   ORDER BY seq DESC LIMIT ?))
         RETURNING checkpoint_id",
    )
    .bind(coordination_id)
    .bind(coordination_id)
    .bind(keep)
    .fetch_all(conn)
    .await?)
}

pub async fn get(pool: &SqlitePool, checkpoint_id: &str) -> Result<Option<Checkpoint>> {
    let sql = format!("SELECT {COLUMNS} FROM checkpoint WHERE checkpoint_id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(checkpoint_id)
        .fetch_optional(pool)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(_, c)| c))
        .transpose()
}

/// A coordination's checkpoints before `before` (a seq), newest first.
pub async fn list(
    pool: &SqlitePool,
    coordination_id: &str,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, Checkpoint)>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM checkpoint WHERE coordination_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(coordination_id)
        .bind(before)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}
