//! The engine's transitions, each inside the caller's store transaction (one writer at a time,
//! every step move a compare-and-set), so what a transaction reads is what it changes:
//!
//! - a step becomes ready → [`dispatch`]: an agent is chosen (the named one, or the available
//!   agent with the capability and the lowest `held / max_concurrent_tasks`, never one at its
//!   limit), the attempt goes out as a `workflow.step` message; no agent free → `waiting`,
//!   looked at again when a held step ends and by the timer;
//! - an attempt ends (results in batches, each batch's compare-and-sets in one statement; the
//!   timer's timeouts through [`attempt_ended`]) → success, a retry after backoff (1 s × 2ⁿ⁻¹
//!   plus jitter, at most 60 s), or a final failure; [`steps_ended`] takes it from there:
//! - a step reaches a final status → the run's barrier counts it (one statement for every run
//!   the batch touched), then what follows from the pattern: the next step (sequential, with a
//!   handoff recorded between the two agents), the dependants whose dependencies have all
//!   succeeded (DAG; a failure skips its dependants), the `step:<step_id>` trigger
//!   (event-driven); a run whose last step that was ends with its learning records (a memory,
//!   a `successful_orchestration` / `orchestration_failure` pattern, `precedes` graph edges).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::{Map, Value, json};

use super::db::{self, RunRow, StepRow};
use super::definition::{Pattern, WorkflowDefinition};
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::handoffs;
use crate::memory::{self, NewEdge, NewMemory, NewPattern};
use crate::messages;
use crate::store::Writer;

/// How long a waiting step waits before the timer looks for an agent again (a held step that
/// ends looks sooner).
const WAIT_RECHECK_MS: i64 = 1_000;
/// An event posted this long before a step begins waiting still starts it.
pub const TRIGGER_LOOKBACK_MS: i64 = 60_000;
/// Steps the timer moves per tick.
const DUE_BATCH: u32 = 200;

/// How an attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// With the agent's output (raw JSON).
    Succeeded(Option<String>),
    Failed(String),
    TimedOut,
}

fn pattern(run: &RunRow) -> Result<Pattern> {
    serde_json::from_value(Value::String(run.pattern.clone()))
        .map_err(|e| Error::Internal(format!("pattern: {e}")))
}

fn event(kind: &'static str, data: Value) -> NewEvent {
    NewEvent::new("workflows", kind, data)
}

/// A run was inserted with its steps: starts those that are ready.
pub async fn started(
    tx: &mut Writer,
    state: &AppState,
    run: &RunRow,
    def: &WorkflowDefinition,
    steps: Vec<StepRow>,
    now: i64,
) -> Result<()> {
    tx.emit(event(
        "workflow.started",
        json!({"workflow_id": run.workflow_id, "name": run.name, "pattern": run.pattern,
               "steps": steps.len()}),
    ));
    // The precedes edges, as the seed draws them: from each step to the steps that follow it.
    let node = |step_id: &str| format!("workflow_step:{}/{step_id}", run.workflow_id);
    let mut edges = Vec::new();
    let mut precede = |from: &str, to: &str| {
        edges.push(NewEdge {
            source: node(from),
            target: node(to),
            relationship: "precedes".into(),
            properties: Map::from_iter([("workflow_id".to_owned(), json!(run.workflow_id))]),
        })
    };
    match def.pattern {
        Pattern::Sequential => def
            .steps
            .windows(2)
            .for_each(|w| precede(&w[0].step_id, &w[1].step_id)),
        Pattern::DependencyBased => def.steps.iter().for_each(|s| {
            s.depends_on.iter().for_each(|d| precede(d, &s.step_id));
        }),
        Pattern::EventDriven => def.steps.iter().for_each(|s| {
            if let Some(from) = s.trigger.as_deref().and_then(|t| t.strip_prefix("step:")) {
                precede(from, &s.step_id);
            }
        }),
        Pattern::Parallel => {}
    }
    memory::link_many(tx, edges).await?;

    let ready: Vec<StepRow> = match def.pattern {
        Pattern::Sequential => steps.into_iter().take(1).collect(),
        Pattern::Parallel => steps,
        Pattern::DependencyBased => steps.into_iter().filter(|s| s.deps_left == 0).collect(),
        Pattern::EventDriven => {
            // No lost wakeup: an event committed before this transaction is in the table (and
            // one committed after it finds these steps pending).
            // (A `step:` trigger cannot have fired before its run existed.)
            let mut ready = Vec::new();
            for step in steps {
                let name = step.trigger_name.as_deref().unwrap_or_default();
                if name.starts_with("step:") {
                    continue;
                }
                let since = now - TRIGGER_LOOKBACK_MS;
                if db::recent_trigger(tx.conn(), name, &run.workflow_id, since)
                    .await?
                    .is_some()
                {
                    ready.push(step);
                }
            }
            ready
        }
    };
    dispatch(tx, state, run, ready, now).await?;
    Ok(())
}

