//! Retention: finished records past their retention are purged and live ones never are, the
//! event log is bounded by size as well as age, and the freed space goes back to the file system.

use serde_json::{Value, json};

use ltmc::common::now_ms;
use ltmc::events::NewEvent;

use crate::both_brokers;
use crate::harness::{Kind, Options, TestApp};

const DAY_MS: i64 = 86_400_000;

fn id(body: &Value, key: &str) -> String {
    body[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {body}"))
        .to_owned()
}

/// Creates one finished and one live record of every kind; returns, for each, a path that reads
/// it from the store: 404 once purged, or a list that no longer holds it. (Sessions and
/// checkpoints are read through lists: their hot copies in the broker expire on the real clock,
/// minutes after a write, long before any retention, which these tests fake.)
async fn finished_and_live(app: &TestApp) -> (Vec<String>, Vec<String>) {
    app.register("w", &["x"]).await;
    app.register("v", &["x"]).await;
    let (mut finished, mut live) = (Vec::new(), Vec::new());

    // Workflows: one run to completion, one still executing.
    let done = app
        .post(
            "/v1/workflows",
            json!({"name": "done", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "w"}]}),
        )
        .await
        .1;
    let step = app.claim("w", json!({"auto_ack": true})).await;
    let path = format!("/v1/workflows/{}/steps/s/result", id(&done, "workflow_id"));
    let result =
        json!({"agent_id": "w", "attempt": step[0]["content"]["attempt"], "success": true});
    assert_eq!(app.post(&path, result).await.0, 200);
    finished.push(format!("/v1/workflows/{}", id(&done, "workflow_id")));
    let running = app
        .post(
            "/v1/workflows",
            json!({"name": "running", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "v"}]}),
        )
        .await
        .1;
    live.push(format!("/v1/workflows/{}", id(&running, "workflow_id")));

    // Handoffs: one completed, one still offered.
    let handoff = json!({"from_agent": "v", "to_agent": "w", "context": {"k": 1}});
    let completed = id(
        &app.post("/v1/handoffs", handoff.clone()).await.1,
        "handoff_id",
    );
    let accept = format!("/v1/handoffs/{completed}/accept");
    assert_eq!(app.post(&accept, json!({"agent_id": "w"})).await.0, 200);
    let complete = format!("/v1/handoffs/{completed}/complete");
    assert_eq!(app.post(&complete, json!({})).await.0, 200);
    finished.push(format!("/v1/handoffs/{completed}"));
    let offered = id(&app.post("/v1/handoffs", handoff).await.1, "handoff_id");
    live.push(format!("/v1/handoffs/{offered}"));

    // Sessions: one ended, one active.
    let ended = id(
        &app.post("/v1/sessions", json!({"session_type": "t"}))
            .await
            .1,
        "session_id",
    );
    let end = format!("/v1/sessions/{ended}/end");
    assert_eq!(app.post(&end, json!({})).await.0, 200);
    finished.push(format!("/v1/sessions?status=ended#{ended}"));
    let active = id(
        &app.post("/v1/sessions", json!({"session_type": "t"}))
            .await
            .1,
        "session_id",
    );
    live.push(format!("/v1/sessions?status=active#{active}"));
    // A finished handoff of a session still going stays: the chain is the session's hop budget.
    let chained =
        json!({"from_agent": "v", "to_agent": "w", "context": {"k": 2}, "session_id": active});
    let in_session = id(&app.post("/v1/handoffs", chained).await.1, "handoff_id");
    let cancel = format!("/v1/handoffs/{in_session}/cancel");
    assert_eq!(app.post(&cancel, json!({})).await.0, 200);
    live.push(format!("/v1/handoffs/{in_session}"));

    // Coordination rounds: one answered by all, one still collecting.
    let answered = id(
        &app.post(
            "/v1/coordinations",
            json!({"agents": ["w"], "topic": "t", "payload": {}}),
        )
        .await
        .1,
        "coordination_id",
    );
    let answer = json!({"agent_id": "w", "success": true, "result": {}});
    let responses = format!("/v1/coordinations/{answered}/responses");
    assert_eq!(app.post(&responses, answer).await.0, 202);
    finished.push(format!("/v1/coordinations/{answered}"));
    let collecting = id(
        &app.post(
            "/v1/coordinations",
            json!({"agents": ["w", "v"], "topic": "t", "payload": {}, "timeout_ms": 30000}),
        )
        .await
        .1,
        "coordination_id",
    );
    live.push(format!("/v1/coordinations/{collecting}"));

    // Checkpoints: of a coordination long over, and of the round still collecting.
    for (coordination, list) in [
        ("old-plan", &mut finished),
        (collecting.as_str(), &mut live),
    ] {
        let checkpoint = app
            .post(
                "/v1/checkpoints",
                json!({"coordination_id": coordination, "state": {"n": 1}, "status": "in_progress"}),
            )
            .await
            .1;
        list.push(format!(
            "/v1/checkpoints?coordination_id={coordination}#{}",
            id(&checkpoint, "checkpoint_id")
        ));
    }

    // The record of what happened.
    let memory = app
        .post(
            "/v1/memories",
            json!({"content": "noted", "tags": ["t"], "metadata": {}}),
        )
        .await
        .1;
    finished.push(format!("/v1/memories/{}", id(&memory, "memory_id")));
    (finished, live)
}

