//! `workflow`: first submits `--runs-held` (default 10000) one-step runs, at
//! `--concurrency`, for agents `{prefix}idle{k}` (1000 each) that nobody
//! claims for (`submit`); they stay executing (step timeout 1 h), and the end
//! counts those still listed as executing. Then `--agents` simulated agents
//! (`agents.rs`), each on its stream, claim (limit 32, auto-ack) on every
//! `new_message` frame and post every claimed step's result at once,
//! `--concurrency` results in flight in all. The window
//! submits workflows (`--rate` workflows/s): parallel ones of `--steps` steps
//! spread over the agents and, every `--sequential-every` (default 5th), a
//! sequential one of 5 steps alternating between two agents.
//! `step` runs from the submit's answer to the accepted result (parallel
//! steps); `handover` from just before a sequential step's result POST to
//! the next step's `new_message` frame on the other agent's stream.
//!
//! Below the table, one line sets the workflows offered per second (submits
//! due or, closed loop, started in the window) beside those accepted and the
//! steps finished (results accepted in the window), so an overload curve
//! (offered against finished) reads off one run per rate. A refused held run
//! is not retried: its submitter waits the `Retry-After` and goes on.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

use crate::agents::Run;
use crate::http::{Failed, read_json};
use crate::tally::{Window, header, row};
use crate::{Bench, DRAIN, lock, mix};

/// Held runs per idle agent (an agent's queue holds 10 000 by default).
const HELD_PER_AGENT: usize = 1000;
/// A held step's timeout, the longest the server allows.
const HELD_TIMEOUT_MS: u64 = 3_600_000;
/// The sequential workflows' steps.
const SEQUENTIAL_STEPS: usize = 5;

/// The half of a parallel run's story heard first, the submit's answer
/// (when, whether it counts, steps not yet answered) or results accepted
/// before it was read.
pub enum Dispatch {
    Answered(Instant, bool, usize),
    Early(Vec<Instant>),
}

/// `workflow`.
pub async fn run(b: Arc<Bench>) -> Result<(), String> {
    let n = b.targets;
    let (stop, stop_rx) = watch::channel(false);
    let (streams, open_secs) = b.every_stream(&stop_rx).await?;
    let held = b.args.runs_held.unwrap_or(10_000);
    // A step naming an unregistered agent is refused: the idle agents exist, they never claim.
    let idle = (0..held.div_ceil(HELD_PER_AGENT)).map(|a| format!("{}idle{a}", b.prefix));
    b.register_ids(idle).await?;
    let held_secs = if held > 0 { b.hold(held).await } else { 0.0 };
    let w = Window::new(b.args.duration_s);
    let agents = b.start_agents(w, &stop_rx);
    b.produce_all(w).await;
    while b.st.pending.load(Relaxed) > 0 && Instant::now() < w.end + DRAIN {
        sleep(Duration::from_millis(10)).await;
    }
    let still_open = b.st.open_streams.load(Relaxed);
    let _ = stop.send(true);
    let _ = timeout(Duration::from_secs(1), agents.join_all()).await;
    let _ = timeout(Duration::from_secs(1), streams.join_all()).await;
    let submitted = b.st.held.ok();
    let listing = Instant::now();
    let executing = match submitted {
        0 => Some(0),
        _ => b.count_held(submitted).await,
    };
    let (st, secs) = (&b.st, w.secs());
    header();
    row("connect", &st.connect, open_secs);
    if held > 0 {
        row("submit", &st.held, held_secs);
    }
    row(b.rows()[0], &st.send, secs);
    row("claim", &st.claim, secs);
    row("result", &st.result, secs);
    row("step", &st.step, secs);
    row("handover", &st.handover, secs);
    let (answered, completed) = (st.answered.load(Relaxed), st.completed.load(Relaxed));
    let per_s = |n: u64| n as f64 / secs;
    let (offered, accepted) = (per_s(st.send.started()), per_s(st.send.ok()));
    let finished = per_s(answered);
    print!("load: {offered:.1} workflows/s offered, {accepted:.1} accepted, ");
    println!("{finished:.1} steps/s finished");
    let (runs, rate) = (st.accepted.load(Relaxed), answered as f64 / secs);
    print!("steps: {answered} results accepted in the window, {rate:.1} steps/s end to end; ");
    println!("{completed} of {runs} workflows completed, warm-up and drain included");
    let took = listing.elapsed().as_secs_f64();
    match executing {
        Some(found) => println!(
            "held: {found} of {submitted} held runs still executing at the end (listed in {took:.2} s)"
        ),
        None => println!("held: {submitted} runs submitted, cannot list executing runs"),
    }
    println!("streams: {still_open} of {n} still open at the end");
    Ok(())
}

impl Bench {
    /// Submits `n` one-step runs for agents nobody claims for,
    /// `--concurrency` at a time. Returns the seconds taken.
    async fn hold(&self, n: usize) -> f64 {
        eprintln!("submitting {n} held runs");
        let (start, name) = (Instant::now(), format!("{}held", self.prefix));
        stream::iter(0..n)
            .map(|k| {
                let agent = format!("{}idle{}", self.prefix, k / HELD_PER_AGENT);
                let step = json!({"step_id": "wait", "agent": agent, "input": {},
                    "timeout_ms": HELD_TIMEOUT_MS});
                let body = json!({"name": name, "pattern": "parallel", "steps": [step]});
                async move {
                    let t = Instant::now();
                    self.st.held.begin(true);
                    match self.post_json::<Run>("/v1/workflows", &body).await {
                        Ok(_) => self.st.held.done(true, t.elapsed()),
                        // A refused run is not held: this slot waits, then goes on.
                        Err(e) => {
                            if let Some(wait) = self.failed(&self.st.held, true, "submit", e) {
                                sleep(wait).await;
                            }
                        }
                    }
                }
            })
            .buffer_unordered(self.args.concurrency)
            .for_each(|()| async {})
            .await;
        start.elapsed().as_secs_f64()
    }

