//! Group commit for the hot writes: send, ack and claim.
//!
//! SQLite has one writer, and each statement is a round trip to sqlx's worker thread, so a
//! transaction per request caps throughput at a few thousand per second however fast SQLite is,
//! and requests queued on the write connection's lock each wait behind every other. Instead these
//! requests queue here and one task takes the write connection once per batch: all acks go in
//! as one UPDATE, all sends as one INSERT (triggers log their events and apply the queue cap),
//! then the claims as one UPDATE (a recipient's second claim in a later one), so claims see the
//! batch's sends. Acks and claims finish accepted work and sends are new work: they wait in
//! separate queues, and a batch takes every ack and claim waiting (up to [`MAX_BATCH`]) and then
//! sends up to [`MAX_BATCH`], no more than the messages those acks and claims can finish (see
//! [`crate::store::intake`]). Under light load a batch is one
//! request and adds no wait; under heavy load batches grow and the cost per request falls.
//! Every request gets its own answer (202, 204, 409, 429, …), sent only after its statement
//! committed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{NewMessage, SendReceipt, db, refusal};
use crate::broker::Broker;
use crate::common::new_id;
use crate::error::{Error, Result};
use crate::ops::metrics::Metrics;
use crate::store::intake::{self, Batch, Budget, Intake};
use crate::store::{AutoCommit, Store, Turn};

/// Most requests of each queue committed together.
pub const MAX_BATCH: usize = 512;

const BUDGET: Budget = Budget {
    finishing: MAX_BATCH,
    new: MAX_BATCH as u64,
    new_floor: 64,
};

/// A validated send waiting for its commit.
pub struct SendJob {
    pub to: String,
    pub new: NewMessage,
    pub idempotency_key: Option<String>,
    pub recipient_online: bool,
    pub now: i64,
    pub reply: oneshot::Sender<Result<SendReceipt>>,
}

/// An ack waiting for its commit.
pub struct AckJob {
    pub agent_id: String,
    pub message_id: String,
    pub lease_id: String,
    pub now: i64,
    pub reply: oneshot::Sender<Result<()>>,
}

/// A claim waiting for its turn on the write connection.
pub struct ClaimJob {
    pub agent_id: String,
    pub limit: u32,
    pub lease_id: String,
    pub lease_expires_at: i64,
    pub auto_ack: bool,
    pub now: i64,
    pub reply: oneshot::Sender<Result<Vec<db::MessageRow>>>,
}

pub enum Job {
    Send(SendJob),
    Ack(AckJob),
    Claim(ClaimJob),
}

/// The jobs that finish accepted work.
enum Finishing {
    Ack(AckJob),
    Claim(ClaimJob),
}

impl Finishing {
    /// Messages it can finish: an ack one, an auto-acking claim its limit (a plain claim
    /// finishes nothing: the acks that follow do).
    fn weight(&self) -> u64 {
        match self {
            Finishing::Ack(_) => 1,
            Finishing::Claim(claim) if claim.auto_ack => u64::from(claim.limit),
            Finishing::Claim(_) => 0,
        }
    }
}

/// The handle requests submit to.
#[derive(Clone)]
pub struct Batcher {
    finishing: mpsc::Sender<Finishing>,
    new: mpsc::Sender<SendJob>,
}

/// The committing side, run by [`Committer::run`].
pub struct Committer {
    store: Store,
    broker: Broker,
    metrics: Arc<Metrics>,
    queue_cap: u32,
    intake: Intake<Finishing, SendJob>,
}

/// Creates the pair; the app runs the committer as a task.
pub fn channel(
    store: Store,
    broker: Broker,
    metrics: Arc<Metrics>,
    queue_cap: u32,
) -> (Batcher, Committer) {
    let (finishing, new, intake) = intake::intake(MAX_BATCH * 8, Finishing::weight, |_| 1);
    (
        Batcher { finishing, new },
        Committer {
            store,
            broker,
            metrics,
            queue_cap,
            intake,
        },
    )
}

impl Batcher {
    pub async fn submit(&self, job: Job) -> Result<()> {
        let sent = match job {
            Job::Send(job) => self.new.send(job).await.is_ok(),
            Job::Ack(job) => self.finishing.send(Finishing::Ack(job)).await.is_ok(),
            Job::Claim(job) => self.finishing.send(Finishing::Claim(job)).await.is_ok(),
        };
        if !sent {
            return Err(Error::Unavailable("the service is shutting down".into()));
        }
        Ok(())
    }
}

