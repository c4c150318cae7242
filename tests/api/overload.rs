//! Overload: work that finishes accepted work commits ahead of new work, and new work past the
//! admission bound is refused with 429 and `Retry-After`, changing nothing. The store is made
//! to fall behind by holding its write connection (as a long write would), so what queues and
//! what is refused is decided, not timed.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::both_brokers;
use crate::harness::{Kind, Next, Options, TestApp};

const BOUND: u32 = 20;

async fn spawn(kind: Kind) -> TestApp {
    TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_new_backlog = BOUND)).await
}

/// POSTs `body` (from a task of its own, so requests can be in flight together); answers the
/// status, the `Retry-After` header and the body.
fn post(app: &TestApp, path: &str, body: Value) -> JoinHandle<(u16, Option<String>, Value)> {
    tokio::spawn(post_from(app.client.clone(), app.url(path), body))
}

async fn post_from(
    client: reqwest::Client,
    url: String,
    body: Value,
) -> (u16, Option<String>, Value) {
    let response = client
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("request is sent");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap_or(Value::Null);
    (status, retry_after, body)
}

fn run_of(steps: usize, agent: &str) -> Value {
    let steps: Vec<Value> = (0..steps)
        .map(|i| json!({"step_id": format!("s{i}"), "agent": agent, "input": {}}))
        .collect();
    json!({"name": "flood", "pattern": "parallel", "steps": steps})
}

/// Waits until the admitted new work reaches `units` (the requests are in flight).
async fn backlog_reaches(app: &TestApp, units: u64) {
    for _ in 0..500 {
        if app.state.admission.backlog() == units {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the backlog stayed at {} (wanted {units})",
        app.state.admission.backlog()
    );
}

fn assert_overloaded(status: u16, retry_after: Option<String>, body: &Value) {
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["type"], "urn:ltmc:problem:overloaded", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("over capacity"),
        "{body}"
    );
}

both_brokers!(
    a_step_result_commits_ahead_of_a_flood_of_submits_and_past_the_bound_they_get_429,
    |kind| async move {
        let app = spawn(kind).await;
        app.register("worker", &[]).await;
        // A step out with its agent, whose result will finish accepted work.
        let (status, first) = app.post("/v1/workflows", run_of(1, "worker")).await;
        assert_eq!(status, 201, "{first}");
        let first_id = first["workflow_id"].as_str().unwrap().to_owned();
        let step = &app.claim("worker", json!({"auto_ack": true})).await[0];
        assert_eq!(step["content"]["workflow_id"], first_id.as_str());

        // The store falls behind: nothing commits while this is held.
        let held = app.state.store.begin().await.unwrap();
        let submits: Vec<_> = (0..3)
            .map(|_| post(&app, "/v1/workflows", run_of(6, "worker")))
            .collect();
        backlog_reaches(&app, 18).await;
        // A run that would pass the bound is refused at once, and writes nothing; smaller new
        // work still fits.
        let (status, retry_after, body) = post(&app, "/v1/workflows", run_of(3, "worker"))
            .await
            .unwrap();
        assert_overloaded(status, retry_after, &body);
        let send = json!({"from": "worker", "message_type": "t", "content": {}});
        let sends: Vec<_> = (0..2)
            .map(|_| post(&app, "/v1/agents/worker/messages", send.clone()))
            .collect();
        backlog_reaches(&app, 20).await;
        // At the bound, new work of any kind is refused before its body is even read.
        let (status, retry_after, body) = post(&app, "/v1/agents/worker/messages", send)
            .await
            .unwrap();
        assert_overloaded(status, retry_after, &body);
        let (status, retry_after, body) =
            post(&app, "/v1/workflows", json!("not even a definition"))
                .await
                .unwrap();
        assert_overloaded(status, retry_after, &body);
        // Finishing work is not refused: it waits for the store like the submits.
        let path = format!("/v1/workflows/{first_id}/steps/s0/result");
        let body =
            json!({"agent_id": "worker", "attempt": 1, "success": true, "output": {"ok": 1}});
        let result = post(&app, &path, body);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!result.is_finished(), "the result waits for the store");
        drop(held);

        let (status, _, run) = result.await.unwrap();
        assert_eq!(status, 200, "{run}");
        assert_eq!(run["status"], "completed");
        let mut started = Vec::new();
        for submit in submits {
            let (status, _, run) = submit.await.unwrap();
            assert_eq!(status, 201, "nothing admitted is dropped: {run}");
            started.push(run["workflow_id"].as_str().unwrap().to_owned());
        }
        for send in sends {
            assert_eq!(send.await.unwrap().0, 202, "nothing admitted is dropped");
        }
        assert_eq!(app.state.admission.backlog(), 0);
        // The three admitted runs and the first exist; the refused ones do not.
        assert_eq!(app.count("/v1/workflows").await, 4);

        // In the log, the result's moves come before any of the flood's runs started.
        let mut firehose = app
            .ws("/v1/events/stream?topics=workflows&since=0", &[])
            .await
            .unwrap();
        let mut order = Vec::new();
        while let Next::Frame(frame) = firehose.next(Duration::from_millis(500)).await {
            let id = frame["data"]["workflow_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match frame["type"].as_str().unwrap() {
                "workflow.step.succeeded" if id == first_id => order.push("result".to_owned()),
                "workflow.started" if started.contains(&id) => order.push("started".to_owned()),
                _ => {}
            }
        }
        assert_eq!(order, ["result", "started", "started", "started"]);
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
        let metrics = metrics.text().await.unwrap();
        assert!(metrics.contains("ltmc_new_work_refused_total{kind=\"workflow\"} 2"));
        assert!(metrics.contains("ltmc_new_work_refused_total{kind=\"message\"} 1"));
        assert!(metrics.contains("ltmc_new_work_backlog_limit 20"));
        app.stop().await;
    }
);

