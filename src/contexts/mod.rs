//! Agent contexts and their synchronisation. Each agent has a versioned context (`values`); a
//! write may name the version it read (`If-Match`) and is refused with 409 when another write came
//! first. A sync gathers the named agents' contexts, reports conflicts (a key whose values differ
//! between agents), resolves them by strategy — `last_writer_wins` (the most recently updated
//! context), `fail_on_conflict` (nothing written, 409 with the conflicts) or `prefer_agent` —
//! and writes the merged context to every agent (version bumped, `context.updated` on its stream).

pub mod db;
pub mod routes;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::common::{new_id, now_ms, rfc3339, validate_agent_id};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::memory::{self, NewMemory};
use crate::store::Writer;

/// Largest context, serialized.
const MAX_CONTEXT: usize = 256 << 10;

/// An agent's context.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Context {
    pub agent_id: String,
    #[schema(value_type = Object)]
    pub values: Map<String, Value>,
    /// 0 until the first write; each write adds one.
    pub version: i64,
    pub updated_at: Option<String>,
}

/// `{values}` of PUT (replace) and PATCH (merge: keys set, a null value removes the key).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContextWrite {
    #[serde(deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub values: Map<String, Value>,
}

/// How a sync resolves conflicts.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    LastWriterWins,
    FailOnConflict,
    PreferAgent,
}

/// A sync request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSync {
    /// 2 to 100 agents.
    #[schema(value_type = Vec<crate::common::AgentId>, min_items = 2, max_items = 100)]
    pub agents: Vec<String>,
    #[serde(default)]
    pub strategy: Strategy,
    /// With `prefer_agent`: whose values win (one of `agents`).
    #[schema(value_type = Option<crate::common::AgentId>)]
    pub prefer_agent: Option<String>,
}

/// A key whose values differ between agents.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Conflict {
    pub key: String,
    /// agent id → its value.
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, Value>,
}

/// What a sync did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SyncResult {
    pub sync_id: String,
    pub agents_synced: Vec<String>,
    pub strategy: Strategy,
    pub conflicts: Vec<Conflict>,
    pub conflicts_resolved: usize,
    #[schema(value_type = Object)]
    pub merged: Map<String, Value>,
    pub success: bool,
}

/// The keys that several agents hold with different values, each with every agent's value (also
/// used by coordination rounds over their responses).
pub fn find_conflicts<'a>(
    objects: impl IntoIterator<Item = (&'a str, &'a Map<String, Value>)>,
) -> Vec<Conflict> {
    let mut by_key: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for (agent, values) in objects {
        for (key, value) in values {
            by_key
                .entry(key.clone())
                .or_default()
                .insert(agent.to_owned(), value.clone());
        }
    }
    by_key
        .into_iter()
        .filter(|(_, values)| {
            values
                .values()
                .skip(1)
                .any(|v| Some(v) != values.values().next())
        })
        .map(|(key, values)| Conflict { key, values })
        .collect()
}

/// Reads an agent's context.
pub async fn get(state: &AppState, agent_id: &str) -> Result<Context> {
    validate_agent_id("agent_id", agent_id)?;
    let (values, version, updated_at) = db::get(state.store.reader(), agent_id).await?;
    Ok(Context {
        agent_id: agent_id.to_owned(),
        values,
        version,
        updated_at: updated_at.map(rfc3339),
    })
}

/// Writes one agent's context in `tx` (version check included) and notifies its stream.
async fn write(
    tx: &mut Writer,
    agent_id: &str,
    values: &Map<String, Value>,
    read_version: i64,
    why: &str,
) -> Result<Context> {
    if Value::Object(values.clone()).to_string().len() > MAX_CONTEXT {
        return Err(Error::PayloadTooLarge(format!(
            "context is larger than {MAX_CONTEXT} bytes"
        )));
    }
    let now = now_ms();
    if !db::put(tx.conn(), agent_id, values, read_version, now).await? {
        return Err(Error::Conflict(format!(
            "context of {agent_id:?} changed since version {read_version}"
        )));
    }
    let version = read_version + 1;
    tx.emit(
        NewEvent::new(
            "agents",
            "context.updated",
            json!({"agent_id": agent_id, "version": version, "by": why}),
        )
        .to_agent(agent_id),
    );
    Ok(Context {
        agent_id: agent_id.to_owned(),
        values: values.clone(),
        version,
        updated_at: Some(rfc3339(now)),
    })
}