    /// How many held runs the server lists as executing, paging newest first
    /// until all `submitted` are found; `None` if listing fails.
    async fn count_held(&self, submitted: u64) -> Option<u64> {
        let name = format!("{}held", self.prefix);
        let (mut found, mut cursor) = (0, None);
        loop {
            let mut path = "/v1/workflows?status=executing&limit=500".to_owned();
            if let Some(cursor) = cursor {
                path = format!("{path}&cursor={cursor}");
            }
            let page = match self.get_json(&path).await {
                Ok(page) => page,
                Err(e) => {
                    self.fail("list", e);
                    return None;
                }
            };
            let items = page.get("items").and_then(Value::as_array).into_iter();
            let held = |r: &&Value| r.get("name").and_then(Value::as_str) == Some(&name);
            found += items.flatten().filter(held).count() as u64;
            cursor = page
                .get("next_cursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if found >= submitted || cursor.is_none() {
                return Some(found);
            }
        }
    }

    /// Submits workflow `i`: every `--sequential-every`th sequential, alternating
    /// between two agents, the others parallel, spread over the agents.
    pub async fn submit(&self, i: u64, counted: bool) -> Result<(), Failed> {
        let n = self.targets;
        let every = self.args.sequential_every;
        let sequential = every > 0 && i % every == every - 1;
        let (pattern, steps) = if sequential {
            let first = (mix(self.seed ^ i) % n as u64) as usize;
            let pair = [first, (first + 1) % n];
            ("sequential", self.sequential(pair, SEQUENTIAL_STEPS))
        } else {
            let first = i as usize * self.steps;
            ("parallel", self.parallel(first, self.steps))
        };
        let (name, n_steps) = (format!("{}{pattern}", self.prefix), steps.len());
        let body = json!({"name": name, "pattern": pattern, "steps": steps});
        let (run, answered) = self.submit_run(&body, n_steps).await?;
        if !sequential {
            self.dispatched(run.workflow_id, answered, counted, n_steps);
        }
        Ok(())
    }

    /// Submits the workflow `body` of `steps` steps; the run as answered, and when.
    pub async fn submit_run(&self, body: &Value, steps: usize) -> Result<(Run, Instant), Failed> {
        let resp = self.post("/v1/workflows", body).await?;
        let answered = Instant::now();
        let run: Run = read_json(resp).await?;
        self.st.accepted.fetch_add(1, Relaxed);
        self.st.pending.fetch_add(steps as i64, Relaxed);
        Ok((run, answered))
    }

    /// `n` sequential steps alternating between the agents of `pair`, each
    /// naming the next one's agent in its input (the last: null).
    pub fn sequential(&self, pair: [usize; 2], n: usize) -> Vec<Value> {
        let step = |s: usize| {
            let next = (s + 1 < n).then(|| pair[(s + 1) % 2]);
            json!({"step_id": format!("s{s}"), "agent": self.agent(pair[s % 2]),
                "input": {"next": next}})
        };
        (0..n).map(step).collect()
    }

    /// `n` parallel steps for agents `first`, `first + 1`, … (mod the agents).
    pub fn parallel(&self, first: usize, n: usize) -> Vec<Value> {
        let step = |s: usize| {
            json!({"step_id": format!("s{s}"), "agent": self.agent((first + s) % self.targets),
                "input": {}})
        };
        (0..n).map(step).collect()
    }

    /// The submit of a parallel run answered at `at`; its steps'
    /// latencies run from there, also those of results accepted before.
    pub fn dispatched(&self, run: String, at: Instant, counted: bool, steps: usize) {
        self.st.step.begin_many(counted, steps as u64);
        let mut runs = lock(&self.st.runs);
        let early = match runs.remove(&run) {
            Some(Dispatch::Early(early)) => early,
            _ => Vec::new(),
        };
        for done in &early {
            self.st
                .step
                .done(counted, done.saturating_duration_since(at));
        }
        if early.len() < steps {
            runs.insert(run, Dispatch::Answered(at, counted, steps - early.len()));
        } else {
            self.st.completed.fetch_add(1, Relaxed);
        }
    }

    /// A parallel run's step result accepted at `at`.
    pub fn step_done(&self, run: &str, at: Instant) {
        let mut runs = lock(&self.st.runs);
        match runs.get_mut(run) {
            Some(Dispatch::Answered(start, counted, left)) => {
                self.st
                    .step
                    .done(*counted, at.saturating_duration_since(*start));
                *left -= 1;
                if *left == 0 {
                    runs.remove(run);
                    self.st.completed.fetch_add(1, Relaxed);
                }
            }
            Some(Dispatch::Early(early)) => early.push(at),
            None => {
                runs.insert(run.to_owned(), Dispatch::Early(vec![at]));
            }
        }
    }
}