/// An agent that may take a capability's steps: (agent_id, max_concurrent_tasks, in hand).
type Candidate = (String, i64, i64);

/// The available agents (present, status `available`) with a capability and what each has in
/// hand: the steps it holds, or what its heartbeat reports when that is more.
async fn candidates(
    tx: &mut Writer,
    state: &AppState,
    capability: &str,
    now: i64,
) -> Result<Vec<Candidate>> {
    let capable = db::capable(tx.conn(), capability).await?;
    if capable.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = capable.iter().map(|(id, _, _)| id.as_str()).collect();
    let presence = match state.broker.presence(&ids, now).await {
        Ok(presence) => presence,
        Err(e) => {
            // Nobody is known to be available: the steps wait, and the timer looks again.
            tracing::warn!(error = %e, capability, "presence unknown: capability steps wait");
            return Ok(Vec::new());
        }
    };
    Ok(capable
        .into_iter()
        .zip(presence)
        .filter_map(|((id, max, held), p)| {
            let p = p.filter(|p| p.status == "available")?;
            Some((id, max, held.max(i64::from(p.current_tasks))))
        })
        .collect())
}

/// The candidate below its limit with the lowest share of it in hand (ties: fewer in hand, then
/// the id), never one at its limit.
fn least_loaded(pool: &[Candidate]) -> Option<String> {
    pool.iter()
        .filter(|(_, max, in_hand)| in_hand < max)
        .min_by(|(a_id, a_max, a_in), (b_id, b_max, b_in)| {
            // a_in / a_max < b_in / b_max, without floating point.
            (a_in * b_max)
                .cmp(&(b_in * a_max))
                .then(a_in.cmp(b_in))
                .then(a_id.cmp(b_id))
        })
        .map(|(id, _, _)| id.clone())
}

/// `previous_results` for a step's attempt: a JSON object of raw outputs — every earlier step's
/// (sequential), the dependencies' (DAG), the triggering step's output or the event's payload
/// (event-driven, under the trigger's name); `{}` for parallel steps.
async fn previous_results(tx: &mut Writer, run: &RunRow, step: &StepRow) -> Result<String> {
    let pairs = match pattern(run)? {
        Pattern::Sequential => {
            return db::outputs_before(tx.conn(), &run.workflow_id, step.idx).await;
        }
        Pattern::DependencyBased => {
            let deps = StepRow::indexes(&step.depends_on)?;
            db::outputs(tx.conn(), &run.workflow_id, &deps).await?
        }
        Pattern::EventDriven => {
            let trigger = step.trigger_name.as_deref().unwrap_or_default();
            let payload = match trigger.strip_prefix("step:") {
                Some(from) => db::step_by_id(tx.conn(), &run.workflow_id, from)
                    .await?
                    .and_then(|s| s.output),
                None => db::recent_trigger(tx.conn(), trigger, &run.workflow_id, 0).await?,
            };
            payload
                .map(|p| vec![(trigger.to_owned(), p)])
                .unwrap_or_default()
        }
        Pattern::Parallel => Vec::new(),
    };
    let mut object = String::from("{");
    for (i, (key, raw)) in pairs.iter().enumerate() {
        if i > 0 {
            object.push(',');
        }
        let key = serde_json::to_string(key).map_err(|e| Error::Internal(e.to_string()))?;
        let _ = write!(object, "{key}:{raw}");
    }
    object.push('}');
    Ok(object)
}

/// What a sequential run's next step was read with as its predecessor ended, so that
/// [`put_out`] reads neither again: its `previous_results`, and the step that ended (the
/// handoff's source).
struct Handover<'a> {
    previous_results: String,
    from: &'a StepRow,
}

