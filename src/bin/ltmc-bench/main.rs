//! `ltmc-bench`: a load generator for an `ltmc` server, shipped beside it the
//! way `redis-benchmark` ships beside `redis-server`.
//!
//! It drives one server's public HTTP/WebSocket API (`--url`) and prints a
//! throughput/latency table. Every run is bounded: an uncounted 1 s warm-up,
//! `--duration-s` measured seconds, then at most 5 s to drain work in flight.
//! Agents are named `{prefix}{i}` and registered first. Latencies are kept in
//! HdrHistograms at microsecond resolution.
//!
//! Scenarios:
//! - `send`: POST messages to `--agents` recipients round-robin. `--rate 0`
//!   runs `--concurrency` workers back to back (maximum throughput); `--rate N`
//!   sends on a fixed timetable of N/s (open loop) and measures latency from
//!   each *scheduled* time, so stalls are not hidden (no coordinated omission).
//! - `roundtrip`: `send`, plus one consumer per agent that claims (limit 32,
//!   visibility 30 s) and acks each message, a batch's acks concurrently.
//!   End-to-end latency runs from the scheduled send, carried in the content,
//!   to the completed ack. Consumers poll, backing off from 1 to 20 ms while
//!   idle. At `--rate 0` producers may outrun consumers: use `--rate` for
//!   end-to-end latency.
//! - `notify`: open `--streams` WebSockets (one per agent), then send at
//!   `--rate` (default 1000/s, open loop) to random agents among them. Latency
//!   runs from just before the POST to the matching `new_message` frame.
//! - `connections`: open `--streams` idle WebSockets (one per agent), hold them
//!   `--duration-s`, and report the opening time and the server's RSS
//!   (`VmRSS` of `--server-pid`) before and after opening.
//! - `handoff`: open one stream per agent, then hand off from agent `i` to
//!   `i + 1` (mod `--agents`). `initiate` is the POST; `offer→accept` runs from
//!   just before it to the completed accept, issued when the `handoff.offered`
//!   frame for that handoff reaches the addressee's stream.
//! - `session`: warm-up creates sessions; the window alternates `create` with
//!   an `activity` on a warm-up session, round-robin.
//! - `checkpoint`: warm-up saves checkpoints (state: one `--payload-bytes`
//!   string, default 64 KiB); the window alternates `save` with a `restore` of
//!   a saved one, round-robin, and counts whether it came from cache or store.
//! - `workflow`: first submits `--runs-held` (default 10000) one-step runs, at
//!   `--concurrency`, for agents `{prefix}idle{k}` (1000 each) that nobody
//!   claims for (`submit`); they stay executing (step timeout 1 h), and the end
//!   counts those still listed as executing. Then `--agents` simulated agents,
//!   each on its stream, claim (limit 32, auto-ack) on every `new_message`
//!   frame and post every claimed step's result at once, `--concurrency`
//!   results in flight in all. The window submits workflows (`--rate`
//!   workflows/s): parallel ones of `--steps` steps spread over the agents and,
//!   every `--sequential-every` (default 5th), a sequential one of 5 steps
//!   alternating between two agents.
//!   `step` runs from the submit's answer to the accepted result (parallel
//!   steps); `handover` from just before a sequential step's result POST to
//!   the next step's `new_message` frame on the other agent's stream.
//!
//! The last four run like `send`: `--concurrency` workers back to back, or
//! open loop at `--rate`.
//!
//! A row's `ok` and latencies cover operations *started* in the measured window;
//! `errors` are those started there that failed or were unfinished when the
//! drain ended (end-to-end, notify: accepted messages never acked or announced;
//! open-loop sends: also messages due in the window but never sent). `rate/s`
//! is `ok / secs`. Failures are listed by cause below the table.
//! Thousands of sockets need `ulimit -n 65536` on both sides.
//!
//! ```text
//! ltmc-bench send
//! ltmc-bench send --rate 5000 --agents 50 --duration-s 30
//! ltmc-bench roundtrip --rate 2000 --token "$LTMC_ADMIN_TOKEN"
//! ltmc-bench notify --streams 1000 --rate 1000
//! ltmc-bench connections --streams 10000 --server-pid "$(pidof ltmc)"
//! ltmc-bench handoff --agents 100 --rate 500
//! ltmc-bench session --concurrency 32
//! ltmc-bench checkpoint --rate 500 --payload-bytes 1048576
//! ltmc-bench workflow --rate 200 --runs-held 2000
//! ```

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures_util::{StreamExt, future::join_all, stream};
use hdrhistogram::Histogram;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const WARMUP: Duration = Duration::from_secs(1);
const DRAIN: Duration = Duration::from_secs(5);
const OPEN_LIMIT: Duration = Duration::from_secs(60);
const CLAIM_LIMIT: usize = 32;
const MIN_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);
/// Workflow: an agent claims this long after its last claim even without a frame.
const WAKE_FALLBACK: Duration = Duration::from_secs(1);
/// Workflow: held runs per idle agent (an agent's queue holds 10 000 by default).
const HELD_PER_AGENT: usize = 1000;
/// Workflow: a held step's timeout, the longest the server allows.
const HELD_TIMEOUT_MS: u64 = 3_600_000;
/// Workflow: the sequential workflows' steps.
const SEQUENTIAL_STEPS: usize = 5;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Stop = watch::Receiver<bool>;

