//! The agent registry. The record (capabilities, limits, metadata, token hash) is in the store;
//! presence (status, last heartbeat, deadline) is in the broker only, so heartbeats never write
//! SQL. An agent not heard from within its `ttl_s` goes `offline`: the expiry step
//! ([`expire_tick`]) takes it out of the active set and emits `agent.expired`.
//!
//! Registered means a record exists, whatever the agent's presence (`available`, `busy` or
//! `offline`): registering creates it, only `DELETE` removes it. Work addressed to an agent by
//! name (a handoff, a coordination round, a workflow step) must name a registered one
//! ([`require_registered`]), so a typo is a 422 at once rather than work nobody ever claims; a
//! message may wait for an agent that registers later.

pub mod db;
pub mod routes;

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::{Principal, issue_agent_token, token_hash};
use crate::broker::Presence;
use crate::common::{Page, now_ms, rfc3339, validate_agent_id, validate_name, validate_printable};
use crate::error::{Error, FieldError, Result};
use crate::events::NewEvent;
use db::AgentRow;

/// Registration (or re-registration) of an agent.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    /// Chosen by the agent: 1-128 characters of `[A-Za-z0-9._:-]`.
    #[schema(value_type = crate::common::AgentId)]
    pub agent_id: String,
    /// What the agent can do (at most 64 entries of 1-128 bytes).
    #[schema(max_items = 64)]
    pub capabilities: Vec<String>,
    /// Tasks the agent takes at once (1-10 000, default 5).
    #[serde(default = "default_max_tasks")]
    #[schema(default = 5, minimum = 1, maximum = 10_000)]
    pub max_concurrent_tasks: u32,
    /// Seconds of silence before the agent goes offline (1-604 800, default 3 600).
    #[serde(default = "default_ttl")]
    #[schema(default = 3600, minimum = 1, maximum = 604_800)]
    pub ttl_s: u32,
    /// Free-form JSON object.
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

fn default_max_tasks() -> u32 {
    5
}
fn default_ttl() -> u32 {
    3600
}

/// A heartbeat: refreshes the TTL and optionally sets the status.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub status: Option<HeartbeatStatus>,
}

/// The statuses an agent may report for itself (`offline` is the registry's to say).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatStatus {
    Available,
    Busy,
}

impl HeartbeatStatus {
    fn as_str(self) -> &'static str {
        match self {
            HeartbeatStatus::Available => "available",
            HeartbeatStatus::Busy => "busy",
        }
    }
}

/// An agent as the registry sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    pub agent_id: String,
    pub capabilities: Vec<String>,
    /// `available`, `busy` or `offline` (not heard from within `ttl_s`).
    pub status: String,
    /// Tasks in hand: the workflow steps it holds, or what its last heartbeat reported when
    /// that is more.
    pub current_tasks: u32,
    pub max_concurrent_tasks: u32,
    pub ttl_s: u32,
    pub registered_at: String,
    pub last_seen_at: String,
    /// When the agent goes offline unless it heartbeats; null while offline.
    pub expires_at: Option<String>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The agent token: returned once, on the first registration, when auth is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Agent {
    fn from_parts(row: AgentRow, presence: Option<Presence>) -> Agent {
        let (status, current_tasks, last_seen_at, expires_at) = match presence {
            Some(p) => (
                p.status,
                p.current_tasks,
                p.last_seen_at,
                Some(rfc3339(p.expires_at)),
            ),
            None => ("offline".to_owned(), 0, row.last_seen_at, None),
        };
        Agent {
            agent_id: row.agent_id,
            capabilities: row.capabilities,
            status,
            current_tasks,
            max_concurrent_tasks: row.max_concurrent_tasks,
            ttl_s: row.ttl_s,
            registered_at: rfc3339(row.registered_at),
            last_seen_at: rfc3339(last_seen_at),
            expires_at,
            metadata: row.metadata,
            token: None,
        }
    }
}

fn validate(new: &NewAgent) -> Result<()> {
    validate_agent_id("agent_id", &new.agent_id)?;
    if new.agent_id.starts_with("ltmc:") || new.agent_id == "ltmc" {
        return Err(Error::invalid(
            "agent_id",
            "`ltmc` and ids starting `ltmc:` are the service's own",
        ));
    }
    if new.capabilities.len() > 64 {
        return Err(Error::invalid("capabilities", "at most 64 capabilities"));
    }
    for (i, capability) in new.capabilities.iter().enumerate() {
        validate_name(&format!("capabilities[{i}]"), capability, 128)?;
    }
    if !(1..=10_000).contains(&new.max_concurrent_tasks) {
        return Err(Error::invalid("max_concurrent_tasks", "must be 1-10000"));
    }
    if !(1..=604_800).contains(&new.ttl_s) {
        return Err(Error::invalid("ttl_s", "must be 1-604800 seconds"));
    }
    Ok(())
}

