//! `session` and `checkpoint`: single requests on records made before.
//!
//! - `session`: warm-up creates sessions; the window alternates `create` with
//!   an `activity` on a warm-up session, round-robin.
//! - `checkpoint`: warm-up saves checkpoints (state: one `--payload-bytes`
//!   string, default 64 KiB); the window alternates `save` with a `restore` of
//!   a saved one, round-robin, and counts whether it came from cache or store.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::http::Failed;
use crate::tally::{Window, header, row};
use crate::{Bench, Scenario, lock};

/// `session` and `checkpoint`.
pub async fn run(b: Arc<Bench>) -> Result<(), String> {
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

impl Bench {
    /// Operation `i`, due at `due`: creates a session (kept for reuse if made
    /// in the warm-up) or saves a checkpoint (kept).
    pub async fn create(&self, w: Window, i: u64, due: Instant) -> Result<(), Failed> {
        if self.args.scenario == Scenario::Session {
            let body = json!({"session_type": "bench"});
            let reply = self.post_json("/v1/sessions", &body).await?;
            return Ok(self.keep(&reply, "session_id", due < w.measure)?);
        }
        let state = json!({"data": "x".repeat(self.payload)});
        let coordination_id = format!("{}c{i}", self.prefix);
        let body = json!({"coordination_id": coordination_id, "state": state,
            "agents": [], "status": "in_progress"});
        let reply = self.post_json("/v1/checkpoints", &body).await?;
        Ok(self.keep(&reply, "checkpoint_id", true)?)
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
    pub async fn reuse(&self, scenario: Scenario, k: u64) -> Result<(), Failed> {
        let id = {
            let ids = lock(&self.st.ids);
            let n = ids.len().max(1);
            let id = ids.get(k as usize % n).cloned();
            id.ok_or_else(|| Failed::Error("nothing to reuse".into()))?
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
}
