//! Group commit for the two hottest writes, send and ack.
//!
//! SQLite has one writer, and each statement is a round trip to sqlx's worker thread, so a write
//! transaction per request caps throughput at a few thousand per second however fast SQLite is.
//! Instead, requests queue here and one task commits whatever has gathered — up to
//! [`MAX_BATCH`] sends and acks — in a single transaction of a few multi-row statements. Under
//! light load a batch is one request and adds no wait; under heavy load batches grow and the cost
//! per request falls. Every request still gets its own answer (202, 204, 409, 429, …), and the
//! answer is sent only after the commit.

use std::collections::{HashMap, HashSet};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{NewMessage, SendReceipt, db, refusal};
use crate::broker::Broker;
use crate::common::new_id;
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::store::{Store, Writer};

/// Most requests committed together.
pub const MAX_BATCH: usize = 512;

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

pub enum Job {
    Send(SendJob),
    Ack(AckJob),
}

/// The handle requests submit to.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
}

/// The committing side, run by [`Committer::run`].
pub struct Committer {
    store: Store,
    broker: Broker,
    queue_cap: u32,
    jobs: mpsc::Receiver<Job>,
}

/// Creates the pair; the app runs the committer as a task.
pub fn channel(store: Store, broker: Broker, queue_cap: u32) -> (Batcher, Committer) {
    let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
    (
        Batcher { jobs: tx },
        Committer {
            store,
            broker,
            queue_cap,
            jobs: rx,
        },
    )
}

impl Batcher {
    pub async fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .await
            .map_err(|_| Error::Unavailable("the service is shutting down".into()))
    }
}

impl Committer {
    /// Commits batches until `stop` is cancelled (after the server stopped taking requests),
    /// then commits what is still queued and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut jobs = Vec::with_capacity(MAX_BATCH);
        loop {
            let received = tokio::select! {
                biased;
                n = self.jobs.recv_many(&mut jobs, MAX_BATCH) => n,
                _ = stop.cancelled() => {
                    self.jobs.close();
                    while let Some(job) = self.jobs.recv().await {
                        jobs.push(job);
                        if jobs.len() == MAX_BATCH {
                            self.commit(std::mem::take(&mut jobs)).await;
                        }
                    }
                    self.commit(jobs).await;
                    return;
                }
            };
            if received == 0 {
                return;
            }
            self.commit(std::mem::take(&mut jobs)).await;
        }
    }

    /// Commits one batch and answers every request in it.
    async fn commit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        let mut acks = Vec::new();
        for job in jobs {
            match job {
                Job::Send(s) => sends.push(s),
                Job::Ack(a) => acks.push(a),
            }
        }
        let outcome = async {
            let sent = if sends.is_empty() {
                Vec::new()
            } else {
                let mut tx = self.store.begin().await?;
                let sent = apply_sends(&mut tx, &sends, self.queue_cap).await?;
                tx.commit(&self.broker).await?;
                sent
            };
            // Acks emit no event: one autocommit statement, no transaction round trips.
            let acked = apply_acks(&self.store, &acks).await?;
            Ok::<_, Error>((sent, acked))
        }
        .await;
        match outcome {
            Ok((sent, acked)) => {
                for (job, answer) in sends.into_iter().zip(sent) {
                    let _ = job.reply.send(answer);
                }
                for (job, answer) in acks.into_iter().zip(acked) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, sends = sends.len(), acks = acks.len(), "batch commit failed");
                let failed = || Error::Unavailable("the store failed to commit; retry".into());
                for job in sends {
                    let _ = job.reply.send(Err(failed()));
                }
                for job in acks {
                    let _ = job.reply.send(Err(failed()));
                }
            }
        }
    }
}

fn idempotency_scope(job: &SendJob) -> String {
    format!("send:{}:{}", job.new.from, job.to)
}

/// Enqueues the batch's sends: idempotent replays answered from their first receipt, the
/// per-recipient cap applied in arrival order, everything else inserted with its event.
async fn apply_sends(
    tx: &mut Writer,
    jobs: &[SendJob],
    cap: u32,
) -> Result<Vec<Result<SendReceipt>>> {
    let mut answers: Vec<Option<Result<SendReceipt>>> = (0..jobs.len()).map(|_| None).collect();
    // Idempotency-Key: a stored answer, or the answer of an earlier job in this batch.
    let mut first_in_batch: HashMap<(String, &str), usize> = HashMap::new();
    let mut replay_of: HashMap<usize, usize> = HashMap::new();
    for (i, job) in jobs.iter().enumerate() {
        let Some(key) = job.idempotency_key.as_deref() else {
            continue;
        };
        let scope = idempotency_scope(job);
        if let Some(body) = db::idempotent_answer(tx.conn(), &scope, key).await? {
            answers[i] =
                Some(serde_json::from_str(&body).map_err(|e| Error::Internal(e.to_string())));
        } else if let Some(&first) = first_in_batch.get(&(scope.clone(), key)) {
            replay_of.insert(i, first);
        } else {
            first_in_batch.insert((scope, key), i);
        }
    }

    let recipients: HashSet<&str> = jobs.iter().map(|j| j.to.as_str()).collect();
    let recipients: Vec<&str> = recipients.into_iter().collect();
    let mut pending = db::pending_counts(tx.conn(), &recipients).await?;
    let mut accepted = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        if answers[i].is_some() || replay_of.contains_key(&i) {
            continue;
        }
        let depth = pending.entry(job.to.as_str()).or_default();
        if *depth >= i64::from(cap) {
            answers[i] = Some(Err(Error::TooManyRequests(format!(
                "queue full: {:?} already has {cap} waiting messages",
                job.to
            ))));
            continue;
        }
        *depth += 1;
        accepted.push((i, new_id("msg")));
    }

    let rows: Vec<db::Insert> = accepted
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
    db::insert_many(tx.conn(), &rows).await?;
    let events = accepted
        .iter()
        .map(|(i, message_id)| {
            let job = &jobs[*i];
            NewEvent::new(
                "messages",
                "new_message",
                json!({
                    "message_id": message_id, "from": job.new.from, "to": job.to,
                    "priority": job.new.priority, "message_type": job.new.message_type,
                    "correlation_id": job.new.correlation_id,
                }),
            )
            .to_agent(&job.to)
        })
        .collect();
    tx.emit_many(events).await?;
    for (i, message_id) in accepted {
        let job = &jobs[i];
        let receipt = SendReceipt {
            message_id,
            recipient_online: job.recipient_online,
        };
        if let Some(key) = job.idempotency_key.as_deref() {
            let body =
                serde_json::to_string(&receipt).map_err(|e| Error::Internal(e.to_string()))?;
            db::remember_answer(tx.conn(), &idempotency_scope(job), key, 202, &body, job.now)
                .await?;
        }
        answers[i] = Some(Ok(receipt));
    }
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
async fn apply_acks(store: &Store, jobs: &[AckJob]) -> Result<Vec<Result<()>>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
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
    let mut conn = store.autocommit().await?;
    let acked = db::ack_many(&mut conn, &keys, now).await?;
    let mut answers = Vec::with_capacity(jobs.len());
    for job in jobs {
        if acked.contains(&(job.message_id.clone(), job.lease_id.clone())) {
            answers.push(Ok(()));
            continue;
        }
        let current = db::lease_state(&mut conn, &job.agent_id, &job.message_id).await?;
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
    Ok(answers)
}
