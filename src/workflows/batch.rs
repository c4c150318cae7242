//! Group commit for step results, the engine's hot path. Results queue here and one task runs a
//! batch of them (up to [`MAX_BATCH`]) in one store transaction: each result is checked against
//! the step (a refusal — 404, 409 — writes nothing), then moves it with a compare-and-set and
//! what follows (the next steps, the run's end); the freed slots go to waiting steps once per
//! batch. Under light load a batch is one result and adds no wait; under load the transaction's
//! fixed costs (begin, the events' insert, commit) are shared. A failure after a step moved rolls
//! the whole batch back and each of its results is answered 503 (retry: nothing was recorded).

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::engine::{self, Outcome};
use super::{StepResult, db};
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::store::Writer;

/// Most results committed together.
pub const MAX_BATCH: usize = 256;

/// A validated result waiting for its commit.
pub struct ResultJob {
    pub workflow_id: String,
    pub step_id: String,
    pub result: StepResult,
    pub now: i64,
    pub reply: oneshot::Sender<Result<()>>,
}

/// The handle requests submit to.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<ResultJob>,
}

/// The committing side, run by [`Committer::run`].
pub struct Committer {
    jobs: mpsc::Receiver<ResultJob>,
}

/// Creates the pair; the app runs the committer as a task.
pub fn channel() -> (Batcher, Committer) {
    let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
    (Batcher { jobs: tx }, Committer { jobs: rx })
}

impl Batcher {
    /// Queues a result and waits for its commit.
    pub async fn submit(
        &self,
        workflow_id: &str,
        step_id: &str,
        result: StepResult,
        now: i64,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let job = ResultJob {
            workflow_id: workflow_id.to_owned(),
            step_id: step_id.to_owned(),
            result,
            now,
            reply,
        };
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the service is shutting down".into()))?;
        answer
            .await
            .map_err(|_| Error::Unavailable("the service is shutting down".into()))?
    }
}

/// A refusal is decided before anything is written.
fn is_refusal(error: &Error) -> bool {
    matches!(
        error,
        Error::NotFound(_) | Error::Conflict(_) | Error::Validation(_)
    )
}

impl Committer {
    /// Commits batches until `stop` is cancelled (after the server stopped taking requests),
    /// then commits what is still queued and returns.
    pub async fn run(mut self, state: AppState, stop: CancellationToken) {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        loop {
            tokio::select! {
                biased;
                n = self.jobs.recv_many(&mut jobs, MAX_BATCH) => {
                    if n == 0 {
                        return;
                    }
                }
                _ = stop.cancelled() => {
                    self.jobs.close();
                    while let Some(job) = self.jobs.recv().await {
                        jobs.push(job);
                        if jobs.len() == MAX_BATCH {
                            commit(&state, std::mem::take(&mut jobs)).await;
                        }
                    }
                    commit(&state, jobs).await;
                    return;
                }
            }
            commit(&state, std::mem::take(&mut jobs)).await;
        }
    }
}

/// Runs one batch in one transaction and answers each result.
async fn commit(state: &AppState, jobs: Vec<ResultJob>) {
    if jobs.is_empty() {
        return;
    }
    let mut tx = match state.store.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail(jobs.into_iter().map(|j| j.reply), &e),
    };
    let mut accepted = Vec::with_capacity(jobs.len());
    let mut jobs = jobs.into_iter();
    let mut now = 0;
    while let Some(job) = jobs.next() {
        now = now.max(job.now);
        match apply(&mut tx, state, &job).await {
            Ok(()) => accepted.push(job.reply),
            Err(e) if is_refusal(&e) => {
                let _ = job.reply.send(Err(e));
            }
            Err(e) => {
                drop(tx);
                let replies = accepted.into_iter().chain([job.reply]);
                return fail(replies.chain(jobs.map(|j| j.reply)), &e);
            }
        }
    }
    let freed = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
    let finished = match engine::fill_waiting(&mut tx, state, freed, now).await {
        Ok(()) => tx.commit(&state.broker).await,
        Err(e) => Err(e),
    };
    match finished {
        Ok(()) => accepted.into_iter().for_each(|reply| {
            let _ = reply.send(Ok(()));
        }),
        Err(e) => fail(accepted.into_iter(), &e),
    }
}

/// Answers every reply 503: the batch was rolled back (the cause is logged once).
fn fail(replies: impl Iterator<Item = oneshot::Sender<Result<()>>>, error: &Error) {
    tracing::error!(error = %error, "a batch of step results was rolled back");
    for reply in replies {
        let _ = reply.send(Err(Error::Unavailable(
            "the result was not recorded; retry".into(),
        )));
    }
}

/// One result: the attempt ends with one compare-and-set (the step must be out, under this
/// attempt, with this agent), then the run moves on. Only when that finds nothing is the step
/// read, to tell a repeat of a recorded result (200) from a refusal (404, 409), nothing written.
async fn apply(tx: &mut Writer, state: &AppState, job: &ResultJob) -> Result<()> {
    let (workflow_id, step_id, body) = (&job.workflow_id, &job.step_id, &job.result);
    let outcome = if body.success {
        Outcome::Succeeded(body.output.as_ref().map(|o| o.get().to_owned()))
    } else {
        Outcome::Failed(body.error.clone().unwrap_or_else(|| "failed".into()))
    };
    let attempt = db::Attempt {
        workflow_id,
        key: db::StepKey::Id(step_id),
        number: body.attempt,
        holder: Some(&body.agent_id),
    };
    let ended = engine::attempt_ended(tx, state, &attempt, outcome, job.now)
        .await
        .map_err(|e| match e {
            // Past the compare-and-set a refusal would leave half a move: not a refusal.
            e if is_refusal(&e) => Error::Internal(format!("after the step moved: {e}")),
            e => e,
        })?;
    if ended.is_some() {
        return Ok(());
    }
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
