//! Sessions: a unit of collaborative work with an activity log, kept across restarts of the
//! service and of Redis (the store is the truth; the broker holds each session's hot copy — the
//! record with its status, activity counter and deadline, and the activity ring — as a versioned
//! read-through cache, see [`crate::broker::Hot`]). Each activity extends the life
//! by `ttl_s`; a session idle past it expires ([`expire_tick`]) and takes no more activities
//! (404). The newest 100 activities are kept. An ended or expired session is purged, with its
//! log, `LTMC_RETENTION_DAYS` after its last activity ([`crate::retention`]).

pub mod db;
pub mod routes;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::broker::{Hot, HotWrite};
use crate::common::{now_ms, random_hex, validate_agent_id, validate_name, validate_printable};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::memory::{self, NewMemory};

/// How long a session's hot copy stays in the broker after its last write.
const CACHE_TTL_MS: i64 = 600_000;
/// Largest context or activity details, serialized.
const MAX_OBJECT: usize = 64 << 10;

/// A session to open.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// What kind of work, e.g. `code_review` (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub session_type: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub context: Map<String, Value>,
    /// Seconds of idleness before the session expires (1-2 592 000, default 86 400).
    #[serde(default = "default_ttl")]
    #[schema(default = 86400, minimum = 1, maximum = 2_592_000)]
    pub ttl_s: u32,
}

fn default_ttl() -> u32 {
    86_400
}

/// A session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub session_id: String,
    pub session_type: String,
    #[schema(value_type = Object)]
    pub context: Value,
    /// `active`, `ended` or `expired`.
    pub status: String,
    pub ttl_s: u32,
    pub created_at: String,
    pub last_activity_at: String,
    /// Every activity recorded (the log keeps the newest 100).
    pub activity_count: i64,
    pub expires_at: String,
}

/// An activity to record.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewActivity {
    /// e.g. `file_edited` (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub activity_type: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub details: Map<String, Value>,
    /// The agent that did it (with an agent token: must be that agent).
    #[schema(value_type = Option<crate::common::AgentId>)]
    pub agent_id: Option<String>,
}

/// A recorded activity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Activity {
    pub activity_type: String,
    #[schema(value_type = Object)]
    pub details: Value,
    pub agent_id: Option<String>,
    pub at: String,
}

/// The answer to recording an activity.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ActivityReceipt {
    pub session_id: String,
    pub activity_count: i64,
    pub last_activity_at: String,
    /// The session's new deadline.
    pub expires_at: String,
}

/// A session's newest activities.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Activities {
    pub items: Vec<Activity>,
}

/// `GET /v1/sessions` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionQuery {
    pub status: Option<String>,
    pub session_type: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl SessionQuery {
    pub fn check(&self) -> Result<()> {
        if let Some(status) = &self.status
            && !["active", "ended", "expired"].contains(&status.as_str())
        {
            return Err(Error::invalid("status", "one of active, ended, expired"));
        }
        match &self.session_type {
            Some(session_type) => validate_printable("session_type", session_type),
            None => Ok(()),
        }
    }
}

fn hot_key(session_id: &str) -> String {
    format!("sess:{session_id}")
}

/// The version of a session's hot copy: it grows with every activity and once more when the
/// session ends or expires (after which nothing changes).
fn version(activity_count: i64, status: &str) -> i64 {
    activity_count * 2 + i64::from(status != "active")
}

/// Writes to the session's hot copy; a failure only costs the fast path.
async fn hot_write(state: &AppState, session_id: &str, version: i64, write: HotWrite<'_>) {
    let written = state
        .broker
        .hot_write(
            &hot_key(session_id),
            version,
            write,
            db::KEEP_ACTIVITIES as usize,
            CACHE_TTL_MS,
            now_ms(),
        )
        .await;
    if let Err(e) = written {
        tracing::warn!(error = %e, session_id, "session hot copy not written");
    }
}

