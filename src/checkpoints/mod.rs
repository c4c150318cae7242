//! Coordination checkpoints: save a coordination's state and restore it in milliseconds. The
//! store is the truth; the broker caches each checkpoint (`cache:chk:{id}`, one hour), so a
//! restore answers from the cache when it can (`source: cache`) and from the store otherwise
//! (`source: store`, refilling the cache) — after a restart of the service or a FLUSHALL of
//! Redis nothing is lost. The newest `LTMC_CHECKPOINT_RETENTION` (100) per coordination are kept;
//! a coordination that saved nothing for `LTMC_RETENTION_DAYS` and is not a run, session or round
//! still going loses them all ([`crate::retention`]).

pub mod db;
pub mod routes;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, json};
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::common::{new_id, now_ms, rfc3339, validate_agent_id, validate_name};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::memory::{self, NewMemory};

/// How long a checkpoint stays in the broker's cache.
const CACHE_TTL_MS: i64 = 3_600_000;
/// Largest state, serialized.
const MAX_STATE: usize = 512 << 10;

/// A checkpoint to save.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCheckpoint {
    /// The coordination (workflow, session, round, …) this is a checkpoint of (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub coordination_id: String,
    /// The state to restore: a JSON object of at most 512 KiB, kept and answered as sent.
    #[serde(deserialize_with = "crate::common::bounded_raw")]
    #[schema(value_type = Object)]
    pub state: Box<RawValue>,
    /// The agents taking part.
    #[serde(default)]
    #[schema(value_type = Vec<crate::common::AgentId>, max_items = 1000)]
    pub agents: Vec<String>,
    /// The coordination's status at this point, e.g. `in_progress` (1-64 bytes).
    #[schema(min_length = 1, max_length = 64)]
    pub status: String,
}

/// A saved checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub checkpoint_id: String,
    pub coordination_id: String,
    /// The state as saved (its JSON text is stored and answered untouched).
    #[schema(value_type = Object)]
    pub state: Box<RawValue>,
    pub agents: Vec<String>,
    pub status: String,
    pub created_at: String,
    /// On a restore: `cache` (the broker) or `store` (SQLite).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `GET /v1/checkpoints` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CheckpointQuery {
    #[param(min_length = 1, max_length = 128)]
    pub coordination_id: String,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn cache_key(checkpoint_id: &str) -> String {
    format!("chk:{checkpoint_id}")
}

/// Saves a checkpoint (and trims the coordination's oldest beyond the retention).
pub async fn save(state: &AppState, new: NewCheckpoint) -> Result<Checkpoint> {
    validate_name("coordination_id", &new.coordination_id, 128)?;
    validate_name("status", &new.status, 64)?;
    if new.agents.len() > 1000 {
        return Err(Error::invalid("agents", "at most 1000 agents"));
    }
    for (i, agent) in new.agents.iter().enumerate() {
        validate_agent_id(&format!("agents[{i}]"), agent)?;
    }
    if !new.state.get().starts_with('{') {
        return Err(Error::invalid("state", "must be a JSON object"));
    }
    if new.state.get().len() > MAX_STATE {
        return Err(Error::PayloadTooLarge(format!(
            "state is larger than {MAX_STATE} bytes"
        )));
    }
    let now = now_ms();
    let checkpoint = Checkpoint {
        checkpoint_id: new_id("chk"),
        coordination_id: new.coordination_id,
        state: new.state,
        agents: new.agents,
        status: new.status,
        created_at: rfc3339(now),
        source: None,
    };
    let mut tx = state.store.begin().await?;
    db::insert(tx.conn(), &checkpoint, now).await?;
    let trimmed = db::trim(
        tx.conn(),
        &checkpoint.coordination_id,
        state.config.limits.checkpoint_retention,
    )
    .await?;
    memory::store_memory(
        &mut tx,
        NewMemory {
            content: format!(
                "Coordination checkpoint: {} ({})",
                checkpoint.coordination_id, checkpoint.status
            ),
            tags: vec!["checkpoint".into(), "coordination".into()],
            metadata: Map::from_iter([
                ("checkpoint_id".to_owned(), json!(checkpoint.checkpoint_id)),
                (
                    "coordination_id".to_owned(),
                    json!(checkpoint.coordination_id),
                ),
                ("agents".to_owned(), json!(checkpoint.agents)),
            ]),
        },
    )
    .await?;
    tx.emit(NewEvent::new(
        "coordinations",
        "checkpoint.saved",
        json!({"checkpoint_id": checkpoint.checkpoint_id, "coordination_id": checkpoint.coordination_id,
               "status": checkpoint.status}),
    ));
    tx.commit(&state.broker).await?;
    refill(state, &checkpoint, now).await;
    let trimmed: Vec<String> = trimmed.iter().map(|id| cache_key(id)).collect();
    if let Err(e) = state.broker.cache_del(&trimmed).await {
        tracing::warn!(error = %e, "trimmed checkpoints stay cached until their TTL");
    }
    Ok(checkpoint)
}

/// Puts a checkpoint in the broker's cache; a failure only costs the fast path.
async fn refill(state: &AppState, checkpoint: &Checkpoint, now: i64) {
    let cached = match serde_json::to_string(checkpoint) {
        Ok(json) => {
            state
                .broker
                .cache_put(
                    &cache_key(&checkpoint.checkpoint_id),
                    &json,
                    CACHE_TTL_MS,
                    now,
                )
                .await
        }
        Err(e) => Err(Error::Internal(e.to_string())),
    };
    if let Err(e) = cached {
        tracing::warn!(error = %e, checkpoint_id = %checkpoint.checkpoint_id, "checkpoint not cached");
    }
}

/// Restores a checkpoint: the cache first, the store on a miss (refilling the cache).
pub async fn restore(state: &AppState, checkpoint_id: &str) -> Result<Checkpoint> {
    let now = now_ms();
    if let Ok(Some(json)) = state.broker.cache_get(&cache_key(checkpoint_id), now).await
        && let Ok(mut checkpoint) = serde_json::from_str::<Checkpoint>(&json)
    {
        checkpoint.source = Some("cache".into());
        return Ok(checkpoint);
    }
    let mut checkpoint = db::get(state.store.reader(), checkpoint_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no checkpoint {checkpoint_id:?}")))?;
    refill(state, &checkpoint, now).await;
    checkpoint.source = Some("store".into());
    Ok(checkpoint)
}
