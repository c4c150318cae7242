//! Durable per-agent priority queues. A 202 on send means the message is committed to the store;
//! consumers claim → work → ack under leases. Rules:
//!
//! - Order: higher `priority` first, then send order, also across redeliveries.
//! - A lease is current while its id matches and it has not run out; ack, nack and extend under
//!   any other lease are 409 ("lease does not match": only the current lease is kept, so an old
//!   delivery's and one never issued look alike), so a slow consumer can never ack someone else's
//!   delivery. A repeated ack under the lease that acked is 204 while the acked message is
//!   remembered: an hour, or until `LTMC_ACKED_MAX_ROWS` newer acks push it out ([`prune_tick`]).
//! - One claim hands the same `lease_id` to every message it returns; each message's lease still
//!   lives, and is acked, nacked or extended, on its own.
//! - A lease that runs out puts the message back ([`reap_tick`]); after `max_deliveries` it moves
//!   to the dead letters without blocking the messages behind it, until replayed.
//! - Each send logs `new_message` for the recipient's stream in the same statement (a trigger);
//!   a redelivery or a replay notifies it again. Claims, acks, nacks and extends log no event.
//! - Sends, acks and claims are committed in batches ([`batch`]).

pub mod batch;
pub mod db;
mod reaper;
pub mod routes;

pub use reaper::{Reaped, prune_tick, reap_tick};

use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::admission::NewWork;
use crate::app::AppState;
use crate::common::{
    Page, new_id, now_ms, rfc3339, validate_agent_id, validate_name, validate_text,
};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::store::Lane;
use db::MessageRow;

/// A message to send.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    /// The sending agent (with an agent token: must be the token's agent).
    #[schema(value_type = crate::common::AgentId)]
    pub from: String,
    /// What kind of message this is (1-128 bytes), e.g. `task.request`.
    #[schema(min_length = 1, max_length = 128)]
    pub message_type: String,
    /// Any JSON, at most the configured content limit (256 KiB by default) when serialized.
    #[serde(deserialize_with = "crate::common::bounded_raw")]
    #[schema(value_type = Object)]
    pub content: Box<RawValue>,
    /// 0 (lowest, default) to 9 (highest).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 9)]
    pub priority: u8,
    /// Ties related messages together (at most 256 bytes).
    #[schema(min_length = 1, max_length = 256)]
    pub correlation_id: Option<String>,
}

/// The answer to a send.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SendReceipt {
    pub message_id: String,
    /// Whether the recipient is present (heartbeating) right now; the message waits either way.
    pub recipient_online: bool,
    /// Whether the recipient is registered (a record exists, whatever its presence): false
    /// flags a likely typo, though the message still waits for an agent that registers later.
    /// Answers stored before this field existed read as false.
    #[serde(default)]
    pub recipient_registered: bool,
}

/// A claim request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// How many messages at most (1-100, default 10).
    #[serde(default = "default_claim_limit")]
    #[schema(default = 10, minimum = 1, maximum = 100)]
    pub limit: u32,
    /// Seconds the lease lasts before the message is delivered again (1-43 200, default 30).
    #[serde(default = "default_visibility")]
    #[schema(default = 30, minimum = 1, maximum = 43_200)]
    pub visibility_timeout_s: u32,
    /// Ack the messages as they are handed out (at-most-once).
    #[serde(default)]
    pub auto_ack: bool,
}

impl Default for ClaimRequest {
    fn default() -> Self {
        ClaimRequest {
            limit: default_claim_limit(),
            visibility_timeout_s: default_visibility(),
            auto_ack: false,
        }
    }
}

fn default_claim_limit() -> u32 {
    10
}
fn default_visibility() -> u32 {
    30
}

/// Claimed messages, in claim order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Claimed {
    pub messages: Vec<Message>,
}

