//! The agent registry's SQL.

use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::error::{Error, Result};

/// An agent's durable record (presence is in the broker).
#[derive(Debug, Clone)]
pub struct AgentRow {
    pub agent_id: String,
    pub capabilities: Vec<String>,
    pub max_concurrent_tasks: u32,
    pub ttl_s: u32,
    pub metadata: serde_json::Value,
    pub registered_at: i64,
    pub last_seen_at: i64,
}

fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<AgentRow> {
    let decode = |e: serde_json::Error| Error::Internal(format!("agent row: {e}"));
    Ok(AgentRow {
        agent_id: row.try_get("agent_id")?,
        capabilities: serde_json::from_str(row.try_get("capabilities")?).map_err(decode)?,
        max_concurrent_tasks: row.try_get("max_concurrent_tasks")?,
        ttl_s: row.try_get("ttl_s")?,
        metadata: serde_json::from_str(row.try_get("metadata")?).map_err(decode)?,
        registered_at: row.try_get("registered_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

pub async fn get(conn: impl sqlx::SqliteExecutor<'_>, agent_id: &str) -> Result<Option<AgentRow>> {
    let row = sqlx::query(
        "SELECT agent_id, capabilities, max_concurrent_tasks, ttl_s, metadata, registered_at, last_seen_at
         FROM agent WHERE agent_id = ?",
    )
    .bind(agent_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Those of `agent_ids` with no record, in the order given.
pub async fn unregistered(pool: &SqlitePool, agent_ids: &[&str]) -> Result<Vec<String>> {
    let ids = serde_json::Value::from(agent_ids).to_string();
    Ok(sqlx::query_scalar(
        "SELECT value FROM json_each(?) WHERE value NOT IN (SELECT agent_id FROM agent) ORDER BY key",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Inserts a new agent; `token_hash` is None with auth off.
pub async fn insert(
    conn: &mut SqliteConnection,
    agent: &AgentRow,
    token_hash: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO agent (agent_id, capabilities, max_concurrent_tasks, ttl_s, metadata,
                            registered_at, updated_at, last_seen_at, token_hash)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&agent.agent_id)
    .bind(serde_json::to_string(&agent.capabilities).unwrap_or_default())
    .bind(agent.max_concurrent_tasks)
    .bind(agent.ttl_s)
    .bind(agent.metadata.to_string())
    .bind(agent.registered_at)
    .bind(agent.registered_at)
    .bind(agent.last_seen_at)
    .bind(token_hash)
    .execute(&mut *conn)
    .await?;
    replace_capabilities(conn, &agent.agent_id, &agent.capabilities).await
}

/// Refreshes a re-registered agent's record (its token and registration time stay).
pub async fn update(conn: &mut SqliteConnection, agent: &AgentRow) -> Result<()> {
    sqlx::query(
        "UPDATE agent SET capabilities = ?, max_concurrent_tasks = ?, ttl_s = ?, metadata = ?,
                          updated_at = ?, last_seen_at = ?
         WHERE agent_id = ?",
    )
    .bind(serde_json::to_string(&agent.capabilities).unwrap_or_default())
    .bind(agent.max_concurrent_tasks)
    .bind(agent.ttl_s)
    .bind(agent.metadata.to_string())
    .bind(agent.last_seen_at)
    .bind(agent.last_seen_at)
    .bind(&agent.agent_id)
    .execute(&mut *conn)
    .await?;
    replace_capabilities(conn, &agent.agent_id, &agent.capabilities).await
}

async fn replace_capabilities(
    conn: &mut SqliteConnection,
    agent_id: &str,
    capabilities: &[String],
) -> Result<()> {
    sqlx::query("DELETE FROM agent_capability WHERE agent_id = ?")
        .bind(agent_id)
        .execute(&mut *conn)
        .await?;
    for capability in capabilities {
        sqlx::query("INSERT OR IGNORE INTO agent_capability (agent_id, capability) VALUES (?, ?)")
            .bind(agent_id)
            .bind(capability)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Deletes an agent; false when there was none.
pub async fn delete(conn: &mut SqliteConnection, agent_id: &str) -> Result<bool> {
    let result = sqlx::query("DELETE FROM agent WHERE agent_id = ?")
        .bind(agent_id)
        .execute(conn)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Records when an expired agent was last heard from.
pub async fn set_last_seen(
    conn: &mut SqliteConnection,
    agent_id: &str,
    last_seen_at: i64,
) -> Result<bool> {
    let result = sqlx::query("UPDATE agent SET last_seen_at = ? WHERE agent_id = ?")
        .bind(last_seen_at)
        .bind(agent_id)
        .execute(conn)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Up to `limit` agents after `cursor` (by id), optionally only those with `capability`.
pub async fn list(
    pool: &SqlitePool,
    capability: Option<&str>,
    cursor: &str,
    limit: u32,
) -> Result<Vec<AgentRow>> {
    let rows = match capability {
        Some(capability) => {
            sqlx::query(
                "SELECT a.agent_id, a.capabilities, a.max_concurrent_tasks, a.ttl_s, a.metadata,
                        a.registered_at, a.last_seen_at
                 FROM agent_capability c JOIN agent a ON a.agent_id = c.agent_id
                 WHERE c.capability = ? AND c.agent_id > ? ORDER BY c.agent_id LIMIT ?",
            )
            .bind(capability)
            .bind(cursor)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query(
                "SELECT agent_id, capabilities, max_concurrent_tasks, ttl_s, metadata, registered_at, last_seen_at
                 FROM agent WHERE agent_id > ? ORDER BY agent_id LIMIT ?",
            )
            .bind(cursor)
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter().map(from_row).collect()
}

/// The agent a token hash belongs to.
/// Agents whose capability index (agent_capability) differs from their record, for diagnostics.
pub async fn inconsistent_capabilities(pool: &SqlitePool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM agent a
         WHERE (SELECT COUNT(DISTINCT value) FROM json_each(a.capabilities))
            != (SELECT COUNT(*) FROM agent_capability c WHERE c.agent_id = a.agent_id)
            OR EXISTS (SELECT 1 FROM agent_capability c WHERE c.agent_id = a.agent_id
                       AND c.capability NOT IN (SELECT value FROM json_each(a.capabilities)))",
    )
    .fetch_one(pool)
    .await?)
}

pub async fn agent_by_token_hash(pool: &SqlitePool, hash: &str) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT agent_id FROM agent WHERE token_hash = ?")
            .bind(hash)
            .fetch_optional(pool)
            .await?,
    )
}
