//! Coordination rounds: a round that completes (with conflicts, long-poll woken by the last
//! answer) and one that times out with `missing`; who may answer, and only once.

use std::time::{Duration, Instant};

use ltmc::common::now_ms;
use serde_json::json;

use crate::both_brokers;
use crate::harness::TestApp;

both_brokers!(a_round_completes_and_long_poll_wakes, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.ensure_registered(&["backend", "frontend"]).await;
    let mut backend = app.ws("/v1/agents/backend/stream", &[]).await.unwrap();
    let (status, started) = app
        .post("/v1/coordinations", json!({"agents": ["backend", "frontend"], "topic": "tech_stack_validation",
                                         "payload": {"question": "which db?"}, "timeout_ms": 10000}))
        .await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["status"], "collecting");
    let id = started["coordination_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("crd_"));
    // Each agent is asked: a notification and a message in its queue.
    let mut types = vec![
        backend.frame().await["type"].as_str().unwrap().to_owned(),
        backend.frame().await["type"].as_str().unwrap().to_owned(),
    ];
    types.sort();
    assert_eq!(types, ["coordination.request", "new_message"]);
    let asked = app.claim("frontend", json!({})).await;
    assert_eq!(asked[0]["message_type"], "coordination.request");
    assert_eq!(asked[0]["content"]["payload"]["question"], "which db?");

    let respond = format!("/v1/coordinations/{id}/responses");
    assert_eq!(app.post(&respond, json!({"agent_id": "backend", "success": true, "result": {"db": "sqlite", "lang": "rust"}})).await.0, 202);
    assert_eq!(
        app.post(
            &respond,
            json!({"agent_id": "backend", "success": true, "result": {}})
        )
        .await
        .0,
        409,
        "once each"
    );
    assert_eq!(
        app.post(&respond, json!({"agent_id": "stranger", "success": true}))
            .await
            .0,
        409,
        "named agents only"
    );

    // A long-poll is woken by the last answer, well before its wait runs out.
    let poll = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/v1/coordinations/{id}?wait_ms=10000")),
        );
        tokio::spawn(async move {
            let began = Instant::now();
            let round: serde_json::Value =
                client.get(url).send().await.unwrap().json().await.unwrap();
            (round, began.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.post(&respond, json!({"agent_id": "frontend", "success": true, "result": {"db": "postgres", "lang": "rust"}})).await.0, 202);
    let (round, waited) = poll.await.unwrap();
    assert!(waited < Duration::from_secs(5), "woken after {waited:?}");
    assert_eq!(round["status"], "completed");
    assert_eq!(round["missing"], json!([]));
    assert_eq!(round["responses"].as_array().unwrap().len(), 2);
    assert_eq!(
        round["conflicts"],
        json!([{"key": "db", "values": {"backend": "sqlite", "frontend": "postgres"}}])
    );
    assert_eq!(
        app.post(&respond, json!({"agent_id": "frontend", "success": true}))
            .await
            .0,
        409,
        "ended"
    );
    app.stop().await;
});

both_brokers!(a_round_times_out_with_missing, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.ensure_registered(&["a", "b", "c"]).await;
    let (_, started) = app
        .post(
            "/v1/coordinations",
            json!({"agents": ["a", "b", "c"], "topic": "vote", "timeout_ms": 300}),
        )
        .await;
    let id = started["coordination_id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/coordinations/{id}/responses"),
        json!({"agent_id": "a", "success": true, "result": {"x": 1}}),
    )
    .await;
    // The long-poll returns at the deadline, not at the end of its wait.
    let began = Instant::now();
    let (_, round) = app
        .get(&format!("/v1/coordinations/{id}?wait_ms=5000"))
        .await;
    assert!(began.elapsed() < Duration::from_secs(3));
    assert_eq!(round["status"], "timed_out");
    assert_eq!(round["missing"], json!(["b", "c"]));
    assert_eq!(
        ltmc::coordinations::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ltmc::coordinations::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        0,
        "once"
    );
    assert_eq!(
        app.post(
            &format!("/v1/coordinations/{id}/responses"),
            json!({"agent_id": "b", "success": true})
        )
        .await
        .0,
        409
    );
    // Bad input.
    for body in [
        json!({"agents": [], "topic": "t"}),
        json!({"agents": ["a", "a"], "topic": "t"}),
        json!({"agents": ["a"], "topic": "t", "timeout_ms": 30001}),
    ] {
        assert_eq!(
            app.post("/v1/coordinations", body.clone()).await.0,
            422,
            "{body}"
        );
    }
    assert_eq!(
        app.get(&format!("/v1/coordinations/{id}?wait_ms=30001"))
            .await
            .0,
        422
    );
    assert_eq!(app.get("/v1/coordinations/crd_nope").await.0, 404);
    app.stop().await;
});
