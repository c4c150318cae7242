//! Handoffs: an agent passes work, with its full context, to another, and the context provably
//! arrives intact (`context_digest`, the SHA-256 of its canonical JSON).
//!
//! States: `initiated → accepted → completed | failed`; `initiated → rejected | cancelled |
//! expired`; any other move is 409. Only the addressed agent accepts, completes or rejects; only
//! the initiator cancels. Initiation, in one transaction: the record, a memory, the graph edge
//! `agent:{from} —hands_off_to→ agent:{to}` (both written by the record's own INSERT, a trigger),
//! a `handoff.offered` message in the addressee's queue and the `handoff.offered` notification on
//! its stream. A chain of handoffs carrying one session
//! or workflow longer than the hop budget is refused (422, naming the loop). An offer not
//! accepted within `accept_timeout_s` expires ([`expire_tick`]). Both agents must be registered
//! (422 naming the one that is not). A finished handoff is purged after `LTMC_RETENTION_DAYS`,
//! unless its session or run is still going ([`crate::retention`]).

pub mod db;
pub mod routes;

use crate::ops::sla::Measure;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use crate::admission::NewWork;
use crate::agents;
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{
    hex, new_id, now_ms, rfc3339, validate_agent_id, validate_name, validate_text,
};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::memory;
use crate::messages;
use crate::store::{Lane, Writer};
use db::HandoffRow;

/// Largest context, serialized.
const MAX_CONTEXT: usize = 256 << 10;

/// A handoff to initiate.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHandoff {
    #[schema(value_type = crate::common::AgentId)]
    pub from_agent: String,
    #[schema(value_type = crate::common::AgentId)]
    pub to_agent: String,
    /// Everything the receiver needs (at most 256 KiB serialized).
    #[serde(deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: Option<String>,
    /// Handoffs carrying the same session or workflow form a chain, bounded by the hop budget.
    #[schema(min_length = 1, max_length = 128)]
    pub session_id: Option<String>,
    #[schema(min_length = 1, max_length = 128)]
    pub workflow_id: Option<String>,
    /// Seconds the offer stays open (1-86 400, default 300).
    #[serde(default = "default_accept_timeout")]
    #[schema(default = 300, minimum = 1, maximum = 86_400)]
    pub accept_timeout_s: u32,
}

fn default_accept_timeout() -> u32 {
    300
}

/// `{agent_id, context_digest?}`: accept.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    /// The addressed agent.
    #[schema(value_type = crate::common::AgentId)]
    pub agent_id: String,
    /// The digest the receiver computed; 409 when the stored context's differs.
    pub context_digest: Option<String>,
}

/// `{agent_id?, result?, success?}`: complete (`success: false` ends it `failed`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// The addressed agent (optional; with auth on the token says who is calling).
    pub agent_id: Option<String>,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    /// Default true; false records the handoff as `failed`.
    pub success: Option<bool>,
}

/// `{agent_id?, reason}`: reject.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reject {
    pub agent_id: Option<String>,
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: String,
}

/// A handoff.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Handoff {
    pub handoff_id: String,
    pub from_agent: String,
    pub to_agent: String,
    /// `initiated`, `accepted`, `completed`, `failed`, `rejected`, `cancelled` or `expired`.
    pub status: String,
    #[schema(value_type = Object)]
    pub context: Value,
    pub context_digest: String,
    pub reason: Option<String>,
    pub session_id: Option<String>,
    pub workflow_id: Option<String>,
    /// The memory recorded at initiation.
    pub memory_ref: String,
    /// The completion's result, or the rejection's reason.
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub created_at: String,
    pub expires_at: String,
    pub accepted_at: Option<String>,
    pub completed_at: Option<String>,
    /// From initiation to the final state; null while open.
    pub duration_ms: Option<i64>,
}