#[derive(Parser)]
#[command(
    name = "ltmc-bench",
    version,
    about = "Load generator for an ltmc server"
)]
struct Args {
    /// What to measure.
    scenario: Scenario,
    /// Base URL of the server.
    #[arg(long, env = "LTMC_BENCH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Bearer token for every request and stream (use an admin token).
    #[arg(long, env = "LTMC_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Measured seconds of load (connections: seconds to hold the streams).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration_s: u64,
    /// Offered messages (operations, workflow: workflows)/s in total, 0 = as fast as possible
    /// [default: 0, notify: 1000].
    #[arg(long)]
    rate: Option<u64>,
    /// HTTP requests in flight from producers; also caps acks (workflow: step
    /// results) in flight, parallel registrations and parallel stream handshakes.
    #[arg(long, default_value_t = 64, value_parser = positive())]
    concurrency: usize,
    /// Recipient agents (send, roundtrip, handoff; workflow: simulated agents, one stream each).
    #[arg(long, default_value_t = 100, value_parser = positive())]
    agents: usize,
    /// Length in bytes of each message's content string (checkpoint: state
    /// string) [default: 128, checkpoint: 65536].
    #[arg(long)]
    payload_bytes: Option<usize>,
    /// Agent id prefix [default: bench<pid>-<n>-].
    #[arg(long)]
    prefix: Option<String>,
    /// WebSocket streams, one per agent [default: notify 1000, connections 10000].
    #[arg(long, value_parser = positive())]
    streams: Option<usize>,
    /// Pid of the server process, to report its RSS (connections).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Steps of each parallel workflow (workflow).
    #[arg(long, default_value_t = 10, value_parser = positive())]
    steps: usize,
    /// Every how many workflows one is sequential, 0 = none (workflow).
    #[arg(long, default_value_t = 5)]
    sequential_every: u64,
    /// Runs to submit and leave executing before the window, 0 = none (workflow) [default: 10000].
    #[arg(long)]
    runs_held: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    Send,
    Roundtrip,
    Notify,
    Connections,
    Handoff,
    Session,
    Checkpoint,
    Workflow,
}

/// One table row: operations started in the measured window, and the
/// latencies (µs) of those that succeeded.
struct Row(Mutex<Tally>);

struct Tally {
    started: u64,
    ok: u64,
    hist: Histogram<u64>,
}

impl Default for Row {
    fn default() -> Self {
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let tally = Tally {
            started: 0,
            ok: 0,
            hist,
        };
        Row(Mutex::new(tally))
    }
}

impl Row {
    fn begin(&self, counted: bool) {
        if counted {
            lock(&self.0).started += 1;
        }
    }

    fn done(&self, counted: bool, latency: Duration) {
        if counted {
            let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            let mut t = lock(&self.0);
            t.ok += 1;
            t.hist.saturating_record(micros);
        }
    }
}

/// Warm-up starts at `start`, the zero of message timestamps; operations
/// starting in `measure..end` count.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure: Instant,
    end: Instant,
}

impl Window {
    fn new(duration_s: u64) -> Self {
        let start = Instant::now();
        let measure = start + WARMUP;
        let end = measure + Duration::from_secs(duration_s);
        Window {
            start,
            measure,
            end,
        }
    }

    fn counts(&self, t: Instant) -> bool {
        self.measure <= t && t < self.end
    }

    fn secs(&self) -> f64 {
        (self.end - self.measure).as_secs_f64()
    }
}

/// Notify: the half of a message's story heard first, its send (POST start,
/// whether it counts) or its frame (arrival time), waiting for the other half.
enum Seen {
    /// The third field is the handoff's accept body (notify: null).
    Sent(Instant, bool, Value),
    Frame(Instant),
}

#[derive(Deserialize)]
struct Accepted {
    message_id: String,
}

#[derive(Deserialize)]
struct Claimed {
    messages: Vec<Leased>,
}

#[derive(Deserialize)]
struct Leased {
    message_id: String,
    lease_id: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message_id: String,
    #[serde(default)]
    handoff_id: String,
    /// A workflow step's workflow id (null for other messages).
    #[serde(default)]
    correlation_id: Option<String>,
}

/// Workflow: a claimed message, auto-acked.
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
struct Run {
    workflow_id: String,
}

/// Workflow: the half of a parallel run's story heard first, the submit's
/// answer (when, whether it counts, steps not yet answered) or results
/// accepted before it was read.
enum Dispatch {
    Answered(Instant, bool, usize),
    Early(Vec<Instant>),
}

