//! The queues' SQL. A claim is one `UPDATE … RETURNING` over the index
//! `(recipient, state, priority DESC, seq)`, so priority-then-FIFO holds, also for redelivered
//! messages (they keep their `seq`).

use std::collections::{HashMap, HashSet};

use sqlx::{QueryBuilder, Row, SqliteConnection, SqlitePool};

use crate::error::Result;

/// A message row as the API shows it.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub seq: i64,
    pub message_id: String,
    pub sender: String,
    pub recipient: String,
    pub message_type: String,
    pub content: String,
    pub priority: i64,
    pub correlation_id: Option<String>,
    pub created_at: i64,
    pub state: String,
    pub delivery_count: i64,
    pub lease_id: Option<String>,
    pub lease_expires_at: Option<i64>,
}

fn from_row(row: &sqlx::sqlite::SqliteRow) -> Result<MessageRow> {
    Ok(MessageRow {
        seq: row.try_get("seq")?,
        message_id: row.try_get("message_id")?,
        sender: row.try_get("sender")?,
        recipient: row.try_get("recipient")?,
        message_type: row.try_get("message_type")?,
        content: row.try_get("content")?,
        priority: row.try_get("priority")?,
        correlation_id: row.try_get("correlation_id")?,
        created_at: row.try_get("created_at")?,
        state: row.try_get("state")?,
        delivery_count: row.try_get("delivery_count")?,
        lease_id: row.try_get("lease_id")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
    })
}

/// A message to enqueue.
pub struct Insert<'a> {
    pub message_id: &'a str,
    pub sender: &'a str,
    pub recipient: &'a str,
    pub message_type: &'a str,
    pub content: &'a str,
    pub priority: u8,
    pub correlation_id: Option<&'a str>,
    pub now: i64,
}

/// Enqueues messages, 1000 rows a statement (9 variables a row: inside SQLite's limit of
/// 32 766, and more than a write batch holds, so a batch is one atomic statement). The
/// triggers log each one's `new_message` event and skip any over its recipient's cap; returns the
/// ids that went in.
/// Messages still claimed under a lease that ran out before `before` (the reaper should have
/// taken them back), for diagnostics.
pub async fn stuck_leases(pool: &SqlitePool, before: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM message WHERE state = 'claimed' AND lease_expires_at < ?",
    )
    .bind(before)
    .fetch_one(pool)
    .await?)
}

/// Messages dead-lettered since `since`, for diagnostics.
pub async fn dead_lettered_since(pool: &SqlitePool, since: i64) -> Result<i64> {
    Ok(
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM message WHERE state = 'dead' AND finished_at >= ?",
        )
        .bind(since)
        .fetch_one(pool)
        .await?,
    )
}

/// Messages by state (`queued`, `claimed`, `acked`, `dead`), for the metrics.
pub async fn count_by_state(pool: &SqlitePool) -> Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT state, COUNT(*) FROM message GROUP BY state ORDER BY state")
            .fetch_all(pool)
            .await?,
    )
}

/// Inserts messages (triggers log their events and skip those over a recipient's cap); answers
/// each inserted message's id with whether its recipient is registered, read in the same
/// statement: no extra round trip, one probe of the agent table's key per row. (Measured on
/// 512-row inserts: `recipient IN (SELECT agent_id FROM agent)` costs nothing measurable, while
/// the correlated `EXISTS (… WHERE agent_id = recipient)` made each row about 7× slower.)
pub async fn insert_many(
    conn: &mut SqliteConnection,
    messages: &[Insert<'_>],
) -> Result<HashMap<String, bool>> {
    let mut inserted = HashMap::with_capacity(messages.len());
    for chunk in messages.chunks(1000) {
        let mut insert = QueryBuilder::new(
            "INSERT INTO message (message_id, sender, recipient, message_type, content, priority,
                                  correlation_id, created_at, visible_at) ",
        );
        insert.push_values(chunk, |mut row, m| {
            row.push_bind(m.message_id.to_owned())
                .push_bind(m.sender.to_owned())
                .push_bind(m.recipient.to_owned())
                .push_bind(m.message_type.to_owned())
                .push_bind(m.content.to_owned())
                .push_bind(i64::from(m.priority))
                .push_bind(m.correlation_id.map(str::to_owned))
                .push_bind(m.now)
                .push_bind(m.now);
        });
        insert.push(" RETURNING message_id, recipient IN (SELECT agent_id FROM agent)");
        let rows: Vec<(String, bool)> = insert.build_query_as().fetch_all(&mut *conn).await?;
        inserted.extend(rows);
    }
    Ok(inserted)
}

