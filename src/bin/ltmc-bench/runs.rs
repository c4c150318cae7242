//! `chain` and `fanout` time whole runs, one at a time: a workflow is
//! submitted, run end to end by the simulated agents (`agents.rs`), and then
//! the next one is submitted, until the window ends (runs started in the
//! warm-up are not counted; the last one may end in the drain).
//!
//! A run's time (row `e2e`) is from just before its submit to the answer of
//! the result that completes it (its `status` there is `completed`): the
//! definition of the floor's `flowbench`, which times a run from its first
//! POST to the last hop's durable write (chain) or to the join's last
//! arrival (fan-out), one run at a time. A refused submit counts in the row's
//! `refused` and waits its `Retry-After`; a run that never completes (its
//! failures are listed) holds the rest of the window.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use crate::tally::Window;
use crate::{Bench, DRAIN, lock};

/// What the runs leave for the scenario's report.
pub struct Ran {
    pub window: Window,
    /// Seconds taken to open the streams.
    pub open_secs: f64,
    /// Streams still open at the end.
    pub still_open: usize,
}

impl Bench {
    /// Opens the agents' streams, then runs workflows of `steps` (`pattern`),
    /// named `{prefix}{what}{k}`, one at a time through the window.
    pub async fn one_at_a_time(
        self: &Arc<Self>,
        what: &str,
        pattern: &str,
        steps: Vec<Value>,
    ) -> Result<Ran, String> {
        let (stop, stop_rx) = watch::channel(false);
        let (streams, open_secs) = self.every_stream(&stop_rx).await?;
        let window = Window::new(self.args.duration_s);
        let agents = self.start_agents(window, &stop_rx);
        let mut body = json!({"name": what, "pattern": pattern, "steps": steps});
        let mut k = 0;
        while Instant::now() < window.end {
            let name = format!("{}{what}{k}", self.prefix);
            if let Some(wait) = self.time_run(window, what, name, &mut body).await {
                sleep_until((Instant::now() + wait).min(window.end)).await;
            }
            k += 1;
        }
        // The completing result ends a run, but others committed with it may
        // still be on their way back to their agents: stopping now would drop them.
        while self.st.pending.load(Relaxed) > 0 && Instant::now() < window.end + DRAIN {
            sleep(Duration::from_millis(10)).await;
        }
        let still_open = self.st.open_streams.load(Relaxed);
        let _ = stop.send(true);
        let _ = timeout(Duration::from_secs(1), agents.join_all()).await;
        let _ = timeout(Duration::from_secs(1), streams.join_all()).await;
        Ok(Ran {
            window,
            open_secs,
            still_open,
        })
    }

    /// Submits `body` as the run `name` and waits for it to complete, timed
    /// in `e2e` (a parallel run's steps in `step` too). Returns the wait that
    /// a refusal asks for.
    async fn time_run(
        &self,
        w: Window,
        what: &str,
        name: String,
        body: &mut Value,
    ) -> Option<Duration> {
        body["name"] = json!(name);
        let (steps, parallel) = (self.steps, body["pattern"] == "parallel");
        // Awaited before the submit: its last result may be answered before the submit is read.
        let (done, completed) = oneshot::channel();
        *lock(&self.st.awaited) = Some((name, done));
        let start = Instant::now();
        let (row, counted) = (&self.st.e2e, w.counts(start));
        row.begin(counted);
        match self.submit_run(body, steps).await {
            Ok((run, answered)) if parallel => {
                self.dispatched(run.workflow_id, answered, counted, steps);
            }
            Ok(_) => {}
            Err(e) => {
                lock(&self.st.awaited).take();
                return self.failed(row, counted, what, e);
            }
        }
        match timeout_at(w.end + DRAIN, completed).await {
            Ok(Ok(at)) => row.done(counted, at.saturating_duration_since(start)),
            _ => self.fail(what, "run not completed when the drain ended"),
        }
        None
    }
}