/// Puts the next attempt of ready steps of one run (`pending` or `waiting`) out to agents, in
/// a few statements for all of them; those without a free agent (or whose agent's queue is
/// full) are left `waiting`. Returns how many went out.
pub async fn dispatch(
    tx: &mut Writer,
    state: &AppState,
    run: &RunRow,
    steps: Vec<StepRow>,
    now: i64,
) -> Result<usize> {
    put_out(tx, state, run, steps, None, now).await
}

/// [`dispatch`], given what was read already of the first step's hand-over (sequential).
async fn put_out(
    tx: &mut Writer,
    state: &AppState,
    run: &RunRow,
    steps: Vec<StepRow>,
    mut handover: Option<Handover<'_>>,
    now: i64,
) -> Result<usize> {
    if steps.is_empty() {
        return Ok(0);
    }
    let sequential = pattern(run)? == Pattern::Sequential;
    // Choose the agents; a capability pick sees the steps given out earlier in this call.
    let mut pools: HashMap<String, Vec<Candidate>> = HashMap::new();
    let mut chosen = Vec::with_capacity(steps.len());
    for step in &steps {
        let agent = match (&step.agent, &step.capability) {
            (Some(agent), _) => Some(agent.clone()),
            (None, Some(capability)) => {
                if !pools.contains_key(capability) {
                    let pool = candidates(tx, state, capability, now).await?;
                    pools.insert(capability.clone(), pool);
                }
                let agent = least_loaded(&pools[capability]);
                if let Some(agent) = &agent {
                    for pool in pools.values_mut() {
                        pool.iter_mut()
                            .filter(|(id, _, _)| id == agent)
                            .for_each(|c| c.2 += 1);
                    }
                }
                agent
            }
            (None, None) => {
                return Err(Error::Internal("a step without agent or capability".into()));
            }
        };
        chosen.push(agent);
    }
    // One message per step that has an agent, all in one INSERT.
    let mut messages = Vec::with_capacity(steps.len());
    for (i, (step, agent)) in steps.iter().zip(&chosen).enumerate() {
        if agent.is_none() {
            messages.push((String::new(), String::new()));
            continue;
        }
        let previous = match handover.as_mut() {
            Some(h) if i == 0 => std::mem::take(&mut h.previous_results),
            _ => previous_results(tx, run, step).await?,
        };
        let content = format!(
            r#"{{"workflow_id":{},"step_id":{},"attempt":{},"input":{},"previous_results":{previous}}}"#,
            json!(run.workflow_id),
            json!(step.step_id),
            step.attempts + 1,
            step.input,
        );
        messages.push((crate::common::new_id("msg"), content));
    }
    // The queue runs on the wall clock (a timer step may be driven with a later one).
    let queued_at = crate::common::now_ms();
    let rows: Vec<messages::db::Insert> = chosen
        .iter()
        .zip(&messages)
        .filter_map(|(agent, (message_id, content))| {
            Some(messages::db::Insert {
                message_id,
                sender: "ltmc",
                recipient: agent.as_deref()?,
                message_type: "workflow.step",
                content,
                priority: 5,
                correlation_id: Some(&run.workflow_id),
                now: queued_at,
            })
        })
        .collect();
    // A message missing here met a full queue: that step waits like one without an agent.
    let queued = messages::db::insert_many(tx.conn(), &rows).await?;
    let mut out = Vec::new();
    let mut waiting = Vec::new();
    for ((step, agent), (message_id, _)) in steps.into_iter().zip(chosen).zip(messages) {
        match agent {
            Some(agent) if queued.contains_key(&message_id) => out.push((step, agent)),
            _ => waiting.push(step),
        }
    }
    // Sequential: the previous step's agent hands over to this one, with its output.
    let mut handoffs = Vec::with_capacity(out.len());
    let ended = handover.map(|h| h.from);
    for (step, agent) in &out {
        handoffs.push(if sequential && step.idx > 0 && step.attempts == 0 {
            step_handoff(tx, run, step, agent, ended, now).await?
        } else {
            None
        });
    }
    let moves: Vec<db::Dispatch> = out
        .iter()
        .zip(&handoffs)
        .map(|((step, agent), handoff_id)| db::Dispatch {
            idx: step.idx,
            attempts: step.attempts,
            agent_id: agent,
            handoff_id: handoff_id.as_deref(),
        })
        .collect();
    if db::dispatch(tx.conn(), &run.workflow_id, &moves, now).await? != moves.len() as u64 {
        return Err(Error::Internal("a step moved under the writer".into()));
    }
    for (step, agent) in &out {
        tx.emit(
            event(
                "workflow.step.dispatched",
                json!({"workflow_id": run.workflow_id, "step_id": step.step_id, "agent_id": agent,
                       "attempt": step.attempts + 1}),
            )
            .to_agent(agent),
        );
    }
    let idxs: Vec<i64> = waiting.iter().map(|s| s.idx).collect();
    db::set_waiting(tx.conn(), &run.workflow_id, &idxs, now + WAIT_RECHECK_MS).await?;
    for step in waiting.iter().filter(|s| s.status != "waiting") {
        tx.emit(event(
            "workflow.step.waiting",
            json!({"workflow_id": run.workflow_id, "step_id": step.step_id}),
        ));
    }
    Ok(out.len())
}