/// Refills the hot copy from what the store answered (with the activities when read too).
async fn fill(state: &AppState, session: &Session, activities: Option<&[Activity]>) {
    let serialized = serde_json::to_string(session).and_then(|record| {
        let log: Option<Vec<String>> = activities
            .map(|items| items.iter().map(serde_json::to_string).collect())
            .transpose()?;
        Ok((record, log))
    });
    match serialized {
        Ok((record, log)) => {
            let write = HotWrite::Fill {
                record: &record,
                log: log.as_deref(),
            };
            let v = version(session.activity_count, &session.status);
            hot_write(state, &session.session_id, v, write).await;
        }
        Err(e) => tracing::warn!(error = %e, "session not serialized"),
    }
}

fn too_large(field: &str, object: &Map<String, Value>) -> Result<String> {
    let json = Value::Object(object.clone()).to_string();
    if json.len() > MAX_OBJECT {
        return Err(Error::PayloadTooLarge(format!(
            "{field} is larger than {MAX_OBJECT} bytes"
        )));
    }
    Ok(json)
}

/// Opens a session (and records a memory of it).
pub async fn create(state: &AppState, new: NewSession) -> Result<Session> {
    validate_name("session_type", &new.session_type, 128)?;
    if !(1..=2_592_000).contains(&new.ttl_s) {
        return Err(Error::invalid("ttl_s", "must be 1-2592000 seconds"));
    }
    let context = too_large("context", &new.context)?;
    let now = now_ms();
    let session_id = format!("sess_{}_{}", now / 1000, random_hex(8));
    let mut tx = state.store.begin().await?;
    let session = db::insert(
        tx.conn(),
        &db::NewRow {
            session_id: &session_id,
            session_type: &new.session_type,
            context: &context,
            ttl_s: new.ttl_s,
            now,
        },
    )
    .await?;
    memory::store_memory(
        &mut tx,
        NewMemory {
            content: format!("Session created: {}", new.session_type),
            tags: vec![
                "session".into(),
                new.session_type.clone(),
                session_id.clone(),
            ],
            metadata: Map::from_iter([
                ("session_id".to_owned(), json!(session_id)),
                ("session_type".to_owned(), json!(new.session_type)),
            ]),
        },
    )
    .await?;
    tx.emit(NewEvent::new(
        "sessions",
        "session.created",
        json!({"session_id": session_id, "session_type": new.session_type}),
    ));
    tx.commit(&state.broker).await?;
    fill(state, &session, Some(&[])).await;
    Ok(session)
}

/// The session's hot copy, if the broker has one (a broker failure reads as a miss).
async fn hot(state: &AppState, session_id: &str) -> Option<Hot> {
    match state.broker.hot_get(&hot_key(session_id), now_ms()).await {
        Ok(hot) => hot,
        Err(e) => {
            tracing::warn!(error = %e, session_id, "session read from the store");
            None
        }
    }
}

