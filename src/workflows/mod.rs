//! Workflows: a definition ([`definition`]) run step by step by agents. Each step reaches its
//! agent as a `workflow.step` message (the named agent, or the least-loaded available agent with
//! the capability); the agent posts the attempt's result over REST. The engine ([`engine`]) is a
//! set of transitions inside store transactions, driven by those results, by posted events and
//! by the timer ([`tick`]: attempt timeouts, retry backoff, steps waiting for a free agent). All
//! state is in the store, so a restart resumes every executing run where it was, and every
//! transition is a compare-and-set, so with several instances each happens once. A step naming
//! an `agent` needs it registered at submit (422); one naming a `capability` may wait for one. A
//! finished run is purged after `LTMC_RETENTION_DAYS` ([`crate::retention`]).

pub mod batch;
pub mod db;
pub mod definition;
pub mod engine;
pub mod routes;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use crate::admission::NewWork;
use crate::agents;
use crate::app::AppState;
use crate::common::{
    Page, PageQuery, new_id, now_ms, rfc3339, validate_agent_id, validate_name, validate_text,
};
use crate::error::{Error, Result};
use db::{RunRow, StepRow, StepView};
use definition::{Limits, Pattern, WorkflowDefinition};

/// Longest step error text, in bytes.
const MAX_ERROR: usize = 4096;

/// A workflow run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Workflow {
    pub workflow_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub pattern: Pattern,
    /// `executing`, `completed`, `failed` or `cancelled`.
    pub status: String,
    /// The first step (in definition order) that is out with an agent or waiting for one.
    pub current_step: Option<String>,
    pub steps: Vec<Step>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// From creation to the end (while executing: so far).
    pub execution_time_ms: i64,
}

/// A step of a run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub step_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `pending` (not started: earlier steps, dependencies, its trigger or a retry's backoff
    /// ahead), `waiting` (ready, no agent free), `dispatched`, `succeeded`, `failed`,
    /// `timed_out`, `skipped` or `cancelled`.
    pub status: String,
    /// Who holds (or held) the current attempt.
    pub agent_id: Option<String>,
    /// Attempts made so far (the current one included).
    pub attempts: i64,
    /// The agent's output, as it sent it.
    #[schema(value_type = Option<Object>)]
    pub output: Option<Box<RawValue>>,
    pub error: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// The result of one attempt of a step.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepResult {
    /// The agent that holds the attempt.
    #[schema(value_type = crate::common::AgentId)]
    pub agent_id: String,
    /// The attempt's number, from the `workflow.step` message.
    pub attempt: i64,
    pub success: bool,
    /// Any JSON (at most the message content limit); handed on as `previous_results`.
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Box<RawValue>>,
    /// Why it failed (at most 4096 bytes).
    #[schema(min_length = 1, max_length = 4096)]
    pub error: Option<String>,
}

/// An event for event-driven steps.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerEvent {
    /// The event name steps name as their `trigger` (1-256 bytes).
    pub name: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub payload: Map<String, Value>,
    /// Only this workflow's steps (default: every executing workflow's).
    pub workflow_id: Option<String>,
}

/// What posting an event did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventAccepted {
    pub name: String,
    /// Steps it started now. A workflow submitted within the next minute still sees the event.
    pub steps_started: usize,
}

/// `GET /v1/workflows` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WorkflowQuery {
    /// `executing`, `completed`, `failed` or `cancelled`.
    pub status: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

