//! Requests to the server that the scenarios share: JSON in and out, a
//! non-2xx answer turned into a [`Failed`] named by its status and problem
//! title, registrations, and the claim every consumer times.
//!
//! A 429 or 503 with `Retry-After` is a refusal, not a failure: the server is
//! over capacity for new work and says when to come back. Its value is read
//! as whole seconds, at most [`MAX_RETRY_AFTER`]; anything else (an HTTP date,
//! garbage) reads as 1 s. Only the producers' operations (`load.rs`) treat a
//! refusal as one; everywhere else it is an error like any other.

use std::error::Error;
use std::fmt;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use reqwest::{StatusCode, header::RETRY_AFTER};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::Bench;
use crate::tally::Window;

/// The longest `Retry-After` honoured: a run is seconds long, and a server
/// asking for more would only leave the window idle.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a request did not succeed.
pub enum Failed {
    /// A 429 or 503 with `Retry-After`: come back after `wait`; `why` names
    /// the status and title, for where a refusal counts as an error.
    Refused {
        wait: Duration,
        why: String,
    },
    Error(String),
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failed::Refused { why, .. } | Failed::Error(why) => f.write_str(why),
        }
    }
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Error(e)
    }
}

impl From<Failed> for String {
    fn from(e: Failed) -> Self {
        e.to_string()
    }
}

impl Bench {
    pub async fn health(&self) -> Result<(), String> {
        let request = self.http.get(format!("{}/healthz", self.base));
        let resp = request.timeout(Duration::from_secs(3)).send().await;
        match resp.map_err(|e| cause(&e))?.status() {
            s if s.is_success() => Ok(()),
            s => Err(format!("GET /healthz answered {s}")),
        }
    }

    /// POSTs JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<reqwest::Response, Failed> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        checked(request.send().await.map_err(|e| cause(&e))?).await
    }

    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<T, Failed> {
        let resp = self.post(path, body).await?;
        Ok(read_json(resp).await?)
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, Failed> {
        let request = self.http.get(format!("{}{path}", self.base));
        let resp = checked(request.send().await.map_err(|e| cause(&e))?).await?;
        Ok(read_json(resp).await?)
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

/// A 2xx answer, or why not: a refusal if it is a 429 or 503 with
/// `Retry-After`, else an error named by the status and problem title.
async fn checked(resp: reqwest::Response) -> Result<reqwest::Response, Failed> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let busy = [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ];
    let wait = match busy.contains(&status) {
        true => resp.headers().get(RETRY_AFTER).map(retry_after),
        false => None,
    };
    let problem = resp.json::<Value>().await.unwrap_or_default();
    let why = match problem.get("title").and_then(Value::as_str) {
        Some(title) if Some(title) != status.canonical_reason() => {
            format!("HTTP {status} ({title})")
        }
        _ => format!("HTTP {status}"),
    };
    Err(match wait {
        Some(wait) => Failed::Refused { wait, why },
        None => Failed::Error(why),
    })
}

/// A `Retry-After` value as the wait it asks for (see the module doc).
fn retry_after(value: &reqwest::header::HeaderValue) -> Duration {
    let secs = value.to_str().map(str::trim).unwrap_or_default();
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return Duration::from_secs(1);
    }
    // All digits: too many of them for a u64 is still "a long time".
    let secs = secs.parse().unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_RETRY_AFTER)
}

pub async fn read_json<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, String> {
    let reply = resp.json().await;
    reply.map_err(|e| format!("bad reply: {}", cause(&e)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_capped_and_else_one() {
        let wait = |v: &str| retry_after(&reqwest::header::HeaderValue::from_str(v).unwrap());
        assert_eq!(wait("2"), Duration::from_secs(2));
        assert_eq!(wait(" 0 "), Duration::ZERO);
        assert_eq!(wait("120"), MAX_RETRY_AFTER);
        assert_eq!(wait("99999999999999999999999"), MAX_RETRY_AFTER);
        for other in ["", "1.5", "-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            assert_eq!(wait(other), Duration::from_secs(1), "{other:?}");
        }
    }
}
