//! `send` and `roundtrip`.
//!
//! - `send`: POST messages to `--agents` recipients round-robin. `--rate 0`
//!   runs `--concurrency` workers back to back (maximum throughput); `--rate N`
//!   sends on a fixed timetable of N/s (open loop) and measures latency from
//!   each *scheduled* time, so stalls are not hidden (no coordinated omission).
//! - `roundtrip`: `send`, plus one consumer per agent that claims (limit 32,
//!   visibility 30 s) and acks each message, a batch's acks concurrently.
//!   End-to-end latency runs from the scheduled send, carried in the content,
//!   to the completed ack. Consumers poll, backing off from 1 to 20 ms while
//!   idle. At `--rate 0` producers may outrun consumers: use `--rate` for
//!   end-to-end latency. Below the table, one line sets the messages offered
//!   per second (sends due or, closed loop, started in the window) beside
//!   those accepted and those acked (acks started in the window), so an
//!   overload curve reads off one run per rate.
//!
//! `notify` sends with [`Bench::send`] too, to random agents among its streams.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::future::join_all;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout_at};

use crate::notify::Seen;
use crate::tally::{Window, header, row};
use crate::{Bench, CLAIM_LIMIT, DRAIN, Scenario, mix};

/// A roundtrip consumer's shortest and longest wait between empty claims.
const MIN_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(20);

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

/// `send` and `roundtrip`.
pub async fn run(b: Arc<Bench>) -> Result<(), String> {
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
        let per_s = |n: u64| n as f64 / secs;
        let (offered, accepted) = (per_s(st.send.started()), per_s(st.send.ok()));
        let acked = per_s(st.ack.ok());
        println!("load: {offered:.1} msg/s offered, {accepted:.1} accepted, {acked:.1} acked");
    }
    Ok(())
}

impl Bench {
    /// Sends message `i`, due at `due`: round-robin (notify: to a random
    /// agent). Returns the wait that a refusal asks for.
    pub async fn send(self: &Arc<Self>, w: Window, i: u64, due: Instant) -> Option<Duration> {
        let notify = self.args.scenario == Scenario::Notify;
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
                None
            }
            Err(e) => self.failed(&self.st.send, counted, "send", e),
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
}