fn view(run: RunRow, steps: Vec<StepView>, now: i64) -> Result<Workflow> {
    let current_step = steps
        .iter()
        .find(|s| s.status == "dispatched" || s.status == "waiting")
        .map(|s| s.step_id.clone());
    let steps = steps
        .into_iter()
        .map(|s| {
            Ok(Step {
                output: s
                    .output
                    .map(RawValue::from_string)
                    .transpose()
                    .map_err(|e| Error::Internal(format!("step output: {e}")))?,
                step_id: s.step_id,
                name: s.name,
                status: s.status,
                agent_id: s.agent_id,
                attempts: s.attempts,
                error: s.error,
                started_at: s.started_at.map(rfc3339),
                finished_at: s.finished_at.map(rfc3339),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Workflow {
        pattern: serde_json::from_value(Value::String(run.pattern))
            .map_err(|e| Error::Internal(format!("pattern: {e}")))?,
        metadata: serde_json::from_str(&run.metadata)
            .map_err(|e| Error::Internal(format!("metadata: {e}")))?,
        workflow_id: run.workflow_id,
        name: run.name,
        description: run.description,
        status: run.status,
        current_step,
        steps,
        created_at: rfc3339(run.created_at),
        finished_at: run.finished_at.map(rfc3339),
        execution_time_ms: run.finished_at.unwrap_or(now) - run.created_at,
    })
}

/// Validates and starts a workflow: its first steps are dispatched before this answers.
pub async fn submit(state: &AppState, def: WorkflowDefinition) -> Result<Workflow> {
    let limits = Limits {
        max_steps: state.config.limits.max_workflow_steps as usize,
        max_input_bytes: state.config.limits.max_content_bytes as usize,
    };
    definition::validate(&def, &limits)?;
    // A step naming its agent needs a registered one; a step naming a capability may wait.
    let named: Vec<(String, &str)> = def
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((format!("steps[{i}].agent"), s.agent.as_deref()?)))
        .collect();
    agents::require_registered(state, &named).await?;
    let _admitted = state
        .admission
        .admit(NewWork::Workflow, def.steps.len() as u64)?;
    let now = now_ms();
    let workflow_id = new_id("wf");
    let index: std::collections::HashMap<&str, i64> = def
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.step_id.as_str(), i as i64))
        .collect();
    let dependants = definition::dependants(&def);
    let steps: Vec<StepRow> = def
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let depends_on: Vec<i64> = s.depends_on.iter().map(|d| index[d.as_str()]).collect();
            StepRow {
                workflow_id: workflow_id.clone(),
                idx: i as i64,
                step_id: s.step_id.clone(),
                name: s.name.clone(),
                agent: s.agent.clone(),
                capability: s.capability.clone(),
                input: Value::Object(s.input.clone()).to_string(),
                deps_left: depends_on.len() as i64,
                depends_on: Value::from(depends_on).to_string(),
                dependants: Value::from(dependants[i].clone()).to_string(),
                trigger_name: s.trigger.clone(),
                timeout_ms: s.timeout_ms as i64,
                max_retries: i64::from(s.max_retries),
                status: "pending".into(),
                agent_id: None,
                attempts: 0,
                attempt_at: None,
                due_at: None,
                output: None,
                error: None,
                handoff_id: None,
                started_at: None,
                finished_at: None,
            }
        })
        .collect();
    let run = RunRow {
        seq: 0,
        workflow_id: workflow_id.clone(),
        name: def.name.clone(),
        description: def.description.clone(),
        pattern: def.pattern.as_str().to_owned(),
        metadata: Value::Object(def.metadata.clone()).to_string(),
        status: "executing".into(),
        steps_total: steps.len() as i64,
        steps_done: 0,
        steps_failed: 0,
        created_at: now,
        finished_at: None,
    };
    state.engine.start(run, steps, def).await
}