impl From<HandoffRow> for Handoff {
    fn from(h: HandoffRow) -> Self {
        Handoff {
            duration_ms: h.completed_at.map(|done| done - h.created_at),
            handoff_id: h.handoff_id,
            from_agent: h.from_agent,
            to_agent: h.to_agent,
            status: h.status,
            context: h.context,
            context_digest: h.context_digest,
            reason: h.reason,
            session_id: h.session_id,
            workflow_id: h.workflow_id,
            memory_ref: h.memory_ref,
            result: h.result,
            created_at: rfc3339(h.created_at),
            expires_at: rfc3339(h.expires_at),
            accepted_at: h.accepted_at.map(rfc3339),
            completed_at: h.completed_at.map(rfc3339),
        }
    }
}

/// `GET /v1/handoffs` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HandoffQuery {
    /// Handoffs from or to this agent.
    pub agent: Option<String>,
    pub status: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

const STATUSES: &[&str] = &[
    "initiated",
    "accepted",
    "completed",
    "failed",
    "rejected",
    "cancelled",
    "expired",
];

/// JSON with object keys sorted at every level and no whitespace.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                Value::Object(
                    entries
                        .into_iter()
                        .map(|(k, v)| (k.clone(), sorted(v)))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // serde_json writes a map in its iteration order; `sorted` fixes that order (with or
    // without serde_json's `preserve_order`).
    sorted(value).to_string()
}

/// SHA-256 (hex) of the canonical JSON.
pub fn digest(value: &Value) -> String {
    hex(&Sha256::digest(canonical_json(value).as_bytes()))
}

fn event(kind: &'static str, h: &HandoffRow, to: &str) -> NewEvent {
    NewEvent::new(
        "handoffs",
        kind,
        json!({
            "handoff_id": h.handoff_id, "from_agent": h.from_agent, "to_agent": h.to_agent,
            "status": h.status, "context_digest": h.context_digest, "reason": h.reason,
        }),
    )
    .to_agent(to)
}

/// Initiates a handoff (see the module doc for everything it records).
pub async fn initiate(state: &AppState, who: &Principal, new: NewHandoff) -> Result<Handoff> {
    validate_agent_id("from_agent", &new.from_agent)?;
    validate_agent_id("to_agent", &new.to_agent)?;
    if new.from_agent == new.to_agent {
        return Err(Error::invalid(
            "to_agent",
            "an agent cannot hand off to itself",
        ));
    }
    who.require_agent(&new.from_agent)?;
    if let Some(reason) = &new.reason {
        validate_text("reason", reason, 1024)?;
    }
    for (field, value) in [
        ("session_id", &new.session_id),
        ("workflow_id", &new.workflow_id),
    ] {
        if let Some(value) = value {
            validate_name(field, value, 128)?;
        }
    }
    if !(1..=86_400).contains(&new.accept_timeout_s) {
        return Err(Error::invalid(
            "accept_timeout_s",
            "must be 1-86400 seconds",
        ));
    }
    agents::require_registered(
        state,
        &[
            ("from_agent".to_owned(), new.from_agent.as_str()),
            ("to_agent".to_owned(), new.to_agent.as_str()),
        ],
    )
    .await?;
    let context = Value::Object(new.context);
    if context.to_string().len() > MAX_CONTEXT {
        return Err(Error::PayloadTooLarge(format!(
            "context is larger than {MAX_CONTEXT} bytes"
        )));
    }
    let context_digest = digest(&context);
    let now = now_ms();
    let handoff_id = new_id("hof");

    let _admitted = state.admission.admit(NewWork::Handoff, 1)?;
    let mut tx = state.store.begin().await?;
    if new.session_id.is_some() || new.workflow_id.is_some() {
        let chain = db::chain(
            tx.conn(),
            new.session_id.as_deref(),
            new.workflow_id.as_deref(),
        )
        .await?;
        let budget = state.config.limits.max_handoff_hops as usize;
        if chain.len() >= budget {
            let mut path: Vec<&str> = chain.iter().map(|(from, _)| from.as_str()).collect();
            path.extend(chain.last().map(|(_, to)| to.as_str()));
            path.push(&new.to_agent);
            let field = if new.session_id.is_some() {
                "session_id"
            } else {
                "workflow_id"
            };
            return Err(Error::invalid(
                field,
                format!(
                    "hop budget of {budget} handoffs exhausted for this chain: {}",
                    path.join(" → ")
                ),
            ));
        }
    }
    let handoff = HandoffRow {
        handoff_id,
        from_agent: new.from_agent,
        to_agent: new.to_agent,
        status: "initiated".into(),
        context,
        context_digest,
        reason: new.reason,
        session_id: new.session_id,
        workflow_id: new.workflow_id,
        memory_ref: new_id("mem"),
        result: None,
        created_at: now,
        expires_at: now + i64::from(new.accept_timeout_s) * 1000,
        accepted_at: None,
        completed_at: None,
    };
    db::insert(tx.conn(), &handoff).await?;
    recorded(&mut tx, &handoff);
    offer(&mut tx, &handoff, now).await?;
    tx.emit(event("handoff.offered", &handoff, &handoff.to_agent));
    tx.commit(&state.broker).await?;
    Ok(handoff.into())
}