/// Whether each record is still there: `path#id` looks for the id in a list, a plain path is
/// read by id.
async fn present(app: &TestApp, paths: &[String]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for path in paths {
        let found = match path.split_once('#') {
            Some((list, id)) => {
                let (status, page) = app.get(list).await;
                assert_eq!(status, 200, "{list}: {page}");
                page.to_string().contains(id)
            }
            None => match app.get(path).await {
                (200, _) => true,
                (404, _) => false,
                (status, body) => panic!("{path}: {status} {body}"),
            },
        };
        out.push((path.clone(), found));
    }
    out
}

both_brokers!(finished_records_go_live_ones_stay, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let (finished, live) = finished_and_live(&app).await;
    let queued = app.send("v", "boss", json!("unacked"), 0).await;

    // Within the retention nothing goes.
    let soon = now_ms() + 29 * DAY_MS;
    let purged = ltmc::retention::purge_tick(&app.state, soon).await.unwrap();
    assert!(purged.is_empty(), "{purged:?}");
    for (path, found) in present(&app, &finished).await {
        assert!(found, "{path} is within its retention");
    }

    let later = now_ms() + 31 * DAY_MS;
    let purged = ltmc::retention::purge_tick(&app.state, later)
        .await
        .unwrap();
    for kind in [
        "workflows",
        "handoffs",
        "sessions",
        "coordinations",
        "checkpoints",
        "memories",
    ] {
        assert!(
            purged.get(kind).is_some_and(|n| *n >= 1),
            "{kind}: {purged:?}"
        );
    }
    for (path, found) in present(&app, &finished).await {
        assert!(!found, "{path} is finished and past its retention");
    }
    for (path, found) in present(&app, &live).await {
        assert!(found, "{path} is live: it must stay");
    }
    // A message not yet acked stays, however old.
    ltmc::messages::prune_tick(&app.state, later).await.unwrap();
    let (_, waiting) = app.get("/v1/agents/v/messages").await;
    assert!(
        waiting["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["message_id"] == queued),
        "{waiting}"
    );

    // What went is counted, in /metrics and in diagnostics.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"ltmc_purged_rows_total{kind="workflows"} 1"#),
        "{text}"
    );
    assert!(text.contains("ltmc_database_bytes "), "{text}");
    let (_, diagnostics) = app.get("/v1/diagnostics").await;
    assert_eq!(
        diagnostics["checks"]["storage"]["status"], "passed",
        "{diagnostics}"
    );
    assert_eq!(
        diagnostics["storage"]["purged_rows"]["workflows"], 1,
        "{diagnostics}"
    );
    assert!(diagnostics["storage"]["database_bytes"].as_i64().unwrap() > 0);
    app.stop().await;
});