/// One ack to apply: (recipient, message_id, lease_id).
pub type AckKey<'a> = (&'a str, &'a str, &'a str);

/// Acks the messages held under live leases, in one statement per 1000; returns the
/// (message_id, lease_id) pairs that were acked.
pub async fn ack_many(
    conn: &mut SqliteConnection,
    acks: &[AckKey<'_>],
    now: i64,
) -> Result<HashSet<(String, String)>> {
    let mut acked = HashSet::new();
    for chunk in acks.chunks(1000) {
        let mut update = QueryBuilder::new("UPDATE message SET state = 'acked', finished_at = ");
        update.push_bind(now);
        update.push(" WHERE state = 'claimed' AND lease_expires_at > ");
        update.push_bind(now);
        // The plain `message_id IN (…)` lets SQLite use the unique index; the row-value test
        // alone would scan every live lease.
        update.push(" AND message_id IN (");
        let mut ids = update.separated(", ");
        for (_, message_id, _) in chunk {
            ids.push_bind(message_id.to_string());
        }
        update.push(") AND (recipient, message_id, lease_id) IN (");
        update.push_values(chunk, |mut row, (recipient, message_id, lease_id)| {
            row.push_bind(recipient.to_string())
                .push_bind(message_id.to_string())
                .push_bind(lease_id.to_string());
        });
        update.push(") RETURNING message_id, lease_id");
        for row in update.build().fetch_all(&mut *conn).await? {
            acked.insert((row.try_get("message_id")?, row.try_get("lease_id")?));
        }
    }
    Ok(acked)
}

/// A claim for [`claim_many`]: up to `limit` (at most [`MAX_CLAIM`]) visible queued messages
/// of `recipient` under the lease `lease_id` (acked at once with `auto_ack`).
pub struct Claim<'a> {
    pub recipient: &'a str,
    pub limit: u32,
    pub lease_id: &'a str,
    pub lease_expires_at: i64,
    pub auto_ack: bool,
    pub now: i64,
}

/// Most messages one claim takes.
pub const MAX_CLAIM: u32 = 100;

/// Runs claims of distinct recipients together, one statement per 500: each takes its
/// recipient's first visible queued messages (priority, then age). Returns the messages each
/// lease took, in claim order (a lease that found none is absent).
pub async fn claim_many(
    conn: &mut SqliteConnection,
    claims: &[Claim<'_>],
) -> Result<HashMap<String, Vec<MessageRow>>> {
    let mut taken: HashMap<String, Vec<MessageRow>> = HashMap::new();
    for chunk in claims.chunks(500) {
        let mut update = QueryBuilder::new(
            "WITH c(c_recipient, c_limit, c_lease, c_expires, c_state, c_now) AS (",
        );
        update.push_values(chunk, |mut row, c| {
            row.push_bind(c.recipient.to_owned())
                .push_bind(c.limit)
                .push_bind(c.lease_id.to_owned())
                .push_bind(c.lease_expires_at)
                .push_bind(if c.auto_ack { "acked" } else { "claimed" })
                .push_bind(c.now);
        });
        // Each claim's candidates come from its recipient's queue index (at most MAX_CLAIM of
        // them, as a JSON array a LIMIT cannot take from the outer row), cut to its limit.
        update.push(format!(
            ") UPDATE message
               SET state = c_state, lease_id = c_lease, lease_expires_at = c_expires,
                   delivery_count = delivery_count + 1,
                   finished_at = CASE WHEN c_state = 'acked' THEN c_now END
               FROM c, json_each((
                   SELECT json_group_array(seq) FROM (
                       SELECT seq FROM message m
                       WHERE m.recipient = c_recipient AND m.state = 'queued'
                         AND m.visible_at <= c_now
                       ORDER BY m.priority DESC, m.seq LIMIT {MAX_CLAIM}))) AS j
               WHERE message.seq = j.value AND j.key < c_limit
               RETURNING seq, message_id, sender, recipient, message_type, content, priority,
                         correlation_id, created_at, state, delivery_count, lease_id,
                         lease_expires_at"
        ));
        for row in crate::store::build_rows(&mut update, chunk.len())
            .fetch_all(&mut *conn)
            .await?
        {
            let message = from_row(&row)?;
            let lease = message.lease_id.clone().unwrap_or_default();
            taken.entry(lease).or_default().push(message);
        }
    }
    // RETURNING does not promise an order.
    for messages in taken.values_mut() {
        messages.sort_by_key(|m| (-m.priority, m.seq));
    }
    Ok(taken)
}

/// Where a message stands, for explaining why a lease operation was refused.
pub struct LeaseState {
    pub state: String,
    pub lease_id: Option<String>,
    pub lease_expires_at: Option<i64>,
}

pub async fn lease_state(
    conn: &mut SqliteConnection,
    recipient: &str,
    message_id: &str,
) -> Result<Option<LeaseState>> {
    let row = sqlx::query(
        "SELECT state, lease_id, lease_expires_at FROM message WHERE message_id = ? AND recipient = ?",
    )
    .bind(message_id)
    .bind(recipient)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(LeaseState {
            state: r.try_get("state")?,
            lease_id: r.try_get("lease_id")?,
            lease_expires_at: r.try_get("lease_expires_at")?,
        })
    })
    .transpose()
}

