//! Handoffs: the state machine (every allowed and refused move), the context digest, expiry, the
//! hop budget, what initiation records, and who may move an offer.

use ltmc::common::now_ms;
use reqwest::Method;
use serde_json::{Value, json};

use crate::both_brokers;
use crate::harness::{Options, TestApp};

async fn initiate(app: &TestApp, body: Value) -> Value {
    let ends = [&body["from_agent"], &body["to_agent"]].map(|a| a.as_str().unwrap());
    app.ensure_registered(&ends).await;
    let (status, handoff) = app.post("/v1/handoffs", body).await;
    assert_eq!(status, 201, "{handoff}");
    handoff
}

fn offer(from: &str, to: &str) -> Value {
    json!({"from_agent": from, "to_agent": to, "context": {"task": "fix login", "files": ["a.rs"], "depth": {"b": 1, "a": 2}},
           "reason": "specialist needed"})
}

async fn act(app: &TestApp, id: &str, action: &str, body: Value) -> (u16, Value) {
    app.post(&format!("/v1/handoffs/{id}/{action}"), body).await
}

both_brokers!(
    initiation_records_memory_edge_and_offer,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let mut coder = app.ws("/v1/agents/coder/stream", &[]).await.unwrap();
        let handoff = initiate(&app, offer("planner", "coder")).await;
        assert_eq!(handoff["status"], "initiated");
        assert!(handoff["handoff_id"].as_str().unwrap().starts_with("hof_"));
        // The digest is the SHA-256 of the canonical JSON (sorted keys, no spaces).
        let canonical = r#"{"depth":{"a":2,"b":1},"files":["a.rs"],"task":"fix login"}"#;
        assert_eq!(
            handoff["context_digest"],
            ltmc::common::hex(&sha2_digest(canonical))
        );

        // The addressee's queue holds the offer, and its stream hears of it.
        let mut types = Vec::new();
        for _ in 0..2 {
            types.push(coder.frame().await["type"].as_str().unwrap().to_owned());
        }
        types.sort();
        assert_eq!(types, ["handoff.offered", "new_message"]);
        let queued = app.claim("coder", json!({})).await;
        assert_eq!(queued[0]["message_type"], "handoff.offered");
        assert_eq!(queued[0]["content"]["handoff_id"], handoff["handoff_id"]);
        // A memory and the graph edge.
        let (_, memory) = app
            .get(&format!(
                "/v1/memories/{}",
                handoff["memory_ref"].as_str().unwrap()
            ))
            .await;
        assert_eq!(memory["metadata"]["handoff_id"], handoff["handoff_id"]);
        let (_, edges) = app
            .get("/v1/graph/edges?node=agent:planner&relationship=hands_off_to")
            .await;
        assert_eq!(edges["items"][0]["target"], "agent:coder");
        assert_eq!(
            edges["items"][0]["properties"]["handoff_id"],
            handoff["handoff_id"]
        );
        // Listing by agent and status.
        let (_, listed) = app.get("/v1/handoffs?agent=coder&status=initiated").await;
        assert_eq!(listed["items"][0]["handoff_id"], handoff["handoff_id"]);
        assert!(
            app.get("/v1/handoffs?status=accepted").await.1["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        app.stop().await;
    }
);

fn sha2_digest(text: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).to_vec()
}

both_brokers!(every_move_of_the_state_machine, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut planner = app.ws("/v1/agents/planner/stream", &[]).await.unwrap();
    // initiated → accepted → completed, with the digest proven.
    let h = initiate(&app, offer("planner", "coder")).await;
    let id = h["handoff_id"].as_str().unwrap();
    assert_eq!(
        act(&app, id, "complete", json!({})).await.0,
        409,
        "not accepted yet"
    );
    let (status, problem) = act(
        &app,
        id,
        "accept",
        json!({"agent_id": "coder", "context_digest": "00"}),
    )
    .await;
    assert_eq!(status, 409, "digest mismatch: {problem}");
    assert_eq!(
        act(&app, id, "accept", json!({"agent_id": "intruder"}))
            .await
            .0,
        409,
        "wrong owner"
    );
    let (status, accepted) = act(
        &app,
        id,
        "accept",
        json!({"agent_id": "coder", "context_digest": h["context_digest"]}),
    )
    .await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(accepted["status"], "accepted");
    assert_eq!(
        accepted["context"]["task"], "fix login",
        "the context comes with the acceptance"
    );
    assert_eq!(planner.frame().await["type"], "handoff.accepted");
    for (action, body) in [
        ("accept", json!({"agent_id": "coder"})),
        ("reject", json!({"reason": "no"})),
        ("cancel", json!({})),
    ] {
        assert_eq!(
            act(&app, id, action, body).await.0,
            409,
            "{action} after accept"
        );
    }
    let (_, done) = act(&app, id, "complete", json!({"result": {"pr": 42}})).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"]["pr"], 42);
    assert!(done["duration_ms"].as_i64().unwrap() >= 0);
    assert_eq!(planner.frame().await["type"], "handoff.completed");
    for (action, body) in [
        ("complete", json!({})),
        ("accept", json!({"agent_id": "coder"})),
    ] {
        assert_eq!(
            act(&app, id, action, body).await.0,
            409,
            "{action} after complete"
        );
    }

    // accepted → failed.
    let id = initiate(&app, offer("planner", "coder")).await["handoff_id"]
        .as_str()
        .unwrap()
        .to_owned();
    act(&app, &id, "accept", json!({"agent_id": "coder"})).await;
    let (_, failed) = act(
        &app,
        &id,
        "complete",
        json!({"success": false, "result": {"error": "tests red"}}),
    )
    .await;
    assert_eq!(failed["status"], "failed");

    // initiated → rejected, and → cancelled; nothing moves after either.
    let id = initiate(&app, offer("planner", "coder")).await["handoff_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, rejected) = act(&app, &id, "reject", json!({"reason": "busy"})).await;
    assert_eq!(rejected["status"], "rejected");
    assert_eq!(rejected["result"]["reason"], "busy");
    assert_eq!(
        act(&app, &id, "accept", json!({"agent_id": "coder"}))
            .await
            .0,
        409
    );
    let id = initiate(&app, offer("planner", "coder")).await["handoff_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, cancelled) = act(&app, &id, "cancel", json!({})).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        act(&app, &id, "accept", json!({"agent_id": "coder"}))
            .await
            .0,
        409
    );
    assert_eq!(
        act(&app, &id, "reject", json!({"reason": "x"})).await.0,
        409
    );
    assert_eq!(
        act(&app, "hof_nope", "accept", json!({"agent_id": "coder"}))
            .await
            .0,
        404
    );
    app.stop().await;
});

