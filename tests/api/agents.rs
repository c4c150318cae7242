//! The registry: register, re-register, list with filters, heartbeat, delete, TTL expiry.

use ltmc::common::now_ms;
use serde_json::json;

use crate::both_brokers;
use crate::harness::TestApp;

both_brokers!(register_reregister_get_list_delete, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let (status, agent) = app
        .post("/v1/agents", json!({"agent_id": "coder-1", "capabilities": ["code", "review"], "metadata": {"v": 1}}))
        .await;
    assert_eq!(status, 201);
    assert_eq!(agent["status"], "available");
    assert_eq!(agent["max_concurrent_tasks"], 5);
    assert_eq!(agent["metadata"]["v"], 1);
    assert!(agent.get("token").is_none(), "no token with auth off");

    let (status, again) = app
        .post(
            "/v1/agents",
            json!({"agent_id": "coder-1", "capabilities": ["code"], "max_concurrent_tasks": 2}),
        )
        .await;
    assert_eq!(status, 200, "re-registration refreshes");
    assert_eq!(again["registered_at"], agent["registered_at"]);
    assert_eq!(again["max_concurrent_tasks"], 2);
    app.register("tester-1", &["test"]).await;

    let (_, by_cap) = app.get("/v1/agents?capability=code").await;
    let ids: Vec<&str> = by_cap["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["coder-1"]);
    let (_, review) = app.get("/v1/agents?capability=review").await;
    assert!(
        review["items"].as_array().unwrap().is_empty(),
        "capabilities were replaced"
    );

    let (status, beat) = app
        .post("/v1/agents/tester-1/heartbeat", json!({"status": "busy"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(beat["status"], "busy");
    let (_, busy) = app.get("/v1/agents?status=busy").await;
    assert_eq!(busy["items"][0]["agent_id"], "tester-1");
    assert_eq!(busy["items"].as_array().unwrap().len(), 1);

    assert_eq!(
        app.request(reqwest::Method::DELETE, "/v1/agents/tester-1", None)
            .await
            .0,
        204
    );
    assert_eq!(app.get("/v1/agents/tester-1").await.0, 404);
    assert_eq!(
        app.request(reqwest::Method::DELETE, "/v1/agents/tester-1", None)
            .await
            .0,
        404
    );
    assert_eq!(
        app.post("/v1/agents/tester-1/heartbeat", json!({})).await.0,
        404
    );
    app.stop().await;
});

both_brokers!(pages_walk_the_whole_registry, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for i in 0..7 {
        app.register(&format!("a{i}"), &["x"]).await;
    }
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = if cursor.is_empty() {
            "/v1/agents?limit=3".to_owned()
        } else {
            format!("/v1/agents?limit=3&cursor={cursor}")
        };
        let (status, page) = app.get(&path).await;
        assert_eq!(status, 200);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["agent_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("a{i}")).collect::<Vec<_>>());
    app.stop().await;
});

both_brokers!(silent_agent_goes_offline_with_an_event, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut firehose = app
        .ws("/v1/events/stream?topics=agents", &[])
        .await
        .unwrap();
    app.post(
        "/v1/agents",
        json!({"agent_id": "sleepy", "capabilities": [], "ttl_s": 1}),
    )
    .await;
    assert_eq!(firehose.frame().await["type"], "agent.registered");

    // Not yet due: nothing happens.
    assert_eq!(
        ltmc::agents::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        0
    );
    assert_eq!(app.get("/v1/agents/sleepy").await.1["status"], "available");
    // Past the TTL the presence is gone even before the loop runs (the broker's TTL) …
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(app.get("/v1/agents/sleepy").await.1["status"], "offline");
    // … and the expiry step emits agent.expired once.
    assert_eq!(
        ltmc::agents::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ltmc::agents::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        0
    );
    let frame = firehose.frame().await;
    assert_eq!(frame["type"], "agent.expired");
    assert_eq!(frame["data"]["agent_id"], "sleepy");
    let (_, offline) = app.get("/v1/agents?status=offline").await;
    assert_eq!(offline["items"][0]["agent_id"], "sleepy");
    assert!(offline["items"][0]["expires_at"].is_null());

    // A heartbeat brings it back.
    let (_, back) = app.post("/v1/agents/sleepy/heartbeat", json!({})).await;
    assert_eq!(back["status"], "available");
    app.stop().await;
});

// `ltmc` and `ltmc:…` ids are the service's own (the sender of workflow steps, diagnostics
// probes): no agent can register as one.
both_brokers!(service_ids_are_reserved, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for id in ["ltmc", "ltmc:diagnostics:x"] {
        let (status, problem) = app
            .post("/v1/agents", json!({"agent_id": id, "capabilities": []}))
            .await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["errors"][0]["field"], "agent_id");
    }
    app.stop().await;
});