/// Where presence goes after a heartbeat or registration.
fn fresh_presence(status: &str, ttl_s: u32, current_tasks: u32, now: i64) -> Presence {
    Presence {
        status: status.to_owned(),
        last_seen_at: now,
        expires_at: now + i64::from(ttl_s) * 1000,
        current_tasks,
    }
}

/// Registers an agent, or refreshes it when it exists. Returns the agent and whether it is new.
pub async fn register(state: &AppState, who: &Principal, new: NewAgent) -> Result<(Agent, bool)> {
    validate(&new)?;
    who.require_agent(&new.agent_id)?;
    let now = now_ms();
    let mut row = AgentRow {
        agent_id: new.agent_id,
        capabilities: new.capabilities,
        max_concurrent_tasks: new.max_concurrent_tasks,
        ttl_s: new.ttl_s,
        metadata: serde_json::Value::Object(new.metadata),
        registered_at: now,
        last_seen_at: now,
    };
    let mut tx = state.store.begin().await?;
    let existing = db::get(tx.conn(), &row.agent_id).await?;
    let created = existing.is_none();
    let token = match existing {
        Some(old) => {
            row.registered_at = old.registered_at;
            db::update(tx.conn(), &row).await?;
            None
        }
        None => {
            // A first registration with auth on must come from the admin: it mints a credential.
            who.require_admin()?;
            let token = state.config.auth_enabled().then(issue_agent_token);
            db::insert(tx.conn(), &row, token.as_deref().map(token_hash).as_deref()).await?;
            token
        }
    };
    let kind = if created {
        "agent.registered"
    } else {
        "agent.updated"
    };
    tx.emit(NewEvent::new(
        "agents",
        kind,
        json!({"agent_id": row.agent_id, "capabilities": row.capabilities, "status": "available"}),
    ));
    tx.commit(&state.broker).await?;

    let current = state
        .broker
        .presence(&[&row.agent_id], now)
        .await
        .ok()
        .and_then(|mut p| p.pop().flatten());
    let presence = fresh_presence(
        "available",
        row.ttl_s,
        current.map_or(0, |p| p.current_tasks),
        now,
    );
    // The record is committed; presence is best effort here (the next heartbeat restores it).
    let presence = match state
        .broker
        .set_presence(&row.agent_id, &presence, i64::from(row.ttl_s) * 1000)
        .await
    {
        Ok(()) => Some(presence),
        Err(e) => {
            tracing::warn!(error = %e, agent_id = %row.agent_id, "presence not recorded");
            None
        }
    };
    let mut agent = Agent::from_parts(row, presence);
    agent.token = token;
    Ok((agent, created))
}

/// One agent, with its presence.
pub async fn get(state: &AppState, agent_id: &str) -> Result<Agent> {
    validate_agent_id("agent_id", agent_id)?;
    let row = db::get(state.store.reader(), agent_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("agent {agent_id:?} is not registered")))?;
    let presence = state
        .broker
        .presence(&[agent_id], now_ms())
        .await?
        .pop()
        .flatten();
    let mut agent = [Agent::from_parts(row, presence)];
    count_held(state, &mut agent).await?;
    let [agent] = agent;
    Ok(agent)
}

/// Raises each agent's `current_tasks` to the workflow steps it holds.
async fn count_held(state: &AppState, agents: &mut [Agent]) -> Result<()> {
    let ids: Vec<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    let held = crate::workflows::db::held(state.store.reader(), &ids).await?;
    for (agent_id, steps) in held {
        if let Some(agent) = agents.iter_mut().find(|a| a.agent_id == agent_id) {
            agent.current_tasks = agent
                .current_tasks
                .max(u32::try_from(steps).unwrap_or(u32::MAX));
        }
    }
    Ok(())
}

/// Filters of `GET /v1/agents`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AgentQuery {
    /// Only agents with this capability.
    pub capability: Option<String>,
    /// Only agents with this status (`available`, `busy`, `offline`).
    pub status: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// 422 naming each of `named` (field, agent id) that is not registered (see the module doc).
/// One read of the store, outside any write transaction.
pub async fn require_registered(state: &AppState, named: &[(String, &str)]) -> Result<()> {
    let ids: Vec<&str> = named.iter().map(|(_, id)| *id).collect();
    let missing = db::unregistered(state.store.reader(), &ids).await?;
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::Validation(
        named
            .iter()
            .filter(|(_, id)| missing.iter().any(|m| m == id))
            .map(|(field, id)| FieldError {
                field: field.clone(),
                message: format!("agent {id:?} is not registered"),
            })
            .collect(),
    ))
}