/// A queued message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Message {
    pub message_id: String,
    pub from: String,
    pub to: String,
    pub message_type: String,
    #[schema(value_type = Object)]
    pub content: Box<RawValue>,
    pub priority: i64,
    pub correlation_id: Option<String>,
    pub created_at: String,
    /// `queued`, `claimed`, `acked` or `dead`.
    pub state: String,
    pub delivery_count: i64,
    pub lease_id: Option<String>,
    pub lease_expires_at: Option<String>,
}

impl Message {
    fn from_row(row: MessageRow) -> Result<Message> {
        let holds_lease = row.state == "claimed";
        Ok(Message {
            content: RawValue::from_string(row.content)
                .map_err(|e| Error::Internal(e.to_string()))?,
            message_id: row.message_id,
            from: row.sender,
            to: row.recipient,
            message_type: row.message_type,
            priority: row.priority,
            correlation_id: row.correlation_id,
            created_at: rfc3339(row.created_at),
            state: row.state,
            delivery_count: row.delivery_count,
            lease_id: row.lease_id.filter(|_| holds_lease),
            lease_expires_at: row.lease_expires_at.filter(|_| holds_lease).map(rfc3339),
        })
    }
}

/// `{lease_id}`: ack.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub lease_id: String,
}

/// `{lease_id, delay_s?}`: nack.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nack {
    pub lease_id: String,
    /// Seconds before the message may be claimed again (0-43 200, default 0).
    #[serde(default)]
    #[schema(maximum = 43_200)]
    pub delay_s: u32,
}

/// `{lease_id, visibility_timeout_s}`: extend.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Extend {
    pub lease_id: String,
    /// The lease now ends this many seconds from now (1-43 200).
    #[schema(minimum = 1, maximum = 43_200)]
    pub visibility_timeout_s: u32,
}

/// `GET /v1/agents/{agent_id}/messages` filters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MessageQuery {
    /// `queued` (default), `claimed` or `dead`.
    pub state: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn check_visibility(field: &str, seconds: u32) -> Result<()> {
    if !(1..=43_200).contains(&seconds) {
        return Err(Error::invalid(field, "must be 1-43200 seconds"));
    }
    Ok(())
}

/// Sends a message; the answer is durable once this returns.
pub async fn send(
    state: &AppState,
    to: &str,
    new: NewMessage,
    idempotency_key: Option<&str>,
) -> Result<SendReceipt> {
    validate_agent_id("to", to)?;
    validate_agent_id("from", &new.from)?;
    validate_name("message_type", &new.message_type, 128)?;
    if new.priority > 9 {
        return Err(Error::invalid("priority", "must be 0-9"));
    }
    if let Some(correlation_id) = &new.correlation_id {
        validate_name("correlation_id", correlation_id, 256)?;
    }
    let max = state.config.limits.max_content_bytes as usize;
    if new.content.get().len() > max {
        return Err(Error::PayloadTooLarge(format!(
            "content is larger than {max} bytes"
        )));
    }
    if let Some(key) = idempotency_key {
        validate_text("Idempotency-Key", key, 256)?;
    }

    let _admitted = state.admission.admit(NewWork::Message, 1)?;
    let now = now_ms();
    let online = async {
        matches!(
            state.broker.presence(&[to], now).await.as_deref(),
            Ok([Some(_)])
        )
    };
    let commit = |recipient_online| async move {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = batch::SendJob {
            to: to.to_owned(),
            new,
            idempotency_key: idempotency_key.map(str::to_owned),
            recipient_online,
            now,
            reply,
        };
        state.batcher.submit(batch::Job::Send(job)).await?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the service is shutting down".into()))?
    };
    if idempotency_key.is_some() {
        // The stored answer includes `recipient_online`: know it before the commit.
        let recipient_online = online.await;
        return commit(recipient_online).await;
    }
    // Otherwise the presence lookup (a Redis round trip) overlaps the commit.
    let (recipient_online, receipt) = tokio::join!(online, commit(false));
    receipt.map(|receipt| SendReceipt {
        recipient_online,
        ..receipt
    })
}

