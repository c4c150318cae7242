//! `notify` and `handoff`: work sent to agents listening on their streams,
//! timed to what the stream says.
//!
//! - `notify`: open `--streams` WebSockets (one per agent), then send at
//!   `--rate` (default 1000/s, open loop) to random agents among them. Latency
//!   runs from just before the POST to the matching `new_message` frame.
//! - `handoff`: open one stream per agent, then hand off from agent `i` to
//!   `i + 1` (mod `--agents`). `initiate` is the POST; `offer→accept` runs from
//!   just before it to the completed accept, issued when the `handoff.offered`
//!   frame for that handoff reaches the addressee's stream.
//!
//! A send (or initiation) and its frame may be heard in either order: the first
//! waits in [`Stats::seen`](crate::tally::Stats) for the other.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

use crate::http::Failed;
use crate::tally::{Window, header, row};
use crate::{Bench, DRAIN, Scenario, lock};

/// Notify: the half of a message's story heard first, its send (POST start,
/// whether it counts) or its frame (arrival time), waiting for the other half.
pub enum Seen {
    /// The third field is the handoff's accept body (notify: null).
    Sent(Instant, bool, Value),
    Frame(Instant),
}

/// `notify` and `handoff`.
pub async fn run(b: Arc<Bench>) -> Result<(), String> {
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

impl Bench {
    /// Notify, handoff: pairs a send with its frame, whichever is heard first;
    /// a handoff's pair then issues the accept.
    pub fn meet(self: &Arc<Self>, id: String, heard: Seen) {
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

    /// Hands off from agent `i` to `i + 1`; the accept follows the offer frame.
    pub async fn initiate(self: &Arc<Self>, i: u64, counted: bool) -> Result<(), Failed> {
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
            return Err(Failed::Error(
                "bad reply: no handoff_id or context_digest".into(),
            ));
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
}
