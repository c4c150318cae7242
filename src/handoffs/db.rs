//! The handoffs' SQL. Every transition is a compare-and-set on `status`, so two racing moves (or
//! two instances' expiry steps) cannot both win.

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::error::{Error, Result};

pub struct HandoffRow {
    pub handoff_id: String,
    pub from_agent: String,
    pub to_agent: String,
    pub status: String,
    pub context: Value,
    pub context_digest: String,
    pub reason: Option<String>,
    pub session_id: Option<String>,
    pub workflow_id: Option<String>,
    pub memory_ref: String,
    pub result: Option<Value>,
    pub created_at: i64,
    pub expires_at: i64,
    pub accepted_at: Option<i64>,
    pub completed_at: Option<i64>,
}

const COLUMNS: &str =
    "seq, handoff_id, from_agent, to_agent, status, context, context_digest, reason,
    session_id, workflow_id, memory_ref, result, created_at, expires_at, accepted_at, completed_at";

fn from_row(row: &SqliteRow) -> Result<(i64, HandoffRow)> {
    let json = |column: &str| -> Result<Option<Value>> {
        let text: Option<String> = row.try_get(column)?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| Error::Internal(format!("{column}: {e}")))
        })
        .transpose()
    };
    Ok((
        row.try_get("seq")?,
        HandoffRow {
            handoff_id: row.try_get("handoff_id")?,
            from_agent: row.try_get("from_agent")?,
            to_agent: row.try_get("to_agent")?,
            status: row.try_get("status")?,
            context: json("context")?.unwrap_or(Value::Null),
            context_digest: row.try_get("context_digest")?,
            reason: row.try_get("reason")?,
            session_id: row.try_get("session_id")?,
            workflow_id: row.try_get("workflow_id")?,
            memory_ref: row.try_get("memory_ref")?,
            result: json("result")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            accepted_at: row.try_get("accepted_at")?,
            completed_at: row.try_get("completed_at")?,
        },
    ))
}

pub async fn insert(conn: &mut SqliteConnection, h: &HandoffRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO handoff (handoff_id, from_agent, to_agent, status, context, context_digest, reason,
                              session_id, workflow_id, memory_ref, created_at, expires_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&h.handoff_id)
    .bind(&h.from_agent)
    .bind(&h.to_agent)
    .bind(&h.status)
    .bind(h.context.to_string())
    .bind(&h.context_digest)
    .bind(&h.reason)
    .bind(&h.session_id)
    .bind(&h.workflow_id)
    .bind(&h.memory_ref)
    .bind(h.created_at)
    .bind(h.expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(
    conn: impl sqlx::SqliteExecutor<'_>,
    handoff_id: &str,
) -> Result<Option<HandoffRow>> {
    let sql = format!("SELECT {COLUMNS} FROM handoff WHERE handoff_id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(handoff_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(_, h)| h))
        .transpose()
}

/// The agents along the chain of handoffs carrying this session or workflow, oldest first.
pub async fn chain(
    conn: &mut SqliteConnection,
    session_id: Option<&str>,
    workflow_id: Option<&str>,
) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT from_agent, to_agent FROM handoff
         WHERE (? IS NOT NULL AND session_id = ?) OR (? IS NOT NULL AND workflow_id = ?)
         ORDER BY seq",
    )
    .bind(session_id)
    .bind(session_id)
    .bind(workflow_id)
    .bind(workflow_id)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("from_agent")?, r.try_get("to_agent")?)))
        .collect()
}

/// Moves a handoff from `from_status` to `to_status`; false when it was not in `from_status`.
pub async fn transition(
    conn: &mut SqliteConnection,
    handoff_id: &str,
    from_status: &str,
    to_status: &str,
    now: i64,
    result: Option<&Value>,
) -> Result<bool> {
    let accepted = to_status == "accepted";
    let outcome = sqlx::query(
        "UPDATE handoff
         SET status = ?,
             accepted_at = CASE WHEN ? THEN ? ELSE accepted_at END,
             completed_at = CASE WHEN ? THEN completed_at ELSE ? END,
             result = COALESCE(?, result)
         WHERE handoff_id = ? AND status = ?",
    )
    .bind(to_status)
    .bind(accepted)
    .bind(now)
    .bind(accepted)
    .bind(now)
    .bind(result.map(Value::to_string))
    .bind(handoff_id)
    .bind(from_status)
    .execute(conn)
    .await?;
    Ok(outcome.rows_affected() == 1)
}

/// Moves an `accepted` handoff to a final `to_status` in one statement (a step handoff whose
/// receiving step ended); returns it as it is now, None when it was not `accepted`.
pub async fn settle(
    conn: &mut SqliteConnection,
    handoff_id: &str,
    to_status: &str,
    now: i64,
) -> Result<Option<HandoffRow>> {
    let sql = format!(
        "UPDATE handoff SET status = ?, completed_at = ?
         WHERE handoff_id = ? AND status = 'accepted' RETURNING {COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(to_status)
        .bind(now)
        .bind(handoff_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(_, h)| h))
        .transpose()
}

/// Whether any initiated handoff's accept timeout has passed (for `Store::any_due`).
pub const ANY_DUE: &str =
    "SELECT EXISTS (SELECT 1 FROM handoff WHERE status = 'initiated' AND expires_at <= ?)";

/// Initiated handoffs whose accept timeout has passed, up to `batch`.
pub async fn due(conn: &mut SqliteConnection, now: i64, batch: u32) -> Result<Vec<HandoffRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM handoff WHERE status = 'initiated' AND expires_at <= ? ORDER BY expires_at LIMIT ?"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(batch)
        .fetch_all(conn)
        .await?;
    rows.iter().map(|r| from_row(r).map(|(_, h)| h)).collect()
}

/// Handoffs before `before` (a seq), newest first, involving `agent` and in `status` when given.
pub async fn list(
    pool: &SqlitePool,
    agent: Option<&str>,
    status: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, HandoffRow)>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM handoff
         WHERE seq < ? AND (? IS NULL OR from_agent = ? OR to_agent = ?) AND (? IS NULL OR status = ?)
         ORDER BY seq DESC LIMIT ?"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(before)
        .bind(agent)
        .bind(agent)
        .bind(agent)
        .bind(status)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}
