//! The lease reaper and housekeeping of the queues, as step functions the background loop drives
//! (and tests call with the clock they need).

use serde_json::json;

use super::{db, dead_lettered};
use crate::app::AppState;
use crate::error::Result;
use crate::events::NewEvent;

/// How long an acked message is remembered (a repeated ack within it is 204).
const ACKED_RETENTION_MS: i64 = 3_600_000;
/// How long an `Idempotency-Key` answer is kept.
const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 3_600_000;

/// What one reaper step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    pub redelivered: usize,
    pub dead_lettered: usize,
}

/// One step of the lease reaper: expired leases go back to the queue (the recipient's stream is
/// told `new_message` again) or, past `max_deliveries`, to the dead letters.
pub async fn reap_tick(state: &AppState, now: i64) -> Result<Reaped> {
    let mut outcome = Reaped::default();
    if !state.store.any_due(db::ANY_EXPIRED_LEASE, now).await? {
        return Ok(outcome);
    }
    let mut tx = state.store.begin().await?;
    let reaped = db::reap_expired(tx.conn(), state.config.limits.max_deliveries, now, 1000).await?;
    for m in &reaped {
        if m.state == "dead" {
            outcome.dead_lettered += 1;
            tx.emit(dead_lettered(&m.recipient, &m.message_id, m.delivery_count));
        } else {
            outcome.redelivered += 1;
            tx.emit(
                NewEvent::new(
                    "messages",
                    "new_message",
                    json!({
                        "message_id": m.message_id, "from": m.sender, "to": m.recipient,
                        "priority": m.priority, "redelivered": true, "delivery_count": m.delivery_count,
                    }),
                )
                .to_agent(&m.recipient),
            );
        }
    }
    tx.commit(&state.broker).await?;
    Ok(outcome)
}

/// Housekeeping: forgets acked messages past their hour or past `LTMC_ACKED_MAX_ROWS` (the
/// oldest first), and idempotency answers past their retention.
pub async fn prune_tick(state: &AppState, now: i64) -> Result<u64> {
    // A batch per turn on the write connection, so other writes get theirs in between.
    const BATCH: u32 = 2000;
    // An hour of acks, or fewer when that is more than the configured count (found on the read
    // pool, so the writer never waits for the count).
    let max_rows = state.config.limits.acked_max_rows;
    let cutoff = match db::acked_finished_at(state.store.reader(), max_rows).await? {
        Some(oldest_kept) => oldest_kept.max(now - ACKED_RETENTION_MS),
        None => now - ACKED_RETENTION_MS,
    };
    let mut pruned = 0;
    loop {
        let mut conn = state.store.autocommit().await?;
        let deleted = db::prune_acked(&mut conn, cutoff, BATCH).await?;
        drop(conn);
        pruned += deleted;
        if deleted < u64::from(BATCH) {
            break;
        }
    }
    state.metrics.purged("acked_messages", pruned);
    let mut conn = state.store.autocommit().await?;
    Ok(pruned + db::prune_idempotency(&mut conn, now - IDEMPOTENCY_RETENTION_MS).await?)
}
