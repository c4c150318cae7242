//! Bounded input: every JSON value the service stores or forwards nests at most 64 levels, ids,
//! names, types, tags and the search query hold no control characters (each a 422 naming the
//! field, nothing stored), and the full-text search answers any text without failing.

use serde_json::{Value, json};

use crate::both_brokers;
use crate::harness::TestApp;
use crate::inputs::{Answer, call, problem, raw_json};

/// `n` nested arrays around `1`: `[[1]]` is depth 2.
fn nested(n: usize) -> String {
    format!("{}1{}", "[".repeat(n), "]".repeat(n))
}

/// Asserts a 422 whose only error names `field`.
#[track_caller]
fn refused(answer: &Answer, field: &str, what: &str) {
    let body = problem(answer, 422);
    assert_eq!(body["errors"][0]["field"], field, "{what}: {body}");
    assert_eq!(
        body["errors"].as_array().unwrap().len(),
        1,
        "{what}: {body}"
    );
}

both_brokers!(
    every_stored_json_nests_at_most_64_levels,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        for agent in ["a", "b"] {
            app.register(agent, &["c"]).await;
        }
        // Each request with `{}` where a JSON value goes: the value is nested inside an object
        // key so the field itself (an object) is one level deeper than the arrays.
        let cases: &[(&str, &str, &str)] = &[
            (
                "/v1/agents/b/messages",
                r#"{"from":"a","message_type":"t","content":{}}"#,
                "content",
            ),
            (
                "/v1/handoffs",
                r#"{"from_agent":"a","to_agent":"b","context":{}}"#,
                "context",
            ),
            (
                "/v1/sessions",
                r#"{"session_type":"t","context":{}}"#,
                "context",
            ),
            (
                "/v1/checkpoints",
                r#"{"coordination_id":"c1","status":"s","state":{}}"#,
                "state",
            ),
            (
                "/v1/coordinations",
                r#"{"agents":["a"],"topic":"t","payload":{}}"#,
                "payload",
            ),
            (
                "/v1/workflows",
                r#"{"name":"w","pattern":"parallel","steps":[{"step_id":"s","agent":"a","input":{}}]}"#,
                "steps[0].input",
            ),
            (
                "/v1/workflows",
                r#"{"name":"w","pattern":"parallel","steps":[{"step_id":"s","agent":"a"}],"metadata":{}}"#,
                "metadata",
            ),
            ("/v1/events", r#"{"name":"e","payload":{}}"#, "payload"),
            (
                "/v1/memories",
                r#"{"content":"m","metadata":{}}"#,
                "metadata",
            ),
            (
                "/v1/graph/edges",
                r#"{"source":"x","target":"y","relationship":"r","properties":{}}"#,
                "properties",
            ),
            (
                "/v1/patterns",
                r#"{"pattern_type":"p","context":"c","solution":"s","metadata":{}}"#,
                "metadata",
            ),
            (
                "/v1/agents",
                r#"{"agent_id":"c","capabilities":[],"metadata":{}}"#,
                "metadata",
            ),
        ];
        for (path, template, field) in cases {
            // 63 arrays inside the object: 64 levels, accepted.
            let fits = template.replace("{}", &format!(r#"{{"k":{}}}"#, nested(63)));
            let answer = raw_json(&app, path, fits).await;
            assert!(
                (200..300).contains(&answer.status),
                "{path} at 64 levels: {} {}",
                answer.status,
                answer.body
            );
            // One more, and far more (past serde_json's own limit of 128, and 100 000 deep).
            for depth in [64, 200, 100_000] {
                let deep = template.replace("{}", &format!(r#"{{"k":{}}}"#, nested(depth)));
                let answer = raw_json(&app, path, deep).await;
                refused(&answer, field, &format!("{path} at {} levels", depth + 1));
                let detail = answer.body["detail"].as_str().unwrap();
                assert!(detail.contains("64 levels"), "{detail}");
            }
        }
        // Bodies whose value sits under an id in the path.
        let (_, handoff) = app
            .post(
                "/v1/handoffs",
                json!({"from_agent": "a", "to_agent": "b", "context": {}}),
            )
            .await;
        let id = handoff["handoff_id"].as_str().unwrap();
        assert_eq!(
            app.post(
                &format!("/v1/handoffs/{id}/accept"),
                json!({"agent_id": "b"})
            )
            .await
            .0,
            200
        );
        let deep_result = format!(r#"{{"result":{}}}"#, nested(65));
        let answer = raw_json(&app, &format!("/v1/handoffs/{id}/complete"), deep_result).await;
        refused(&answer, "result", "handoff result");
        let (_, round) = app
            .post("/v1/coordinations", json!({"agents": ["a"], "topic": "t"}))
            .await;
        let round = round["coordination_id"].as_str().unwrap();
        let answer = raw_json(
            &app,
            &format!("/v1/coordinations/{round}/responses"),
            format!(
                r#"{{"agent_id":"a","success":true,"result":{{"k":{}}}}}"#,
                nested(64)
            ),
        )
        .await;
        refused(&answer, "result", "coordination result");
        let (_, session) = app.post("/v1/sessions", json!({"session_type": "t"})).await;
        let session = session["session_id"].as_str().unwrap();
        let answer = raw_json(
            &app,
            &format!("/v1/sessions/{session}/activities"),
            format!(
                r#"{{"activity_type":"t","details":{{"k":{}}}}}"#,
                nested(64)
            ),
        )
        .await;
        refused(&answer, "details", "activity details");
        let answer = call(
            app.client
                .put(app.url("/v1/agents/a/context"))
                .header("content-type", "application/json")
                .body(format!(r#"{{"values":{{"k":{}}}}}"#, nested(64))),
        )
        .await;
        refused(&answer, "values", "context values");
        let (_, run) = app
            .post(
                "/v1/workflows",
                json!({"name": "w", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "b"}]}),
            )
            .await;
        let run = run["workflow_id"].as_str().unwrap();
        let answer = raw_json(
            &app,
            &format!("/v1/workflows/{run}/steps/s/result"),
            format!(
                r#"{{"agent_id":"b","attempt":1,"success":true,"output":{}}}"#,
                nested(65)
            ),
        )
        .await;
        refused(&answer, "output", "step output");
        let answer = call(
            app.client
                .patch(app.url("/v1/memories/mem_x"))
                .header("content-type", "application/json")
                .body(format!(r#"{{"metadata":{{"k":{}}}}}"#, nested(64))),
        )
        .await;
        refused(&answer, "metadata", "memory patch");

        // Nothing too deep was stored: b's queue holds only what fitted (and the offer), and a
        // claim parses.
        let claimed = app.claim("b", json!({"limit": 100})).await;
        assert!(claimed.iter().all(|m| m["message_type"] != "t" || {
            let mut depth = 0;
            let mut v = &m["content"]["k"];
            while let Value::Array(items) = v {
                depth += 1;
                v = &items[0];
            }
            depth == 63
        }));
        app.stop().await;
    }
);

both_brokers!(control_characters_in_names_are_422, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("a", &[]).await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/v1/agents",
            json!({"agent_id": "a\u{0}", "capabilities": []}),
            "agent_id",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "z", "capabilities": ["ok", "bad\u{1b}[31m"]}),
            "capabilities[1]",
        ),
        (
            "/v1/agents/a/messages",
            json!({"from": "a", "message_type": "t\n", "content": 1}),
            "message_type",
        ),
        (
            "/v1/agents/a/messages",
            json!({"from": "a", "message_type": "t", "content": 1, "correlation_id": "c\u{7f}"}),
            "correlation_id",
        ),
        (
            "/v1/sessions",
            json!({"session_type": "t\u{0}"}),
            "session_type",
        ),
        (
            "/v1/checkpoints",
            json!({"coordination_id": "c\u{0}", "status": "s", "state": {}}),
            "coordination_id",
        ),
        (
            "/v1/coordinations",
            json!({"agents": ["a"], "topic": "t\u{8}"}),
            "topic",
        ),
        (
            "/v1/memories",
            json!({"content": "m", "tags": ["x", "y\u{0}"]}),
            "tags[1]",
        ),
        (
            "/v1/graph/edges",
            json!({"source": "x\r", "target": "y", "relationship": "r"}),
            "source",
        ),
        (
            "/v1/patterns",
            json!({"pattern_type": "p\u{9b}", "context": "c", "solution": "s"}),
            "pattern_type",
        ),
        (
            "/v1/workflows",
            json!({"name": "w\u{0}", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "a"}]}),
            "name",
        ),
        (
            "/v1/workflows",
            json!({"name": "w", "pattern": "parallel", "steps": [{"step_id": "s", "capability": "c\u{0}"}]}),
            "steps[0].capability",
        ),
        ("/v1/events", json!({"name": "e\u{0}"}), "name"),
    ];
    for (path, body, field) in &cases {
        let answer = call(app.client.post(app.url(path)).json(body)).await;
        refused(&answer, field, path);
    }
    // Free text and JSON content may hold them.
    let (status, _) = app
        .post(
            "/v1/agents/a/messages",
            json!({"from": "a", "message_type": "t", "content": {"text": "line\nnext\u{0}"}}),
        )
        .await;
    assert_eq!(status, 202);
    let (status, _) = app
        .post(
            "/v1/memories",
            json!({"content": "line one\nline two\ttab"}),
        )
        .await;
    assert_eq!(status, 201);
    // Filters too.
    for (path, field) in [
        ("/v1/memories?q=%00", "q"),
        ("/v1/memories?q=ok%0Aok", "q"),
        ("/v1/memories?tag=%1B", "tag"),
        ("/v1/agents?capability=%00", "capability"),
        ("/v1/sessions?session_type=%07", "session_type"),
        ("/v1/graph/edges?node=%00", "node"),
        ("/v1/graph/edges?relationship=%7F", "relationship"),
        ("/v1/patterns?pattern_type=%00", "pattern_type"),
    ] {
        let answer = call(app.client.get(app.url(path))).await;
        refused(&answer, field, path);
    }
    // Nothing refused was stored: one agent, one memory, no session, edge or pattern.
    assert_eq!(app.count("/v1/agents").await, 1);
    assert_eq!(app.count("/v1/sessions").await, 0);
    assert_eq!(app.count("/v1/patterns").await, 0);
    assert_eq!(app.count("/v1/checkpoints?coordination_id=c").await, 0);
    app.stop().await;
});

