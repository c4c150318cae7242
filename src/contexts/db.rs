//! The agent contexts' SQL.

use serde_json::{Map, Value};
use sqlx::{Row, SqliteConnection};

use crate::error::{Error, Result};

/// An agent's stored context: (values, version, updated_at); version 0 when it has none yet.
pub async fn get(
    conn: impl sqlx::SqliteExecutor<'_>,
    agent_id: &str,
) -> Result<(Map<String, Value>, i64, Option<i64>)> {
    let row =
        sqlx::query("SELECT context, version, updated_at FROM agent_context WHERE agent_id = ?")
            .bind(agent_id)
            .fetch_optional(conn)
            .await?;
    match row {
        None => Ok((Map::new(), 0, None)),
        Some(row) => {
            let values = serde_json::from_str(row.try_get("context")?)
                .map_err(|e| Error::Internal(e.to_string()))?;
            Ok((
                values,
                row.try_get("version")?,
                Some(row.try_get("updated_at")?),
            ))
        }
    }
}

/// Writes a context as the next version after `version`; false when someone else wrote first.
pub async fn put(
    conn: &mut SqliteConnection,
    agent_id: &str,
    values: &Map<String, Value>,
    version: i64,
    now: i64,
) -> Result<bool> {
    let json = Value::Object(values.clone()).to_string();
    let written = if version == 0 {
        sqlx::query(
            "INSERT INTO agent_context (agent_id, context, version, updated_at) VALUES (?, ?, 1, ?)
             ON CONFLICT (agent_id) DO NOTHING",
        )
        .bind(agent_id)
        .bind(json)
        .bind(now)
        .execute(conn)
        .await?
    } else {
        sqlx::query("UPDATE agent_context SET context = ?, version = version + 1, updated_at = ? WHERE agent_id = ? AND version = ?")
            .bind(json)
            .bind(now)
            .bind(agent_id)
            .bind(version)
            .execute(conn)
            .await?
    };
    Ok(written.rows_affected() == 1)
}
