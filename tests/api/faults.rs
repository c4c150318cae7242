//! Faults, for real: the service killed with SIGKILL mid-traffic, stopped with SIGTERM mid-traffic,
//! Redis flushed, Redis killed and restarted empty. The promise under test: a 202 means the
//! message is durable, and the service recovers by itself.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ltmc::common::now_ms;
use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::both_brokers;
use crate::harness::{Kind, Process, Redis, TestApp, Ws, db_path, unique_prefix};

/// Messages each flood tries to send, and how many must be 202'd before the service is stopped
/// (the rest are in flight or not sent yet).
const FLOOD: usize = 500;
const STOP_AFTER: usize = 250;
/// Concurrent senders of a flood.
const SENDERS: usize = 8;

/// The `ltmc` binary's setting for one test: its database file and, for Redis, a private server
/// and key prefix that outlive every restart of the service.
struct Setup {
    _dir: TempDir,
    db: PathBuf,
    args: Vec<String>,
    _redis: Option<Redis>,
}

impl Setup {
    async fn new(kind: Kind) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let db = db_path(&dir);
        let (args, redis) = match kind {
            Kind::Memory => (Vec::new(), None),
            Kind::Redis => {
                let redis = Redis::start().await;
                let args = vec![
                    "--redis-url".to_owned(),
                    redis.url.clone(),
                    "--key-prefix".to_owned(),
                    unique_prefix(),
                ];
                (args, Some(redis))
            }
        };
        Setup {
            _dir: dir,
            db,
            args,
            _redis: redis,
        }
    }

    /// Starts the binary over this test's database (again), with extra flags.
    async fn start(&self, extra: &[&str]) -> (Process, Client) {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        let process = Process::start(&self.db, &args).await;
        let client = Client::new(&process);
        (process, client)
    }
}

/// A plain HTTP client of a [`Process`]; transport errors are returned, since the service may
/// be gone.
#[derive(Clone)]
struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    fn new(process: &Process) -> Client {
        Client {
            base: format!("http://{}", process.addr),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    async fn claim(&self, agent: &str, limit: u32, visibility_timeout_s: u32) -> Vec<Value> {
        let body = json!({"limit": limit, "visibility_timeout_s": visibility_timeout_s});
        let (status, answer) = self
            .call(
                Method::POST,
                &format!("/v1/agents/{agent}/messages/claim"),
                Some(body),
            )
            .await
            .expect("claim is answered");
        assert_eq!(status, 200, "claim: {answer}");
        answer["messages"].as_array().unwrap().clone()
    }

    /// Claims until the queue is empty, 100 at a time.
    async fn claim_all(&self, agent: &str, visibility_timeout_s: u32) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let batch = self.claim(agent, 100, visibility_timeout_s).await;
            if batch.is_empty() {
                return all;
            }
            all.extend(batch);
        }
    }
}

/// Sends up to [`FLOOD`] messages to `to` from [`SENDERS`] concurrent tasks, until done or until
/// the service stops answering. Returns the ids of the messages answered 202, as they arrive; any
/// other answer fails the sending task (join the set to see it).
fn flood(client: &Client, to: &str) -> (Arc<Mutex<Vec<String>>>, JoinSet<()>) {
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..SENDERS {
        let (client, accepted, next) = (client.clone(), accepted.clone(), next.clone());
        let path = format!("/v1/agents/{to}/messages");
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= FLOOD {
                    return;
                }
                let body = json!({"from": "boss", "message_type": "load", "content": {"i": i}});
                match client.call(Method::POST, &path, Some(body)).await {
                    Ok((202, receipt)) => accepted
                        .lock()
                        .unwrap()
                        .push(receipt["message_id"].as_str().unwrap().to_owned()),
                    Ok((status, body)) => panic!("send {i} answered {status}: {body}"),
                    // The service is gone: whatever was not answered was never promised.
                    Err(_) => return,
                }
            }
        });
    }
    (accepted, tasks)
}

