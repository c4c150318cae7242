//! Coordination rounds (scatter–gather): one question (`topic`, `payload`) to N agents, each of
//! which gets a `coordination.request` message and notification; answers are accepted from the
//! named agents only, once each. The round is `completed` when all have answered, `timed_out` at
//! its deadline ([`expire_tick`]); the answer lists who is `missing` and the `conflicts` (result
//! keys whose values differ between responses). `?wait_ms=` long-polls until the round ends.
//! Every named agent must be registered (422 naming each one that is not). A finished round is
//! purged after `LTMC_RETENTION_DAYS` ([`crate::retention`]).

pub mod db;
pub mod routes;

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::agents;
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{new_id, now_ms, rfc3339, validate_agent_id, validate_name};
use crate::contexts::{Conflict, find_conflicts};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::events::hub::{Delivery, Interest};
use crate::memory::{self, NewMemory};
use crate::messages;
use crate::store::Lane;
use db::{ResponseRow, RoundRow};

/// Longest deadline and long-poll, in milliseconds.
const MAX_WAIT_MS: u32 = 30_000;
/// Largest payload or result, serialized.
const MAX_OBJECT: usize = 64 << 10;

/// A round to start.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRound {
    /// 1 to 100 agents.
    #[schema(value_type = Vec<crate::common::AgentId>, min_items = 1, max_items = 100)]
    pub agents: Vec<String>,
    /// What is asked, e.g. `tech_stack_validation` (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub topic: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub payload: Map<String, Value>,
    /// Milliseconds until the round times out (1-30 000, default 30 000).
    #[serde(default = "default_timeout")]
    #[schema(default = 30000, minimum = 1, maximum = 30_000)]
    pub timeout_ms: u32,
}

fn default_timeout() -> u32 {
    MAX_WAIT_MS
}

/// The answer to starting a round.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Started {
    pub coordination_id: String,
    pub status: String,
    pub deadline: String,
}

/// One agent's answer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewResponse {
    #[schema(value_type = crate::common::AgentId)]
    pub agent_id: String,
    pub success: bool,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub result: Map<String, Value>,
}

/// A recorded answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Response {
    pub agent_id: String,
    pub success: bool,
    #[schema(value_type = Object)]
    pub result: Value,
    pub at: String,
}

/// A round and what it gathered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Round {
    pub coordination_id: String,
    pub topic: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    pub agents: Vec<String>,
    /// `collecting`, `completed` or `timed_out`.
    pub status: String,
    pub responses: Vec<Response>,
    /// Agents that have not answered.
    pub missing: Vec<String>,
    /// Result keys whose values differ between responses.
    pub conflicts: Vec<Conflict>,
    pub created_at: String,
    pub deadline: String,
    /// From start to the end of the round (so far, while collecting).
    pub duration_ms: i64,
}

/// `GET /v1/coordinations/{id}` options.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RoundQuery {
    /// Wait up to this many milliseconds (0-30 000) for the round to end.
    #[param(maximum = 30_000)]
    pub wait_ms: Option<u32>,
}

fn check_object(field: &str, object: &Map<String, Value>) -> Result<Value> {
    let value = Value::Object(object.clone());
    if value.to_string().len() > MAX_OBJECT {
        return Err(Error::PayloadTooLarge(format!(
            "{field} is larger than {MAX_OBJECT} bytes"
        )));
    }
    Ok(value)
}

