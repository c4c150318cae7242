//! The test harness: a real server on port 0 with its own SQLite file and key prefix, against
//! either broker, and a client with one generic request helper.
//!
//! Redis: each test that needs one starts a private `redis-server` on a free port (so tests can
//! kill and restart it), unless `LTMC_TEST_REDIS_URL` points at an existing server, in which case
//! tests share it under unique key prefixes (and the tests that kill Redis are skipped loudly).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ltmc::app::{App, AppState};
use ltmc::config::Config;
use reqwest::Method;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Memory,
    Redis,
}

/// Runs an async test body once per broker: `both_brokers!(name, |kind| async move { … })`.
#[macro_export]
macro_rules! both_brokers {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                ($body)($crate::harness::Kind::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                ($body)($crate::harness::Kind::Redis).await
            }
        }
    };
}

static PREFIX: AtomicU32 = AtomicU32::new(0);

/// A unique key prefix per test.
pub fn unique_prefix() -> String {
    format!(
        "t{}-{}:",
        std::process::id(),
        PREFIX.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private `redis-server` (killed on drop), or the shared one from `LTMC_TEST_REDIS_URL`.
pub struct Redis {
    pub url: String,
    port: u16,
    process: Option<tokio::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub async fn start() -> Redis {
        if let Ok(url) = std::env::var("LTMC_TEST_REDIS_URL") {
            return Redis {
                url,
                port: 0,
                process: None,
            };
        }
        let port = free_port();
        let mut redis = Redis {
            url: format!("redis://127.0.0.1:{port}"),
            port,
            process: None,
        };
        redis.spawn().await;
        redis
    }

    /// Whether this test owns the server (and may kill it).
    pub fn owned(&self) -> bool {
        self.port != 0
    }

    async fn spawn(&mut self) {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server must be on PATH for the Redis half of the suite (apt-get install redis-server)");
        self.process = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Kills the server (SIGKILL): everything in it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().await.unwrap();
        }
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// FLUSHALL.
    pub async fn flushall(&self) {
        let client = redis::Client::open(self.url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
}

/// A running in-process server.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    /// Sent as the bearer token unless a request says otherwise.
    pub token: Option<String>,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
    pub dir: std::sync::Arc<TempDir>,
    pub redis: Option<Redis>,
}

/// Knobs for [`TestApp::spawn_with`].
pub struct Options {
    pub kind: Kind,
    pub configure: Box<dyn FnOnce(&mut Config) + Send>,
    /// Share another app's database file (a second instance).
    pub dir: Option<std::sync::Arc<TempDir>>,
    /// Use this Redis URL and prefix (a second instance sharing Redis).
    pub redis_url: Option<(String, String)>,
}

impl Options {
    pub fn new(kind: Kind) -> Self {
        Options {
            kind,
            configure: Box::new(|_| {}),
            dir: None,
            redis_url: None,
        }
    }
    pub fn configure(mut self, f: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.configure = Box::new(f);
        self
    }
}

/// A test's default configuration: its own database file, background loop effectively off
/// (tests drive the step functions), quick pings.
pub fn test_config(db: &Path) -> Config {
    let mut config = Config::for_tests(db);
    config.limits.tick_ms = 60_000;
    config.log = "warn".into();
    config
}

impl TestApp {
    pub async fn spawn(kind: Kind) -> TestApp {
        Self::spawn_with(Options::new(kind)).await
    }

    pub async fn spawn_with(options: Options) -> TestApp {
        let dir = options
            .dir
            .unwrap_or_else(|| std::sync::Arc::new(tempfile::tempdir().unwrap()));
        let mut config = test_config(&dir.path().join("ltmc.db"));
        let mut redis = None;
        match (options.kind, options.redis_url) {
            (Kind::Memory, _) => {}
            (Kind::Redis, Some((url, prefix))) => {
                config.redis_url = Some(url);
                config.key_prefix = prefix;
            }
            (Kind::Redis, None) => {
                let server = Redis::start().await;
                config.redis_url = Some(server.url.clone());
                config.key_prefix = unique_prefix();
                redis = Some(server);
            }
        }
        (options.configure)(&mut config);
        let token = config.admin_token.clone();
        let shutdown = CancellationToken::new();
        let app = App::build(config, shutdown.clone())
            .await
            .expect("app builds");
        let addr = app.local_addr();
        let state = app.state().clone();
        let handle = tokio::spawn(async move { app.run().await.expect("app runs") });
        let test = TestApp {
            addr,
            state,
            client: reqwest::Client::new(),
            token,
            shutdown,
            handle: Some(handle),
            dir,
            redis,
        };
        if options.kind == Kind::Redis {
            test.wait_ready().await;
        }
        test
    }

    /// Waits until `/readyz` answers 200 (the Redis subscription may take a moment).
    pub async fn wait_ready(&self) {
        for _ in 0..300 {
            if self.get("/readyz").await.0 == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the app never became ready");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One request with an optional JSON body and token; returns status and JSON body (Null
    /// when empty).
    pub async fn request_as(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request is sent");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        (status, body)
    }

    pub async fn request(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.token.clone();
        self.request_as(method, path, body, token.as_deref()).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(Method::GET, path, None).await
    }

    /// How many items a list answers (asserting a 200).
    pub async fn count(&self, path: &str) -> usize {
        let (status, page) = self.get(path).await;
        assert_eq!(status, 200, "{page}");
        page["items"].as_array().unwrap().len()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(Method::POST, path, Some(body)).await
    }

    /// Registers an agent with defaults; returns the answer body.
    pub async fn register(&self, agent_id: &str, capabilities: &[&str]) -> Value {
        let (status, body) = self
            .post(
                "/v1/agents",
                serde_json::json!({"agent_id": agent_id, "capabilities": capabilities}),
            )
            .await;
        assert!(
            status == 201 || status == 200,
            "register {agent_id}: {status} {body}"
        );
        body
    }

    /// Registers (with no capabilities) those of `agent_ids` not registered yet: work addressed
    /// to an agent by name needs a registered one. Registered agents are left as they are.
    pub async fn ensure_registered(&self, agent_ids: &[&str]) {
        for agent_id in agent_ids {
            if self.get(&format!("/v1/agents/{agent_id}")).await.0 == 404 {
                self.register(agent_id, &[]).await;
            }
        }
    }

    /// Sends a message; returns its id.
    pub async fn send(&self, to: &str, from: &str, content: Value, priority: u8) -> String {
        let (status, body) = self
            .post(
                &format!("/v1/agents/{to}/messages"),
                serde_json::json!({"from": from, "message_type": "test", "content": content, "priority": priority}),
            )
            .await;
        assert_eq!(status, 202, "send: {body}");
        body["message_id"].as_str().unwrap().to_owned()
    }

    /// Claims; returns the messages.
    pub async fn claim(&self, agent: &str, body: Value) -> Vec<Value> {
        let (status, answer) = self
            .post(&format!("/v1/agents/{agent}/messages/claim"), body)
            .await;
        assert_eq!(status, 200, "claim: {answer}");
        answer["messages"].as_array().unwrap().clone()
    }

    /// Opens a WebSocket to `path` with optional headers.
    pub async fn ws(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, tungstenite::Error> {
        let mut request = format!("ws://{}{path}", self.addr)
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        if let Some(token) = &self.token
            && !headers.iter().any(|(n, _)| {
                n.eq_ignore_ascii_case("authorization")
                    || n.eq_ignore_ascii_case("sec-websocket-protocol")
            })
        {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Ws { stream })
    }

    /// Stops the app gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("app stops in time")
                .unwrap();
        }
    }

    /// Cancels the shutdown token without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("app stops in time")
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A WebSocket client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What the server said next.
#[derive(Debug)]
pub enum Next {
    Frame(Value),
    Closed(Option<CloseFrame>),
    Timeout,
}

impl Ws {
    /// The next text frame or close, within `within`.
    pub async fn next(&mut self, within: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Next::Timeout,
                Ok(None) | Ok(Some(Err(_))) => return Next::Closed(None),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Next::Frame(serde_json::from_str(&text).unwrap());
                }
                Ok(Some(Ok(Message::Close(frame)))) => return Next::Closed(frame),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next text frame; panics on anything else.
    pub async fn frame(&mut self) -> Value {
        match self.next(Duration::from_secs(5)).await {
            Next::Frame(v) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The close code the server ends with (skipping frames).
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next(Duration::from_secs(10)).await {
                Next::Frame(_) => continue,
                Next::Closed(frame) => return frame.map(|f| u16::from(f.code)),
                Next::Timeout => panic!("the server did not close the stream"),
            }
        }
    }

    pub async fn send_text(&mut self, text: String) -> Result<(), tungstenite::Error> {
        self.stream.send(Message::Text(text.into())).await
    }
}

/// The `ltmc` binary as a child process, for kill -9 and signal tests.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Starts `ltmc serve` over `db` with extra args; waits for its "serving" log line.
    pub async fn start(db: &Path, extra: &[&str]) -> Process {
        let command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ltmc"));
        Self::launch(command, db, extra).await.0
    }

    /// Like [`Process::start`], under a file-descriptor limit of `soft`:`hard` set by the shell
    /// that execs it (the test process keeps its own); also returns the JSON log lines written
    /// before "serving".
    pub async fn start_with_fd_limit(
        db: &Path,
        extra: &[&str],
        soft: u32,
        hard: u32,
    ) -> (Process, Vec<Value>) {
        let mut command = tokio::process::Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_ltmc"),
        ]);
        Self::launch(command, db, extra).await
    }

    async fn launch(
        mut command: tokio::process::Command,
        db: &Path,
        extra: &[&str],
    ) -> (Process, Vec<Value>) {
        let mut child = command
            .args([
                "--bind",
                "127.0.0.1:0",
                "--database-url",
                &format!("sqlite://{}", db.display()),
            ])
            .args(extra)
            .env("LTMC_LOG_FORMAT", "json")
            .env("LTMC_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut startup = Vec::new();
        let addr = loop {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .expect("ltmc logs within 20 s")
                .unwrap()
                .expect("ltmc exited before serving");
            let Ok(json) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if json["fields"]["message"] == "ltmc serving" {
                break json["fields"]["addr"].as_str().unwrap().parse().unwrap();
            }
            startup.push(json);
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        (Process { child, addr }, startup)
    }
}

/// Path of the SQLite file in a temp dir.
pub fn db_path(dir: &TempDir) -> PathBuf {
    dir.path().join("ltmc.db")
}
