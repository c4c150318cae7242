//! Checkpoints: save and restore (cache fast path, store fallback), survival across a kill -9 of
//! the service and a FLUSHALL of Redis, newest-first listing and retention.

use serde_json::{Value, json};

use crate::both_brokers;
use crate::harness::{Kind, Options, Process, TestApp, db_path};

fn checkpoint(coordination: &str, step: u32) -> Value {
    json!({"coordination_id": coordination, "state": {"step": step, "plan": ["a", "b"], "blob": "x".repeat(1024)},
           "agents": ["planner", "coder"], "status": "in_progress"})
}

both_brokers!(
    restore_from_cache_then_store_after_a_flush,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let (status, saved) = app.post("/v1/checkpoints", checkpoint("wf_1", 1)).await;
        assert_eq!(status, 201, "{saved}");
        let id = saved["checkpoint_id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("chk_"));
        let (_, restored) = app.get(&format!("/v1/checkpoints/{id}")).await;
        assert_eq!(restored["source"], "cache");
        assert_eq!(restored["state"]["step"], 1);
        assert_eq!(restored["agents"], json!(["planner", "coder"]));
        if kind == Kind::Redis {
            let redis = app.redis.as_ref().unwrap();
            if redis.owned() {
                redis.flushall().await;
                let (_, after_flush) = app.get(&format!("/v1/checkpoints/{id}")).await;
                assert_eq!(after_flush["source"], "store");
                assert_eq!(after_flush["state"], restored["state"]);
                assert_eq!(
                    app.get(&format!("/v1/checkpoints/{id}")).await.1["source"],
                    "cache",
                    "refilled"
                );
            }
        }
        assert_eq!(app.get("/v1/checkpoints/chk_nope").await.0, 404);
        // Saving writes a memory of it.
        let (_, memories) = app.get("/v1/memories?tag=checkpoint").await;
        assert_eq!(
            memories["items"][0]["metadata"]["checkpoint_id"],
            id.as_str()
        );
        app.stop().await;
    }
);

both_brokers!(
    newest_first_and_only_the_newest_are_kept,
    |kind| async move {
        let app = TestApp::spawn_with(
            Options::new(kind).configure(|c| c.limits.checkpoint_retention = 3),
        )
        .await;
        let mut ids = Vec::new();
        for step in 0..5 {
            ids.push(
                app.post("/v1/checkpoints", checkpoint("wf_2", step))
                    .await
                    .1["checkpoint_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        app.post("/v1/checkpoints", checkpoint("other", 0)).await;
        let (_, page) = app
            .get("/v1/checkpoints?coordination_id=wf_2&limit=2")
            .await;
        let listed: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["checkpoint_id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, [ids[4].as_str(), ids[3].as_str()]);
        let (_, rest) = app
            .get(&format!(
                "/v1/checkpoints?coordination_id=wf_2&cursor={}",
                page["next_cursor"].as_str().unwrap()
            ))
            .await;
        assert_eq!(
            rest["items"].as_array().unwrap().len(),
            1,
            "retention keeps 3"
        );
        assert_eq!(rest["items"][0]["checkpoint_id"], ids[2].as_str());
        // Trimmed ones are gone, from the cache too.
        assert_eq!(app.get(&format!("/v1/checkpoints/{}", ids[0])).await.0, 404);
        assert_eq!(
            app.get("/v1/checkpoints").await.0,
            422,
            "coordination_id is required"
        );
        app.stop().await;
    }
);

/// The real binary, killed with SIGKILL: a saved checkpoint is restored from the store after
/// the restart, then from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(&dir);
    let client = reqwest::Client::new();
    let mut first = Process::start(&db, &[]).await;
    let saved: Value = client
        .post(format!("http://{}/v1/checkpoints", first.addr))
        .json(&checkpoint("wf_3", 7))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    first.child.kill().await.unwrap();
    let second = Process::start(&db, &[]).await;
    let url = format!(
        "http://{}/v1/checkpoints/{}",
        second.addr,
        saved["checkpoint_id"].as_str().unwrap()
    );
    let restored: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(restored["source"], "store");
    assert_eq!(restored["state"]["step"], 7);
    let again: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["source"], "cache");
}

// The state must be a JSON object; it is stored and restored as the very text that was sent.
both_brokers!(state_is_an_object_kept_as_sent, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for state in [json!([1, 2]), json!("s"), json!(null), json!(3)] {
        let (status, problem) = app
            .post(
                "/v1/checkpoints",
                json!({"coordination_id": "c", "state": state, "status": "s"}),
            )
            .await;
        assert_eq!(status, 422, "{state}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "state");
    }
    assert_eq!(
        app.get("/v1/checkpoints?coordination_id=c").await.1["items"],
        json!([])
    );
    let body = r#"{"coordination_id": "c", "status": "s", "state": {"b": 1, "a": [ 2.50, "é" ]}}"#;
    let saved = app
        .client
        .post(format!("http://{}/v1/checkpoints", app.addr))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 201);
    let id = saved.json::<Value>().await.unwrap()["checkpoint_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let restored = app
        .client
        .get(format!("http://{}/v1/checkpoints/{id}", app.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        restored.contains(r#""state":{"b": 1, "a": [ 2.50, "é" ]}"#),
        "{restored}"
    );
    app.stop().await;
});
