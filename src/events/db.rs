//! The event log's SQL.

use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Event, NewEvent};
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

/// Appends events, each with the time it was emitted, in one statement per thousand (inside the
/// caller's transaction); they are published after the commit.
pub async fn append(conn: &mut SqliteConnection, events: &[(i64, NewEvent)]) -> Result<()> {
    for chunk in events.chunks(1000) {
        let mut query = sqlx::QueryBuilder::new("");
        push_append(&mut query, chunk);
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Pushes the INSERTs of [`append`], each ended by `;`.
fn push_append(query: &mut sqlx::QueryBuilder<sqlx::Sqlite>, events: &[(i64, NewEvent)]) {
    for chunk in events.chunks(1000) {
        query.push("INSERT INTO event (topic, type, agent_id, at, data) ");
        query.push_values(chunk, |mut row, (at, event)| {
            row.push_bind(event.topic)
                .push_bind(event.kind)
                .push_bind(&event.agent_id)
                .push_bind(at)
                .push_bind(event.data.to_string());
        });
        query.push("; ");
    }
}

/// Ends a write transaction in one round trip to the database: appends `events` (each with the
/// time it was emitted, a statement per thousand), takes the outbox and commits —
/// `INSERT INTO event …; DELETE FROM outbox RETURNING …; COMMIT`. Returns everything the
/// transaction logged (also events written by triggers), to be read once committed. An error
/// leaves the transaction open for its owner to roll back (the outbox with it).
///
/// This leans on sqlx's SQLite driver running every statement of a query string, binds and all
/// (sqlx deprecates that for its database-neutral API: sqlx issue 3108): should a later
/// sqlx stop, every write fails at once in the tests, and this becomes three round trips again.
pub async fn append_and_commit(
    conn: &mut SqliteConnection,
    events: &[(i64, NewEvent)],
) -> Result<Committed> {
    let mut query = sqlx::QueryBuilder::new("");
    push_append(&mut query, events);
    query.push("DELETE FROM outbox RETURNING seq, topic, type, agent_id, at, data; COMMIT");
    Ok(Committed(query.build().fetch_all(conn).await?))
}

/// The outbox of a committed transaction.
pub struct Committed(Vec<sqlx::sqlite::SqliteRow>);

impl Committed {
    /// What the transaction logged, oldest first.
    pub fn events(&self) -> Result<Vec<Event>> {
        logged(&self.0)
    }
}

/// The events of outbox rows, in `seq` order (RETURNING promises no order).
fn logged(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<Event>> {
    let mut events = rows
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>>>()?;
    events.sort_unstable_by_key(|e| e.seq);
    Ok(events)
}

/// Creates the write connection's outbox: a TEMP table (private to that connection, rolled back
/// with its transaction) that a TEMP trigger fills with every event the connection logs, including
/// those logged by other triggers. Other instances' events never enter it.
pub async fn create_outbox(conn: &mut SqliteConnection) -> Result<()> {
    sqlx::query(
        "CREATE TEMP TABLE IF NOT EXISTS outbox (
             seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, type TEXT NOT NULL, agent_id TEXT,
             at INTEGER NOT NULL, data TEXT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "CREATE TEMP TRIGGER IF NOT EXISTS outbox_capture AFTER INSERT ON main.event
         BEGIN
             INSERT INTO outbox (seq, topic, type, agent_id, at, data)
             VALUES (NEW.seq, NEW.topic, NEW.type, NEW.agent_id, NEW.at, NEW.data);
         END",
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes everything from the outbox, oldest first.
pub async fn drain_outbox(conn: &mut SqliteConnection) -> Result<Vec<Event>> {
    let rows = sqlx::query("DELETE FROM outbox RETURNING seq, topic, type, agent_id, at, data")
        .fetch_all(conn)
        .await?;
    logged(&rows)
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

/// The newest `seq` that may be pruned: older than `cutoff_ms` (found from the oldest end, so
/// only what will be deleted is read) and not among the newest `keep` events — or, whatever its
/// age, not among the newest `max_rows` (counted by `seq`: a gap left by a rolled-back insert only
/// makes fewer rows stay).
pub async fn prunable_through(
    pool: &SqlitePool,
    cutoff_ms: i64,
    keep: i64,
    max_rows: i64,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "WITH newest (seq) AS (SELECT COALESCE(MAX(seq), 0) FROM event)
         SELECT MAX(MIN(COALESCE((SELECT seq FROM event WHERE at >= ? ORDER BY seq LIMIT 1) - 1,
                                 newest.seq),
                        newest.seq - ?),
                    newest.seq - ?)
         FROM newest",
    )
    .bind(cutoff_ms)
    .bind(keep)
    .bind(max_rows)
    .fetch_one(pool)
    .await?)
}

/// Deletes up to `batch` of the oldest events at or below `through` and records how far the log
/// was pruned. Returns how many were deleted.
pub async fn prune(conn: &mut SqliteConnection, through: i64, batch: i64) -> Result<u64> {
    let upto: Option<i64> = sqlx::query_scalar(
        "SELECT MAX(seq) FROM (SELECT seq FROM event WHERE seq <= ? ORDER BY seq LIMIT ?)",
    )
    .bind(through)
    .bind(batch)
    .fetch_one(&mut *conn)
    .await?;
    let Some(upto) = upto else { return Ok(0) };
    let deleted = sqlx::query("DELETE FROM event WHERE seq <= ?")
        .bind(upto)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("UPDATE meta SET value = MAX(value, ?) WHERE key = 'event_pruned_through'")
        .bind(upto)
        .execute(&mut *conn)
        .await?;
    Ok(deleted)
}