/// A run with its steps.
pub async fn get(state: &AppState, workflow_id: &str) -> Result<Workflow> {
    let (run, steps) = db::run_with_steps(state.store.reader(), workflow_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no workflow {workflow_id:?}")))?;
    view(run, steps, now_ms())
}

/// Runs, newest first.
pub async fn list(state: &AppState, query: WorkflowQuery) -> Result<Page<Workflow>> {
    if let Some(status) = &query.status
        && !["executing", "completed", "failed", "cancelled"].contains(&status.as_str())
    {
        return Err(Error::invalid(
            "status",
            "one of executing, completed, failed, cancelled",
        ));
    }
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let reader = state.store.reader();
    let runs = db::list_runs(reader, query.status.as_deref(), before, limit + 1).await?;
    let now = now_ms();
    let mut rows = Vec::with_capacity(runs.len());
    for run in runs {
        let steps = db::step_views(reader, &run.workflow_id).await?;
        rows.push((run.seq, view(run, steps, now)?));
    }
    Ok(Page::from_seq_rows(rows, limit, |w| w))
}

/// The result of an attempt, from the agent that holds it (409 for anyone else, for an attempt
/// that is not the current one — e.g. one that timed out — and for a step that is not out),
/// committed with others through [`batch`]. Answers the run as it is after the commit.
pub async fn result(
    state: &AppState,
    workflow_id: &str,
    step_id: &str,
    body: StepResult,
) -> Result<Workflow> {
    validate_agent_id("agent_id", &body.agent_id)?;
    if let Some(error) = &body.error {
        validate_text("error", error, MAX_ERROR)?;
    }
    if let Some(output) = &body.output
        && output.get().len() > state.config.limits.max_content_bytes as usize
    {
        return Err(Error::PayloadTooLarge(format!(
            "output is larger than {} bytes",
            state.config.limits.max_content_bytes
        )));
    }
    state
        .engine
        .result(workflow_id, step_id, body, now_ms())
        .await
}

/// Cancels an executing run: open steps become `cancelled`, their holders are notified.
pub async fn cancel(state: &AppState, workflow_id: &str) -> Result<Workflow> {
    let now = now_ms();
    let mut tx = state.store.begin().await?;
    let run = db::get_run(tx.conn(), workflow_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no workflow {workflow_id:?}")))?;
    if run.status != "executing" {
        return Err(Error::Conflict(format!(
            "workflow {workflow_id} is {}",
            run.status
        )));
    }
    engine::cancelled(&mut tx, &run, now).await?;
    tx.commit(&state.broker).await?;
    get(state, workflow_id).await
}

/// Posts an event: starts the pending steps that wait for it (and is kept a minute for steps
/// that begin waiting just after).
pub async fn post_event(state: &AppState, event: TriggerEvent) -> Result<EventAccepted> {
    validate_name("name", &event.name, 256)?;
    if event.name.starts_with("step:") {
        return Err(Error::invalid(
            "name",
            "`step:` events are the engine's own (a step's completion)",
        ));
    }
    if let Some(id) = &event.workflow_id {
        validate_name("workflow_id", id, 128)?;
    }
    let payload = Value::Object(event.payload).to_string();
    if payload.len() > state.config.limits.max_content_bytes as usize {
        return Err(Error::PayloadTooLarge(format!(
            "payload is larger than {} bytes",
            state.config.limits.max_content_bytes
        )));
    }
    let now = now_ms();
    let mut tx = state.store.begin().await?;
    if let Some(id) = &event.workflow_id
        && db::get_run(tx.conn(), id).await?.is_none()
    {
        return Err(Error::NotFound(format!("no workflow {id:?}")));
    }
    let started = engine::fire(
        &mut tx,
        state,
        &event.name,
        event.workflow_id.as_deref(),
        &payload,
        now,
    )
    .await?;
    tx.commit(&state.broker).await?;
    Ok(EventAccepted {
        name: event.name,
        steps_started: started,
    })
}

/// One step of the timer loop: attempts past their deadline time out (and retry or fail),
/// retries whose backoff is over and waiting steps due for another look are dispatched.
/// Returns how many steps it moved.
pub async fn tick(state: &AppState, now: i64) -> Result<usize> {
    if !state.store.any_due(db::ANY_DUE, now).await? {
        return Ok(0);
    }
    let mut tx = state.store.begin().await?;
    let moved = engine::due(&mut tx, state, now).await?;
    tx.commit(&state.broker).await?;
    Ok(moved)
}

/// Housekeeping: forgets posted events older than an hour.
pub async fn prune_tick(state: &AppState, now: i64) -> Result<u64> {
    let mut conn = state.store.autocommit().await?;
    db::prune_triggers(&mut conn, now - 3_600_000).await
}