/// Records the handoff from the previous step's agent to `agent` (none when it is the same
/// agent, or the previous step had none). The previous step is read unless the caller has it
/// (`ended`: the step that just ended, as it ended).
async fn step_handoff(
    tx: &mut Writer,
    run: &RunRow,
    step: &StepRow,
    agent: &str,
    ended: Option<&StepRow>,
    now: i64,
) -> Result<Option<String>> {
    let ended = ended.filter(|ended| ended.idx == step.idx - 1);
    let read = match ended {
        Some(_) => None,
        None => db::step_by_idx(tx.conn(), &run.workflow_id, step.idx - 1).await?,
    };
    let Some(previous) = ended.or(read.as_ref()) else {
        return Ok(None);
    };
    let Some(from) = previous.agent_id.as_deref().filter(|from| *from != agent) else {
        return Ok(None);
    };
    let output: Value = match &previous.output {
        Some(raw) => serde_json::from_str(raw).unwrap_or(Value::Null),
        None => Value::Null,
    };
    let context = json!({"workflow_id": run.workflow_id, "from_step": previous.step_id,
                         "to_step": step.step_id, "previous_output": output});
    let reason = format!("workflow {} step {}", run.name, step.step_id);
    let id =
        handoffs::record_step_handoff(tx, from, agent, context, &run.workflow_id, &reason, now)
            .await?;
    Ok(Some(id))
}

/// Gives up to `slots` freed places to the oldest waiting steps (held steps just ended).
pub async fn fill_waiting(tx: &mut Writer, state: &AppState, slots: u32, now: i64) -> Result<()> {
    if slots == 0 {
        return Ok(());
    }
    let waiting = db::waiting(tx.conn(), slots).await?;
    for_each_run(tx, state, waiting, now).await.map(drop)
}

/// Dispatches ready steps of any runs (sorted by run), one batch per executing run. Returns how
/// many went out.
async fn for_each_run(
    tx: &mut Writer,
    state: &AppState,
    steps: Vec<StepRow>,
    now: i64,
) -> Result<usize> {
    let mut started = 0;
    let mut steps = steps.into_iter().peekable();
    while let Some(first) = steps.next() {
        let mut group = vec![first];
        while let Some(next) = steps.next_if(|s| s.workflow_id == group[0].workflow_id) {
            group.push(next);
        }
        if let Some(run) = db::get_run(tx.conn(), &group[0].workflow_id).await?
            && run.status == "executing"
        {
            started += dispatch(tx, state, &run, group, now).await?;
        }
    }
    Ok(started)
}

/// How an attempt's end is stored: the outcome, and the jitter of a retry's backoff.
pub fn ending(outcome: &Outcome) -> db::Ending<'_> {
    let (kind, output, error) = match outcome {
        Outcome::Succeeded(output) => ("succeeded", output.as_deref(), None),
        Outcome::Failed(error) => ("failed", None, Some(error.as_str())),
        Outcome::TimedOut => ("timed_out", None, Some("attempt timed out")),
    };
    let mut bytes = [0u8; 2];
    let jitter = match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.0,
    };
    db::Ending {
        outcome: kind,
        output,
        error,
        jitter,
    }
}

