//! Group commit for the engine's hot paths: step results and submitted runs. Both queue here
//! and one task runs a batch of them in one store transaction: the results of distinct steps
//! end their attempts in one compare-and-set (a result whose step did not move is refused —
//! 404, 409 — writing nothing) and what follows runs for all of them (the barrier, the next
//! steps, the runs' ends); then the new runs are inserted with their steps (one statement for
//! all) and their first steps dispatched; the freed slots go to waiting steps once per batch.
//! Results finish accepted work and submits are new work: they wait in separate queues, and a
//! batch takes every result waiting (up to [`MAX_BATCH`]) and then runs of up to
//! [`MAX_NEW_STEPS`] steps in all, no more steps than it has results (see
//! [`crate::store::intake`]). Under light load a batch is
//! one request and adds no wait; under load the transaction's fixed costs (begin, the events'
//! insert, commit and its pages) are shared. Each request is answered with its run as it is
//! after the commit, read once for all the batch's requests of that run. A failure after
//! anything moved rolls the whole batch back and each of its requests is answered 503 (retry:
//! nothing was recorded).

use std::collections::{HashMap, HashSet};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::db::{RunRow, StepRow};
use super::definition::WorkflowDefinition;
use super::engine::{self, Outcome};
use super::{StepResult, Workflow, db};
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::store::intake::{self, Batch, Budget, Intake};
use crate::store::{Turn, Writer};

/// Most results committed together.
pub const MAX_BATCH: usize = 256;
/// Most steps of new runs committed together (a larger run goes alone).
pub const MAX_NEW_STEPS: u64 = 256;

const BUDGET: Budget = Budget {
    finishing: MAX_BATCH,
    new: MAX_NEW_STEPS,
    new_floor: 64,
};

/// Where a request's answer goes: its run as it is after the commit, or why not.
pub struct Reply {
    workflow_id: String,
    tx: oneshot::Sender<Result<Workflow>>,
}

impl Reply {
    fn send(self, answer: Result<Workflow>) {
        let _ = self.tx.send(answer);
    }
}

/// A validated result waiting for its commit.
pub struct ResultJob {
    pub workflow_id: String,
    pub step_id: String,
    pub result: StepResult,
    pub now: i64,
    pub reply: Reply,
}

/// A validated run, its rows built, waiting for its commit.
pub struct StartJob {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
    pub def: WorkflowDefinition,
    pub reply: Reply,
}

/// The handle requests submit to.
#[derive(Clone)]
pub struct Batcher {
    results: mpsc::Sender<ResultJob>,
    starts: mpsc::Sender<StartJob>,
}

/// The committing side, run by [`Committer::run`].
pub struct Committer {
    intake: Intake<ResultJob, StartJob>,
}

/// Creates the pair; the app runs the committer as a task.
pub fn channel() -> (Batcher, Committer) {
    let (results, starts, intake) = intake::intake(
        MAX_BATCH * 8,
        |_| 1,
        |start: &StartJob| start.steps.len() as u64,
    );
    (Batcher { results, starts }, Committer { intake })
}

impl Batcher {
    /// Queues a new run and waits for its commit (its first steps dispatched); answers the run.
    pub async fn start(
        &self,
        run: RunRow,
        steps: Vec<StepRow>,
        def: WorkflowDefinition,
    ) -> Result<Workflow> {
        let (tx, answer) = oneshot::channel();
        let reply = Reply {
            workflow_id: run.workflow_id.clone(),
            tx,
        };
        let job = StartJob {
            run,
            steps,
            def,
            reply,
        };
        let queued = self.starts.send(job).await.is_ok();
        Self::answer(queued, answer).await
    }

    /// Queues a result and waits for its commit; answers the run.
    pub async fn result(
        &self,
        workflow_id: &str,
        step_id: &str,
        result: StepResult,
        now: i64,
    ) -> Result<Workflow> {
        let (tx, answer) = oneshot::channel();
        let job = ResultJob {
            workflow_id: workflow_id.to_owned(),
            step_id: step_id.to_owned(),
            result,
            now,
            reply: Reply {
                workflow_id: workflow_id.to_owned(),
                tx,
            },
        };
        let queued = self.results.send(job).await.is_ok();
        Self::answer(queued, answer).await
    }

