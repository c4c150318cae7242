//! The event log's SQL.

use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Event, NewEvent};
use crate::common::now_ms;
use crate::error::Result;

fn event_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Event> {
    let data: String = row.try_get("data")?;
    Ok(Event {
        seq: row.try_get("seq")?,
        topic: row.try_get("topic")?,
        kind: row.try_get("type")?,
        agent_id: row.try_get("agent_id")?,
        at: row.try_get("at")?,
        data: serde_json::from_str(&data)
            .map_err(|e| crate::error::Error::Internal(e.to_string()))?,
    })
}

/// Appends an event (inside the caller's transaction); it is published after the commit.
pub async fn append(conn: &mut SqliteConnection, event: NewEvent) -> Result<()> {
    sqlx::query("INSERT INTO event (topic, type, agent_id, at, data) VALUES (?, ?, ?, ?, ?)")
        .bind(event.topic)
        .bind(event.kind)
        .bind(&event.agent_id)
        .bind(now_ms())
        .bind(event.data.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

/// Every event after `since`, oldest first (what a commit on the writer logged).
pub async fn after(conn: &mut SqliteConnection, since: i64) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT seq, topic, type, agent_id, at, data FROM event WHERE seq > ? ORDER BY seq",
    )
    .bind(since)
    .fetch_all(conn)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// Up to `limit` notifications for `agent_id` after `since`, oldest first.
pub async fn after_for_agent(
    pool: &SqlitePool,
    agent_id: &str,
    since: i64,
    limit: i64,
) -> Result<Vec<Event>> {
    let rows = sqlx::query(
        "SELECT seq, topic, type, agent_id, at, data FROM event
         WHERE agent_id = ? AND seq > ? ORDER BY seq LIMIT ?",
    )
    .bind(agent_id)
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// Up to `limit` events of the given topics after `since`, oldest first.
pub async fn after_for_topics(
    pool: &SqlitePool,
    topics: &[String],
    since: i64,
    limit: i64,
) -> Result<Vec<Event>> {
    let topics = serde_json::to_string(topics).unwrap_or_else(|_| "[]".into());
    let rows = sqlx::query(
        "SELECT seq, topic, type, agent_id, at, data FROM event
         WHERE seq > ? AND topic IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
    )
    .bind(since)
    .bind(topics)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// The newest `seq` in the log (0 when empty).
pub async fn latest_seq(conn: impl sqlx::SqliteExecutor<'_>) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM event")
            .fetch_one(conn)
            .await?,
    )
}

/// Everything at or below this `seq` may have been pruned: a resume from an older position
/// cannot be complete.
pub async fn pruned_through(pool: &SqlitePool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT value FROM meta WHERE key = 'event_pruned_through'")
            .fetch_one(pool)
            .await?,
    )
}

/// Deletes events older than `cutoff_ms`, always keeping the newest `keep` events. Returns how
/// many were deleted.
pub async fn prune(conn: &mut SqliteConnection, cutoff_ms: i64, keep: i64) -> Result<u64> {
    let through: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(seq) FROM event
         WHERE at < ? AND seq <= (SELECT COALESCE(MAX(seq), 0) FROM event) - ?",
    )
    .bind(cutoff_ms)
    .bind(keep)
    .fetch_one(&mut *conn)
    .await?;
    let Some(through) = through else { return Ok(0) };
    let deleted = sqlx::query("DELETE FROM event WHERE seq <= ?")
        .bind(through)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("UPDATE meta SET value = MAX(value, ?) WHERE key = 'event_pruned_through'")
        .bind(through)
        .execute(&mut *conn)
        .await?;
    Ok(deleted)
}