both_brokers!(an_unaccepted_offer_expires, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut body = offer("planner", "coder");
    body["accept_timeout_s"] = json!(1);
    let id = initiate(&app, body).await["handoff_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        ltmc::handoffs::expire_tick(&app.state, now_ms())
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        ltmc::handoffs::expire_tick(&app.state, now_ms() + 1_500)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ltmc::handoffs::expire_tick(&app.state, now_ms() + 1_500)
            .await
            .unwrap(),
        0,
        "once"
    );
    let (_, expired) = app.get(&format!("/v1/handoffs/{id}")).await;
    assert_eq!(expired["status"], "expired");
    assert_eq!(
        act(&app, &id, "accept", json!({"agent_id": "coder"}))
            .await
            .0,
        409
    );
    app.stop().await;
});

both_brokers!(the_hop_budget_stops_ping_pong, |kind| async move {
    let app =
        TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_handoff_hops = 3)).await;
    let pairs = [("a", "b"), ("b", "a"), ("a", "b")];
    for (from, to) in pairs {
        let mut body = offer(from, to);
        body["session_id"] = json!("sess_1_0123456789abcdef");
        initiate(&app, body).await;
    }
    let mut body = offer("b", "a");
    body["session_id"] = json!("sess_1_0123456789abcdef");
    let (status, problem) = app.post("/v1/handoffs", body).await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("a → b → a → b → a"),
        "{problem}"
    );
    // Another session has its own budget.
    let mut body = offer("b", "a");
    body["session_id"] = json!("sess_2_0123456789abcdef");
    initiate(&app, body).await;
    app.stop().await;
});

both_brokers!(only_the_addressee_moves_an_offer, |kind| async move {
    let app = TestApp::spawn_with(
        Options::new(kind).configure(|c| c.admin_token = Some("admin-token-0123456789".into())),
    )
    .await;
    let mut tokens = std::collections::HashMap::new();
    for agent in ["planner", "coder", "intruder"] {
        let (_, registered) = app
            .post("/v1/agents", json!({"agent_id": agent, "capabilities": []}))
            .await;
        tokens.insert(agent, registered["token"].as_str().unwrap().to_owned());
    }
    let app = &app;
    let as_agent = |agent: &str, path: String, body: Value| {
        let token = tokens[agent].clone();
        async move {
            app.request_as(Method::POST, &path, Some(body), Some(&token))
                .await
        }
    };
    // Only the initiator may initiate in its name.
    assert_eq!(
        as_agent("intruder", "/v1/handoffs".into(), offer("planner", "coder"))
            .await
            .0,
        403
    );
    let (status, h) = as_agent("planner", "/v1/handoffs".into(), offer("planner", "coder")).await;
    assert_eq!(status, 201);
    let id = h["handoff_id"].as_str().unwrap();
    let accept = json!({"agent_id": "coder"});
    assert_eq!(
        as_agent(
            "intruder",
            format!("/v1/handoffs/{id}/accept"),
            accept.clone()
        )
        .await
        .0,
        403
    );
    assert_eq!(
        as_agent(
            "planner",
            format!("/v1/handoffs/{id}/accept"),
            accept.clone()
        )
        .await
        .0,
        403
    );
    assert_eq!(
        as_agent("coder", format!("/v1/handoffs/{id}/cancel"), json!({}))
            .await
            .0,
        403
    );
    assert_eq!(
        app.get(&format!("/v1/handoffs/{id}")).await.1["status"],
        "initiated",
        "nothing changed"
    );
    let (status, accepted) = as_agent("coder", format!("/v1/handoffs/{id}/accept"), accept).await;
    assert_eq!(status, 200, "{accepted}");
    // An outsider cannot read it; the parties can.
    let (status, _) = app
        .request_as(
            Method::GET,
            &format!("/v1/handoffs/{id}"),
            None,
            Some(&tokens["intruder"]),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .request_as(
            Method::GET,
            &format!("/v1/handoffs/{id}"),
            None,
            Some(&tokens["planner"]),
        )
        .await;
    assert_eq!(status, 200);
});