/// What the run measures and counts, shared by all its tasks.
#[derive(Default)]
struct Stats {
    /// The producers' operation: send, initiate, create or save.
    send: Row,
    /// Activity (session) or restore (checkpoint), on ids made before.
    reuse: Row,
    claim: Row,
    ack: Row,
    /// Messages acked (roundtrip), announced on their stream (notify), or
    /// handoffs accepted (handoff).
    e2e: Row,
    connect: Row,
    /// Number of the next message to send.
    next: AtomicU64,
    /// Messages accepted by the server, warm-up and drain included.
    accepted: AtomicU64,
    /// Accepted messages not yet acked (roundtrip) or announced (notify).
    pending: AtomicI64,
    producers_done: AtomicBool,
    frames: AtomicU64,
    open_streams: AtomicUsize,
    seen: Mutex<HashMap<String, Seen>>,
    /// Sessions or checkpoints to reuse.
    ids: Mutex<Vec<String>>,
    /// Checkpoint restores by `source`.
    sources: Mutex<BTreeMap<String, u64>>,
    /// Workflow: held runs submitted, step results, steps of parallel runs, handovers.
    held: Row,
    result: Row,
    step: Row,
    handover: Row,
    /// Workflow: parallel runs by id, until every step is answered.
    runs: Mutex<HashMap<String, Dispatch>>,
    /// Workflow: sequential runs by id whose step result is out: the agent
    /// (index) of the next step, the POST's start and whether it counts.
    handovers: Mutex<HashMap<String, (usize, Instant, bool)>>,
    /// Workflow: one per agent, notified by its stream's `new_message` frames.
    wake: Vec<Notify>,
    /// Workflow: results accepted in the window; runs whose every result was
    /// accepted, warm-up and drain included.
    answered: AtomicU64,
    completed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

struct Bench {
    args: Args,
    base: String,
    auth: Option<String>,
    http: reqwest::Client,
    prefix: String,
    sender: String,
    rate: u64,
    payload: usize,
    /// Agents the load goes to: `--agents`, or `--streams` for the stream scenarios.
    targets: usize,
    seed: u64,
    st: Stats,
}

impl Bench {
    fn new(args: Args) -> Result<Self, String> {
        let now = UNIX_EPOCH.elapsed().unwrap_or_default();
        let default_prefix = || format!("bench{}-{}-", std::process::id(), now.as_secs() % 100_000);
        let prefix = args.prefix.clone().unwrap_or_else(default_prefix);
        let valid = |c: char| c.is_ascii_alphanumeric() || "._:-".contains(c);
        if prefix.len() > 100 || !prefix.chars().all(valid) {
            return Err(format!(
                "bad --prefix {prefix:?}: want 0-100 of [A-Za-z0-9._:-]"
            ));
        }
        let auth = args.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(auth) = &auth {
            let mut value = reqwest::header::HeaderValue::from_str(auth)
                .map_err(|_| "--token holds characters not allowed in a header")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        // Keep as many idle connections as requests can be in flight, so that
        // connections are reused instead of churned through TIME_WAIT.
        let in_flight = match args.scenario {
            Scenario::Roundtrip | Scenario::Workflow => 2 * args.concurrency + args.agents,
            Scenario::Handoff => 2 * args.concurrency,
            _ => args.concurrency,
        };
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(in_flight)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", cause(&e)))?;
        let (rate, targets) = match args.scenario {
            Scenario::Send | Scenario::Roundtrip | Scenario::Handoff | Scenario::Workflow => {
                (args.rate.unwrap_or(0), args.agents)
            }
            Scenario::Session | Scenario::Checkpoint => (args.rate.unwrap_or(0), args.agents),
            Scenario::Notify => (args.rate.unwrap_or(1000), args.streams.unwrap_or(1000)),
            Scenario::Connections => (0, args.streams.unwrap_or(10_000)),
        };
        let payload = match args.scenario {
            Scenario::Checkpoint => args.payload_bytes.unwrap_or(64 * 1024),
            _ => args.payload_bytes.unwrap_or(128),
        };
        let base = args.url.trim_end_matches('/').to_owned();
        let sender = format!("{prefix}sender");
        let (seed, mut st) = (mix(now.as_nanos() as u64), Stats::default());
        if args.scenario == Scenario::Workflow {
            st.wake = (0..targets).map(|_| Notify::new()).collect();
        }
        Ok(Bench {
            args,
            base,
            auth,
            http,
            prefix,
            sender,
            rate,
            payload,
            targets,
            seed,
            st,
        })
    }

    fn agent(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// Names of the producers' operation and of the reuse operation.
    fn rows(&self) -> [&'static str; 2] {
        match self.args.scenario {
            Scenario::Handoff => ["initiate", "offer→accept"],
            Scenario::Session => ["create", "activity"],
            Scenario::Checkpoint => ["save", "restore"],
            Scenario::Workflow => ["workflow", "workflow"],
            _ => ["send", "send"],
        }
    }

    fn fail(&self, what: &str, err: String) {
        let key = format!("{what}: {err}");
        *lock(&self.st.errors).entry(key).or_default() += 1;
    }

    async fn health(&self) -> Result<(), String> {
        let request = self.http.get(format!("{}/healthz", self.base));
        let resp = request.timeout(Duration::from_secs(3)).send().await;
        match resp.map_err(|e| cause(&e))?.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("GET /healthz answered {s}")),
        }
    }

