//! Simulated agents for the workflow scenarios (workflow, chain, fanout): agent `i` listens on its
//! stream, claims (limit 32, auto-ack) on every `new_message` frame, again at
//! once after a full batch and after a second without a frame, and posts every
//! claimed step's (successful) result at once, `--concurrency` results in
//! flight in all.
//!
//! A sequential step's input names the agent of the next step (`next`, null
//! for the last): the result's POST then starts a handover, which ends at that
//! step's `new_message` frame on the next agent's stream. A result whose
//! answer says the run `completed` ends the run that chain or fanout awaits.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use crate::tally::Window;
use crate::{Bench, CLAIM_LIMIT, Stop, lock};

/// An agent claims this long after its last claim even without a frame.
const WAKE_FALLBACK: Duration = Duration::from_secs(1);

/// A claimed message, auto-acked.
#[derive(Deserialize)]
struct Delivered {
    message_type: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct Delivery {
    messages: Vec<Delivered>,
}

/// The content of a `workflow.step` message.
#[derive(Deserialize)]
struct StepMessage {
    workflow_id: String,
    step_id: String,
    attempt: i64,
    #[serde(default)]
    input: Value,
}

/// The part of a Workflow the bench reads.
#[derive(Deserialize)]
pub struct Run {
    pub workflow_id: String,
    name: String,
    /// `completed` once its last step succeeded.
    status: String,
}

impl Bench {
    /// Starts the agents `0..targets`, working until `stop`.
    pub fn start_agents(self: &Arc<Self>, w: Window, stop: &Stop) -> JoinSet<()> {
        let results = Arc::new(Semaphore::new(self.args.concurrency));
        (0..self.targets)
            .map(|i| self.clone().work(w, i, results.clone(), stop.clone()))
            .collect()
    }

    /// A `new_message` frame on agent `i`'s stream wakes its claims,
    /// and ends the handover to it if one is out for that run.
    pub fn woken(&self, i: usize, run: Option<String>, at: Instant) {
        if let Some(wake) = self.st.wake.get(i) {
            wake.notify_one();
        }
        let Some(run) = run else { return };
        let mut handovers = lock(&self.st.handovers);
        if let Some(&(next, start, counted)) = handovers.get(&run)
            && next == i
        {
            handovers.remove(&run);
            drop(handovers);
            self.st
                .handover
                .done(counted, at.saturating_duration_since(start));
        }
    }

    /// The run named `name` completed, its result answered at `at`: ends it
    /// if it is the one awaited (several results of a parallel run committed
    /// together may all say so; the first one heard ends it).
    fn finished(&self, name: &str, at: Instant) {
        let awaited = lock(&self.st.awaited).take_if(|(awaited, _)| awaited == name);
        if let Some((_, done)) = awaited {
            let _ = done.send(at);
        }
    }

    /// Agent `i` claims when woken (by a frame, or after a second without
    /// one), again at once after a full batch, and answers every claimed step
    /// concurrently, until `stop`.
    async fn work(self: Arc<Self>, w: Window, i: usize, results: Arc<Semaphore>, mut stop: Stop) {
        let path = format!("/v1/agents/{}/messages/claim", self.agent(i));
        let body = json!({"limit": CLAIM_LIMIT, "auto_ack": true});
        let mut answers = JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = timeout(WAKE_FALLBACK, self.st.wake[i].notified()) => {}
            }
            loop {
                let Some(delivery) = self.claim::<Delivery>(w, &path, &body).await else {
                    break;
                };
                let messages = delivery.messages;
                let n = messages.len();
                for m in messages {
                    answers.spawn(self.clone().answer(w, i, m, results.clone()));
                }
                while answers.try_join_next().is_some() {}
                if n < CLAIM_LIMIT {
                    break;
                }
            }
        }
    }

    /// Agent `i` posts the (successful) result of a claimed step.
    async fn answer(self: Arc<Self>, w: Window, i: usize, m: Delivered, results: Arc<Semaphore>) {
        if m.message_type != "workflow.step" {
            return;
        }
        let step = match serde_json::from_value::<StepMessage>(m.content) {
            Ok(step) => step,
            Err(e) => return self.fail("claim", format!("bad workflow.step content: {e}")),
        };
        let _permit = results.acquire().await;
        let (agent, run) = (self.agent(i), &step.workflow_id);
        let path = format!("/v1/workflows/{run}/steps/{}/result", step.step_id);
        let body = json!({"agent_id": agent, "attempt": step.attempt, "success": true,
            "output": {"by": agent}});
        // Sequential steps name the next step's agent (null for the last).
        let sequential = step.input.get("next").is_some();
        let next = step.input.get("next").and_then(Value::as_u64);
        let t = Instant::now();
        let counted = w.counts(t);
        if let Some(next) = next {
            self.st.handover.begin(counted);
            let out = (next as usize, t, counted);
            lock(&self.st.handovers).insert(run.clone(), out);
        }
        self.st.result.begin(counted);
        match self.post_json::<Run>(&path, &body).await {
            Ok(after) => {
                let at = Instant::now();
                self.st.result.done(counted, at - t);
                self.st.pending.fetch_sub(1, Relaxed);
                if w.counts(at) {
                    self.st.answered.fetch_add(1, Relaxed);
                }
                if !sequential {
                    self.step_done(run, at);
                } else if next.is_none() {
                    self.st.completed.fetch_add(1, Relaxed);
                }
                if after.status == "completed" {
                    self.finished(&after.name, at);
                }
            }
            Err(e) => {
                self.fail("result", e);
                if next.is_some() {
                    lock(&self.st.handovers).remove(run);
                }
            }
        }
    }
}