/// Agents by id, filtered by capability and status.
pub async fn list(state: &AppState, query: AgentQuery) -> Result<Page<Agent>> {
    let page = crate::common::PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let limit = page.limit(state.config.limits.max_page_size)?;
    if let Some(status) = &query.status
        && !["available", "busy", "offline"].contains(&status.as_str())
    {
        return Err(Error::invalid("status", "one of available, busy, offline"));
    }
    if let Some(capability) = &query.capability {
        validate_printable("capability", capability)?;
    }
    // The cursor is the last agent id of the previous page.
    if let Some(cursor) = &page.cursor {
        validate_agent_id("cursor", cursor)
            .map_err(|_| Error::invalid("cursor", "not a cursor this endpoint issued"))?;
    }
    let mut cursor = page.cursor.unwrap_or_default();
    let mut items = Vec::new();
    // A status filter is applied after the presence lookup, so keep reading until the page is
    // full or the registry is exhausted.
    loop {
        let rows = db::list(
            state.store.reader(),
            query.capability.as_deref(),
            &cursor,
            limit + 1,
        )
        .await?;
        let exhausted = rows.len() <= limit as usize;
        let Some(last) = rows.last() else { break };
        cursor = last.agent_id.clone();
        let ids: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
        let presence = state.broker.presence(&ids, now_ms()).await?;
        let mut agents: Vec<Agent> = rows
            .into_iter()
            .zip(presence)
            .map(|(row, p)| Agent::from_parts(row, p))
            .filter(|a| query.status.as_ref().is_none_or(|s| *s == a.status))
            .collect();
        count_held(state, &mut agents).await?;
        items.extend(agents);
        if exhausted || items.len() > limit as usize {
            break;
        }
    }
    Ok(Page::from_overfetch(items, limit, |a| a.agent_id.clone()))
}

/// Refreshes an agent's presence; heartbeats write only to the broker.
pub async fn heartbeat(state: &AppState, agent_id: &str, beat: Heartbeat) -> Result<Agent> {
    validate_agent_id("agent_id", agent_id)?;
    let row = db::get(state.store.reader(), agent_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("agent {agent_id:?} is not registered")))?;
    let now = now_ms();
    let current = state
        .broker
        .presence(&[agent_id], now)
        .await?
        .pop()
        .flatten();
    let status = match (beat.status, &current) {
        (Some(s), _) => s.as_str(),
        (None, Some(p)) => p.status.as_str(),
        (None, None) => "available",
    };
    let presence = fresh_presence(
        status,
        row.ttl_s,
        current.as_ref().map_or(0, |p| p.current_tasks),
        now,
    );
    state
        .broker
        .set_presence(agent_id, &presence, i64::from(row.ttl_s) * 1000)
        .await?;
    let mut agent = [Agent::from_parts(row, Some(presence))];
    count_held(state, &mut agent).await?;
    let [agent] = agent;
    Ok(agent)
}

/// Removes an agent's record and presence. Its queued messages stay: messages may wait for an
/// agent that is not registered.
pub async fn delete(state: &AppState, agent_id: &str) -> Result<()> {
    validate_agent_id("agent_id", agent_id)?;
    let mut tx = state.store.begin().await?;
    if !db::delete(tx.conn(), agent_id).await? {
        return Err(Error::NotFound(format!(
            "agent {agent_id:?} is not registered"
        )));
    }
    tx.emit(NewEvent::new(
        "agents",
        "agent.deleted",
        json!({"agent_id": agent_id}),
    ));
    tx.commit(&state.broker).await?;
    if let Err(e) = state.broker.remove_presence(agent_id).await {
        tracing::warn!(error = %e, agent_id, "presence not removed; it expires by itself");
    }
    Ok(())
}

/// One step of the expiry loop: agents whose presence deadline passed go offline and an
/// `agent.expired` event is emitted for each. Returns how many expired.
pub async fn expire_tick(state: &AppState, now: i64) -> Result<usize> {
    let expired = state.broker.take_expired(now).await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let mut count = 0;
    for (agent_id, deadline) in &expired {
        let Some(row) = db::get(tx.conn(), agent_id).await? else {
            continue;
        };
        let last_seen_at = deadline - i64::from(row.ttl_s) * 1000;
        db::set_last_seen(tx.conn(), agent_id, last_seen_at).await?;
        tx.emit(NewEvent::new(
            "agents",
            "agent.expired",
            json!({"agent_id": agent_id, "status": "offline", "last_seen_at": rfc3339(last_seen_at)}),
        ));
        count += 1;
    }
    tx.commit(&state.broker).await?;
    Ok(count)
}