/// Emits the events of what every handoff leaves behind, which its INSERT wrote (the trigger
/// `handoff_records`): a memory of it (its id is the handoff's `memory_ref`) and the graph edge
/// `agent:{from} —hands_off_to→ agent:{to}` (its id is the memory's with the prefix `edg_`).
fn recorded(tx: &mut Writer, h: &HandoffRow) {
    let tags = [
        "handoff".to_owned(),
        "coordination".to_owned(),
        h.from_agent.clone(),
        h.to_agent.clone(),
    ];
    tx.emit(memory::stored(&h.memory_ref, &tags));
    let edge_id = format!("edg_{}", h.memory_ref.trim_start_matches("mem_"));
    tx.emit(memory::linked(
        &edge_id,
        &format!("agent:{}", h.from_agent),
        &format!("agent:{}", h.to_agent),
        "hands_off_to",
    ));
}

/// Records the handoff between two consecutive steps of a sequential workflow, inside the
/// engine's transaction: already `accepted` (the engine hands the step over itself, so there is
/// no offer to wait for), with the previous step's output as its context; it becomes `completed`
/// or `failed` with the receiving step ([`settle_step_handoff`]). The hop budget does not apply:
/// the workflow's definition bounds the chain. Returns its id.
pub async fn record_step_handoff(
    tx: &mut Writer,
    from: &str,
    to: &str,
    context: Value,
    workflow_id: &str,
    reason: &str,
    now: i64,
) -> Result<String> {
    let handoff = HandoffRow {
        handoff_id: new_id("hof"),
        from_agent: from.to_owned(),
        to_agent: to.to_owned(),
        status: "accepted".into(),
        context_digest: digest(&context),
        context,
        reason: Some(reason.to_owned()),
        session_id: None,
        workflow_id: Some(workflow_id.to_owned()),
        memory_ref: new_id("mem"),
        result: None,
        created_at: now,
        expires_at: now,
        accepted_at: Some(now),
        completed_at: None,
    };
    db::insert(tx.conn(), &handoff).await?;
    recorded(tx, &handoff);
    tx.emit(event("handoff.accepted", &handoff, to));
    Ok(handoff.handoff_id)
}

/// Settles a step handoff when its receiving step ends: `completed` or `failed`. A handoff that
/// already left `accepted` is left as it is.
pub async fn settle_step_handoff(tx: &mut Writer, handoff_id: &str, success: bool) -> Result<()> {
    let (to, kind) = if success {
        ("completed", "handoff.completed")
    } else {
        ("failed", "handoff.failed")
    };
    if let Some(h) = db::settle(tx.conn(), handoff_id, to, now_ms()).await? {
        tx.emit(event(kind, &h, &h.from_agent));
    }
    Ok(())
}