/// Waits until `n` sends were 202'd.
async fn wait_for_accepted(accepted: &Mutex<Vec<String>>, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "{n} sends were not accepted in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Joins the senders (re-raising a failed one) and returns the 202'd ids.
async fn finish(accepted: Arc<Mutex<Vec<String>>>, mut tasks: JoinSet<()>) -> Vec<String> {
    while let Some(result) = tasks.join_next().await {
        result.expect("a sender saw an answer other than 202");
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= STOP_AFTER);
    accepted
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every accepted id is among `claimed` exactly once, and nothing was handed out twice.
fn assert_each_claimed_once(accepted: &[String], claimed: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for id in claimed {
        *counts.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handed out more than once: {twice:?}");
    let lost: Vec<_> = accepted
        .iter()
        .filter(|id| !counts.contains_key(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages were lost, e.g. {:?}",
        lost.len(),
        accepted.len(),
        &lost[..lost.len().min(5)]
    );
    // Sends that were committed but never answered may be there too, nothing else.
    assert!(claimed.len() <= FLOOD, "{} claimed", claimed.len());
}

both_brokers!(
    kill_9_loses_no_accepted_message_and_leases_survive,
    |kind| async move {
        let setup = Setup::new(kind).await;
        let (mut process, client) = setup.start(&[]).await;

        let (accepted, senders) = flood(&client, "worker");
        wait_for_accepted(&accepted, STOP_AFTER).await;
        process.child.kill().await.unwrap(); // SIGKILL, sends in flight
        let accepted = finish(accepted, senders).await;

        // Restarted over the same database: every 202'd message is there, exactly once.
        let (mut process, client) = setup.start(&[]).await;
        let lease_s = 2;
        let claimed = client.claim_all("worker", lease_s).await;
        assert_each_claimed_once(&accepted, &ids(&claimed));
        assert!(claimed.iter().all(|m| m["delivery_count"] == 1));

        // Crash again while all of them are claimed and none acked.
        process.child.kill().await.unwrap();
        let (_process, client) = setup.start(&["--tick-ms", "50"]).await;
        let lease_ends = claimed
            .iter()
            .map(|m| {
                let at = m["lease_expires_at"].as_str().unwrap();
                chrono::DateTime::parse_from_rfc3339(at)
                    .unwrap()
                    .timestamp_millis()
            })
            .min()
            .unwrap();
        // The leases outlived the crash: nothing is handed out again before they run out (checked
        // only when the restart was quick enough to ask in time).
        if now_ms() + 300 < lease_ends {
            assert!(
                client.claim("worker", 100, 30).await.is_empty(),
                "a leased message was handed out again before its lease ran out"
            );
        }
        // Then each comes back, once, as its second delivery.
        let mut redelivered = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while redelivered.len() < claimed.len() && Instant::now() < deadline {
            let batch = client.claim("worker", 100, 30).await;
            if batch.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            redelivered.extend(batch);
        }
        let redelivered_ids = ids(&redelivered);
        assert_eq!(
            redelivered_ids.iter().collect::<HashSet<_>>(),
            ids(&claimed).iter().collect::<HashSet<_>>(),
            "every claimed-but-unacked message is delivered again after its lease ran out"
        );
        assert_each_claimed_once(&accepted, &redelivered_ids);
        assert!(redelivered.iter().all(|m| m["delivery_count"] == 2));
    }
);

both_brokers!(
    sigterm_mid_traffic_exits_cleanly_and_keeps_every_accepted_message,
    |kind| async move {
        let setup = Setup::new(kind).await;
        let (mut process, client) = setup.start(&[]).await;
        let (stream, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/v1/agents/worker/stream",
            process.addr
        ))
        .await
        .unwrap();
        let mut stream = Ws { stream };
        let stream_end = tokio::spawn(async move { stream.close_code().await });

        let (accepted, senders) = flood(&client, "worker");
        wait_for_accepted(&accepted, STOP_AFTER).await;
        let pid = process.child.id().unwrap().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        let exit = tokio::time::timeout(Duration::from_secs(5), process.child.wait())
            .await
            .expect("ltmc exits within 5 s of SIGTERM")
            .unwrap();
        assert!(exit.success(), "ltmc exited with {exit}");
        let accepted = finish(accepted, senders).await;
        assert_eq!(
            stream_end.await.unwrap(),
            Some(1012),
            "open streams are closed with the reconnectable 1012"
        );

        let (_process, client) = setup.start(&[]).await;
        let claimed = client.claim_all("worker", 30).await;
        assert_each_claimed_once(&accepted, &ids(&claimed));
    }
);

/// A private Redis may be killed or flushed; a shared one (`LTMC_TEST_REDIS_URL`) may not.
fn owns_redis(app: &TestApp, test: &str) -> bool {
    let owned = app.redis.as_ref().is_some_and(Redis::owned);
    if !owned {
        eprintln!("SKIPPED {test}: LTMC_TEST_REDIS_URL is a shared Redis; this test needs its own");
    }
    owned
}

async fn agent_status(app: &TestApp, agent: &str) -> String {
    let (status, body) = app.get(&format!("/v1/agents/{agent}")).await;
    assert_eq!(status, 200, "{body}");
    body["status"].as_str().unwrap().to_owned()
}

async fn claim_ids(app: &TestApp, agent: &str) -> HashSet<String> {
    let mut all = HashSet::new();
    loop {
        let batch = app.claim(agent, json!({"limit": 100})).await;
        if batch.is_empty() {
            return all;
        }
        for id in ids(&batch) {
            assert!(all.insert(id.clone()), "{id} handed out twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_loses_nothing() {
    let app = TestApp::spawn(Kind::Redis).await;
    if !owns_redis(&app, "flushall_loses_nothing") {
        return;
    }
    app.register("worker", &["build"]).await;
    app.register("idle", &["build"]).await;
    let mut sent = HashSet::new();
    for i in 0..20 {
        sent.insert(app.send("worker", "boss", json!(i), (i % 10) as u8).await);
    }
    assert_eq!(agent_status(&app, "worker").await, "available");

    app.redis.as_ref().unwrap().flushall().await;

    assert_eq!(app.get("/readyz").await.0, 200);
    // The registry is the store's: both agents are still listed, offline until they heartbeat.
    let (status, page) = app.get("/v1/agents").await;
    assert_eq!(status, 200, "{page}");
    let listed: HashMap<&str, &str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["agent_id"].as_str().unwrap(),
                a["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        HashMap::from([("worker", "offline"), ("idle", "offline")])
    );
    let (status, agent) = app.post("/v1/agents/worker/heartbeat", json!({})).await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(agent["status"], "available");
    assert_eq!(agent_status(&app, "worker").await, "available");
    assert_eq!(agent_status(&app, "idle").await, "offline");

    // Every queued message is still claimable, and sending goes on.
    sent.insert(app.send("worker", "boss", json!("after"), 0).await);
    assert_eq!(claim_ids(&app, "worker").await, sent);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_nothing_and_the_service_recovers_by_itself() {
    let mut app = TestApp::spawn(Kind::Redis).await;
    if !owns_redis(&app, "redis_restart_loses_nothing") {
        return;
    }
    app.register("worker", &["build"]).await;
    let mut sent = HashSet::new();
    for i in 0..10 {
        sent.insert(app.send("worker", "boss", json!(i), 0).await);
    }

    app.redis.as_mut().unwrap().kill().await;

    // Down: not ready, and the problem names redis.
    let (status, problem) = app.get("/readyz").await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["type"], "urn:ltmc:problem:unavailable");
    assert!(
        problem["detail"].as_str().unwrap().contains("redis"),
        "{problem}"
    );
    // Sends still succeed: the store is the truth.
    for i in 10..20 {
        let (status, receipt) = app
            .post(
                "/v1/agents/worker/messages",
                json!({"from": "boss", "message_type": "test", "content": i}),
            )
            .await;
        assert_eq!(status, 202, "{receipt}");
        assert_eq!(receipt["recipient_online"], false);
        sent.insert(receipt["message_id"].as_str().unwrap().to_owned());
    }
    // Presence lives only in Redis: a heartbeat cannot be recorded.
    let (status, problem) = app.post("/v1/agents/worker/heartbeat", json!({})).await;
    assert_eq!(status, 503, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("redis"));

    app.redis.as_mut().unwrap().restart().await; // back, empty, on the same port

    // Ready again without anyone doing anything.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app.get("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready 10 s after redis returned: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(agent_status(&app, "worker").await, "offline");
    let (status, agent) = app.post("/v1/agents/worker/heartbeat", json!({})).await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(agent["status"], "available");
    let (_, receipt) = app
        .post(
            "/v1/agents/worker/messages",
            json!({"from": "boss", "message_type": "test", "content": "back"}),
        )
        .await;
    assert_eq!(receipt["recipient_online"], true);
    sent.insert(receipt["message_id"].as_str().unwrap().to_owned());
    assert_eq!(claim_ids(&app, "worker").await, sent);
    app.stop().await;
}

// A write abandoned halfway (a handler cancelled by a timeout or a client that went away) is
// rolled back, and the write connection serves the next request as if nothing happened.
both_brokers!(an_abandoned_write_is_rolled_back, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut tx = app.state.store.begin().await.unwrap();
    let event = ltmc::events::NewEvent::new("agents", "test.abandoned", serde_json::json!({}));
    ltmc::events::db::append(tx.conn(), &[(ltmc::common::now_ms(), event)])
        .await
        .unwrap();
    drop(tx);
    let id = app.send("w", "b", serde_json::json!("after"), 0).await;
    let claimed = app.claim("w", serde_json::json!({})).await;
    assert_eq!(claimed[0]["message_id"], id.as_str());
    let mut firehose = app
        .ws("/v1/events/stream?topics=agents&since=0", &[])
        .await
        .unwrap();
    assert_eq!(firehose.frame().await["type"], "resumed");
    // The abandoned event was never committed: nothing of it in the log.
    assert!(matches!(
        firehose.next(std::time::Duration::from_millis(300)).await,
        crate::harness::Next::Timeout
    ));
    app.stop().await;
});