impl Committer {
    /// Commits batches until `stop` is cancelled (after the server stopped taking requests),
    /// then commits what is still queued and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                ready = self.intake.ready() => if !ready {
                    return;
                },
                _ = stop.cancelled() => break,
            }
            self.commit_next().await;
        }
        self.intake.close();
        while self.intake.ready().await {
            self.commit_next().await;
        }
    }

    /// Waits for the write connection, then commits what waits by then.
    async fn commit_next(&mut self) {
        let store = &self.store;
        let turn = self.intake.turn(|lane| store.turn(lane)).await;
        let batch = self.intake.take(BUDGET);
        self.commit(turn, batch).await;
    }

    /// Commits one batch and answers every request in it.
    async fn commit(&self, turn: Turn, batch: Batch<Finishing, SendJob>) {
        let sends = batch.new;
        let mut acks = Vec::new();
        let mut claims = Vec::new();
        for job in batch.finishing {
            match job {
                Finishing::Ack(a) => acks.push(a),
                Finishing::Claim(c) => claims.push(c),
            }
        }
        // One turn on the write connection for the whole batch: requests queue here, not on
        // the connection's lock, where each would wait behind every other.
        let mut conn = match turn.autocommit().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::error!(error = %e, "the write connection is unavailable");
                let failed = || Error::Unavailable("the store is unavailable; retry".into());
                reply_each(sends.into_iter().map(|j| j.reply), Err(failed()));
                reply_each(acks.into_iter().map(|j| j.reply), Err(failed()));
                reply_each(claims.into_iter().map(|j| j.reply), Err(failed()));
                return;
            }
        };
        // Each step answers for itself: a failed send step must not report committed acks as
        // failed, nor the other way round (a client would retry them into duplicates).
        // Acks emit no event: one autocommit statement, no transaction round trips.
        let acked = apply_acks(&mut conn, &acks).await.map(|(answers, newly)| {
            // Only the rows this batch moved: a repeated ack is answered 204 but counted once.
            let metrics = &self.metrics;
            metrics.messages.with_label_values(&["acked"]).inc_by(newly);
            answers
        });
        reply_each(acks.into_iter().map(|j| j.reply), acked);
        let sent = if sends.is_empty() {
            Ok(Vec::new())
        } else {
            apply_sends(&mut conn, &self.broker, &sends, self.queue_cap).await
        };
        let settled = conn.settle().await; // a failed keyed send batch leaves its transaction open
        reply_each(sends.into_iter().map(|j| j.reply), sent);
        if let Err(e) = settled {
            tracing::error!(error = %e, "could not roll back a failed send batch");
            let failed = || Error::Unavailable("the store is unavailable; retry".into());
            reply_each(claims.into_iter().map(|j| j.reply), Err(failed()));
            return;
        }
        // Claims last, so they see this batch's sends.
        self.apply_claims(&mut conn, claims).await;
    }

    /// The claims of distinct recipients run as one statement (a second claim for a recipient
    /// goes in the next round, so it takes what the first left). Several rounds share one
    /// transaction; the answers go out after the commit, and a failed round or commit answers
    /// its claims 503 (nothing was claimed).
    async fn apply_claims(&self, conn: &mut AutoCommit, claims: Vec<ClaimJob>) {
        // The requester is gone (timed out, disconnected): claiming for nobody would park
        // the messages under a lease no one holds and spend one of their deliveries.
        let claims: Vec<ClaimJob> = claims
            .into_iter()
            .filter(|j| !j.reply.is_closed())
            .collect();
        let mut rounds: Vec<Vec<ClaimJob>> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for job in claims {
            let round = seen.entry(job.agent_id.clone()).or_default();
            if *round == rounds.len() {
                rounds.push(Vec::new());
            }
            rounds[*round].push(job);
            *round += 1;
        }
        let together = rounds.len() > 1;
        if together && let Err(e) = conn.begin().await {
            let replies: Vec<_> = rounds.into_iter().flatten().map(|j| j.reply).collect();
            reply_each(replies.into_iter(), Err(e));
            return;
        }
        let mut answered = Vec::new();
        for round in rounds {
            let specs: Vec<db::Claim> = round
                .iter()
                .map(|j| db::Claim {
                    recipient: &j.agent_id,
                    limit: j.limit,
                    lease_id: &j.lease_id,
                    lease_expires_at: j.lease_expires_at,
                    auto_ack: j.auto_ack,
                    now: j.now,
                })
                .collect();
            match db::claim_many(conn, &specs).await {
                Ok(mut taken) => answered.extend(round.into_iter().map(|j| {
                    let messages = taken.remove(&j.lease_id).unwrap_or_default();
                    (j, messages)
                })),
                Err(e) => reply_each(round.into_iter().map(|j| j.reply), Err(e)),
            }
        }
        if together && let Err(e) = conn.commit().await {
            reply_each(answered.into_iter().map(|(j, _)| j.reply), Err(e));
            return;
        }
        for (job, messages) in answered {
            let n = messages.len() as u64;
            self.metrics
                .messages
                .with_label_values(&["claimed"])
                .inc_by(n);
            if job.auto_ack {
                self.metrics
                    .messages
                    .with_label_values(&["acked"])
                    .inc_by(n);
            }
            let _ = job.reply.send(Ok(messages));
        }
    }
}

/// Answers each request with its own result, or every one with 503 when the step failed as a
/// whole (logged once, with its cause).
fn reply_each<T>(
    replies: impl ExactSizeIterator<Item = oneshot::Sender<Result<T>>>,
    results: Result<Vec<Result<T>>>,
) {
    match results {
        Ok(results) => {
            for (reply, result) in replies.zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, requests = replies.len(), "a write batch step failed");
            for reply in replies {
                let _ = reply.send(Err(Error::Unavailable(
                    "the store could not commit this request; retry".into(),
                )));
            }
        }
    }
}

