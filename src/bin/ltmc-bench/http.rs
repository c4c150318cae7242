//! Requests to the server that the scenarios share: JSON in and out, a
//! non-2xx answer turned into an error named by its status and problem
//! title, registrations, and the claim every consumer times.

use std::error::Error;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Bench;
use crate::tally::Window;

impl Bench {
    pub async fn health(&self) -> Result<(), String> {
        let request = self.http.get(format!("{}/healthz", self.base));
        let resp = request.timeout(Duration::from_secs(3)).send().await;
        match resp.map_err(|e| cause(&e))?.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("GET /healthz answered {s}")),
        }
    }

    /// POSTs JSON; a non-2xx status is an error named by status and problem title.
    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, String> {
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

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, String> {
        let resp = self.post(path, body).await?;
        let reply = resp.json().await;
        reply.map_err(|e| format!("bad reply: {}", cause(&e)))
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, String> {
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
    pub async fn register(&self, n: usize) -> Result<(), String> {
        eprintln!("registering {n} agents {}0..{}", self.prefix, n - 1);
        let ids = std::iter::once(self.sender.clone()).chain((0..n).map(|i| self.agent(i)));
        self.register_ids(ids).await
    }

    /// Registers these agents, `--concurrency` at a time.
    pub async fn register_ids(&self, ids: impl Iterator<Item = String>) -> Result<(), String> {
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

    /// A claim, timed in the `claim` row; None when it failed (counted as a failure).
    pub async fn claim<T: DeserializeOwned>(
        &self,
        w: Window,
        path: &str,
        body: &Value,
    ) -> Option<T> {
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
}

/// The innermost cause of an error, which names what actually went wrong.
pub fn cause(err: &(dyn Error + 'static)) -> String {
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