/// A session: the broker's hot copy when it has one, else the store (refilling the copy).
pub async fn get(state: &AppState, session_id: &str) -> Result<Session> {
    if let Some(record) = hot(state, session_id).await.and_then(|h| h.record)
        && let Ok(session) = serde_json::from_str::<Session>(&record)
    {
        return Ok(session);
    }
    let session = db::get(state.store.reader(), session_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no session {session_id:?}")))?;
    fill(state, &session, None).await;
    Ok(session)
}

/// A session's kept activities, newest first: the broker's activity ring when it is complete,
/// else the store (refilling the ring).
pub async fn activities(state: &AppState, session_id: &str) -> Result<Vec<Activity>> {
    if let Some(log) = hot(state, session_id).await.and_then(|h| h.log) {
        let parsed: serde_json::Result<Vec<Activity>> = log
            .iter()
            .map(|entry| serde_json::from_str(entry))
            .collect();
        if let Ok(activities) = parsed {
            return Ok(activities);
        }
    }
    let (session, activities) = db::with_activities(state.store.reader(), session_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no session {session_id:?}")))?;
    fill(state, &session, Some(&activities)).await;
    Ok(activities)
}

/// Records an activity: 404 for an unknown or expired session, 409 for an ended one.
pub async fn record(
    state: &AppState,
    session_id: &str,
    new: NewActivity,
) -> Result<ActivityReceipt> {
    validate_name("activity_type", &new.activity_type, 128)?;
    if let Some(agent) = &new.agent_id {
        validate_agent_id("agent_id", agent)?;
    }
    let details = too_large("details", &new.details)?;
    let now = now_ms();
    let mut tx = state.store.begin().await?;
    let Some(session) = db::append(
        tx.conn(),
        session_id,
        &new.activity_type,
        &details,
        new.agent_id.as_deref(),
        now,
    )
    .await?
    else {
        return Err(match db::get(tx.conn(), session_id).await? {
            Some(s) if s.status == "ended" => {
                Error::Conflict(format!("session {session_id} has ended"))
            }
            _ => Error::NotFound(format!(
                "no active session {session_id:?} (unknown or expired)"
            )),
        });
    };
    tx.emit(NewEvent::new(
        "sessions",
        "session.activity",
        json!({"session_id": session_id, "activity_type": new.activity_type, "agent_id": new.agent_id,
               "activity_count": session.activity_count}),
    ));
    tx.commit(&state.broker).await?;
    let activity = Activity {
        activity_type: new.activity_type,
        details: Value::Object(new.details),
        agent_id: new.agent_id,
        at: session.last_activity_at.clone(),
    };
    if let (Ok(record), Ok(entry)) = (
        serde_json::to_string(&session),
        serde_json::to_string(&activity),
    ) {
        let v = version(session.activity_count, &session.status);
        let write = HotWrite::Push {
            record: &record,
            entry: &entry,
            previous: v - 2,
        };
        hot_write(state, session_id, v, write).await;
    }
    Ok(ActivityReceipt {
        session_id: session.session_id,
        activity_count: session.activity_count,
        last_activity_at: session.last_activity_at,
        expires_at: session.expires_at,
    })
}

/// Ends an active session (409 when it already ended or expired).
pub async fn end(state: &AppState, session_id: &str) -> Result<Session> {
    let mut tx = state.store.begin().await?;
    let Some(session) = db::set_status(tx.conn(), session_id, "active", "ended").await? else {
        return Err(match db::get(tx.conn(), session_id).await? {
            Some(s) => Error::Conflict(format!("session {session_id} is {}", s.status)),
            None => Error::NotFound(format!("no session {session_id:?}")),
        });
    };
    tx.emit(NewEvent::new(
        "sessions",
        "session.ended",
        json!({"session_id": session_id}),
    ));
    tx.commit(&state.broker).await?;
    if let Ok(record) = serde_json::to_string(&session) {
        let v = version(session.activity_count, &session.status);
        let write = HotWrite::Mark {
            record: Some(&record),
            previous: version(session.activity_count, "active"),
        };
        hot_write(state, session_id, v, write).await;
    }
    Ok(session)
}

/// One step of the timer loop: sessions idle past their deadline expire. Returns how many.
pub async fn expire_tick(state: &AppState, now: i64) -> Result<usize> {
    if !state.store.any_due(db::ANY_DUE, now).await? {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let expired = db::expire_due(tx.conn(), now, 500).await?;
    for (session_id, _) in &expired {
        tx.emit(NewEvent::new(
            "sessions",
            "session.expired",
            json!({"session_id": session_id}),
        ));
    }
    tx.commit(&state.broker).await?;
    for (session_id, activity_count) in &expired {
        let write = HotWrite::Mark {
            record: None,
            previous: version(*activity_count, "active"),
        };
        hot_write(
            state,
            session_id,
            version(*activity_count, "expired"),
            write,
        )
        .await;
    }
    Ok(expired.len())
}