/// PUT (`merge: false`) or PATCH (`merge: true`) an agent's context; `if_match` is the version
/// the writer read (409 when it is no longer current).
pub async fn update(
    state: &AppState,
    agent_id: &str,
    body: ContextWrite,
    merge: bool,
    if_match: Option<i64>,
) -> Result<Context> {
    validate_agent_id("agent_id", agent_id)?;
    let mut tx = state.store.begin().await?;
    let (current, version, updated_at) = db::get(tx.conn(), agent_id).await?;
    let mut values = current.clone();
    if let Some(expected) = if_match
        && expected != version
    {
        return Err(Error::Conflict(format!(
            "If-Match {expected}: the context of {agent_id:?} is at version {version}"
        )));
    }
    if merge {
        for (key, value) in body.values {
            if value.is_null() {
                values.remove(&key);
            } else {
                values.insert(key, value);
            }
        }
    } else {
        values = body.values;
    }
    if version > 0 && values == current {
        // Nothing changes: no new version, no notification.
        return Ok(Context {
            agent_id: agent_id.to_owned(),
            values,
            version,
            updated_at: updated_at.map(rfc3339),
        });
    }
    let context = write(
        &mut tx,
        agent_id,
        &values,
        version,
        if merge { "patch" } else { "put" },
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(context)
}

/// Gathers, merges and writes back the named agents' contexts.
pub async fn sync(state: &AppState, new: NewSync) -> Result<SyncResult> {
    if !(2..=100).contains(&new.agents.len()) {
        return Err(Error::invalid("agents", "name 2-100 agents"));
    }
    for (i, agent) in new.agents.iter().enumerate() {
        validate_agent_id(&format!("agents[{i}]"), agent)?;
    }
    let mut agents = new.agents.clone();
    agents.sort();
    agents.dedup();
    if agents.len() != new.agents.len() {
        return Err(Error::invalid("agents", "each agent once"));
    }
    let preferred = match (new.strategy, &new.prefer_agent) {
        (Strategy::PreferAgent, Some(agent)) if new.agents.contains(agent) => Some(agent.clone()),
        (Strategy::PreferAgent, _) => {
            return Err(Error::invalid("prefer_agent", "name one of `agents`"));
        }
        (_, Some(_)) => {
            return Err(Error::invalid(
                "prefer_agent",
                "only with strategy prefer_agent",
            ));
        }
        (_, None) => None,
    };

    let mut tx = state.store.begin().await?;
    let mut contexts = Vec::with_capacity(new.agents.len());
    for agent in &new.agents {
        let (values, version, updated_at) = db::get(tx.conn(), agent).await?;
        contexts.push((agent.clone(), values, version, updated_at.unwrap_or(0)));
    }
    let conflicts = find_conflicts(
        contexts
            .iter()
            .map(|(agent, values, _, _)| (agent.as_str(), values)),
    );
    if new.strategy == Strategy::FailOnConflict && !conflicts.is_empty() {
        let keys: Vec<&str> = conflicts.iter().map(|c| c.key.as_str()).collect();
        return Err(Error::ConflictWith(
            format!("conflicting keys, nothing written: {}", keys.join(", ")),
            json!(conflicts),
        ));
    }
    // Merge: the oldest context first, so newer writers overwrite; the preferred agent last.
    let mut order: Vec<usize> = (0..contexts.len()).collect();
    order.sort_by_key(|&i| (Some(&contexts[i].0) == preferred.as_ref(), contexts[i].3));
    let mut merged = Map::new();
    for i in order {
        merged.extend(contexts[i].1.clone());
    }
    let sync_id = new_id("sync");
    // An agent that already holds the merged context keeps its version (no needless 409 for a
    // writer that read it).
    for (agent, values, version, _) in &contexts {
        if *values != merged {
            write(&mut tx, agent, &merged, *version, &sync_id).await?;
        }
    }
    memory::store_memory(
        &mut tx,
        NewMemory {
            content: format!(
                "Context sync across {} agents: {} conflicts",
                contexts.len(),
                conflicts.len()
            ),
            tags: vec!["sync".into(), "context".into()],
            metadata: Map::from_iter([
                ("sync_id".to_owned(), json!(sync_id)),
                ("agents".to_owned(), json!(new.agents)),
                ("strategy".to_owned(), json!(new.strategy)),
                (
                    "conflicts".to_owned(),
                    json!(conflicts.iter().map(|c| &c.key).collect::<Vec<_>>()),
                ),
            ]),
        },
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(SyncResult {
        sync_id,
        agents_synced: new.agents,
        strategy: new.strategy,
        conflicts_resolved: conflicts.len(),
        conflicts,
        merged,
        success: true,
    })
}