/// Claims messages under a fresh lease.
pub async fn claim(state: &AppState, agent_id: &str, request: ClaimRequest) -> Result<Claimed> {
    validate_agent_id("agent_id", agent_id)?;
    if !(1..=db::MAX_CLAIM).contains(&request.limit) {
        return Err(Error::invalid("limit", "must be 1-100"));
    }
    check_visibility("visibility_timeout_s", request.visibility_timeout_s)?;
    let now = now_ms();
    let lease_id = new_id("lse");
    let expires = now + i64::from(request.visibility_timeout_s) * 1000;
    // One statement, no event: it takes its turn in the write batches (see `batch`).
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = batch::ClaimJob {
        agent_id: agent_id.to_owned(),
        limit: request.limit,
        lease_id,
        lease_expires_at: expires,
        auto_ack: request.auto_ack,
        now,
        reply,
    };
    state.batcher.submit(batch::Job::Claim(job)).await?;
    let rows = answer
        .await
        .map_err(|_| Error::Unavailable("the service is shutting down".into()))??;
    let messages = rows
        .into_iter()
        .map(Message::from_row)
        .collect::<Result<_>>()?;
    Ok(Claimed { messages })
}

/// Explains why a lease operation on `message_id` found no current lease, given where the
/// message stands.
fn refusal(
    current: Option<db::LeaseState>,
    agent_id: &str,
    message_id: &str,
    lease_id: &str,
) -> Error {
    let Some(current) = current else {
        return Error::NotFound(format!("no message {message_id:?} in {agent_id:?}'s queue"));
    };
    // Only the current lease is kept, so a lease that is not it may be an older delivery's or
    // one never issued (a typo): say only that it does not match.
    let ours = current.lease_id.as_deref() == Some(lease_id);
    Error::Conflict(match current.state.as_str() {
        "acked" if ours => "the message is already acked".to_owned(),
        "acked" => "lease does not match: the message was acked under another lease".to_owned(),
        "dead" => "the message is in the dead letters".to_owned(),
        "claimed" if ours => format!(
            "the lease ran out at {}; the message will be delivered again",
            rfc3339(current.lease_expires_at.unwrap_or_default())
        ),
        "claimed" => "lease does not match: the message is claimed under another lease".to_owned(),
        _ if ours => "the lease is over: the message is back in the queue".to_owned(),
        _ => "lease does not match: the message is queued, not claimed under this lease".to_owned(),
    })
}

/// Why a lease operation was refused, read inside its transaction.
async fn explain(
    tx: &mut crate::store::Writer,
    agent_id: &str,
    message_id: &str,
    lease_id: &str,
) -> Result<Error> {
    let current = db::lease_state(tx.conn(), agent_id, message_id).await?;
    Ok(refusal(current, agent_id, message_id, lease_id))
}

/// Acks a message; a repeated ack under the same lease is a success too. Committed in a batch
/// with other acks and sends (see [`batch`]).
pub async fn ack(state: &AppState, agent_id: &str, message_id: &str, body: Ack) -> Result<()> {
    validate_agent_id("agent_id", agent_id)?;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = batch::AckJob {
        agent_id: agent_id.to_owned(),
        message_id: message_id.to_owned(),
        lease_id: body.lease_id,
        now: now_ms(),
        reply,
    };
    state.batcher.submit(batch::Job::Ack(job)).await?;
    answer
        .await
        .map_err(|_| Error::Unavailable("the service is shutting down".into()))?
}

/// Gives a message back: it returns to its old place in the queue (after `delay_s`).
pub async fn nack(state: &AppState, agent_id: &str, message_id: &str, body: Nack) -> Result<()> {
    validate_agent_id("agent_id", agent_id)?;
    if body.delay_s > 43_200 {
        return Err(Error::invalid("delay_s", "must be 0-43200 seconds"));
    }
    let now = now_ms();
    let visible_at = now + i64::from(body.delay_s) * 1000;
    let max = state.config.limits.max_deliveries;
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    match db::nack(
        tx.conn(),
        agent_id,
        message_id,
        &body.lease_id,
        visible_at,
        max,
        now,
    )
    .await?
    {
        Some(new_state) => {
            if new_state == "dead" {
                tx.emit(dead_lettered(agent_id, message_id, i64::from(max)));
            }
            tx.commit(&state.broker).await?;
            state.metrics.messages.with_label_values(&["nacked"]).inc();
            Ok(())
        }
        None => Err(explain(&mut tx, agent_id, message_id, &body.lease_id).await?),
    }
}