/// Ends an attempt of a dispatched step (the timer's timeouts; results end theirs in batches
/// through [`db::end_attempts`]): success, a retry after backoff, or a final failure — one
/// compare-and-set with the retry decision in it, then what follows ([`steps_ended`]). None
/// when the step is not out under that attempt and holder (nothing written).
pub async fn attempt_ended(
    tx: &mut Writer,
    state: &AppState,
    attempt: &db::Attempt<'_>,
    outcome: Outcome,
    now: i64,
) -> Result<Option<()>> {
    let ending = ending(&outcome);
    let Some(step) = db::end_attempt(tx.conn(), attempt, &ending, now).await? else {
        return Ok(None);
    };
    steps_ended(tx, state, vec![(step, ending.outcome)], now).await?;
    Ok(Some(()))
}

/// What follows attempts that ended (each step with its outcome: `succeeded`, `failed` or
/// `timed_out`), in order: each step's event; then for the steps that reached a final status
/// the runs' barriers count them (one statement for all), each run moves on by its pattern,
/// and a run whose last step that was ends.
pub async fn steps_ended(
    tx: &mut Writer,
    state: &AppState,
    ended: Vec<(StepRow, &str)>,
    now: i64,
) -> Result<()> {
    let mut finals = Vec::with_capacity(ended.len());
    for (step, outcome) in ended {
        let retry = step.status == "pending";
        let mut data = json!({"workflow_id": step.workflow_id, "step_id": step.step_id,
                              "agent_id": step.agent_id, "attempt": step.attempts,
                              "status": step.status,
                              "duration_ms": (now - step.attempt_at.unwrap_or(now)).max(0)});
        if outcome != "succeeded" {
            data["error"] = json!(step.error);
        }
        if let (true, Some(due_at)) = (retry, step.due_at) {
            data["retry_at"] = json!(crate::common::rfc3339(due_at));
        }
        let mut notice = event(
            match outcome {
                "succeeded" => "workflow.step.succeeded",
                "failed" => "workflow.step.failed",
                _ => "workflow.step.timed_out",
            },
            data,
        );
        if let ("timed_out", Some(holder)) = (outcome, &step.agent_id) {
            notice = notice.to_agent(holder);
        }
        tx.emit(notice);
        if !retry {
            if let Some(handoff_id) = &step.handoff_id {
                handoffs::settle_step_handoff(tx, handoff_id, step.status == "succeeded").await?;
            }
            finals.push(step);
        }
    }
    if finals.is_empty() {
        return Ok(());
    }
    // The barrier, per run in order of appearance.
    let mut order: Vec<&str> = Vec::new();
    let mut counts: HashMap<&str, (i64, i64)> = HashMap::new();
    for step in &finals {
        let count = counts.entry(&step.workflow_id).or_insert_with(|| {
            order.push(&step.workflow_id);
            (0, 0)
        });
        count.0 += 1;
        count.1 += i64::from(step.status != "succeeded");
    }
    let rows: Vec<(&str, i64, i64)> = order
        .iter()
        .map(|id| (*id, counts[id].0, counts[id].1))
        .collect();
    let mut runs: HashMap<String, RunRow> = db::count_done(tx.conn(), &rows)
        .await?
        .into_iter()
        .map(|run| (run.workflow_id.clone(), run))
        .collect();
    let mut skipped: HashMap<&str, i64> = HashMap::new();
    for step in &finals {
        let run = runs
            .get(&step.workflow_id)
            .ok_or_else(|| Error::Internal(format!("no workflow {}", step.workflow_id)))?;
        let n = step_final(tx, state, run, step, now).await?;
        *skipped.entry(&step.workflow_id).or_default() += n;
    }
    // The skipped steps are final too.
    let rows: Vec<(&str, i64, i64)> = order
        .iter()
        .filter_map(|id| Some((*id, skipped.get(id).copied().filter(|n| *n > 0)?, 0)))
        .collect();
    if !rows.is_empty() {
        for run in db::count_done(tx.conn(), &rows).await? {
            runs.insert(run.workflow_id.clone(), run);
        }
    }
    for id in order {
        let run = &runs[id];
        if run.steps_done >= run.steps_total {
            let status = if run.steps_failed > 0 {
                "failed"
            } else {
                "completed"
            };
            run_ended(tx, run, status, now).await?;
        }
    }
    Ok(())
}