    /// POSTs JSON; a non-2xx status is an error named by status and problem title.
    async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, String> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let resp = request.send().await.map_err(|e| cause(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let problem = resp.json::<Value>().await.unwrap_or_default();
        match problem.get("title").and_then(Value::as_str) {
            Some(title) if Some(title) != status.canonical_reason() => {
                Err(format!("HTTP {status} ({title})"))
            }
            _ => Err(format!("HTTP {status}")),
        }
    }

    async fn post_json<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, String> {
        let resp = self.post(path, body).await?;
        let reply = resp.json().await;
        reply.map_err(|e| format!("bad reply: {}", cause(&e)))
    }

    async fn get_json(&self, path: &str) -> Result<Value, String> {
        let request = self.http.get(format!("{}{path}", self.base));
        let resp = request.send().await.map_err(|e| cause(&e))?;
        match resp.status() {
            s if s.is_success() => resp
                .json()
                .await
                .map_err(|e| format!("bad reply: {}", cause(&e))),
            s => Err(format!("HTTP {s}")),
        }
    }

    /// Registers the sender and agents `0..n`, `--concurrency` at a time.
    async fn register(&self, n: usize) -> Result<(), String> {
        eprintln!("registering {n} agents {}0..{}", self.prefix, n - 1);
        let ids = std::iter::once(self.sender.clone()).chain((0..n).map(|i| self.agent(i)));
        self.register_ids(ids).await
    }

    /// Registers these agents, `--concurrency` at a time.
    async fn register_ids(&self, ids: impl Iterator<Item = String>) -> Result<(), String> {
        let results: Vec<_> = stream::iter(ids)
            .map(|id| async move {
                let body = json!({"agent_id": id, "capabilities": ["bench"]});
                self.post("/v1/agents", &body).await
            })
            .buffer_unordered(self.args.concurrency)
            .collect()
            .await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        match results.into_iter().find_map(Result::err) {
            None => Ok(()),
            Some(e) => Err(format!("{failed} registrations failed, e.g. {e}")),
        }
    }

    /// Runs the producers through the window, their last sends at most into the drain.
    async fn produce_all(self: &Arc<Self>, w: Window) {
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
            lock(&self.st.send.0).started = n - reuse;
            lock(&self.st.reuse.0).started = reuse;
        }
    }

    /// A producer worker. Workers take message numbers from a shared counter;
    /// with a rate, message `i` is due at `start + i / rate`, whoever sends it.
    async fn produce(self: Arc<Self>, w: Window) {
        let notify = self.args.scenario == Scenario::Notify;
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
            if !matches!(
                self.args.scenario,
                Scenario::Send | Scenario::Roundtrip | Scenario::Notify
            ) {
                self.op(w, i, due).await;
                continue;
            }
            let start = Instant::now();
            // The content carries the due time in whole µs since the window's
            // start; round `due` to that, so consumers judge `counted` alike.
            let micros = (due - w.start).as_micros();
            let due = w.start + Duration::from_micros(micros as u64);
            let mut content = format!("{micros} ");
            let pad = self.payload.saturating_sub(content.len());
            content.extend(std::iter::repeat_n('x', pad));
            let k = if notify { mix(self.seed ^ i) } else { i } % self.targets as u64;
            let path = format!("/v1/agents/{}/messages", self.agent(k as usize));
            let body = json!({
                "from": self.sender, "message_type": "bench", "content": content, "priority": 0,
            });
            let counted = w.counts(due);
            self.st.send.begin(counted);
            match self.post_json::<Accepted>(&path, &body).await {
                Ok(accepted) => {
                    self.st.send.done(counted, due.elapsed());
                    self.st.accepted.fetch_add(1, Relaxed);
                    self.st.pending.fetch_add(1, Relaxed);
                    self.st.e2e.begin(counted);
                    if notify {
                        self.meet(accepted.message_id, Seen::Sent(start, counted, Value::Null));
                    }
                }
                Err(e) => self.fail("send", e),
            }
        }
    }

    /// One operation of `handoff`, `session` or `checkpoint`, due at `due`.
    async fn op(self: &Arc<Self>, w: Window, i: u64, due: Instant) {
        let reusing = matches!(self.args.scenario, Scenario::Session | Scenario::Checkpoint);
        let (counted, reuse) = (w.counts(due), reusing && due >= w.measure && i % 2 == 1);
        let (row, what) = match reuse {
            false => (&self.st.send, self.rows()[0]),
            true => (&self.st.reuse, self.rows()[1]),
        };
        row.begin(counted);
        let result = match (self.args.scenario, reuse) {
            (Scenario::Handoff, _) => self.initiate(i, counted).await,
            (Scenario::Workflow, _) => self.submit(i, counted).await,
            (Scenario::Session, false) => {
                let body = json!({"session_type": "bench"});
                let reply = self.post_json("/v1/sessions", &body).await;
                reply.and_then(|v| self.keep(&v, "session_id", due < w.measure))
            }
            (Scenario::Checkpoint, false) => {
                let state = json!({"data": "x".repeat(self.payload)});
                let coordination_id = format!("{}c{i}", self.prefix);
                let body = json!({"coordination_id": coordination_id, "state": state,
                    "agents": [], "status": "in_progress"});
                let reply = self.post_json("/v1/checkpoints", &body).await;
                reply.and_then(|v| self.keep(&v, "checkpoint_id", true))
            }
            (scenario, _) => self.reuse(scenario, i / 2).await,
        };
        match result {
            Ok(()) => row.done(counted, due.elapsed()),
            Err(e) => self.fail(what, e),
        }
    }

    /// Notes the id in `reply` for reuse if `keep`.
    fn keep(&self, reply: &Value, field: &str, keep: bool) -> Result<(), String> {
        let id = reply.get(field).and_then(Value::as_str);
        let id = id.ok_or_else(|| format!("bad reply: no {field}"))?;
        if keep {
            lock(&self.st.ids).push(id.to_owned());
        }
        Ok(())
    }