    async fn answer(queued: bool, answer: oneshot::Receiver<Result<Workflow>>) -> Result<Workflow> {
        let stopping = || Error::Unavailable("the service is shutting down".into());
        if !queued {
            return Err(stopping());
        }
        answer.await.map_err(|_| stopping())?
    }
}

/// A refusal is decided before anything is written.
fn is_refusal(error: &Error) -> bool {
    matches!(
        error,
        Error::NotFound(_) | Error::Conflict(_) | Error::Validation(_)
    )
}

/// An error once a step moved: a refusal there would leave half a move, so it is none.
fn after_a_move(error: Error) -> Error {
    if is_refusal(&error) {
        Error::Internal(format!("after the step moved: {error}"))
    } else {
        error
    }
}

impl Committer {
    /// Commits batches until `stop` is cancelled (after the server stopped taking requests),
    /// then commits what is still queued and returns.
    pub async fn run(mut self, state: AppState, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                ready = self.intake.ready() => if !ready {
                    return;
                },
                _ = stop.cancelled() => break,
            }
            self.commit_next(&state).await;
        }
        self.intake.close();
        while self.intake.ready().await {
            self.commit_next(&state).await;
        }
    }

    /// Waits for the write connection, then commits what waits by then.
    async fn commit_next(&mut self, state: &AppState) {
        let store = &state.store;
        let turn = self.intake.turn(|lane| store.turn(lane)).await;
        let batch = self.intake.take(BUDGET);
        commit(state, turn, batch).await;
    }
}

/// Runs one batch in one transaction and answers each request: results first, then new runs.
async fn commit(state: &AppState, turn: Turn, batch: Batch<ResultJob, StartJob>) {
    if batch.is_empty() {
        return;
    }
    let jobs = batch.finishing;
    let mut starts = batch.new;
    let now = jobs
        .iter()
        .map(|j| j.now)
        .chain(starts.iter().map(|s| s.run.created_at))
        .max()
        .unwrap_or_default();
    let mut tx = match turn.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail(replies_of(starts.into_iter(), jobs), &e),
    };
    // The first result for each step ends together with the others; a second one for a step
    // (a client's retry racing its first) is looked at after, on its own.
    let mut seen = HashSet::new();
    let (first, again): (Vec<ResultJob>, Vec<ResultJob>) = jobs
        .into_iter()
        .partition(|j| seen.insert((j.workflow_id.clone(), j.step_id.clone())));
    let mut accepted = match apply_all(&mut tx, state, first, now).await {
        Ok(replies) => replies,
        Err((e, replies)) => {
            drop(tx);
            let replies = replies
                .into_iter()
                .chain(again.into_iter().map(|j| j.reply));
            return fail(replies.chain(starts.into_iter().map(|s| s.reply)), &e);
        }
    };
    // Each result accepted ended a held step (or repeated one that did): its place is free.
    let mut freed = accepted.len();
    let mut again = again.into_iter();
    while let Some(job) = again.next() {
        match apply(&mut tx, state, &job).await {
            Ok(()) => {
                freed += 1;
                accepted.push(job.reply);
            }
            Err(e) if is_refusal(&e) => {
                job.reply.send(Err(e));
            }
            Err(e) => {
                drop(tx);
                let replies = accepted.into_iter().chain([job.reply]);
                let replies = replies.chain(again.map(|j| j.reply));
                return fail(replies.chain(starts.into_iter().map(|s| s.reply)), &e);
            }
        }
    }
    // A requester already gone (timed out, disconnected) was not told of a run: creating it
    // now would make the client's retry a second one.
    starts.retain(|start| !start.reply.tx.is_closed());
    if let Err(e) = insert_runs(&mut tx, &starts).await {
        drop(tx);
        return fail(
            accepted
                .into_iter()
                .chain(replies_of(starts.into_iter(), Vec::new())),
            &e,
        );
    }
    let mut started = starts.into_iter();
    while let Some(StartJob {
        run,
        steps,
        def,
        reply,
    }) = started.next()
    {
        match engine::started(&mut tx, state, &run, &def, steps, run.created_at).await {
            Ok(()) => accepted.push(reply),
            Err(e) => {
                drop(tx);
                let replies = accepted.into_iter().chain([reply]);
                return fail(replies.chain(started.map(|s| s.reply)), &e);
            }
        }
    }
    let freed = u32::try_from(freed).unwrap_or(u32::MAX);
    let finished = match engine::fill_waiting(&mut tx, state, freed, now).await {
        Ok(()) => tx.commit(&state.broker).await,
        Err(e) => Err(e),
    };
    match finished {
        Ok(()) => answer(state, accepted),
        Err(e) => fail(accepted.into_iter(), &e),
    }
}

