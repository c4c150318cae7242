//! Memories (full-text search, tags, PATCH), graph edges and pattern stats.

use reqwest::Method;
use serde_json::json;

use crate::both_brokers;
use crate::harness::{Options, TestApp};

both_brokers!(
    memories_are_found_by_word_and_tag_and_patched,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let mut firehose = app
            .ws("/v1/events/stream?topics=memory", &[])
            .await
            .unwrap();
        let (status, deploy) = app
            .post(
                "/v1/memories",
                json!({"content": "Deployed the billing service after the schema migration",
                   "tags": ["deploy", "billing"], "metadata": {"env": "prod", "owner": "ops"}}),
            )
            .await;
        assert_eq!(status, 201, "{deploy}");
        assert!(deploy["memory_id"].as_str().unwrap().starts_with("mem_"));
        let (_, rollback) = app
            .post(
                "/v1/memories",
                json!({"content": "Rolled back the search index", "tags": ["rollback"]}),
            )
            .await;
        let frame = firehose.frame().await;
        assert_eq!(frame["type"], "memory.stored");
        assert_eq!(frame["data"]["memory_id"], deploy["memory_id"]);

        // Full-text: a word of the content, any order of words, never a syntax error.
        let (_, found) = app.get("/v1/memories?q=migration").await;
        assert_eq!(found["items"].as_array().unwrap().len(), 1);
        assert_eq!(found["items"][0]["memory_id"], deploy["memory_id"]);
        let (_, both) = app.get("/v1/memories?q=service%20billing").await;
        assert_eq!(both["items"].as_array().unwrap().len(), 1);
        let (status, none) = app.get("/v1/memories?q=%22unbalanced%20AND%20(").await;
        assert_eq!(status, 200, "{none}");
        assert!(none["items"].as_array().unwrap().is_empty());
        assert_eq!(app.get("/v1/memories?q=%20").await.0, 422);
        // Tags, and newest first.
        let (_, tagged) = app.get("/v1/memories?tag=rollback").await;
        assert_eq!(tagged["items"][0]["memory_id"], rollback["memory_id"]);
        let (_, all) = app.get("/v1/memories?limit=1").await;
        assert_eq!(all["items"][0]["memory_id"], rollback["memory_id"]);
        let (_, rest) = app
            .get(&format!(
                "/v1/memories?limit=1&cursor={}",
                all["next_cursor"].as_str().unwrap()
            ))
            .await;
        assert_eq!(rest["items"][0]["memory_id"], deploy["memory_id"]);
        assert!(rest["next_cursor"].is_null());

        // PATCH: content and tags replaced, metadata merged (null removes), search follows the content.
        let path = format!("/v1/memories/{}", deploy["memory_id"].as_str().unwrap());
        let (status, patched) = app
            .request(
                Method::PATCH,
                &path,
                Some(json!({"content": "Deployed billing v2", "tags": ["deploy"],
                        "metadata": {"owner": null, "version": 2}})),
            )
            .await;
        assert_eq!(status, 200, "{patched}");
        assert_eq!(patched["metadata"], json!({"env": "prod", "version": 2}));
        assert_eq!(patched["tags"], json!(["deploy"]));
        assert!(
            app.get("/v1/memories?q=migration").await.1["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            app.get("/v1/memories?q=v2").await.1["items"][0]["memory_id"],
            deploy["memory_id"]
        );
        assert!(
            app.get("/v1/memories?tag=billing").await.1["items"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(app.get(&path).await.1["content"], "Deployed billing v2");
        assert_eq!(
            app.request(Method::PATCH, "/v1/memories/mem_nope", Some(json!({})))
                .await
                .0,
            404
        );
        app.stop().await;
    }
);

both_brokers!(graph_edges_by_node_and_relationship, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for (source, target, relationship) in [
        ("agent:planner", "agent:coder", "hands_off_to"),
        ("agent:coder", "agent:reviewer", "hands_off_to"),
        ("step:build", "step:test", "precedes"),
    ] {
        let (status, edge) = app
            .post(
                "/v1/graph/edges",
                json!({"source": source, "target": target, "relationship": relationship,
                       "properties": {"weight": 1}}),
            )
            .await;
        assert_eq!(status, 201, "{edge}");
    }
    let (_, coder) = app.get("/v1/graph/edges?node=agent:coder").await;
    assert_eq!(
        coder["items"].as_array().unwrap().len(),
        2,
        "as source and as target"
    );
    let (_, handoffs) = app.get("/v1/graph/edges?relationship=hands_off_to").await;
    assert_eq!(handoffs["items"].as_array().unwrap().len(), 2);
    let (_, precedes) = app
        .get("/v1/graph/edges?node=step:build&relationship=precedes")
        .await;
    assert_eq!(precedes["items"][0]["target"], "step:test");
    assert_eq!(precedes["items"][0]["properties"]["weight"], 1);
    assert_eq!(
        app.post(
            "/v1/graph/edges",
            json!({"source": "", "target": "b", "relationship": "r"})
        )
        .await
        .0,
        422
    );
    app.stop().await;
});

both_brokers!(pattern_stats_count_uses_and_outcomes, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let outcomes = [
        ("parallel", Some(true)),
        ("parallel", Some(true)),
        ("parallel", Some(false)),
        ("sequential", Some(true)),
        ("handoff", None),
    ];
    for (pattern_type, success) in outcomes {
        let (status, pattern) = app
            .post(
                "/v1/patterns",
                json!({"pattern_type": pattern_type, "context": "ship it", "solution": "fan out",
                       "success": success}),
            )
            .await;
        assert_eq!(status, 201, "{pattern}");
    }
    let (_, stats) = app.get("/v1/patterns/stats").await;
    let by_type = |t: &str| {
        stats["types"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["pattern_type"] == t)
            .unwrap()
            .clone()
    };
    let parallel = by_type("parallel");
    assert_eq!(parallel["uses"], 3);
    assert_eq!(parallel["successes"], 2);
    assert_eq!(parallel["failures"], 1);
    assert!((parallel["success_rate"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(by_type("sequential")["success_rate"], 1.0);
    assert!(
        by_type("handoff")["success_rate"].is_null(),
        "no outcome recorded"
    );
    let (_, listed) = app.get("/v1/patterns?pattern_type=parallel").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    app.stop().await;
});

both_brokers!(
    memory_writes_need_the_admin_and_reads_a_reader,
    |kind| async move {
        let app = TestApp::spawn_with(Options::new(kind).configure(|c| {
            c.admin_token = Some("admin-token-0123456789".into());
            c.read_token = Some("read-token-0123456789".into());
        }))
        .await;
        let (_, agent) = app
            .post("/v1/agents", json!({"agent_id": "a1", "capabilities": []}))
            .await;
        let agent_token = agent["token"].as_str().unwrap().to_owned();
        let body = json!({"content": "x"});
        for token in ["read-token-0123456789", agent_token.as_str()] {
            let (status, _) = app
                .request_as(
                    Method::POST,
                    "/v1/memories",
                    Some(body.clone()),
                    Some(token),
                )
                .await;
            assert_eq!(status, 403);
        }
        assert_eq!(
            app.request_as(Method::GET, "/v1/memories", None, Some(&agent_token))
                .await
                .0,
            403
        );
        assert_eq!(app.post("/v1/memories", body).await.0, 201);
        let (status, page) = app
            .request_as(
                Method::GET,
                "/v1/memories",
                None,
                Some("read-token-0123456789"),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            page["items"].as_array().unwrap().len(),
            1,
            "the refused writes changed nothing"
        );
        app.stop().await;
    }
);