/// A step reached a final status (counted in `run`'s barrier): the run moves on by its
/// pattern. Returns how many steps it skipped.
async fn step_final(
    tx: &mut Writer,
    state: &AppState,
    run: &RunRow,
    step: &StepRow,
    now: i64,
) -> Result<i64> {
    let succeeded = step.status == "succeeded";
    let mut skipped = 0;
    match (pattern(run)?, succeeded) {
        (Pattern::Sequential, true) => {
            let next =
                db::step_with_outputs_before(tx.conn(), &run.workflow_id, step.idx + 1).await?;
            if let Some((next, previous_results)) = next {
                let handover = Handover {
                    previous_results,
                    from: step,
                };
                put_out(tx, state, run, vec![next], Some(handover), now).await?;
            }
        }
        (Pattern::Sequential, false) => {
            let rest: Vec<i64> = (step.idx + 1..run.steps_total).collect();
            skipped = skip(tx, run, &rest, now).await?;
        }
        (Pattern::Parallel, _) => {}
        (Pattern::DependencyBased, true) => {
            let dependants = StepRow::indexes(&step.dependants)?;
            let ready = db::satisfy(tx.conn(), &run.workflow_id, &dependants).await?;
            let ready = db::steps_in(tx.conn(), &run.workflow_id, &ready, "pending").await?;
            dispatch(tx, state, run, ready, now).await?;
        }
        (Pattern::DependencyBased, false) => {
            // Everything downstream of the failure is skipped; independent branches go on.
            let mut downstream = BTreeSet::new();
            let mut frontier = StepRow::indexes(&step.dependants)?;
            while !frontier.is_empty() {
                let open = db::steps_in(tx.conn(), &run.workflow_id, &frontier, "pending").await?;
                frontier = Vec::new();
                for s in open {
                    if downstream.insert(s.idx) {
                        frontier.extend(StepRow::indexes(&s.dependants)?);
                    }
                }
            }
            let downstream: Vec<i64> = downstream.into_iter().collect();
            skipped = skip(tx, run, &downstream, now).await?;
        }
        (Pattern::EventDriven, true) => {
            // This step's completion is the event `step:<step_id>` of its own run (every step
            // of the run exists from submit, so it needs no keeping for later).
            let name = format!("step:{}", step.step_id);
            let next = db::triggered_in_run(tx.conn(), &run.workflow_id, &name).await?;
            dispatch(tx, state, run, next, now).await?;
        }
        (Pattern::EventDriven, false) => {
            // Steps triggered by this one's completion can never start: skipped, and theirs.
            let mut downstream = Vec::new();
            let mut names = vec![format!("step:{}", step.step_id)];
            while let Some(name) = names.pop() {
                for s in db::triggered_in_run(tx.conn(), &run.workflow_id, &name).await? {
                    names.push(format!("step:{}", s.step_id));
                    downstream.push(s.idx);
                }
            }
            skipped = skip(tx, run, &downstream, now).await?;
        }
    }
    Ok(skipped)
}

/// Marks open steps skipped; returns how many.
async fn skip(tx: &mut Writer, run: &RunRow, idxs: &[i64], now: i64) -> Result<i64> {
    let skipped = db::finish_open(tx.conn(), &run.workflow_id, Some(idxs), "skipped", now).await?;
    for (_, step_id) in &skipped {
        tx.emit(event(
            "workflow.step.skipped",
            json!({"workflow_id": run.workflow_id, "step_id": step_id}),
        ));
    }
    Ok(skipped.len() as i64)
}

/// Records a posted event (kept a while for steps that begin waiting later) and dispatches the
/// pending steps of executing runs (of `workflow_id` only, when given) waiting for it. Returns
/// how many it started.
pub async fn fire(
    tx: &mut Writer,
    state: &AppState,
    name: &str,
    workflow_id: Option<&str>,
    payload: &str,
    now: i64,
) -> Result<usize> {
    db::insert_trigger(tx.conn(), name, workflow_id, payload, now).await?;
    let waiting = match workflow_id {
        Some(id) => db::triggered_in_run(tx.conn(), id, name).await?,
        None => db::triggered(tx.conn(), name).await?,
    };
    let count = waiting.len();
    for_each_run(tx, state, waiting, now).await?;
    Ok(count)
}