    /// Session activity or checkpoint restore on the `k`th id, round-robin.
    async fn reuse(&self, scenario: Scenario, k: u64) -> Result<(), String> {
        let id = {
            let ids = lock(&self.st.ids);
            let n = ids.len().max(1);
            ids.get(k as usize % n).cloned().ok_or("nothing to reuse")?
        };
        if scenario == Scenario::Session {
            let body = json!({"activity_type": "edit", "details": {"n": 1}});
            self.post(&format!("/v1/sessions/{id}/activities"), &body)
                .await?;
            return Ok(());
        }
        let reply = self.get_json(&format!("/v1/checkpoints/{id}")).await?;
        let source = reply
            .get("source")
            .and_then(Value::as_str)
            .unwrap_or("(none)");
        *lock(&self.st.sources).entry(source.to_owned()).or_default() += 1;
        Ok(())
    }

    /// Hands off from agent `i` to `i + 1`; the accept follows the offer frame.
    async fn initiate(self: &Arc<Self>, i: u64, counted: bool) -> Result<(), String> {
        let n = self.targets as u64;
        let (from, to) = (
            self.agent((i % n) as usize),
            self.agent(((i + 1) % n) as usize),
        );
        let body =
            json!({"from_agent": from, "to_agent": to, "context": {"task": "bench", "n": i}});
        let start = Instant::now();
        let reply: Value = self.post_json("/v1/handoffs", &body).await?;
        let field = |k| reply.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(id), Some(digest)) = (field("handoff_id"), field("context_digest")) else {
            return Err("bad reply: no handoff_id or context_digest".into());
        };
        self.st.accepted.fetch_add(1, Relaxed);
        self.st.pending.fetch_add(1, Relaxed);
        self.st.e2e.begin(counted);
        let accept = json!({"agent_id": to, "context_digest": digest});
        self.meet(id, Seen::Sent(start, counted, accept));
        Ok(())
    }

    async fn accept(self: Arc<Self>, id: String, body: Value, start: Instant, counted: bool) {
        match self.post(&format!("/v1/handoffs/{id}/accept"), &body).await {
            Ok(_) => self.st.e2e.done(counted, start.elapsed()),
            Err(e) => self.fail("accept", e),
        }
        self.st.pending.fetch_sub(1, Relaxed);
    }

    /// A claim, timed in the `claim` row; None when it failed (counted as a failure).
    async fn claim<T: DeserializeOwned>(&self, w: Window, path: &str, body: &Value) -> Option<T> {
        let t = Instant::now();
        self.st.claim.begin(w.counts(t));
        match self.post_json::<T>(path, body).await {
            Ok(claimed) => {
                self.st.claim.done(w.counts(t), t.elapsed());
                Some(claimed)
            }
            Err(e) => {
                self.fail("claim", e);
                None
            }
        }
    }

    /// A roundtrip consumer of one agent: claim, ack the batch, and again, until
    /// all that was sent is acked or the drain ends.
    async fn consume(self: Arc<Self>, w: Window, agent: String, acks: Arc<Semaphore>) {
        let path = format!("/v1/agents/{agent}/messages/claim");
        let body = json!({"limit": CLAIM_LIMIT, "visibility_timeout_s": 30});
        let mut idle = MIN_POLL;
        while Instant::now() < w.end + DRAIN
            && !(self.st.producers_done.load(Relaxed) && self.st.pending.load(Relaxed) <= 0)
        {
            let messages = self
                .claim::<Claimed>(w, &path, &body)
                .await
                .map_or_else(Vec::new, |claimed| claimed.messages);
            let n = messages.len();
            join_all(messages.into_iter().map(|m| self.ack(w, &agent, m, &acks))).await;
            // A full batch suggests more is queued: claim again at once.
            idle = if n == 0 { idle * 2 } else { MIN_POLL }.min(MAX_POLL);
            if n < CLAIM_LIMIT {
                sleep(idle).await;
            }
        }
    }

    async fn ack(&self, w: Window, agent: &str, m: Leased, acks: &Semaphore) {
        let _permit = acks.acquire().await;
        let t = Instant::now();
        self.st.ack.begin(w.counts(t));
        let path = format!("/v1/agents/{agent}/messages/{}/ack", m.message_id);
        if let Err(e) = self.post(&path, &json!({"lease_id": m.lease_id})).await {
            self.fail("ack", e);
            return;
        }
        let acked = Instant::now();
        self.st.ack.done(w.counts(t), acked - t);
        self.st.pending.fetch_sub(1, Relaxed);
        let stamp = m.content.as_str().unwrap_or_default().split(' ').next();
        if let Some(Ok(micros)) = stamp.map(str::parse) {
            let sent = w.start + Duration::from_micros(micros);
            self.st.e2e.done(w.counts(sent), acked - sent);
        }
    }

    /// Workflow: submits `n` one-step runs for agents nobody claims for,
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
                        Err(e) => self.fail("submit", e),
                    }
                }
            })
            .buffer_unordered(self.args.concurrency)
            .for_each(|()| async {})
            .await;
        start.elapsed().as_secs_f64()
    }

    /// Workflow: how many held runs the server lists as executing, paging
    /// newest first until all `submitted` are found; `None` if listing fails.
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

    /// Workflow: submits workflow `i`: every `--sequential-every`th sequential, alternating
    /// between two agents, the others parallel, spread over the agents.
    async fn submit(&self, i: u64, counted: bool) -> Result<(), String> {
        let n = self.targets;
        let every = self.args.sequential_every;
        let sequential = every > 0 && i % every == every - 1;
        let (pattern, steps): (_, Vec<Value>) = if sequential {
            let first = (mix(self.seed ^ i) % n as u64) as usize;
            let pair = [first, (first + 1) % n];
            let step = |s: usize| {
                // The answering agent learns the next step's agent from the input.
                let next = (s + 1 < SEQUENTIAL_STEPS).then(|| pair[(s + 1) % 2]);
                json!({"step_id": format!("s{s}"), "agent": self.agent(pair[s % 2]),
                    "input": {"next": next}})
            };
            ("sequential", (0..SEQUENTIAL_STEPS).map(step).collect())
        } else {
            let first = i as usize * self.args.steps;
            let step = |s: usize| {
                json!({"step_id": format!("s{s}"), "agent": self.agent((first + s) % n),
                    "input": {}})
            };
            ("parallel", (0..self.args.steps).map(step).collect())
        };
        let (name, n_steps) = (format!("{}{pattern}", self.prefix), steps.len());
        let body = json!({"name": name, "pattern": pattern, "steps": steps});
        let resp = self.post("/v1/workflows", &body).await?;
        let answered = Instant::now();
        let run: Run = resp
            .json()
            .await
            .map_err(|e| format!("bad reply: {}", cause(&e)))?;
        self.st.accepted.fetch_add(1, Relaxed);
        self.st.pending.fetch_add(n_steps as i64, Relaxed);
        if !sequential {
            self.dispatched(run.workflow_id, answered, counted, n_steps);
        }
        Ok(())
    }

    /// Workflow: the submit of a parallel run answered at `at`; its steps'
    /// latencies run from there, also those of results accepted before.
    fn dispatched(&self, run: String, at: Instant, counted: bool, steps: usize) {
        if counted {
            lock(&self.st.step.0).started += steps as u64;
        }
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

    /// Workflow: a parallel run's step result accepted at `at`.
    fn step_done(&self, run: &str, at: Instant) {
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

    /// Workflow: a `new_message` frame on agent `i`'s stream wakes its claims,
    /// and ends the handover to it if one is out for that run.
    fn woken(&self, i: usize, run: Option<String>, at: Instant) {
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

    /// Workflow: agent `i` claims when woken (by a frame, or after a second
    /// without one), again at once after a full batch, and answers every
    /// claimed step concurrently, until `stop`.
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

    /// Workflow: agent `i` posts the (successful) result of a claimed step.
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
            Ok(_) => {
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
            }
            Err(e) => {
                self.fail("result", e);
                if next.is_some() {
                    lock(&self.st.handovers).remove(run);
                }
            }
        }
    }

    /// Registers the agents and opens a stream to each; an error unless all
    /// opened. Returns the reading tasks and the time taken to open them.
    async fn every_stream(self: &Arc<Self>, stop: &Stop) -> Result<(JoinSet<()>, f64), String> {
        let n = self.targets;
        self.register(n).await?;
        let (streams, open_secs) = self.open_streams(n, stop).await;
        let open = self.st.open_streams.load(Relaxed);
        if open < n {
            return Err(format!("only {open} of {n} streams opened"));
        }
        Ok((streams, open_secs))
    }

    /// Opens streams to agents `0..n`, `--concurrency` handshakes at a time,
    /// for at most a minute. Returns the tasks that then read them until
    /// `stop`, and the time taken.
    async fn open_streams(self: &Arc<Self>, n: usize, stop: &Stop) -> (JoinSet<()>, f64) {
        eprintln!("opening {n} streams");
        let gate = Arc::new(Semaphore::new(self.args.concurrency));
        let mut handshakes = JoinSet::new();
        let start = Instant::now();
        for i in 0..n {
            let (b, gate) = (self.clone(), gate.clone());
            handshakes.spawn(async move {
                let _permit = gate.acquire().await;
                let t = Instant::now();
                (i, b.connect(&b.agent(i)).await, t.elapsed())
            });
        }
        lock(&self.st.connect.0).started = n as u64;
        let mut readers = JoinSet::new();
        while let Ok(Some(joined)) = timeout_at(start + OPEN_LIMIT, handshakes.join_next()).await {
            match joined {
                Ok((i, Ok(ws), took)) => {
                    self.st.connect.done(true, took);
                    self.st.open_streams.fetch_add(1, Relaxed);
                    readers.spawn(self.clone().read(ws, i, stop.clone()));
                }
                Ok((_, Err(e), _)) => self.fail("stream connect", e),
                Err(e) => self.fail("stream connect", e.to_string()),
            }
        }
        for _ in 0..handshakes.len() {
            self.fail("stream connect", "not opened within a minute".into());
        }
        (readers, start.elapsed().as_secs_f64())
    }

    async fn connect(&self, agent: &str) -> Result<Ws, String> {
        let ws_base = self.base.replacen("http", "ws", 1);
        let url = format!("{ws_base}/v1/agents/{agent}/stream");
        let mut request = url.into_client_request().map_err(|e| cause(&e))?;
        if let Some(auth) = &self.auth {
            let value = http::HeaderValue::from_str(auth).map_err(|e| cause(&e))?;
            let headers = request.headers_mut();
            headers.insert(http::header::AUTHORIZATION, value);
        }
        match timeout(Duration::from_secs(10), connect_async(request)).await {
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(e)) => Err(cause(&e)),
            Err(_) => Err("handshake timed out".into()),
        }
    }

    /// Reads agent `i`'s stream until `stop`; reading also answers the server's pings.
    async fn read(self: Arc<Self>, mut ws: Ws, i: usize, mut stop: Stop) {
        let scenario = self.args.scenario;
        let wanted = if scenario == Scenario::Handoff {
            "handoff.offered"
        } else {
            "new_message"
        };
        let closed = loop {
            let frame = tokio::select! {
                _ = stop.changed() => {
                    let _ = ws.close(None).await;
                    return;
                }
                frame = ws.next() => frame,
            };
            let at = Instant::now();
            match frame {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<Frame>(&text) {
                    Ok(frame) if frame.kind == wanted => {
                        self.st.frames.fetch_add(1, Relaxed);
                        match scenario {
                            Scenario::Workflow => self.woken(i, frame.correlation_id, at),
                            Scenario::Handoff => self.meet(frame.handoff_id, Seen::Frame(at)),
                            _ => self.meet(frame.message_id, Seen::Frame(at)),
                        }
                    }
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => break cause(&e),
                None => break "closed by the server".to_owned(),
            }
        };
        self.fail("stream", closed);
        self.st.open_streams.fetch_sub(1, Relaxed);
    }

    /// Notify, handoff: pairs a send with its frame, whichever is heard first;
    /// a handoff's pair then issues the accept.
    fn meet(self: &Arc<Self>, id: String, heard: Seen) {
        let mut seen = lock(&self.st.seen);
        match (seen.remove(&id), heard) {
            (Some(Seen::Sent(start, counted, accept)), Seen::Frame(at))
            | (Some(Seen::Frame(at)), Seen::Sent(start, counted, accept)) => {
                drop(seen);
                if accept.is_null() {
                    self.st
                        .e2e
                        .done(counted, at.saturating_duration_since(start));
                    self.st.pending.fetch_sub(1, Relaxed);
                } else {
                    tokio::spawn(self.clone().accept(id, accept, start, counted));
                }
            }
            (_, heard) => {
                seen.insert(id, heard);
            }
        }
    }
}

