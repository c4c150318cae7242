//! The sessions' SQL.

use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Activity, Session};
use crate::common::rfc3339;
use crate::error::{Error, Result};

/// Activities kept per session (by the trigger `session_activity_keep`).
pub const KEEP_ACTIVITIES: i64 = 100;

const COLUMNS: &str =
    "seq, session_id, session_type, context, status, ttl_s, created_at, last_activity_at,
    activity_count, expires_at";

fn json(row: &SqliteRow, column: &str) -> Result<serde_json::Value> {
    serde_json::from_str(row.try_get(column)?)
        .map_err(|e| Error::Internal(format!("{column}: {e}")))
}

fn from_row(row: &SqliteRow) -> Result<(i64, Session)> {
    Ok((
        row.try_get("seq")?,
        Session {
            session_id: row.try_get("session_id")?,
            session_type: row.try_get("session_type")?,
            context: json(row, "context")?,
            status: row.try_get("status")?,
            ttl_s: row.try_get("ttl_s")?,
            created_at: rfc3339(row.try_get("created_at")?),
            last_activity_at: rfc3339(row.try_get("last_activity_at")?),
            activity_count: row.try_get("activity_count")?,
            expires_at: rfc3339(row.try_get("expires_at")?),
        },
    ))
}

pub struct NewRow<'a> {
    pub session_id: &'a str,
    pub session_type: &'a str,
    pub context: &'a str,
    pub ttl_s: u32,
    pub now: i64,
}

/// Inserts a session; returns it as stored.
pub async fn insert(conn: &mut SqliteConnection, s: &NewRow<'_>) -> Result<Session> {
    let sql = format!(
        "INSERT INTO session (session_id, session_type, context, status, ttl_s, created_at,
                              last_activity_at, expires_at)
         VALUES (?, ?, ?, 'active', ?, ?, ?, ?) RETURNING {COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(s.session_id)
        .bind(s.session_type)
        .bind(s.context)
        .bind(s.ttl_s)
        .bind(s.now)
        .bind(s.now)
        .bind(s.now + i64::from(s.ttl_s) * 1000)
        .fetch_one(conn)
        .await?;
    from_row(&row).map(|(_, s)| s)
}

pub async fn get(conn: impl sqlx::SqliteExecutor<'_>, session_id: &str) -> Result<Option<Session>> {
    let sql = format!("SELECT {COLUMNS} FROM session WHERE session_id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(session_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(_, s)| s))
        .transpose()
}

/// Records an activity on a live session (active and not past its deadline) and extends its
/// life (a trigger keeps the newest activities only). Returns the session after it, None when not live.
pub async fn append(
    conn: &mut SqliteConnection,
    session_id: &str,
    activity_type: &str,
    details: &str,
    agent_id: Option<&str>,
    now: i64,
) -> Result<Option<Session>> {
    let sql = format!(
        "UPDATE session SET activity_count = activity_count + 1, last_activity_at = ?1,
                            expires_at = ?1 + ttl_s * 1000
         WHERE session_id = ?2 AND status = 'active' AND expires_at > ?1
         RETURNING {COLUMNS}"
    );
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(session_id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    sqlx::query("INSERT INTO session_activity (session_id, activity_type, details, agent_id, at) VALUES (?, ?, ?, ?, ?)")
        .bind(session_id)
        .bind(activity_type)
        .bind(details)
        .bind(agent_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    from_row(&row).map(|(_, s)| Some(s))
}

/// Moves a session from `from` to `to`; the session after it, None when it was not in `from`.
pub async fn set_status(
    conn: &mut SqliteConnection,
    session_id: &str,
    from: &str,
    to: &str,
) -> Result<Option<Session>> {
    let sql = format!(
        "UPDATE session SET status = ? WHERE session_id = ? AND status = ? RETURNING {COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(to)
        .bind(session_id)
        .bind(from)
        .fetch_optional(conn)
        .await?;
    row.as_ref()
        .map(|r| from_row(r).map(|(_, s)| s))
        .transpose()
}

/// Sessions active now, for the metrics.
pub async fn count_active(pool: &SqlitePool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM session WHERE status = 'active'")
            .fetch_one(pool)
            .await?,
    )
}

/// Whether any active session is idle past its deadline (for `Store::any_due`).
pub const ANY_DUE: &str =
    "SELECT EXISTS (SELECT 1 FROM session WHERE status = 'active' AND expires_at <= ?)";

/// Active sessions idle past their deadline become `expired`; returns their ids and activity
/// counts.
pub async fn expire_due(
    conn: &mut SqliteConnection,
    now: i64,
    batch: u32,
) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "UPDATE session SET status = 'expired'
         WHERE seq IN (SELECT seq FROM session WHERE status = 'active' AND expires_at <= ? LIMIT ?)
         RETURNING session_id, activity_count",
    )
    .bind(now)
    .bind(batch)
    .fetch_all(conn)
    .await?)
}

/// Sessions before `before` (a seq), newest first, filtered by status and type.
pub async fn list(
    pool: &SqlitePool,
    status: Option<&str>,
    session_type: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, Session)>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM session WHERE seq < ? AND (? IS NULL OR status = ?)
           AND (? IS NULL OR session_type = ?) ORDER BY seq DESC LIMIT ?"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(before)
        .bind(status)
        .bind(status)
        .bind(session_type)
        .bind(session_type)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(from_row).collect()
}

/// A session with its kept activities (newest first), read in one snapshot.
pub async fn with_activities(
    pool: &SqlitePool,
    session_id: &str,
) -> Result<Option<(Session, Vec<Activity>)>> {
    let mut tx = pool.begin().await?;
    let Some(session) = get(&mut *tx, session_id).await? else {
        return Ok(None);
    };
    let rows = sqlx::query(
        "SELECT activity_type, details, agent_id, at FROM session_activity
         WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
    )
    .bind(session_id)
    .bind(KEEP_ACTIVITIES)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let activities = rows
        .iter()
        .map(|r| {
            Ok(Activity {
                activity_type: r.try_get("activity_type")?,
                details: json(r, "details")?,
                agent_id: r.try_get("agent_id")?,
                at: rfc3339(r.try_get("at")?),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Some((session, activities)))
}
