//! The offered load of every scenario but `connections`: `--concurrency`
//! producers take operation numbers from one shared counter. At `--rate 0`
//! each runs its operations back to back; at `--rate N` operation `i` is due
//! at `start + i / N`, whoever sends it, and its latency runs from that due
//! time. Producers stop at the window's end; their last operations may run
//! into the drain.
//!
//! A refused operation (see `http.rs`) counts in its row's `refused`. Open
//! loop, it is dropped: the timetable goes on, so the offered load stays what
//! was offered and no operation is retried before its `Retry-After`. Closed
//! loop, the producer that was refused waits the `Retry-After` (at most until
//! the window ends) before its next operation.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout_at};

use crate::http::Failed;
use crate::tally::{Row, WARMUP, Window};
use crate::{Bench, DRAIN, Scenario};

impl Bench {
    /// Runs the producers through the window, their last sends at most into the drain.
    pub async fn produce_all(self: &Arc<Self>, w: Window) {
        let set: JoinSet<()> = (0..self.args.concurrency)
            .map(|_| self.clone().produce(w))
            .collect();
        let _ = timeout_at(w.end + DRAIN, set.join_all()).await;
        self.st.producers_done.store(true, Relaxed);
        if self.rate > 0 {
            // Open loop: operations due in the window that never started are errors too.
            let (lo, n) = (
                self.rate * WARMUP.as_secs(),
                self.rate * self.args.duration_s,
            );
            let reuse = match self.args.scenario {
                // Odd operations after the warm-up reuse ids.
                Scenario::Session | Scenario::Checkpoint => {
                    n - ((lo + n).div_ceil(2) - lo.div_ceil(2))
                }
                _ => 0,
            };
            self.st.send.set_started(n - reuse);
            self.st.reuse.set_started(reuse);
        }
    }

    /// A producer worker. Workers take message numbers from a shared counter;
    /// with a rate, message `i` is due at `start + i / rate`, whoever sends it.
    async fn produce(self: Arc<Self>, w: Window) {
        loop {
            let i = self.st.next.fetch_add(1, Relaxed);
            let due = match self.rate {
                0 => Instant::now(),
                rate => w.start + Duration::from_secs_f64(i as f64 / rate as f64),
            };
            if due >= w.end {
                return;
            }
            if self.rate > 0 {
                sleep_until(due).await;
            }
            if let (0, Some(wait)) = (self.rate, self.op(w, i, due).await) {
                sleep_until((Instant::now() + wait).min(w.end)).await;
            }
        }
    }

    /// Operation `i` of the scenario, due at `due`, timed in its row; returns
    /// the wait that a refusal asks for.
    async fn op(self: &Arc<Self>, w: Window, i: u64, due: Instant) -> Option<Duration> {
        let scenario = self.args.scenario;
        if matches!(
            scenario,
            Scenario::Send | Scenario::Roundtrip | Scenario::Notify
        ) {
            return self.send(w, i, due).await;
        }
        let reusing = matches!(scenario, Scenario::Session | Scenario::Checkpoint);
        let (counted, reuse) = (w.counts(due), reusing && due >= w.measure && i % 2 == 1);
        let (row, what) = match reuse {
            false => (&self.st.send, self.rows()[0]),
            true => (&self.st.reuse, self.rows()[1]),
        };
        row.begin(counted);
        let result = match (scenario, reuse) {
            (Scenario::Handoff, _) => self.initiate(i, counted).await,
            (Scenario::Workflow, _) => self.submit(i, counted).await,
            (_, false) => self.create(w, i, due).await,
            (_, true) => self.reuse(scenario, i / 2).await,
        };
        match result {
            Ok(()) => {
                row.done(counted, due.elapsed());
                None
            }
            Err(e) => self.failed(row, counted, what, e),
        }
    }

    /// Tallies a producer's operation that did not succeed: a refusal in
    /// `row`, returning the wait it asks for; anything else as a failure of
    /// `what`.
    pub fn failed(&self, row: &Row, counted: bool, what: &str, e: Failed) -> Option<Duration> {
        match e {
            Failed::Refused { wait, .. } => {
                row.refuse(counted);
                Some(wait)
            }
            e => {
                self.fail(what, e);
                None
            }
        }
    }
}