/// `send` and `roundtrip`.
async fn messages(b: Arc<Bench>) -> Result<(), String> {
    let roundtrip = b.args.scenario == Scenario::Roundtrip;
    b.register(b.targets).await?;
    let w = Window::new(b.args.duration_s);
    let mut consumers = JoinSet::new();
    if roundtrip {
        let acks = Arc::new(Semaphore::new(b.args.concurrency));
        for i in 0..b.targets {
            consumers.spawn(b.clone().consume(w, b.agent(i), acks.clone()));
        }
    }
    b.produce_all(w).await;
    let _ = timeout_at(w.end + DRAIN, consumers.join_all()).await;
    let (st, secs) = (&b.st, w.secs());
    header();
    row("send", &st.send, secs);
    if roundtrip {
        row("claim", &st.claim, secs);
        row("ack", &st.ack, secs);
        row("end-to-end", &st.e2e, secs);
    }
    Ok(())
}

/// `notify` and `handoff`.
async fn notify(b: Arc<Bench>) -> Result<(), String> {
    let n = b.targets;
    let (stop, stop_rx) = watch::channel(false);
    let (streams, open_secs) = b.every_stream(&stop_rx).await?;
    let w = Window::new(b.args.duration_s);
    b.produce_all(w).await;
    while b.st.pending.load(Relaxed) > 0 && Instant::now() < w.end + DRAIN {
        sleep(Duration::from_millis(10)).await;
    }
    let still_open = b.st.open_streams.load(Relaxed);
    let _ = stop.send(true);
    let _ = timeout(Duration::from_secs(1), streams.join_all()).await;
    let (st, secs) = (&b.st, w.secs());
    header();
    row("connect", &st.connect, open_secs);
    let handoff = b.args.scenario == Scenario::Handoff;
    row(b.rows()[0], &st.send, secs);
    row(if handoff { b.rows()[1] } else { "notify" }, &st.e2e, secs);
    let (frames, sent) = (st.frames.load(Relaxed), st.accepted.load(Relaxed));
    let (kind, what) = match handoff {
        true => ("handoff.offered", "handoffs initiated"),
        false => ("new_message", "messages sent"),
    };
    println!("frames: {frames} {kind} for {sent} {what}, warm-up and drain included");
    println!("streams: {still_open} of {n} still open at the end");
    Ok(())
}