/// Queues the `handoff.offered` message for the addressee (429 when its queue is full).
async fn offer(tx: &mut Writer, h: &HandoffRow, now: i64) -> Result<()> {
    let message_id = new_id("msg");
    let content = json!({
        "handoff_id": h.handoff_id, "from_agent": h.from_agent, "reason": h.reason,
        "context_digest": h.context_digest, "expires_at": rfc3339(h.expires_at),
    })
    .to_string();
    let row = messages::db::Insert {
        message_id: &message_id,
        sender: &h.from_agent,
        recipient: &h.to_agent,
        message_type: "handoff.offered",
        content: &content,
        priority: 5,
        correlation_id: Some(&h.handoff_id),
        now,
    };
    let inserted = messages::db::insert_many(tx.conn(), std::slice::from_ref(&row)).await?;
    if inserted.is_empty() {
        return Err(Error::TooManyRequests(format!(
            "queue full: {:?} cannot take the offer",
            h.to_agent
        )));
    }
    Ok(())
}

/// The handoff, or 404.
async fn load(tx: &mut Writer, handoff_id: &str) -> Result<HandoffRow> {
    db::get(tx.conn(), handoff_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no handoff {handoff_id:?}")))
}

/// Only the addressed agent moves an offer: its token (403 otherwise) and, when named in the
/// body, its id (409 otherwise: a wrong owner).
fn require_addressee(who: &Principal, h: &HandoffRow, named: Option<&str>) -> Result<()> {
    who.require_agent(&h.to_agent)?;
    match named {
        Some(agent) if agent != h.to_agent => Err(Error::Conflict(format!(
            "handoff {} is addressed to {:?}, not {agent:?}",
            h.handoff_id, h.to_agent
        ))),
        _ => Ok(()),
    }
}

/// Applies one move of the state machine inside `tx`; 409 when the handoff is not in `from`.
async fn move_to(
    tx: &mut Writer,
    mut h: HandoffRow,
    from: &str,
    to: &'static str,
    kind: &'static str,
    notify: &str,
    result: Option<Value>,
) -> Result<Handoff> {
    let now = now_ms();
    if !db::transition(tx.conn(), &h.handoff_id, from, to, now, result.as_ref()).await? {
        return Err(Error::Conflict(format!(
            "handoff {} is {}: it cannot become {to}",
            h.handoff_id, h.status
        )));
    }
    h.status = to.to_owned();
    if to == "accepted" {
        h.accepted_at = Some(now);
    } else {
        h.completed_at = Some(now);
    }
    if result.is_some() {
        h.result = result;
    }
    tx.emit(event(kind, &h, notify));
    Ok(h.into())
}

/// The addressee accepts; with a `context_digest` it proves the context it holds is the one sent.
pub async fn accept(
    state: &AppState,
    who: &Principal,
    handoff_id: &str,
    body: Accept,
) -> Result<Handoff> {
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    let h = load(&mut tx, handoff_id).await?;
    require_addressee(who, &h, Some(&body.agent_id))?;
    if let Some(digest) = &body.context_digest
        && !digest.eq_ignore_ascii_case(&h.context_digest)
    {
        let metrics = &state.metrics;
        // Counted once per handoff: the retries that follow a mismatch add nothing.
        metrics
            .sla
            .record_once(Measure::ContextPreserved, handoff_id, now_ms(), 0.0);
        return Err(Error::Conflict(format!(
            "context digest mismatch: the stored context hashes to {}",
            h.context_digest
        )));
    }
    let from = h.from_agent.clone();
    let initiated_at = h.created_at;
    let handoff = move_to(
        &mut tx,
        h,
        "initiated",
        "accepted",
        "handoff.accepted",
        &from,
        None,
    )
    .await?;
    tx.commit(&state.broker).await?;
    let now = now_ms();
    let waited_ms = (now - initiated_at).max(0);
    let metrics = &state.metrics;
    metrics.handoff_accept.observe(waited_ms as f64 / 1000.0);
    metrics
        .sla
        .record(Measure::HandoffTime, now, waited_ms as f64);
    if body.context_digest.is_some() {
        metrics
            .sla
            .record_once(Measure::ContextPreserved, handoff_id, now, 1.0);
    }
    Ok(handoff)
}

/// The addressee finishes the work: `completed`, or `failed` with `success: false`.
pub async fn complete(
    state: &AppState,
    who: &Principal,
    handoff_id: &str,
    body: Complete,
) -> Result<Handoff> {
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    let h = load(&mut tx, handoff_id).await?;
    require_addressee(who, &h, body.agent_id.as_deref())?;
    let (to, kind) = match body.success {
        Some(false) => ("failed", "handoff.failed"),
        _ => ("completed", "handoff.completed"),
    };
    let from = h.from_agent.clone();
    let handoff = move_to(&mut tx, h, "accepted", to, kind, &from, body.result).await?;
    tx.commit(&state.broker).await?;
    Ok(handoff)
}

/// The addressee declines the offer.
pub async fn reject(
    state: &AppState,
    who: &Principal,
    handoff_id: &str,
    body: Reject,
) -> Result<Handoff> {
    validate_text("reason", &body.reason, 1024)?;
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    let h = load(&mut tx, handoff_id).await?;
    require_addressee(who, &h, body.agent_id.as_deref())?;
    let from = h.from_agent.clone();
    let reason = Some(json!({"reason": body.reason}));
    let handoff = move_to(
        &mut tx,
        h,
        "initiated",
        "rejected",
        "handoff.rejected",
        &from,
        reason,
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(handoff)
}

/// The initiator withdraws the offer.
pub async fn cancel(state: &AppState, who: &Principal, handoff_id: &str) -> Result<Handoff> {
    let mut tx = state.store.begin().await?;
    let h = load(&mut tx, handoff_id).await?;
    who.require_agent(&h.from_agent)?;
    let to = h.to_agent.clone();
    let handoff = move_to(
        &mut tx,
        h,
        "initiated",
        "cancelled",
        "handoff.cancelled",
        &to,
        None,
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(handoff)
}

/// One handoff. Agent tokens see only handoffs they are part of.
pub async fn get(state: &AppState, who: &Principal, handoff_id: &str) -> Result<Handoff> {
    let h = db::get(state.store.reader(), handoff_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no handoff {handoff_id:?}")))?;
    if who.require_read_of(&h.from_agent).is_err() {
        who.require_read_of(&h.to_agent)?;
    }
    Ok(h.into())
}

/// Validates `GET /v1/handoffs` filters and who may see them.
pub fn check_query(who: &Principal, query: &HandoffQuery) -> Result<()> {
    if let Some(status) = &query.status
        && !STATUSES.contains(&status.as_str())
    {
        return Err(Error::invalid(
            "status",
            format!("one of {}", STATUSES.join(", ")),
        ));
    }
    match &query.agent {
        Some(agent) => {
            validate_agent_id("agent", agent)?;
            who.require_read_of(agent)
        }
        None => who.require_reader(),
    }
}

/// One step of the timer loop: offers past their accept timeout expire (each once, whichever
/// instance wins the compare-and-set), and the initiator is told. Returns how many expired.
pub async fn expire_tick(state: &AppState, now: i64) -> Result<usize> {
    if !state.store.any_due(db::ANY_DUE, now).await? {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let due = db::due(tx.conn(), now, 500).await?;
    let mut expired = 0;
    for h in due {
        let from = h.from_agent.clone();
        if db::transition(tx.conn(), &h.handoff_id, "initiated", "expired", now, None).await? {
            let h = HandoffRow {
                status: "expired".into(),
                completed_at: Some(now),
                ..h
            };
            tx.emit(event("handoff.expired", &h, &from));
            expired += 1;
        }
    }
    tx.commit(&state.broker).await?;
    Ok(expired)
}
