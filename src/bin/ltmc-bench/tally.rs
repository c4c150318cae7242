//! What a run counts, and the table it prints: a [`Row`] per measured
//! operation, the measured [`Window`], and the [`Stats`] that all of a run's
//! tasks share (its rows, counters and the maps that pair the two halves of
//! an operation heard apart, such as a send and its frame).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::lock;
use crate::notify::Seen;
use crate::workflow::Dispatch;

/// The uncounted time before the window.
pub const WARMUP: Duration = Duration::from_secs(1);

/// One table row: operations started in the measured window, those the
/// server refused for now (429/503 with `Retry-After`), and the latencies (µs)
/// of those that succeeded.
pub struct Row(Mutex<Tally>);

struct Tally {
    started: u64,
    ok: u64,
    refused: u64,
    hist: Histogram<u64>,
}

impl Default for Row {
    fn default() -> Self {
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let tally = Tally {
            started: 0,
            ok: 0,
            refused: 0,
            hist,
        };
        Row(Mutex::new(tally))
    }
}

impl Row {
    pub fn begin(&self, counted: bool) {
        self.begin_many(counted, 1);
    }

    pub fn begin_many(&self, counted: bool, n: u64) {
        if counted {
            lock(&self.0).started += n;
        }
    }

    /// Open loop: the operations due in the window, whether they started or not.
    pub fn set_started(&self, n: u64) {
        lock(&self.0).started = n;
    }

    pub fn done(&self, counted: bool, latency: Duration) {
        if counted {
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            let mut t = lock(&self.0);
            t.ok += 1;
            t.hist.saturating_record(micros);
        }
    }

    /// A refusal: neither an error nor a latency.
    pub fn refuse(&self, counted: bool) {
        if counted {
            lock(&self.0).refused += 1;
        }
    }

    pub fn started(&self) -> u64 {
        lock(&self.0).started
    }

    pub fn ok(&self) -> u64 {
        lock(&self.0).ok
    }

    pub fn median(&self) -> Option<Duration> {
        let t = lock(&self.0);
        let micros = (!t.hist.is_empty()).then(|| t.hist.value_at_quantile(0.5));
        micros.map(Duration::from_micros)
    }
}

/// Warm-up starts at `start`, the zero of message timestamps; operations
/// starting in `measure..end` count.
#[derive(Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub measure: Instant,
    pub end: Instant,
}

impl Window {
    pub fn new(duration_s: u64) -> Self {
        let start = Instant::now();
        let measure = start + WARMUP;
        let end = measure + Duration::from_secs(duration_s);
        Window {
            start,
            measure,
            end,
        }
    }

    pub fn counts(&self, t: Instant) -> bool {
        self.measure <= t && t < self.end
    }

    pub fn secs(&self) -> f64 {
        (self.end - self.measure).as_secs_f64()
    }
}

/// What the run measures and counts, shared by all its tasks.
#[derive(Default)]
pub struct Stats {
    /// The producers' operation: send, initiate, create or save.
    pub send: Row,
    /// Activity (session) or restore (checkpoint), on ids made before.
    pub reuse: Row,
    pub claim: Row,
    pub ack: Row,
    /// Messages acked (roundtrip), announced on their stream (notify),
    /// handoffs accepted (handoff), or runs completed (chain, fanout).
    pub e2e: Row,
    pub connect: Row,
    /// Number of the next message to send.
    pub next: AtomicU64,
    /// Messages accepted by the server, warm-up and drain included.
    pub accepted: AtomicU64,
    /// Accepted messages not yet acked (roundtrip) or announced (notify).
    pub pending: AtomicI64,
    pub producers_done: AtomicBool,
    pub frames: AtomicU64,
    pub open_streams: AtomicUsize,
    pub seen: Mutex<HashMap<String, Seen>>,
    /// Sessions or checkpoints to reuse.
    pub ids: Mutex<Vec<String>>,
    /// Checkpoint restores by `source`.
    pub sources: Mutex<BTreeMap<String, u64>>,
    /// Workflow: held runs submitted, step results, steps of parallel runs, handovers.
    pub held: Row,
    pub result: Row,
    pub step: Row,
    pub handover: Row,
    /// Workflow: parallel runs by id, until every step is answered.
    pub runs: Mutex<HashMap<String, Dispatch>>,
    /// Workflow: sequential runs by id whose step result is out: the agent
    /// (index) of the next step, the POST's start and whether it counts.
    pub handovers: Mutex<HashMap<String, (usize, Instant, bool)>>,
    /// Workflow: one per agent, notified by its stream's `new_message` frames.
    pub wake: Vec<Notify>,
    /// Chain, fanout: the run (by name) whose completion is awaited, and
    /// where to send the time its completing result was answered.
    pub awaited: Mutex<Option<(String, oneshot::Sender<Instant>)>>,
    /// Workflow: results accepted in the window; runs whose every result was
    /// accepted, warm-up and drain included.
    pub answered: AtomicU64,
    pub completed: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
}

pub fn header() {
    println!(
        "measure            ok   errors  refused     secs   rate/s   p50 ms   p99 ms  p999 ms   max ms"
    );
}

pub fn row(name: &str, tally: &Row, secs: f64) {
    let t = lock(&tally.0);
    let ms = |micros: u64| {
        if t.hist.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2}", micros as f64 / 1000.0)
        }
    };
    let q = |quantile| ms(t.hist.value_at_quantile(quantile));
    let (ok, refused, rate) = (t.ok, t.refused, t.ok as f64 / secs);
    let errors = t.started.saturating_sub(ok + refused);
    let (p50, p99, p999, max) = (q(0.5), q(0.99), q(0.999), ms(t.hist.max()));
    print!("{name:<12}{ok:>9}{errors:>9}{refused:>9}{secs:>9.1}{rate:>9.1}");
    println!("{p50:>9}{p99:>9}{p999:>9}{max:>9}");
}