/// Puts a leased message back in its old place (visible after `visible_at`), or into the dead
/// letters when it has used up its deliveries. Returns the new state, None when the lease is not
/// current.
pub async fn nack(
    conn: &mut SqliteConnection,
    recipient: &str,
    message_id: &str,
    lease_id: &str,
    visible_at: i64,
    max_deliveries: u32,
    now: i64,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE message
         SET state = CASE WHEN delivery_count >= ? THEN 'dead' ELSE 'queued' END,
             finished_at = CASE WHEN delivery_count >= ? THEN ? END,
             visible_at = ?, lease_id = NULL, lease_expires_at = NULL
         WHERE message_id = ? AND recipient = ? AND state = 'claimed' AND lease_id = ? AND lease_expires_at > ?
         RETURNING state",
    )
    .bind(max_deliveries)
    .bind(max_deliveries)
    .bind(now)
    .bind(visible_at)
    .bind(message_id)
    .bind(recipient)
    .bind(lease_id)
    .bind(now)
    .fetch_optional(conn)
    .await?)
}

/// Moves a live lease's deadline; false when the lease is not current.
pub async fn extend(
    conn: &mut SqliteConnection,
    recipient: &str,
    message_id: &str,
    lease_id: &str,
    lease_expires_at: i64,
    now: i64,
) -> Result<bool> {
    let result = sqlx::query(
        "UPDATE message SET lease_expires_at = ?
         WHERE message_id = ? AND recipient = ? AND state = 'claimed' AND lease_id = ? AND lease_expires_at > ?",
    )
    .bind(lease_expires_at)
    .bind(message_id)
    .bind(recipient)
    .bind(lease_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Puts a dead letter back in the queue with a fresh delivery budget; false when it is not dead.
pub async fn replay(
    conn: &mut SqliteConnection,
    recipient: &str,
    message_id: &str,
    now: i64,
) -> Result<Option<(i64, String)>> {
    Ok(sqlx::query_as(
        "UPDATE message
         SET state = 'queued', delivery_count = 0, visible_at = ?, lease_id = NULL,
             lease_expires_at = NULL, finished_at = NULL
         WHERE message_id = ? AND recipient = ? AND state = 'dead'
         RETURNING priority, sender",
    )
    .bind(now)
    .bind(message_id)
    .bind(recipient)
    .fetch_optional(conn)
    .await?)
}

/// Whether any lease has run out (for `Store::any_due`).
pub const ANY_EXPIRED_LEASE: &str =
    "SELECT EXISTS (SELECT 1 FROM message WHERE state = 'claimed' AND lease_expires_at <= ?)";

/// A message whose lease ran out, as the reaper left it.
pub struct Reaped {
    pub message_id: String,
    pub recipient: String,
    pub sender: String,
    pub priority: i64,
    pub state: String,
    pub delivery_count: i64,
}

/// Ends up to `batch` expired leases: back to the queue, or to the dead letters after
/// `max_deliveries`.
pub async fn reap_expired(
    conn: &mut SqliteConnection,
    max_deliveries: u32,
    now: i64,
    batch: u32,
) -> Result<Vec<Reaped>> {
    let rows = sqlx::query(
        "UPDATE message
         SET state = CASE WHEN delivery_count >= ? THEN 'dead' ELSE 'queued' END,
             finished_at = CASE WHEN delivery_count >= ? THEN ? END
         WHERE seq IN (SELECT seq FROM message WHERE state = 'claimed' AND lease_expires_at <= ?
                       ORDER BY lease_expires_at LIMIT ?)
         RETURNING message_id, recipient, sender, priority, state, delivery_count",
    )
    .bind(max_deliveries)
    .bind(max_deliveries)
    .bind(now)
    .bind(now)
    .bind(batch)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Reaped {
                message_id: r.try_get("message_id")?,
                recipient: r.try_get("recipient")?,
                sender: r.try_get("sender")?,
                priority: r.try_get("priority")?,
                state: r.try_get("state")?,
                delivery_count: r.try_get("delivery_count")?,
            })
        })
        .collect()
}