async fn connections(b: Arc<Bench>) -> Result<(), String> {
    let (n, hold) = (b.targets, b.args.duration_s);
    b.register(n).await?;
    let before = rss_kib(b.args.server_pid);
    let (stop, stop_rx) = watch::channel(false);
    let (streams, open_secs) = b.open_streams(n, &stop_rx).await;
    let opened = b.st.open_streams.load(Relaxed);
    let after = rss_kib(b.args.server_pid);
    eprintln!("holding {opened} streams for {hold} s");
    sleep(Duration::from_secs(hold)).await;
    let held = b.st.open_streams.load(Relaxed);
    let _ = stop.send(true);
    let _ = timeout(DRAIN, streams.join_all()).await;
    header();
    row("connect", &b.st.connect, open_secs);
    println!(
        "streams: {opened} of {n} opened in {open_secs:.2} s, {held} still open after {hold} s"
    );
    match (b.args.server_pid, before, after) {
        (None, ..) => println!("server RSS: pass --server-pid"),
        (Some(pid), Some(before), Some(after)) => {
            let (mib_before, mib_after) = (before as f64 / 1024.0, after as f64 / 1024.0);
            let kib_each = (after as f64 - before as f64) / opened.max(1) as f64;
            print!("server RSS (pid {pid}): {mib_before:.1} MiB before, {mib_after:.1} MiB after");
            println!(" opening, {kib_each:.2} KiB per open stream");
        }
        (Some(pid), ..) => println!("server RSS: cannot read VmRSS in /proc/{pid}/status"),
    }
    Ok(())
}