/// Cancels an executing run: its open steps become `cancelled` and their holders hear of it.
pub async fn cancelled(tx: &mut Writer, run: &RunRow, now: i64) -> Result<()> {
    let holders = db::holders(tx.conn(), &run.workflow_id).await?;
    let closed = db::finish_open(tx.conn(), &run.workflow_id, None, "cancelled", now).await?;
    db::count_done(tx.conn(), &[(&run.workflow_id, closed.len() as i64, 0)]).await?;
    for (step_id, agent_id) in holders {
        tx.emit(
            event(
                "workflow.step.cancelled",
                json!({"workflow_id": run.workflow_id, "step_id": step_id}),
            )
            .to_agent(&agent_id),
        );
    }
    run_ended(tx, run, "cancelled", now).await
}

/// Ends a run and writes its learning records.
async fn run_ended(tx: &mut Writer, run: &RunRow, status: &str, now: i64) -> Result<()> {
    let Some(ended) = db::finish_run(tx.conn(), &run.workflow_id, status, now).await? else {
        return Err(Error::Conflict(format!(
            "workflow {} has already ended",
            run.workflow_id
        )));
    };
    let duration_ms = now - run.created_at;
    // How much of the run's time its steps ran side by side: Σ step time / (steps × run time).
    let efficiency = (run.pattern == "parallel" && status == "completed" && duration_ms > 0)
        .then(|| (ended.worked_ms as f64 / (run.steps_total as f64 * duration_ms as f64)).min(1.0));
    let agents = ended.agents;
    let kind = match status {
        "completed" => "workflow.completed",
        "failed" => "workflow.failed",
        _ => "workflow.cancelled",
    };
    tx.emit(event(
        kind,
        json!({"workflow_id": run.workflow_id, "name": run.name, "pattern": run.pattern,
               "status": status, "execution_time_ms": duration_ms,
               "parallel_efficiency": efficiency}),
    ));
    memory::store_memory(
        tx,
        NewMemory {
            content: format!("Workflow {status}: {} ({})", run.name, run.pattern),
            tags: vec!["workflow".into(), run.pattern.clone(), status.to_owned()],
            metadata: Map::from_iter([
                ("workflow_id".to_owned(), json!(run.workflow_id)),
                ("pattern".to_owned(), json!(run.pattern)),
                ("status".to_owned(), json!(status)),
                ("execution_time_ms".to_owned(), json!(duration_ms)),
                ("agents".to_owned(), json!(agents)),
            ]),
        },
    )
    .await?;
    if status != "cancelled" {
        let success = status == "completed";
        memory::record_pattern(
            tx,
            NewPattern {
                pattern_type: if success {
                    "successful_orchestration"
                } else {
                    "orchestration_failure"
                }
                .into(),
                context: format!("Workflow: {}", run.name),
                solution: format!("Pattern: {}", run.pattern),
                metadata: Map::from_iter([
                    ("workflow_id".to_owned(), json!(run.workflow_id)),
                    ("pattern".to_owned(), json!(run.pattern)),
                    ("execution_time_ms".to_owned(), json!(duration_ms)),
                    ("agents".to_owned(), json!(agents)),
                    ("agents_involved".to_owned(), json!(agents.len())),
                ]),
                success: Some(success),
            },
        )
        .await?;
    }
    Ok(())
}

/// The timer's share: steps whose `due_at` has come. Returns how many it moved.
pub async fn due(tx: &mut Writer, state: &AppState, now: i64) -> Result<usize> {
    let due = db::due(tx.conn(), now, DUE_BATCH).await?;
    let mut moved = 0;
    let mut freed = 0;
    for step in due {
        // An earlier move in this batch may have changed it (e.g. skipped it): read it again.
        let Some(step) = db::step_by_idx(tx.conn(), &step.workflow_id, step.idx).await? else {
            continue;
        };
        if step.due_at.is_none_or(|at| at > now) {
            continue;
        }
        let Some(run) = db::get_run(tx.conn(), &step.workflow_id).await? else {
            continue;
        };
        if run.status != "executing" {
            continue;
        }
        match step.status.as_str() {
            "dispatched" => {
                let attempt = db::Attempt {
                    workflow_id: &run.workflow_id,
                    key: db::StepKey::Idx(step.idx),
                    number: step.attempts,
                    holder: None,
                };
                attempt_ended(tx, state, &attempt, Outcome::TimedOut, now).await?;
                freed += 1;
            }
            "pending" | "waiting" => {
                dispatch(tx, state, &run, vec![step], now).await?;
            }
            _ => continue,
        }
        moved += 1;
    }
    fill_waiting(tx, state, freed, now).await?;
    Ok(moved)
}
