//! The agents' WebSocket streams (`GET /v1/agents/{id}/stream`): opened
//! `--concurrency` handshakes at a time, then each read by its own task until
//! the run stops, which hands the frames the scenario waits for (`new_message`,
//! or `handoff.offered`) to it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use crate::http::cause;
use crate::notify::Seen;
use crate::{Bench, Scenario, Stop};

/// Longest time to open all the streams.
const OPEN_LIMIT: Duration = Duration::from_secs(60);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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

impl Bench {
    /// Registers the agents and opens a stream to each; an error unless all
    /// opened. Returns the reading tasks and the time taken to open them.
    pub async fn every_stream(self: &Arc<Self>, stop: &Stop) -> Result<(JoinSet<()>, f64), String> {
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
    pub async fn open_streams(self: &Arc<Self>, n: usize, stop: &Stop) -> (JoinSet<()>, f64) {
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
        self.st.connect.set_started(n as u64);
        let mut readers = JoinSet::new();
        while let Ok(Some(joined)) = timeout_at(start + OPEN_LIMIT, handshakes.join_next()).await {
            match joined {
                Ok((i, Ok(ws), took)) => {
                    self.st.connect.done(true, took);
                    self.st.open_streams.fetch_add(1, Relaxed);
                    readers.spawn(self.clone().read(ws, i, stop.clone()));
                }
                Ok((_, Err(e), _)) => self.fail("stream connect", e),
                Err(e) => self.fail("stream connect", e),
            }
        }
        for _ in 0..handshakes.len() {
            self.fail("stream connect", "not opened within a minute");
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
                            Scenario::Workflow | Scenario::Chain | Scenario::Fanout => {
                                self.woken(i, frame.correlation_id, at)
                            }
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
}