/// The replies of requests not yet answered.
fn replies_of(
    starts: impl Iterator<Item = StartJob>,
    jobs: Vec<ResultJob>,
) -> impl Iterator<Item = Reply> {
    starts
        .map(|j| j.reply)
        .chain(jobs.into_iter().map(|j| j.reply))
}

/// New runs with their steps, all in a few statements.
async fn insert_runs(tx: &mut Writer, starts: &[StartJob]) -> Result<()> {
    if starts.is_empty() {
        return Ok(());
    }
    let runs: Vec<&RunRow> = starts.iter().map(|s| &s.run).collect();
    db::insert_runs(tx.conn(), &runs).await?;
    let steps: Vec<&StepRow> = starts.iter().flat_map(|s| &s.steps).collect();
    db::insert_steps(tx.conn(), &steps).await
}

/// How a result ends its attempt.
fn outcome(result: &StepResult) -> Outcome {
    if result.success {
        Outcome::Succeeded(result.output.as_ref().map(|o| o.get().to_owned()))
    } else {
        Outcome::Failed(result.error.clone().unwrap_or_else(|| "failed".into()))
    }
}

fn attempt(job: &ResultJob) -> db::Attempt<'_> {
    db::Attempt {
        workflow_id: &job.workflow_id,
        key: db::StepKey::Id(&job.step_id),
        number: job.result.attempt,
        holder: Some(&job.result.agent_id),
    }
}

/// Results for distinct steps: their attempts end in one compare-and-set, then what follows for
/// all of them. A result whose step did not move is refused (or is a repeat), nothing written.
/// Returns the replies of those accepted; on a failure, the replies of every result not yet
/// answered (whatever moved is rolled back with the batch).
async fn apply_all(
    tx: &mut Writer,
    state: &AppState,
    jobs: Vec<ResultJob>,
    now: i64,
) -> std::result::Result<Vec<Reply>, (Error, Vec<Reply>)> {
    let outcomes: Vec<Outcome> = jobs.iter().map(|j| outcome(&j.result)).collect();
    let (moved, kinds) = {
        let ends: Vec<(db::Attempt, db::Ending)> = jobs
            .iter()
            .zip(&outcomes)
            .map(|(job, outcome)| (attempt(job), engine::ending(outcome)))
            .collect();
        let kinds: Vec<&'static str> = ends.iter().map(|(_, ending)| ending.outcome).collect();
        (db::end_attempts(tx.conn(), &ends, now).await, kinds)
    };
    let moved = match moved {
        Ok(moved) => moved,
        Err(e) => return Err((e, jobs.into_iter().map(|j| j.reply).collect())),
    };
    let mut moved: HashMap<(String, String), StepRow> = moved
        .into_iter()
        .map(|step| ((step.workflow_id.clone(), step.step_id.clone()), step))
        .collect();
    let mut ended = Vec::with_capacity(moved.len());
    let mut accepted = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter().zip(kinds);
    while let Some((job, kind)) = jobs.next() {
        if let Some(step) = moved.remove(&(job.workflow_id.clone(), job.step_id.clone())) {
            ended.push((step, kind));
            accepted.push(job.reply);
            continue;
        }
        match refused(tx, &job).await {
            Ok(()) => accepted.push(job.reply),
            Err(e) if is_refusal(&e) => {
                job.reply.send(Err(e));
            }
            Err(e) => {
                accepted.push(job.reply);
                accepted.extend(jobs.map(|(j, _)| j.reply));
                return Err((e, accepted));
            }
        }
    }
    match engine::steps_ended(tx, state, ended, now).await {
        Ok(()) => Ok(accepted),
        Err(e) => Err((after_a_move(e), accepted)),
    }
}