/// Keeps a lease alive for `visibility_timeout_s` more seconds.
pub async fn extend(
    state: &AppState,
    agent_id: &str,
    message_id: &str,
    body: Extend,
) -> Result<()> {
    validate_agent_id("agent_id", agent_id)?;
    check_visibility("visibility_timeout_s", body.visibility_timeout_s)?;
    let now = now_ms();
    let expires = now + i64::from(body.visibility_timeout_s) * 1000;
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    if db::extend(
        tx.conn(),
        agent_id,
        message_id,
        &body.lease_id,
        expires,
        now,
    )
    .await?
    {
        return tx.commit(&state.broker).await;
    }
    Err(explain(&mut tx, agent_id, message_id, &body.lease_id).await?)
}

/// Puts a dead letter back in the queue with a fresh delivery budget.
pub async fn replay(state: &AppState, agent_id: &str, message_id: &str) -> Result<()> {
    validate_agent_id("agent_id", agent_id)?;
    let mut tx = state.store.begin().await?;
    match db::replay(tx.conn(), agent_id, message_id, now_ms()).await? {
        Some((priority, from)) => {
            tx.emit(
                NewEvent::new(
                    "messages",
                    "new_message",
                    json!({
                        "message_id": message_id, "from": from, "to": agent_id,
                        "priority": priority, "replayed": true,
                    }),
                )
                .to_agent(agent_id),
            );
            tx.commit(&state.broker).await
        }
        None => match db::lease_state(tx.conn(), agent_id, message_id).await? {
            None => Err(Error::NotFound(format!(
                "no message {message_id:?} in {agent_id:?}'s queue"
            ))),
            Some(current) => Err(Error::Conflict(format!(
                "only dead letters can be replayed; this message is {}",
                current.state
            ))),
        },
    }
}

/// A page of an agent's messages in one state, in claim order. Claims nothing.
pub async fn list(state: &AppState, agent_id: &str, query: MessageQuery) -> Result<Page<Message>> {
    validate_agent_id("agent_id", agent_id)?;
    let wanted = query.state.as_deref().unwrap_or("queued");
    if !["queued", "claimed", "dead"].contains(&wanted) {
        return Err(Error::invalid("state", "one of queued, claimed, dead"));
    }
    let page = crate::common::PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit(state.config.limits.max_page_size)?;
    let after = match page.cursor.as_deref() {
        None => (10, 0),
        Some(cursor) => cursor
            .split_once('.')
            .and_then(|(p, s)| Some((p.parse().ok()?, s.parse().ok()?)))
            .ok_or_else(|| Error::invalid("cursor", "not a cursor this endpoint issued"))?,
    };
    let rows = db::list(state.store.reader(), agent_id, wanted, after, limit + 1).await?;
    let cursors: Vec<String> = rows
        .iter()
        .map(|r| format!("{}.{}", r.priority, r.seq))
        .collect();
    let mut items = rows
        .into_iter()
        .map(Message::from_row)
        .collect::<Result<Vec<_>>>()?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = more.then(|| cursors[limit as usize - 1].clone());
    Ok(Page { items, next_cursor })
}

fn dead_lettered(agent_id: &str, message_id: &str, delivery_count: i64) -> NewEvent {
    NewEvent::new(
        "messages",
        "message.dead_lettered",
        json!({"message_id": message_id, "to": agent_id, "delivery_count": delivery_count}),
    )
    .to_agent(agent_id)
}