both_brokers!(full_text_search_answers_any_text, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let text = r#"the planner hands off to the coder: NEAR AND OR NOT "quoted" c++ naïve café -x ^y a:b (paren) 数据库"#;
    let (status, memory) = app.post("/v1/memories", json!({"content": text})).await;
    assert_eq!(status, 201, "{memory}");
    let (status, _) = app
        .post(
            "/v1/memories",
            json!({"content": "something else entirely"}),
        )
        .await;
    assert_eq!(status, 201);
    // Every word must appear, each taken literally: operators are words, punctuation is ignored.
    let finds = [
        "planner coder",
        "coder planner",
        "NEAR",
        "AND",
        "OR",
        "NOT",
        "\"quoted\"",
        "quoted\"",
        "c++",
        "naïve",
        "café",
        "-x",
        "^y",
        "a:b",
        "(paren)",
        "planner*",
        "数据库",
        "planner AND coder",
    ];
    for q in finds {
        let (status, page) = app.get(&format!("/v1/memories?q={}", urlencode(q))).await;
        assert_eq!(status, 200, "q={q:?}: {page}");
        let ids: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["memory_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [memory["memory_id"].as_str().unwrap()], "q={q:?}");
    }
    // Hostile or odd text that matches nothing answers a page, never an error.
    let misses = [
        "*",
        "\"\"",
        "\"\"\"",
        "(",
        ")",
        "-",
        "^",
        ":",
        "NEAR(",
        "content:planner",
        "\"",
        "NEAR(planner coder)",
        "planner OR nothing-here",
        "\u{200b}",
        "😀",
        "planner NOT coder-missing",
        &"\" ".repeat(300),
        &"a ".repeat(500),
    ];
    for q in misses {
        let (status, page) = app.get(&format!("/v1/memories?q={}", urlencode(q))).await;
        assert_eq!(status, 200, "q={q:?}: {page}");
    }
    // A query with no word at all, or too long, is a 422 naming `q`.
    for q in ["", "   ", &"x".repeat(1025)] {
        let answer = call(
            app.client
                .get(app.url(&format!("/v1/memories?q={}", urlencode(q)))),
        )
        .await;
        refused(&answer, "q", q);
    }
    app.stop().await;
});

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