/// Starts a round: the record, a memory, and a `coordination.request` to every agent.
pub async fn start(state: &AppState, new: NewRound) -> Result<Started> {
    if !(1..=100).contains(&new.agents.len()) {
        return Err(Error::invalid("agents", "name 1-100 agents"));
    }
    for (i, agent) in new.agents.iter().enumerate() {
        validate_agent_id(&format!("agents[{i}]"), agent)?;
    }
    if new.agents.iter().collect::<HashSet<_>>().len() != new.agents.len() {
        return Err(Error::invalid("agents", "each agent once"));
    }
    validate_name("topic", &new.topic, 128)?;
    if !(1..=MAX_WAIT_MS).contains(&new.timeout_ms) {
        return Err(Error::invalid(
            "timeout_ms",
            format!("must be 1-{MAX_WAIT_MS}"),
        ));
    }
    let payload = check_object("payload", &new.payload)?;
    let named: Vec<(String, &str)> = new
        .agents
        .iter()
        .enumerate()
        .map(|(i, agent)| (format!("agents[{i}]"), agent.as_str()))
        .collect();
    agents::require_registered(state, &named).await?;
    let now = now_ms();
    let round = RoundRow {
        coordination_id: new_id("crd"),
        topic: new.topic,
        payload,
        agents: new.agents,
        status: "collecting".into(),
        created_at: now,
        deadline: now + i64::from(new.timeout_ms),
        finished_at: None,
    };
    let mut tx = state.store.begin().await?;
    db::insert(tx.conn(), &round).await?;
    let request = json!({
        "coordination_id": round.coordination_id, "topic": round.topic, "payload": round.payload,
        "deadline": rfc3339(round.deadline),
    });
    let content = request.to_string();
    let ids: Vec<String> = round.agents.iter().map(|_| new_id("msg")).collect();
    let rows: Vec<messages::db::Insert> = round
        .agents
        .iter()
        .zip(&ids)
        .map(|(agent, message_id)| messages::db::Insert {
            message_id,
            sender: "ltmc",
            recipient: agent,
            message_type: "coordination.request",
            content: &content,
            priority: 5,
            correlation_id: Some(&round.coordination_id),
            now,
        })
        .collect();
    let queued = messages::db::insert_many(tx.conn(), &rows).await?;
    if queued.len() != rows.len() {
        return Err(Error::TooManyRequests(
            "queue full: an agent of the round cannot take the request".into(),
        ));
    }
    for agent in &round.agents {
        tx.emit(
            NewEvent::new("coordinations", "coordination.request", request.clone()).to_agent(agent),
        );
    }
    memory::store_memory(
        &mut tx,
        NewMemory {
            content: format!(
                "Coordination round {} across {} agents",
                round.topic,
                round.agents.len()
            ),
            tags: vec!["coordination".into(), round.topic.clone()],
            metadata: Map::from_iter([
                ("coordination_id".to_owned(), json!(round.coordination_id)),
                ("agents".to_owned(), json!(round.agents)),
            ]),
        },
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(Started {
        coordination_id: round.coordination_id,
        status: round.status,
        deadline: rfc3339(round.deadline),
    })
}

/// Records one agent's answer; the last one completes the round.
pub async fn respond(
    state: &AppState,
    who: &Principal,
    coordination_id: &str,
    new: NewResponse,
) -> Result<()> {
    validate_agent_id("agent_id", &new.agent_id)?;
    who.require_agent(&new.agent_id)?;
    let result = check_object("result", &new.result)?;
    let now = now_ms();
    let mut tx = state.store.begin_in(Lane::Finish).await?;
    let round = db::get(tx.conn(), coordination_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no coordination {coordination_id:?}")))?;
    if !round.agents.contains(&new.agent_id) {
        return Err(Error::Conflict(format!(
            "{:?} is not part of coordination {coordination_id}",
            new.agent_id
        )));
    }
    if round.status != "collecting" || now >= round.deadline {
        return Err(Error::Conflict(format!(
            "coordination {coordination_id} is no longer collecting"
        )));
    }
    let answer = ResponseRow {
        agent_id: new.agent_id.clone(),
        success: new.success,
        result,
        at: now,
    };
    if !db::respond(tx.conn(), coordination_id, &answer).await? {
        return Err(Error::Conflict(format!(
            "{:?} has already answered",
            new.agent_id
        )));
    }
    tx.emit(NewEvent::new(
        "coordinations",
        "coordination.response",
        json!({"coordination_id": coordination_id, "agent_id": new.agent_id, "success": new.success}),
    ));
    if db::responses(tx.conn(), coordination_id).await?.len() == round.agents.len()
        && db::finish(tx.conn(), coordination_id, "completed", now).await?
    {
        tx.emit(NewEvent::new(
            "coordinations",
            "coordination.completed",
            json!({"coordination_id": coordination_id}),
        ));
    }
    tx.commit(&state.broker).await
}

/// The round with its responses, missing agents and conflicts; a round past its deadline reads
/// as `timed_out` even before the timer step records it.
async fn read(state: &AppState, coordination_id: &str) -> Result<(Round, i64)> {
    let round = db::get(state.store.reader(), coordination_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no coordination {coordination_id:?}")))?;
    let responses = db::responses(state.store.reader(), coordination_id).await?;
    let now = now_ms();
    let status = if round.status == "collecting" && now >= round.deadline {
        "timed_out".into()
    } else {
        round.status
    };
    let answered: HashSet<&str> = responses.iter().map(|r| r.agent_id.as_str()).collect();
    let missing = round
        .agents
        .iter()
        .filter(|a| !answered.contains(a.as_str()))
        .cloned()
        .collect();
    let conflicts = find_conflicts(responses.iter().filter_map(|r| match &r.result {
        Value::Object(result) => Some((r.agent_id.as_str(), result)),
        _ => None,
    }));
    let end = match status.as_str() {
        "collecting" => now,
        "timed_out" => round.finished_at.unwrap_or(round.deadline),
        _ => round.finished_at.unwrap_or(now),
    };
    let deadline = round.deadline;
    let round = Round {
        coordination_id: round.coordination_id,
        topic: round.topic,
        payload: round.payload,
        agents: round.agents,
        status,
        responses: responses
            .into_iter()
            .map(|r| Response {
                agent_id: r.agent_id,
                success: r.success,
                result: r.result,
                at: rfc3339(r.at),
            })
            .collect(),
        missing,
        conflicts,
        created_at: rfc3339(round.created_at),
        deadline: rfc3339(round.deadline),
        duration_ms: end - round.created_at,
    };
    Ok((round, deadline))
}

/// The round; with `wait_ms`, waits (up to 30 s) for it to end, woken by its events.
pub async fn get(
    state: &AppState,
    who: &Principal,
    coordination_id: &str,
    wait_ms: Option<u32>,
) -> Result<Round> {
    let wait_ms = wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(Error::invalid(
            "wait_ms",
            format!("must be 0-{MAX_WAIT_MS}"),
        ));
    }
    // Subscribe before the first read, so an ending between the two is not missed.
    let mut events = state.hub.subscribe(
        Interest::Topics(HashSet::from(["coordinations".to_owned()])),
        64,
    );
    let (mut round, deadline) = read(state, coordination_id).await?;
    if who.require_reader().is_err() && !round.agents.iter().any(|a| who.require_agent(a).is_ok()) {
        return Err(Error::Forbidden(
            "only the agents of this round may read it".into(),
        ));
    }
    let give_up = tokio::time::Instant::now() + Duration::from_millis(wait_ms.into());
    while round.status == "collecting" && tokio::time::Instant::now() < give_up {
        let until_deadline =
            Duration::from_millis(u64::try_from(deadline - now_ms()).unwrap_or(0) + 1);
        let wake = give_up.min(tokio::time::Instant::now() + until_deadline);
        tokio::select! {
            delivery = events.rx.recv() => match delivery {
                Some(Delivery::Frame(event)) if !event.firehose_frame().contains(coordination_id) => {
                    continue;
                }
                Some(_) => {}
                // Dropped by the hub (a burst): fall back to waiting out the time.
                None => tokio::time::sleep_until(wake).await,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
        round = read(state, coordination_id).await?.0;
    }
    Ok(round)
}

/// One step of the timer loop: rounds past their deadline become `timed_out`. Returns how many.
pub async fn expire_tick(state: &AppState, now: i64) -> Result<usize> {
    if !state.store.any_due(db::ANY_DUE, now).await? {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let mut timed_out = 0;
    for coordination_id in db::due(tx.conn(), now, 500).await? {
        if db::finish(tx.conn(), &coordination_id, "timed_out", now).await? {
            tx.emit(NewEvent::new(
                "coordinations",
                "coordination.timed_out",
                json!({"coordination_id": coordination_id}),
            ));
            timed_out += 1;
        }
    }
    tx.commit(&state.broker).await?;
    Ok(timed_out)
}