/// `session` and `checkpoint`.
async fn operations(b: Arc<Bench>) -> Result<(), String> {
    let w = Window::new(b.args.duration_s);
    b.produce_all(w).await;
    let ([first, second], secs) = (b.rows(), w.secs());
    header();
    row(first, &b.st.send, secs);
    row(second, &b.st.reuse, secs);
    let reused = lock(&b.st.ids).len();
    match b.args.scenario {
        Scenario::Session => println!("sessions: {reused} created in the warm-up, reused"),
        _ => {
            let sources = lock(&b.st.sources);
            let counts: Vec<_> = sources.iter().map(|(s, n)| format!("{s} {n}")).collect();
            println!(
                "restore source: {}, warm-up and drain included",
                counts.join(", ")
            );
        }
    }
    Ok(())
}

/// `workflow`.
async fn workflows(b: Arc<Bench>) -> Result<(), String> {
    let n = b.targets;
    let (stop, stop_rx) = watch::channel(false);
    let (streams, open_secs) = b.every_stream(&stop_rx).await?;
    let held = b.args.runs_held.unwrap_or(10_000);
    // A step naming an unregistered agent is refused: the idle agents exist, they never claim.
    let idle = (0..held.div_ceil(HELD_PER_AGENT)).map(|a| format!("{}idle{a}", b.prefix));
    b.register_ids(idle).await?;
    let held_secs = if held > 0 { b.hold(held).await } else { 0.0 };
    let w = Window::new(b.args.duration_s);
    let results = Arc::new(Semaphore::new(b.args.concurrency));
    let agents: JoinSet<()> = (0..n)
        .map(|i| b.clone().work(w, i, results.clone(), stop_rx.clone()))
        .collect();
    b.produce_all(w).await;
    while b.st.pending.load(Relaxed) > 0 && Instant::now() < w.end + DRAIN {
        sleep(Duration::from_millis(10)).await;
    }
    let still_open = b.st.open_streams.load(Relaxed);
    let _ = stop.send(true);
    let _ = timeout(Duration::from_secs(1), agents.join_all()).await;
    let _ = timeout(Duration::from_secs(1), streams.join_all()).await;
    let submitted = lock(&b.st.held.0).ok;
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

fn header() {
    println!(
        "measure            ok   errors     secs   rate/s   p50 ms   p99 ms  p999 ms   max ms"
    );
}

fn row(name: &str, tally: &Row, secs: f64) {
    let t = lock(&tally.0);
    let ms = |micros: u64| {
        if t.hist.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.2}", micros as f64 / 1000.0)
        }
    };
    let q = |quantile| ms(t.hist.value_at_quantile(quantile));
    let (ok, errors, rate) = (t.ok, t.started.saturating_sub(t.ok), t.ok as f64 / secs);
    let (p50, p99, p999, max) = (q(0.5), q(0.99), q(0.999), ms(t.hist.max()));
    println!("{name:<12}{ok:>9}{errors:>9}{secs:>9.1}{rate:>9.1}{p50:>9}{p99:>9}{p999:>9}{max:>9}");
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The innermost cause of an error, which names what actually went wrong.
fn cause(err: &(dyn Error + 'static)) -> String {
    let mut e = err;
    while let Some(inner) = e.source() {
        e = inner;
    }
    let io = e.downcast_ref::<std::io::Error>();
    if io.and_then(std::io::Error::raw_os_error) == Some(24) {
        return "too many open files (EMFILE): raise the limit, e.g. `ulimit -n 65536`".into();
    }
    e.to_string()
}

/// Parses a count that must be at least 1.
fn positive() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// SplitMix64: picks notify's random recipients without an RNG dependency.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ltmc-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let b = Arc::new(Bench::new(args)?);
    let unreachable = |e| format!("server not reachable at {}: {e}", b.base);
    b.health().await.map_err(unreachable)?;
    let (a, name) = (&b.args, format!("{:?}", b.args.scenario).to_lowercase());
    let load = match b.rate {
        _ if a.scenario == Scenario::Connections => "idle".to_owned(),
        0 => format!("max rate, concurrency {}", a.concurrency),
        r if a.scenario == Scenario::Workflow => {
            format!("{r} workflows/s, concurrency {}", a.concurrency)
        }
        r if b.payload > 0 && b.rows()[0] == "send" => {
            format!("{r} msg/s, concurrency {}", a.concurrency)
        }
        r => format!("{r} ops/s, concurrency {}", a.concurrency),
    };
    let (base, agents, secs) = (&b.base, b.targets, a.duration_s);
    println!("ltmc-bench {name} on {base}: {agents} agents, {load}, {secs} s");
    let result = match a.scenario {
        Scenario::Send | Scenario::Roundtrip => messages(b.clone()).await,
        Scenario::Notify | Scenario::Handoff => notify(b.clone()).await,
        Scenario::Session | Scenario::Checkpoint => operations(b.clone()).await,
        Scenario::Connections => connections(b.clone()).await,
        Scenario::Workflow => workflows(b.clone()).await,
    };
    for (what, count) in lock(&b.st.errors).iter() {
        println!("{count:>9} errors  {what}");
    }
    result
}