both_brokers!(
    acks_and_claims_commit_while_sends_past_the_bound_are_refused,
    |kind| async move {
        let app = spawn(kind).await;
        app.register("consumer", &[]).await;
        app.register("producer", &[]).await;
        let queued = app.send("consumer", "producer", json!("first"), 0).await;
        let held_message = &app.claim("consumer", json!({})).await[0];
        let lease = held_message["lease_id"].as_str().unwrap().to_owned();

        let held = app.state.store.begin().await.unwrap();
        let sends: Vec<_> = (0..BOUND)
            .map(|i| {
                let body = json!({"from": "producer", "message_type": "t", "content": i});
                post(&app, "/v1/agents/consumer/messages", body)
            })
            .collect();
        backlog_reaches(&app, u64::from(BOUND)).await;
        let body = json!({"from": "producer", "message_type": "t", "content": "one too many"});
        let (status, retry_after, problem) = post(&app, "/v1/agents/consumer/messages", body)
            .await
            .unwrap();
        assert_overloaded(status, retry_after, &problem);
        let handoff = json!({"from_agent": "consumer", "to_agent": "producer", "context": {}});
        let (status, retry_after, problem) = post(&app, "/v1/handoffs", handoff).await.unwrap();
        assert_overloaded(status, retry_after, &problem);
        let path = format!("/v1/agents/consumer/messages/{queued}/ack");
        let ack = post(&app, &path, json!({"lease_id": lease}));
        drop(held);

        assert_eq!(ack.await.unwrap().0, 204);
        for send in sends {
            assert_eq!(send.await.unwrap().0, 202, "nothing admitted is dropped");
        }
        // The admitted sends are queued; the refused one and the refused handoff are not.
        let queue = app.count("/v1/agents/consumer/messages?state=queued").await;
        assert_eq!(queue, BOUND as usize);
        assert_eq!(app.count("/v1/handoffs").await, 0);
        assert_eq!(app.state.admission.backlog(), 0);
        app.stop().await;
    }
);