fn idempotency_scope(job: &SendJob) -> String {
    format!("send:{}:{}", job.new.from, job.to)
}

/// Enqueues the batch's sends in one INSERT (its triggers log the events and skip sends over a
/// recipient's cap, answered 429). Idempotency-Key answers are read and written in the same
/// transaction as the messages, so only batches with keys pay for `BEGIN` / `COMMIT`.
async fn apply_sends(
    conn: &mut AutoCommit,
    broker: &Broker,
    jobs: &[SendJob],
    cap: u32,
) -> Result<Vec<Result<SendReceipt>>> {
    let keyed = jobs.iter().any(|j| j.idempotency_key.is_some());
    if keyed {
        conn.begin().await?;
    }
    let mut answers: Vec<Option<Result<SendReceipt>>> = (0..jobs.len()).map(|_| None).collect();
    // Idempotency-Key: a stored answer, or the answer of an earlier job in this batch.
    let mut first_in_batch: HashMap<(String, &str), usize> = HashMap::new();
    let mut replay_of: HashMap<usize, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(key) = job.idempotency_key.as_deref() else {
            continue;
        };
        let scope = idempotency_scope(job);
        if let Some(body) = db::idempotent_answer(conn, &scope, key).await? {
            answers[i] =
                Some(serde_json::from_str(&body).map_err(|e| Error::Internal(e.to_string())));
        } else if let Some(&first) = first_in_batch.get(&(scope.clone(), key)) {
            replay_of.insert(i, first);
        } else {
            first_in_batch.insert((scope, key), i);
        }
    }

    let fresh: Vec<(usize, String)> = (0..jobs.len())
        .filter(|i| answers[*i].is_none() && !replay_of.contains_key(i))
        .map(|i| (i, new_id("msg")))
        .collect();
    let rows: Vec<db::Insert> = fresh
        .iter()
        .map(|(i, message_id)| {
            let job = &jobs[*i];
            db::Insert {
                message_id,
                sender: &job.new.from,
                recipient: &job.to,
                message_type: &job.new.message_type,
                content: job.new.content.get(),
                priority: job.new.priority,
                correlation_id: job.new.correlation_id.as_deref(),
                now: job.now,
            }
        })
        .collect();
    let inserted = db::insert_many(conn, &rows).await?;
    for (i, message_id) in fresh {
        let job = &jobs[i];
        let Some(&recipient_registered) = inserted.get(&message_id) else {
            answers[i] = Some(Err(Error::TooManyRequests(format!(
                "queue full: {:?} already has {cap} waiting messages",
                job.to
            ))));
            continue;
        };
        let receipt = SendReceipt {
            message_id,
            recipient_online: job.recipient_online,
            recipient_registered,
        };
        if let Some(key) = job.idempotency_key.as_deref() {
            let body =
                serde_json::to_string(&receipt).map_err(|e| Error::Internal(e.to_string()))?;
            db::remember_answer(conn, &idempotency_scope(job), key, 202, &body, job.now).await?;
        }
        answers[i] = Some(Ok(receipt));
    }
    if keyed {
        conn.commit().await?;
    }
    conn.publish_logged(broker).await;
    for (i, first) in replay_of {
        answers[i] = Some(match &answers[first] {
            Some(Ok(receipt)) => Ok(receipt.clone()),
            Some(Err(e)) => Err(Error::TooManyRequests(e.to_string())),
            None => Err(Error::Internal("idempotent send without an answer".into())),
        });
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::Internal("unanswered send".into()))))
        .collect())
}

/// Acks the batch's messages held under live leases in one autocommit statement; the rest are
/// explained one by one (a repeated ack under the lease that acked is a success).
/// Applies the acks; the answer to each, and how many messages were acked by this batch.
async fn apply_acks(conn: &mut AutoCommit, jobs: &[AckJob]) -> Result<(Vec<Result<()>>, u64)> {
    if jobs.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let now = jobs.iter().map(|j| j.now).min().unwrap_or_default();
    let keys: Vec<db::AckKey> = jobs
        .iter()
        .map(|j| {
            (
                j.agent_id.as_str(),
                j.message_id.as_str(),
                j.lease_id.as_str(),
            )
        })
        .collect();
    let acked = db::ack_many(conn, &keys, now).await?;
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        if acked.contains(&(job.message_id.clone(), job.lease_id.clone())) {
            answers.push(Ok(()));
            continue;
        }
        let current = db::lease_state(conn, &job.agent_id, &job.message_id).await?;
        let answer = match current {
            Some(c)
                if c.state == "acked" && c.lease_id.as_deref() == Some(job.lease_id.as_str()) =>
            {
                Ok(())
            }
            other => Err(refusal(
                other,
                &job.agent_id,
                &job.message_id,
                &job.lease_id,
            )),
        };
        answers.push(answer);
    }
    Ok((answers, acked.len() as u64))
}
