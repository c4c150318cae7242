//! Agent contexts (versions, If-Match) and syncs with each strategy over a real conflict.

use reqwest::Method;
use serde_json::{Value, json};

use crate::both_brokers;
use crate::harness::TestApp;

async fn put_context(
    app: &TestApp,
    agent: &str,
    values: Value,
    if_match: Option<&str>,
) -> (u16, Value) {
    let mut request = app
        .client
        .put(app.url(&format!("/v1/agents/{agent}/context")))
        .json(&json!({"values": values}));
    if let Some(version) = if_match {
        request = request.header("if-match", version);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

both_brokers!(versions_and_if_match, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut stream = app.ws("/v1/agents/coder/stream", &[]).await.unwrap();
    let (_, empty) = app.get("/v1/agents/coder/context").await;
    assert_eq!(empty["version"], 0);
    assert_eq!(empty["values"], json!({}));
    let (status, first) =
        put_context(&app, "coder", json!({"lang": "rust", "tabs": 4}), Some("0")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["version"], 1);
    assert_eq!(stream.frame().await["type"], "context.updated");
    // A writer that read version 0 is too late now.
    let (status, _) = put_context(&app, "coder", json!({"lang": "go"}), Some("0")).await;
    assert_eq!(status, 409);
    // PATCH merges; null removes.
    let (status, patched) = app
        .request(
            Method::PATCH,
            "/v1/agents/coder/context",
            Some(json!({"values": {"tabs": null, "style": "fmt"}})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["values"], json!({"lang": "rust", "style": "fmt"}));
    assert_eq!(patched["version"], 2);
    // The version is also the ETag, and If-Match takes it back quoted; `*` matches any version.
    let response = app
        .client
        .get(app.url("/v1/agents/coder/context"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["etag"], "\"2\"");
    let (status, _) = put_context(&app, "coder", json!({}), Some("\"2\"")).await;
    assert_eq!(status, 200, "a quoted ETag-style version is accepted");
    let (status, cleared) = put_context(&app, "coder", json!({"k": 1}), Some("*")).await;
    assert_eq!(status, 200);
    assert_eq!(cleared["version"], 4);
    let (status, _) = put_context(&app, "coder", json!({}), Some("banana")).await;
    assert_eq!(status, 422);
    // A write that changes nothing keeps the version (and notifies no one).
    let (status, same) = put_context(&app, "coder", json!({"k": 1}), Some("4")).await;
    assert_eq!((status, same["version"].clone()), (200, json!(4)));
    let (_, same) = app
        .request(
            Method::PATCH,
            "/v1/agents/coder/context",
            Some(json!({"values": {}})),
        )
        .await;
    assert_eq!(same["version"], 4);
    for version in 2..=4 {
        assert_eq!(stream.frame().await["version"], version);
    }
    assert!(matches!(
        stream.next(std::time::Duration::from_millis(200)).await,
        crate::harness::Next::Timeout
    ));
    app.stop().await;
});

async fn seed(app: &TestApp) {
    // a writes first, b later: b is the last writer.
    put_context(
        app,
        "a",
        json!({"shared": "from-a", "only_a": 1, "same": true}),
        None,
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put_context(
        app,
        "b",
        json!({"shared": "from-b", "only_b": 2, "same": true}),
        None,
    )
    .await;
}

both_brokers!(each_sync_strategy_with_a_real_conflict, |kind| async move {
    let app = TestApp::spawn(kind).await;
    seed(&app).await;

    // fail_on_conflict: 409 naming the key, nothing written.
    let (status, problem) = app
        .post(
            "/v1/syncs",
            json!({"agents": ["a", "b"], "strategy": "fail_on_conflict"}),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("shared"));
    assert_eq!(
        problem["conflicts"],
        json!([{"key": "shared", "values": {"a": "from-a", "b": "from-b"}}])
    );
    assert_eq!(
        app.get("/v1/agents/a/context").await.1["values"]["shared"],
        "from-a"
    );

    // last_writer_wins (the default): b's value, the union of the rest, written to both.
    let (status, result) = app.post("/v1/syncs", json!({"agents": ["a", "b"]})).await;
    assert_eq!(status, 201, "{result}");
    assert!(result["sync_id"].as_str().unwrap().starts_with("sync_"));
    assert_eq!(
        result["conflicts"],
        json!([{"key": "shared", "values": {"a": "from-a", "b": "from-b"}}])
    );
    assert_eq!(result["conflicts_resolved"], 1);
    assert_eq!(
        result["merged"],
        json!({"shared": "from-b", "only_a": 1, "only_b": 2, "same": true})
    );
    for agent in ["a", "b"] {
        let (_, context) = app.get(&format!("/v1/agents/{agent}/context")).await;
        assert_eq!(context["values"], result["merged"]);
        assert_eq!(context["version"], 2, "bumped");
    }
    // Synced again: nothing to change, so no version moves.
    let (status, again) = app.post("/v1/syncs", json!({"agents": ["a", "b"]})).await;
    assert_eq!((status, again["conflicts"].clone()), (201, json!([])));
    for agent in ["a", "b"] {
        assert_eq!(
            app.get(&format!("/v1/agents/{agent}/context")).await.1["version"],
            2
        );
    }

    // prefer_agent: a wins although b wrote last.
    put_context(&app, "a", json!({"shared": "a-again"}), None).await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    put_context(&app, "b", json!({"shared": "b-again"}), None).await;
    let (_, preferred) = app
        .post(
            "/v1/syncs",
            json!({"agents": ["a", "b"], "strategy": "prefer_agent", "prefer_agent": "a"}),
        )
        .await;
    assert_eq!(preferred["merged"]["shared"], "a-again");
    assert_eq!(
        app.get("/v1/agents/b/context").await.1["values"]["shared"],
        "a-again"
    );
    // A memory of each sync.
    assert_eq!(
        app.get("/v1/memories?tag=sync").await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Bad requests.
    for body in [
        json!({"agents": ["a"]}),
        json!({"agents": ["a", "a"]}),
        json!({"agents": ["a", "b"], "strategy": "prefer_agent"}),
        json!({"agents": ["a", "b"], "strategy": "prefer_agent", "prefer_agent": "z"}),
        json!({"agents": ["a", "b"], "prefer_agent": "a"}),
        json!({"agents": ["a", "b"], "strategy": "coin_flip"}),
    ] {
        assert_eq!(app.post("/v1/syncs", body.clone()).await.0, 422, "{body}");
    }
    app.stop().await;
});