// `LTMC_MEMORY_RETENTION_DAYS=0` keeps the record of what happened for good, while finished
// work still goes after `LTMC_RETENTION_DAYS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memories_kept_for_good_with_zero_days() {
    let app = TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| {
        c.limits.memory_retention_days = 0;
        c.limits.retention_days = 1;
    }))
    .await;
    let memory = app
        .post(
            "/v1/memories",
            json!({"content": "kept", "tags": [], "metadata": {}}),
        )
        .await
        .1;
    let session = app
        .post("/v1/sessions", json!({"session_type": "t"}))
        .await
        .1;
    let session = id(&session, "session_id");
    app.post(&format!("/v1/sessions/{session}/end"), json!({}))
        .await;
    let purged = ltmc::retention::purge_tick(&app.state, now_ms() + 2 * DAY_MS)
        .await
        .unwrap();
    assert_eq!(purged.get("memories"), None, "{purged:?}");
    let memory_path = format!("/v1/memories/{}", id(&memory, "memory_id"));
    assert_eq!(app.get(&memory_path).await.0, 200);
    let (_, ended) = app.get("/v1/sessions?status=ended").await;
    assert!(!ended.to_string().contains(&session), "{ended}");
    app.stop().await;
}

// The event log is capped by size too: past `LTMC_EVENT_MAX_ROWS` the oldest go whatever their
// age, a resume from before them is `recovered: false`, and the pages they took go back to the
// file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_log_capped_by_size_and_space_given_back() {
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory).configure(|c| c.limits.event_max_rows = 1000),
    )
    .await;
    let first = app.send("alice", "boss", json!(1), 0).await;
    let (_, listed) = app.get("/v1/agents/alice/messages").await;
    assert_eq!(listed["items"][0]["message_id"], first);
    let padding = "x".repeat(2000);
    for _ in 0..5 {
        let mut tx = app.state.store.begin().await.unwrap();
        for i in 0..1000 {
            tx.emit(NewEvent::new(
                "agents",
                "test.filler",
                json!({"i": i, "pad": padding}),
            ));
        }
        tx.commit(&app.state.broker).await.unwrap();
    }
    let full = app.state.store.size().await.unwrap();
    assert!(full.incremental_vacuum);

    // All young, yet over the cap: all but the newest 1000 go.
    let pruned = ltmc::events::prune_tick(&app.state, now_ms())
        .await
        .unwrap();
    assert_eq!(pruned, 4001);
    let mut alice = app
        .ws("/v1/agents/alice/stream?since=0", &[])
        .await
        .unwrap();
    let resumed = alice.frame().await;
    assert_eq!(resumed["type"], "resumed");
    assert_eq!(resumed["recovered"], false, "{resumed}");
    drop(alice);

    let freed = app.state.store.size().await.unwrap();
    assert!(freed.free_bytes > 8 << 20, "{freed:?}");
    let pages = ltmc::retention::reclaim_tick(&app.state).await.unwrap();
    assert!(pages > 0);
    let reclaimed = app.state.store.size().await.unwrap();
    assert!(
        reclaimed.bytes < full.bytes - (8 << 20),
        "{full:?} → {reclaimed:?}"
    );
    assert!(reclaimed.free_bytes <= 256 * 4096, "{reclaimed:?}");
    app.stop().await;
}

// A file made before incremental vacuum is converted once at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_file_is_converted_to_incremental_vacuum() {
    use sqlx::Connection as _;
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("ltmc.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE legacy (x)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mode: i64 = sqlx::query_scalar("PRAGMA auto_vacuum")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, 0);
    conn.close().await.unwrap();

    let mut options = Options::new(Kind::Memory);
    options.dir = Some(dir);
    let app = TestApp::spawn_with(options).await;
    assert!(app.state.store.size().await.unwrap().incremental_vacuum);
    app.stop().await;
}
