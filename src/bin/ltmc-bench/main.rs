//! `ltmc-bench`: a load generator for an `ltmc` server, shipped beside it the
//! way `redis-benchmark` ships beside `redis-server`.
//!
//! It drives one server's public HTTP/WebSocket API (`--url`) and prints a
//! throughput/latency table. Every run is bounded: an uncounted 1 s warm-up,
//! `--duration-s` measured seconds, then at most 5 s to drain work in flight.
//! Agents are named `{prefix}{i}` and registered first. Latencies are kept in
//! HdrHistograms at microsecond resolution.
//!
//! Scenarios, one module each (its own doc says exactly what it measures):
//! - `send`, `roundtrip` (`send.rs`): POST messages to `--agents` recipients
//!   round-robin; `roundtrip` adds a consumer per agent that claims and acks,
//!   timed end to end from the scheduled send to the ack.
//! - `notify`, `handoff` (`notify.rs`): send to agents listening on streams,
//!   timed to the `new_message` frame; or hand off from agent `i` to `i + 1`,
//!   timed from the initiation to the accept issued on the `handoff.offered` frame.
//! - `connections` (`connections.rs`): hold `--streams` idle WebSockets; the
//!   opening time and the server's RSS.
//! - `session`, `checkpoint` (`operations.rs`): create sessions and record
//!   activities on them; save checkpoints and restore them.
//! - `workflow` (`workflow.rs`): parallel workflows and every
//!   `--sequential-every`th a sequential one, run by simulated agents
//!   (`agents.rs`) while `--runs-held` runs stay executing.
//! - `chain` (`chain.rs`): one sequential workflow of `--steps` (default 50)
//!   steps alternating between two agents, run end to end, then the next;
//!   each run timed from its submit to its last step's result, and each
//!   hand-over from a result to the next step's frame.
//! - `fanout` (`fanout.rs`): one parallel workflow of `--steps` (default 100)
//!   steps over `--agents` (default 100, one step each), then the next; each
//!   run timed from its submit to the result that completes it (the join).
//!
//! Load (`load.rs`): `--concurrency` workers; at `--rate 0` each runs its
//! operations back to back (maximum throughput), at `--rate N` they keep a
//! fixed timetable of N/s between them (open loop) and measure latency from
//! each *scheduled* time, so stalls are not hidden (no coordinated omission).
//! `notify` runs open loop at 1000/s unless told otherwise; `connections`
//! offers no load; `chain` and `fanout` run one workflow at a time
//! (`runs.rs`), the next submitted as soon as the last one completed.
//!
//! Refusals: new work (a send, a handoff's initiation, a workflow's submit,
//! and the other producers' operations) that the server answers 429 or 503
//! with `Retry-After` is refused for now, not failed: it counts in the row's
//! `refused`. An open-loop run drops that operation and keeps its timetable;
//! a closed-loop worker (`--rate 0`; workflow's held submits; chain, fanout)
//! waits the `Retry-After` (whole seconds, at most 5; unreadable: 1 s) before
//! its next operation. Elsewhere (claims, acks, results, accepts: finishing
//! accepted work) a refusal is an error.
//!
//! A row's `ok` and latencies cover operations *started* in the measured window
//! and accepted; `refused` those started there that were refused; `errors`
//! those started there that failed or were unfinished when the drain ended
//! (end-to-end, notify: accepted messages never acked or announced; open-loop
//! sends: also messages due in the window but never sent). `rate/s` is
//! `ok / secs`. Failures are listed by cause below the table.
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
//! ltmc-bench chain --steps 50
//! ltmc-bench fanout --steps 100 --agents 100
//! ```

mod agents;
mod chain;
mod connections;
mod fanout;
mod http;
mod load;
mod notify;
mod operations;
mod runs;
mod send;
mod streams;
mod tally;
mod workflow;

use std::fmt::Display;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use tokio::sync::{Notify, watch};

use http::cause;
use tally::Stats;

/// Longest time after the window for work in flight to finish.
const DRAIN: Duration = Duration::from_secs(5);
/// Messages one claim asks for (roundtrip consumers, simulated agents).
const CLAIM_LIMIT: usize = 32;

/// Turns `true` when the streams and agents are to stop.
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
    /// (chain, fanout: one run at a time, no rate) [default: 0, notify: 1000].
    #[arg(long)]
    rate: Option<u64>,
    /// HTTP requests in flight from producers; also caps acks (workflow, chain, fanout: step
    /// results) in flight, parallel registrations and parallel stream handshakes.
    #[arg(long, default_value_t = 64, value_parser = positive())]
    concurrency: usize,
    /// Recipient agents (send, roundtrip, handoff; workflow, fanout: simulated agents, one
    /// stream each; chain always runs two).
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
    /// Steps of each parallel workflow (workflow), of each run (chain, fanout)
    /// [default: workflow 10, chain 50, fanout 100].
    #[arg(long, value_parser = positive())]
    steps: Option<usize>,
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
    Chain,
    Fanout,
}

/// The run's settings and shared state, one `Arc` for all its tasks.
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
    /// Steps of a workflow (workflow: of a parallel one).
    steps: usize,
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
            Scenario::Roundtrip | Scenario::Workflow | Scenario::Chain | Scenario::Fanout => {
                2 * args.concurrency + args.agents
            }
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
            Scenario::Chain => (0, 2),
            Scenario::Fanout => (0, args.agents),
        };
        let steps = args.steps.unwrap_or(match args.scenario {
            Scenario::Chain => 50,
            Scenario::Fanout => 100,
            _ => 10,
        });
        let payload = match args.scenario {
            Scenario::Checkpoint => args.payload_bytes.unwrap_or(64 * 1024),
            _ => args.payload_bytes.unwrap_or(128),
        };
        let base = args.url.trim_end_matches('/').to_owned();
        let sender = format!("{prefix}sender");
        let (seed, mut st) = (mix(now.as_nanos() as u64), Stats::default());
        if matches!(
            args.scenario,
            Scenario::Workflow | Scenario::Chain | Scenario::Fanout
        ) {
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
            steps,
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

    /// Counts a failure, listed by `what` and cause below the table.
    fn fail(&self, what: &str, err: impl Display) {
        let key = format!("{what}: {err}");
        *lock(&self.st.errors).entry(key).or_default() += 1;
    }
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
        _ if matches!(a.scenario, Scenario::Chain | Scenario::Fanout) => {
            format!("one run of {} steps at a time", b.steps)
        }
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
        Scenario::Send | Scenario::Roundtrip => send::run(b.clone()).await,
        Scenario::Notify | Scenario::Handoff => notify::run(b.clone()).await,
        Scenario::Session | Scenario::Checkpoint => operations::run(b.clone()).await,
        Scenario::Connections => connections::run(b.clone()).await,
        Scenario::Workflow => workflow::run(b.clone()).await,
        Scenario::Chain => chain::run(b.clone()).await,
        Scenario::Fanout => fanout::run(b.clone()).await,
    };
    for (what, count) in lock(&b.st.errors).iter() {
        println!("{count:>9} errors  {what}");
    }
    result
}