/// One result on its own: the attempt ends with one compare-and-set (the step must be out,
/// under this attempt, with this agent), then the run moves on; else [`refused`].
async fn apply(tx: &mut Writer, state: &AppState, job: &ResultJob) -> Result<()> {
    let ended = engine::attempt_ended(tx, state, &attempt(job), outcome(&job.result), job.now)
        .await
        .map_err(after_a_move)?;
    if ended.is_some() {
        return Ok(());
    }
    refused(tx, job).await
}

/// A result whose step did not move: the step is read to tell a repeat of a recorded result
/// (Ok: answered 200) from a refusal (404, 409). Writes nothing.
async fn refused(tx: &mut Writer, job: &ResultJob) -> Result<()> {
    let (workflow_id, step_id, body) = (&job.workflow_id, &job.step_id, &job.result);
    let Some((_, step)) = db::run_and_step(tx.conn(), workflow_id, step_id).await? else {
        return Err(Error::NotFound(format!(
            "no step {step_id:?} in workflow {workflow_id:?}"
        )));
    };
    let holder = step.agent_id.as_deref() == Some(&body.agent_id);
    let repeated =
        (step.status == "succeeded" && body.success) || (step.status == "failed" && !body.success);
    if repeated && holder && step.attempts == body.attempt {
        // The same result again (its answer was lost): it was recorded, nothing more to do.
        return Ok(());
    }
    if step.status != "dispatched" {
        return Err(Error::Conflict(format!(
            "step {step_id} is {}: it takes no result",
            step.status
        )));
    }
    Err(Error::Conflict(format!(
        "{:?} does not hold attempt {} of step {step_id} (attempt {} is held by {:?})",
        body.agent_id,
        body.attempt,
        step.attempts,
        step.agent_id.as_deref().unwrap_or("nobody")
    )))
}
/// Answers the accepted requests with their runs as they are after the commit: each run read
/// once for all its requests, beside the next batch.
fn answer(state: &AppState, accepted: Vec<Reply>) {
    let mut runs: HashMap<String, Vec<Reply>> = HashMap::new();
    for reply in accepted {
        runs.entry(reply.workflow_id.clone())
            .or_default()
            .push(reply);
    }
    let state = state.clone();
    tokio::spawn(futures_util::future::join_all(runs.into_iter().map(
        move |(workflow_id, replies)| {
            let state = state.clone();
            async move {
                match super::get(&state, &workflow_id).await {
                    Ok(run) => replies.into_iter().for_each(|r| r.send(Ok(run.clone()))),
                    Err(e) => {
                        tracing::error!(error = %e, workflow_id, "a committed run could not be read");
                        replies.into_iter().for_each(|r| {
                            r.send(Err(Error::Internal(format!("reading the run: {e}"))))
                        });
                    }
                }
            }
        },
    )));
}

/// Answers every reply 503: the batch was rolled back (the cause is logged once).
fn fail(replies: impl Iterator<Item = Reply>, error: &Error) {
    tracing::error!(error = %error, "a batch of workflow writes was rolled back");
    for reply in replies {
        reply.send(Err(Error::Unavailable(
            "the result was not recorded; retry".into(),
        )));
    }
}