/// When the `max_rows`-th newest acked message was acked (None with fewer acked messages): the
/// ones acked before it are past the count kept.
pub async fn acked_finished_at(pool: &SqlitePool, max_rows: u32) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT finished_at FROM message WHERE state = 'acked'
         ORDER BY finished_at DESC LIMIT 1 OFFSET ?",
    )
    .bind(i64::from(max_rows) - 1)
    .fetch_optional(pool)
    .await?)
}

/// Forgets up to `batch` acked messages finished before `cutoff` (a repeated ack after that is
/// 404).
pub async fn prune_acked(conn: &mut SqliteConnection, cutoff: i64, batch: u32) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM message WHERE seq IN (SELECT seq FROM message WHERE state = 'acked' AND finished_at < ? LIMIT ?)",
    )
    .bind(cutoff)
    .bind(batch)
    .execute(conn)
    .await?
    .rows_affected())
}

/// A page of `recipient`'s messages in `state`, in claim order, after the cursor position
/// `(priority, seq)`.
pub async fn list(
    pool: &SqlitePool,
    recipient: &str,
    state: &str,
    after: (i64, i64),
    limit: u32,
) -> Result<Vec<MessageRow>> {
    let rows = sqlx::query(
        "SELECT seq, message_id, sender, recipient, message_type, content, priority, correlation_id,
                created_at, state, delivery_count, lease_id, lease_expires_at
         FROM message
         WHERE recipient = ? AND state = ? AND (priority < ? OR (priority = ? AND seq > ?))
         ORDER BY priority DESC, seq LIMIT ?",
    )
    .bind(recipient)
    .bind(state)
    .bind(after.0)
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Looks up a stored answer to an `Idempotency-Key`.
pub async fn idempotent_answer(
    conn: &mut SqliteConnection,
    scope: &str,
    key: &str,
) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT body FROM idempotency WHERE scope = ? AND key = ?")
            .bind(scope)
            .bind(key)
            .fetch_optional(conn)
            .await?,
    )
}

/// Stores the answer to an `Idempotency-Key` (in the same transaction as the write it answers).
pub async fn remember_answer(
    conn: &mut SqliteConnection,
    scope: &str,
    key: &str,
    status: u16,
    body: &str,
    now: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO idempotency (scope, key, status, body, created_at) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(scope)
    .bind(key)
    .bind(status)
    .bind(body)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets idempotency answers older than `cutoff`.
pub async fn prune_idempotency(conn: &mut SqliteConnection, cutoff: i64) -> Result<u64> {
    Ok(sqlx::query("DELETE FROM idempotency WHERE created_at < ?")
        .bind(cutoff)
        .execute(conn)
        .await?
        .rows_affected())
}
