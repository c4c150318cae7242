//! The one event path. Every state change appends an [`Event`] to the store's event log in the
//! same transaction as the change (`store::Writer::emit`, or a trigger for a new message), is
//! published through the broker after commit (the store's outbox, in `seq` order) and fanned out
//! by the [`hub::Hub`] to the WebSocket connections on this instance: at once for this instance's
//! own events, through the single broker subscription for other instances'. Streams resume from
//! the log.

pub mod db;
pub mod hub;
pub mod stream;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::common::rfc3339;

/// The topics of the firehose (`/v1/events/stream?topics=`).
pub const TOPICS: &[&str] = &[
    "agents",
    "messages",
    "handoffs",
    "sessions",
    "workflows",
    "coordinations",
    "memory",
];

/// A committed state change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Position in the event log; only grows.
    pub seq: i64,
    pub topic: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Set when the event is also a notification on this agent's stream.
    pub agent_id: Option<String>,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub data: Value,
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub topic: &'static str,
    pub kind: &'static str,
    pub agent_id: Option<String>,
    pub data: Value,
}

impl NewEvent {
    /// An event for the firehose only.
    pub fn new(topic: &'static str, kind: &'static str, data: Value) -> Self {
        NewEvent {
            topic,
            kind,
            agent_id: None,
            data,
        }
    }

    /// An event that is also a notification on `agent_id`'s stream.
    pub fn to_agent(mut self, agent_id: &str) -> Self {
        self.agent_id = Some(agent_id.to_owned());
        self
    }
}

impl Event {
    /// The firehose frame: `{topic, type, seq, at, data}`.
    pub fn firehose_frame(&self) -> String {
        serde_json::json!({
            "topic": self.topic,
            "type": self.kind,
            "seq": self.seq,
            "at": rfc3339(self.at),
            "data": self.data,
        })
        .to_string()
    }

    /// The agent-stream frame: the event's data with `type`, `seq` and `at` beside it.
    pub fn agent_frame(&self) -> String {
        let mut frame = match &self.data {
            Value::Object(map) => map.clone(),
            other => Map::from_iter([("data".to_owned(), other.clone())]),
        };
        frame.insert("type".into(), Value::String(self.kind.clone()));
        frame.insert("seq".into(), Value::from(self.seq));
        frame.insert("at".into(), Value::String(rfc3339(self.at)));
        Value::Object(frame).to_string()
    }
}

/// Events always kept, whatever their age.
const KEEP_NEWEST_EVENTS: i64 = 1000;
/// Events deleted per write transaction: a few milliseconds of the writer each, so senders
/// queue behind a purge for no longer than behind any other batch.
const PRUNE_BATCH: i64 = 2000;

/// Prunes the event log past its retention (`LTMC_EVENT_RETENTION_H`) or past its size
/// (`LTMC_EVENT_MAX_ROWS`, the oldest go first), keeping the newest 1000 events either way, a
/// batch per transaction.
pub async fn prune_tick(state: &crate::app::AppState, now: i64) -> crate::error::Result<u64> {
    let limits = &state.config.limits;
    let cutoff = now - i64::from(limits.event_retention_h) * 3_600_000;
    let through = db::prunable_through(
        state.store.reader(),
        cutoff,
        KEEP_NEWEST_EVENTS,
        i64::from(limits.event_max_rows),
    )
    .await?;
    let mut pruned = 0;
    loop {
        let mut tx = state.store.begin().await?;
        let deleted = db::prune(tx.conn(), through, PRUNE_BATCH).await?;
        tx.commit(&state.broker).await?;
        pruned += deleted;
        if deleted < PRUNE_BATCH as u64 {
            state.metrics.purged("events", pruned);
            return Ok(pruned);
        }
    }
}
