//! Bad input: each class gets its own clear 4xx problem document (never a 500) and changes
//! nothing; the command line refuses bad settings with one line and exit code 2.

use std::process::Stdio;
use std::time::Duration;

use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use crate::both_brokers;
use crate::harness::{Options, TestApp};

/// Status, headers and the JSON body (Null when empty or not JSON) of one answer.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends a request and collects the answer.
pub(crate) async fn call(request: RequestBuilder) -> Answer {
    let response = request.send().await.expect("request is sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// Asserts the answer is a problem document with `status` and returns it: the content type,
/// `type`, `title`, `status`, `detail`, and for 422 a non-empty `errors` of `{field, message}`.
#[track_caller]
pub(crate) fn problem(answer: &Answer, status: u16) -> &Value {
    let body = &answer.body;
    assert_eq!(answer.status, status, "{body}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{body}"
    );
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:ltmc:problem:")),
        "{body}"
    );
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    if status == 422 {
        let errors = body["errors"].as_array().expect("422 lists its errors");
        assert!(!errors.is_empty(), "{body}");
        for error in errors {
            assert!(
                error["field"].as_str().is_some_and(|f| !f.is_empty()),
                "{body}"
            );
            assert!(
                error["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        }
    }
    body
}

/// The `field` of the first validation error.
#[track_caller]
fn field(answer: &Answer) -> &str {
    problem(answer, 422)["errors"][0]["field"].as_str().unwrap()
}

/// A request with the app's token.
fn request(app: &TestApp, method: Method, path: &str) -> RequestBuilder {
    let request = app.client.request(method, app.url(path));
    match &app.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// A request with a JSON content type and these exact body bytes.
pub async fn raw_json(app: &TestApp, path: &str, body: impl Into<reqwest::Body>) -> Answer {
    call(
        request(app, Method::POST, path)
            .header("content-type", "application/json")
            .body(body),
    )
    .await
}

async fn post(app: &TestApp, path: &str, body: Value) -> Answer {
    call(request(app, Method::POST, path).json(&body)).await
}

async fn get(app: &TestApp, path: &str) -> Answer {
    call(request(app, Method::GET, path)).await
}

/// The number of messages in `agent`'s queue in `state`.
async fn count(app: &TestApp, agent: &str, state: &str) -> usize {
    let (status, page) = app
        .get(&format!(
            "/v1/agents/{agent}/messages?state={state}&limit=500"
        ))
        .await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().len()
}

async fn registry_size(app: &TestApp) -> usize {
    let (status, page) = app.get("/v1/agents?limit=500").await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().len()
}

both_brokers!(malformed_json_is_400, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for body in [
        &b"{\"agent_id\": \"a\","[..],
        b"{agent_id: 'a'}",
        b"not json",
        b"{\"agent_id\":\"a\",\"capabilities\":[]} trailing",
        b"\xff\xfe",
    ] {
        let answer = raw_json(&app, "/v1/agents", body).await;
        let problem = problem(&answer, 400);
        assert_eq!(problem["type"], "urn:ltmc:problem:bad-request");
    }
    for path in ["/v1/agents/w/messages", "/v1/agents/w/messages/claim"] {
        problem(&raw_json(&app, path, "{").await, 400);
    }
    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(count(&app, "w", "queued").await, 0);
    app.stop().await;
});

both_brokers!(a_body_without_json_content_type_is_415, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.send("w", "b", json!(1), 0).await;
    let register = r#"{"agent_id":"a","capabilities":[]}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        for (path, body) in [
            ("/v1/agents", register),
            (
                "/v1/agents/w/messages",
                r#"{"from":"b","message_type":"t","content":1}"#,
            ),
            ("/v1/agents/w/messages/claim", r#"{"limit":1}"#),
        ] {
            let mut request = request(&app, Method::POST, path).body(body);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let answer = call(request).await;
            let problem = problem(&answer, 415);
            assert_eq!(problem["type"], "urn:ltmc:problem:unsupported-media-type");
        }
    }
    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(count(&app, "w", "queued").await, 1);
    assert_eq!(count(&app, "w", "claimed").await, 0);
    app.stop().await;
});

both_brokers!(unknown_field_is_422_naming_it, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let answer = post(
        &app,
        "/v1/agents",
        json!({"agent_id": "a", "capabilities": [], "capabilites": ["typo"]}),
    )
    .await;
    assert_eq!(field(&answer), "capabilites", "{}", answer.body);
    assert!(
        answer.body["detail"]
            .as_str()
            .unwrap()
            .contains("capabilites")
    );

    let send = json!({"from": "b", "message_type": "t", "content": 1, "priorty": 9});
    assert_eq!(
        field(&post(&app, "/v1/agents/w/messages", send).await),
        "priorty"
    );
    let claim = json!({"limit": 1, "visibility": 5});
    assert_eq!(
        field(&post(&app, "/v1/agents/w/messages/claim", claim).await),
        "visibility"
    );
    let beat = json!({"status": "busy", "ttl_s": 5});
    assert_eq!(
        field(&post(&app, "/v1/agents/a/heartbeat", beat).await),
        "ttl_s"
    );
    // Query parameters too.
    assert_eq!(field(&get(&app, "/v1/agents?colour=blue").await), "query");
    assert_eq!(
        field(&get(&app, "/v1/agents/w/messages?sate=dead").await),
        "query"
    );

    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(count(&app, "w", "queued").await, 0);
    app.stop().await;
});

both_brokers!(wrong_type_is_422_naming_the_field, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("a", &[]).await;
    for (path, body, name) in [
        (
            "/v1/agents",
            json!({"agent_id": 5, "capabilities": []}),
            "agent_id",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "b", "capabilities": "code"}),
            "capabilities",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "b", "capabilities": [1]}),
            "capabilities[0]",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "b", "capabilities": [], "ttl_s": -1}),
            "ttl_s",
        ),
        (
            "/v1/agents",
            json!({"agent_id": "b", "capabilities": [], "metadata": []}),
            "metadata",
        ),
        (
            "/v1/agents/w/messages",
            json!({"from": "b", "message_type": "t", "content": 1, "priority": "high"}),
            "priority",
        ),
        (
            "/v1/agents/w/messages",
            json!({"from": "b", "message_type": "t", "content": 1, "priority": 300}),
            "priority",
        ),
        (
            "/v1/agents/w/messages",
            json!({"from": ["b"], "message_type": "t", "content": 1}),
            "from",
        ),
        (
            "/v1/agents/w/messages/claim",
            json!({"limit": "10"}),
            "limit",
        ),
        (
            "/v1/agents/w/messages/claim",
            json!({"limit": 1.5}),
            "limit",
        ),
        (
            "/v1/agents/w/messages/claim",
            json!({"auto_ack": "yes"}),
            "auto_ack",
        ),
        (
            "/v1/agents/a/heartbeat",
            json!({"status": "sleeping"}),
            "status",
        ),
        (
            "/v1/agents/a/heartbeat",
            json!({"status": "offline"}),
            "status",
        ),
    ] {
        let answer = post(&app, path, body.clone()).await;
        assert_eq!(field(&answer), name, "{body}: {}", answer.body);
    }
    // Not an object at all.
    for body in [json!([]), json!("x"), json!(1), json!(null)] {
        problem(&post(&app, "/v1/agents", body).await, 422);
    }
    assert_eq!(registry_size(&app).await, 1);
    assert_eq!(count(&app, "w", "queued").await, 0);
    assert_eq!(app.get("/v1/agents/a").await.1["status"], "available");
    app.stop().await;
});

both_brokers!(missing_required_field_is_422_naming_it, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.send("w", "b", json!(1), 0).await;
    let claimed = app.claim("w", json!({"visibility_timeout_s": 600})).await;
    let ack = format!(
        "/v1/agents/w/messages/{}/ack",
        claimed[0]["message_id"].as_str().unwrap()
    );
    let extend = format!(
        "/v1/agents/w/messages/{}/extend",
        claimed[0]["message_id"].as_str().unwrap()
    );
    for (path, body, name) in [
        ("/v1/agents", json!({"capabilities": []}), "agent_id"),
        ("/v1/agents", json!({"agent_id": "a"}), "capabilities"),
        (
            "/v1/agents/w/messages",
            json!({"message_type": "t", "content": 1}),
            "from",
        ),
        (
            "/v1/agents/w/messages",
            json!({"from": "b", "content": 1}),
            "message_type",
        ),
        (
            "/v1/agents/w/messages",
            json!({"from": "b", "message_type": "t"}),
            "content",
        ),
        (ack.as_str(), json!({}), "lease_id"),
        (
            extend.as_str(),
            json!({"lease_id": claimed[0]["lease_id"]}),
            "visibility_timeout_s",
        ),
    ] {
        let answer = post(&app, path, body.clone()).await;
        assert_eq!(field(&answer), name, "{body}: {}", answer.body);
    }
    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(
        count(&app, "w", "claimed").await,
        1,
        "still claimed, not acked"
    );
    assert_eq!(count(&app, "w", "queued").await, 0);
    app.stop().await;
});

both_brokers!(a_body_over_the_limit_is_413, |kind| async move {
    let app =
        TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_body_bytes = 4096)).await;
    let big = "x".repeat(5 << 10);
    let register = json!({"agent_id": "a", "capabilities": [], "metadata": {"blob": big}});
    let problem_body = problem(&post(&app, "/v1/agents", register).await, 413).clone();
    assert_eq!(problem_body["type"], "urn:ltmc:problem:payload-too-large");
    let send = json!({"from": "b", "message_type": "t", "content": big});
    problem(&post(&app, "/v1/agents/w/messages", send).await, 413);
    problem(
        &post(
            &app,
            "/v1/agents/w/messages/claim",
            json!({"limit": 1, "pad": big}),
        )
        .await,
        413,
    );
    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(count(&app, "w", "queued").await, 0);
    // Under the limit is fine.
    let small = "x".repeat(3 << 10);
    let register = json!({"agent_id": "a", "capabilities": [], "metadata": {"blob": small}});
    assert_eq!(post(&app, "/v1/agents", register).await.status, 201);
    app.stop().await;
});

both_brokers!(
    content_over_the_limit_is_413_and_not_enqueued,
    |kind| async move {
        let app = TestApp::spawn_with(
            Options::new(kind).configure(|c| c.limits.max_content_bytes = 1024),
        )
        .await;
        // The limit is on the serialized content: a string of n characters is n + 2 bytes.
        let over = json!({"from": "b", "message_type": "t", "content": "x".repeat(1023)});
        let answer = post(&app, "/v1/agents/w/messages", over).await;
        let problem = problem(&answer, 413);
        assert_eq!(problem["type"], "urn:ltmc:problem:payload-too-large");
        assert!(
            problem["detail"].as_str().unwrap().contains("content"),
            "{problem}"
        );
        let nested =
            json!({"from": "b", "message_type": "t", "content": {"list": vec!["abcdefgh"; 100]}});
        assert_eq!(
            post(&app, "/v1/agents/w/messages", nested).await.status,
            413
        );
        assert_eq!(count(&app, "w", "queued").await, 0, "nothing enqueued");

        let at_limit = json!({"from": "b", "message_type": "t", "content": "x".repeat(1022)});
        assert_eq!(
            post(&app, "/v1/agents/w/messages", at_limit).await.status,
            202
        );
        assert_eq!(count(&app, "w", "queued").await, 1);
        app.stop().await;
    }
);

both_brokers!(invalid_agent_ids_are_422, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let long = "a".repeat(129);
    // As they appear in a path (percent-encoded) and in a body.
    let bad = [
        ("bad%20id!", "bad id!".to_owned()),
        ("%C3%BC", "ü".to_owned()),
        ("a%2Fb", "a/b".to_owned()),
        (long.as_str(), long.clone()),
    ];
    for (in_path, in_body) in &bad {
        let paths = [
            (Method::GET, format!("/v1/agents/{in_path}")),
            (Method::DELETE, format!("/v1/agents/{in_path}")),
            (Method::POST, format!("/v1/agents/{in_path}/heartbeat")),
            (Method::GET, format!("/v1/agents/{in_path}/messages")),
            (Method::POST, format!("/v1/agents/{in_path}/messages/claim")),
            (
                Method::POST,
                format!("/v1/agents/{in_path}/messages/msg_x/replay"),
            ),
            (
                Method::POST,
                format!("/v1/agents/{in_path}/messages/msg_x/ack"),
            ),
        ];
        for (method, path) in paths {
            let body = if path.ends_with("/ack") {
                json!({"lease_id": "lse_x"})
            } else {
                json!({})
            };
            let answer = call(request(&app, method.clone(), &path).json(&body)).await;
            problem(&answer, 422);
            assert_eq!(field(&answer), "agent_id", "{method} {path}");
        }
        let send = json!({"from": "b", "message_type": "t", "content": 1});
        let answer = post(&app, &format!("/v1/agents/{in_path}/messages"), send).await;
        assert_eq!(field(&answer), "to");

        let answer = post(
            &app,
            "/v1/agents",
            json!({"agent_id": in_body, "capabilities": []}),
        )
        .await;
        assert_eq!(field(&answer), "agent_id", "{in_body}");
        let send = json!({"from": in_body, "message_type": "t", "content": 1});
        assert_eq!(
            field(&post(&app, "/v1/agents/w/messages", send).await),
            "from"
        );
    }
    let empty = post(
        &app,
        "/v1/agents",
        json!({"agent_id": "", "capabilities": []}),
    )
    .await;
    assert_eq!(field(&empty), "agent_id");
    assert_eq!(registry_size(&app).await, 0);
    assert_eq!(count(&app, "w", "queued").await, 0);

    // The edges of the rule are accepted.
    let longest = "a".repeat(128);
    app.register(&longest, &[]).await;
    app.register("A-z.0_9:x", &[]).await;
    assert_eq!(app.get(&format!("/v1/agents/{longest}")).await.0, 200);
    app.stop().await;
});

both_brokers!(
    numeric_ranges_are_422_and_change_nothing,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let send = json!({"from": "b", "message_type": "t", "content": 1, "priority": 10});
        assert_eq!(
            field(&post(&app, "/v1/agents/w/messages", send).await),
            "priority"
        );
        assert_eq!(count(&app, "w", "queued").await, 0);
        app.send("w", "b", json!("one"), 9).await;
        app.send("w", "b", json!("two"), 0).await;

        for (body, name) in [
            (json!({"limit": 0}), "limit"),
            (json!({"limit": 101}), "limit"),
            (json!({"visibility_timeout_s": 0}), "visibility_timeout_s"),
            (
                json!({"visibility_timeout_s": 43_201}),
                "visibility_timeout_s",
            ),
            (json!({"limit": -1}), "limit"),
        ] {
            let answer = post(&app, "/v1/agents/w/messages/claim", body.clone()).await;
            assert_eq!(field(&answer), name, "{body}");
        }
        assert_eq!(
            count(&app, "w", "queued").await,
            2,
            "no bad claim claimed anything"
        );

        // The edges are accepted.
        let got = app
            .claim("w", json!({"limit": 1, "visibility_timeout_s": 43_200}))
            .await;
        assert_eq!(got.len(), 1);
        let id = got[0]["message_id"].as_str().unwrap();
        let lease = got[0]["lease_id"].clone();
        let expires = got[0]["lease_expires_at"].clone();
        let base = format!("/v1/agents/w/messages/{id}");
        for (verb, body, name) in [
            (
                "extend",
                json!({"lease_id": lease, "visibility_timeout_s": 0}),
                "visibility_timeout_s",
            ),
            (
                "extend",
                json!({"lease_id": lease, "visibility_timeout_s": 43_201}),
                "visibility_timeout_s",
            ),
            (
                "nack",
                json!({"lease_id": lease, "delay_s": 43_201}),
                "delay_s",
            ),
        ] {
            let answer = post(&app, &format!("{base}/{verb}"), body.clone()).await;
            assert_eq!(field(&answer), name, "{verb} {body}");
        }
        let (_, claimed) = app.get("/v1/agents/w/messages?state=claimed").await;
        assert_eq!(claimed["items"][0]["lease_id"], lease);
        assert_eq!(claimed["items"][0]["lease_expires_at"], expires);
        assert_eq!(
            app.claim("w", json!({"limit": 100, "visibility_timeout_s": 1}))
                .await
                .len(),
            1
        );

        for body in [
            json!({"agent_id": "a", "capabilities": [], "ttl_s": 0}),
            json!({"agent_id": "a", "capabilities": [], "max_concurrent_tasks": 0}),
            json!({"agent_id": "a", "capabilities": [""]}),
        ] {
            problem(&post(&app, "/v1/agents", body).await, 422);
        }
        assert_eq!(registry_size(&app).await, 0);
        app.stop().await;
    }
);

both_brokers!(list_parameters_are_422, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("a", &["x"]).await;
    app.send("w", "b", json!(1), 0).await;
    for (path, name) in [
        ("/v1/agents?limit=0", "limit"),
        ("/v1/agents?limit=501", "limit"),
        ("/v1/agents?limit=many", "query"),
        ("/v1/agents?limit=-1", "query"),
        ("/v1/agents?status=asleep", "status"),
        ("/v1/agents?cursor=bad%20cursor!", "cursor"),
        ("/v1/agents/w/messages?limit=0", "limit"),
        ("/v1/agents/w/messages?limit=501", "limit"),
        ("/v1/agents/w/messages?limit=99999999999", "query"),
        ("/v1/agents/w/messages?state=acked", "state"),
        ("/v1/agents/w/messages?state=QUEUED", "state"),
        ("/v1/agents/w/messages?state=", "state"),
        ("/v1/agents/w/messages?cursor=garbage", "cursor"),
        ("/v1/agents/w/messages?cursor=1.x", "cursor"),
        ("/v1/agents/w/messages?cursor=", "cursor"),
    ] {
        let answer = get(&app, path).await;
        assert_eq!(field(&answer), name, "{path}: {}", answer.body);
    }
    // The edges are fine.
    for path in [
        "/v1/agents?limit=1",
        "/v1/agents?limit=500",
        "/v1/agents/w/messages?limit=500",
        "/v1/agents/w/messages?state=dead",
    ] {
        assert_eq!(get(&app, path).await.status, 200, "{path}");
    }
    assert_eq!(
        count(&app, "w", "queued").await,
        1,
        "listing claims nothing"
    );
    app.stop().await;
});

both_brokers!(
    bad_stream_parameters_are_422_before_the_upgrade,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        for (path, header) in [
            ("/v1/agents/w/stream?since=abc", None),
            ("/v1/agents/w/stream?since=-1", None),
            ("/v1/agents/w/stream?since=1.5", None),
            ("/v1/agents/w/stream?from=1", None),
            ("/v1/agents/bad%20id/stream", None),
            ("/v1/agents/w/stream", Some(("last-event-id", "yesterday"))),
            ("/v1/events/stream?since=abc", None),
            ("/v1/events/stream?topics=agents,gossip", None),
            ("/v1/events/stream", Some(("last-event-id", "-5"))),
        ] {
            let headers: Vec<(&str, &str)> = header.into_iter().collect();
            match app.ws(path, &headers).await {
                Err(tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), 422, "{path} {header:?}");
                    assert_eq!(
                        response.headers()["content-type"],
                        "application/problem+json"
                    );
                }
                Err(other) => panic!("{path}: expected a 422 answer, got {other}"),
                Ok(_) => panic!("{path} {header:?}: the stream opened"),
            }
        }
        // A plain GET (no upgrade) gets the same 422 for a bad parameter, and a 400 problem
        // document (not plain text) for not being a handshake.
        let answer = get(&app, "/v1/agents/w/stream?since=abc").await;
        assert_eq!(field(&answer), "query");
        for path in ["/v1/agents/w/stream", "/v1/events/stream"] {
            let answer = get(&app, path).await;
            let detail = problem(&answer, 400)["detail"].as_str().unwrap();
            assert!(detail.contains("WebSocket"), "{path}: {detail}");
        }
        app.stop().await;
    }
);

both_brokers!(unknown_route_404_wrong_method_405, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for path in ["/v1/nope", "/nope", "/v1/agents/a/b/c/d/e", "/v2/agents"] {
        let answer = get(&app, path).await;
        assert_eq!(
            problem(&answer, 404)["type"],
            "urn:ltmc:problem:not-found",
            "{path}"
        );
    }
    for (method, path, allowed) in [
        (Method::DELETE, "/v1/agents", "POST"),
        (Method::PUT, "/v1/agents/a", "GET"),
        (Method::GET, "/v1/agents/a/heartbeat", "POST"),
        (Method::GET, "/v1/agents/a/messages/claim", "POST"),
        (Method::DELETE, "/v1/agents/a/messages", "GET"),
        (Method::POST, "/healthz", "GET"),
    ] {
        let answer = call(request(&app, method.clone(), path).json(&json!({}))).await;
        problem(&answer, 405);
        let allow = answer.header("allow").unwrap_or_default();
        assert!(allow.contains(allowed), "{method} {path}: Allow: {allow:?}");
    }
    app.stop().await;
});

both_brokers!(
    action_endpoints_take_no_body_or_an_empty_object,
    |kind| async move {
        let app =
            TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_deliveries = 1))
                .await;
        app.register("w", &[]).await;
        let id = app.send("w", "b", json!(1), 0).await;
        let replay = format!("/v1/agents/w/messages/{id}/replay");
        let kill = || async {
            let got = app.claim("w", json!({"visibility_timeout_s": 1})).await;
            assert_eq!(got.len(), 1);
            let reaped = ltmc::messages::reap_tick(&app.state, ltmc::common::now_ms() + 2_000)
                .await
                .unwrap();
            assert_eq!(reaped.dead_lettered, 1);
        };

        // `{"x":1}` is refused and the dead letter stays dead.
        kill().await;
        assert_eq!(field(&post(&app, &replay, json!({"x": 1})).await), "x");
        assert_eq!(count(&app, "w", "dead").await, 1);
        // No body at all, an empty body with a JSON content type, and `{}`.
        assert_eq!(call(request(&app, Method::POST, &replay)).await.status, 204);
        kill().await;
        let empty = raw_json(&app, &replay, "").await;
        assert_eq!(empty.status, 204, "{}", empty.body);
        kill().await;
        assert_eq!(post(&app, &replay, json!({})).await.status, 204);
        assert_eq!(count(&app, "w", "dead").await, 0);

        // Claim: `{"x":1}` claims nothing; no body and `{}` use the defaults.
        assert_eq!(
            field(&post(&app, "/v1/agents/w/messages/claim", json!({"x": 1})).await),
            "x"
        );
        assert_eq!(count(&app, "w", "queued").await, 1);
        let answer = call(request(&app, Method::POST, "/v1/agents/w/messages/claim")).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.body["messages"].as_array().unwrap().len(), 1);
        let answer = post(&app, "/v1/agents/w/messages/claim", json!({})).await;
        assert_eq!(answer.status, 200);

        // Heartbeat: the same.
        assert_eq!(
            field(&post(&app, "/v1/agents/w/heartbeat", json!({"x": 1})).await),
            "x"
        );
        assert_eq!(
            call(request(&app, Method::POST, "/v1/agents/w/heartbeat"))
                .await
                .status,
            200
        );
        assert_eq!(
            post(&app, "/v1/agents/w/heartbeat", json!({})).await.status,
            200
        );
        app.stop().await;
    }
);

both_brokers!(bad_input_is_never_a_500, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("w", &[]).await;
    app.send("w", "b", json!(1), 0).await;
    let claimed = app.claim("w", json!({"visibility_timeout_s": 600})).await;
    let id = claimed[0]["message_id"].as_str().unwrap().to_owned();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_content = format!(
        r#"{{"from":"b","message_type":"t","content":{}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"text\"".to_vec(),
        b"123456789012345678901234567890".to_vec(),
        b"{}".to_vec(),
        b"{\"agent_id\":{}}".to_vec(),
        b"{\"lease_id\":null}".to_vec(),
        b"{\"from\":\"b\",\"message_type\":\"\",\"content\":1}".to_vec(),
        b"{\"from\":\"b\",\"message_type\":\"t\",\"content\":1,\"correlation_id\":\"\"}".to_vec(),
        b"{\"limit\":1e400}".to_vec(),
        b"{\"lease_id\":\"\\ud800\"}".to_vec(),
        b"\xc3\x28".to_vec(),
        deep.into_bytes(),
        deep_content.into_bytes(),
    ];
    let paths = [
        "/v1/agents".to_owned(),
        "/v1/agents/w/heartbeat".to_owned(),
        "/v1/agents/sink/messages".to_owned(),
        "/v1/agents/w/messages/claim".to_owned(),
        format!("/v1/agents/w/messages/{id}/ack"),
        format!("/v1/agents/w/messages/{id}/nack"),
        format!("/v1/agents/w/messages/{id}/extend"),
        format!("/v1/agents/w/messages/{id}/replay"),
        "/v1/agents/w/messages/%FF%FE/ack".to_owned(),
        "/v1/agents/%FF/heartbeat".to_owned(),
        // Coordination state.
        "/v1/handoffs".to_owned(),
        "/v1/handoffs/hof_x/accept".to_owned(),
        "/v1/handoffs/hof_x/complete".to_owned(),
        "/v1/handoffs/hof_x/reject".to_owned(),
        "/v1/sessions".to_owned(),
        "/v1/sessions/sess_1_x/activities".to_owned(),
        "/v1/checkpoints".to_owned(),
        "/v1/syncs".to_owned(),
        "/v1/coordinations".to_owned(),
        "/v1/coordinations/crd_x/responses".to_owned(),
        "/v1/memories".to_owned(),
        "/v1/graph/edges".to_owned(),
        "/v1/patterns".to_owned(),
        // Workflows.
        "/v1/workflows".to_owned(),
        "/v1/workflows/wf_x/steps/s/result".to_owned(),
        "/v1/workflows/wf_x/cancel".to_owned(),
        "/v1/events".to_owned(),
    ];
    for path in &paths {
        for body in &bodies {
            let answer = raw_json(&app, path, body.clone()).await;
            let shown = String::from_utf8_lossy(&body[..body.len().min(40)]).into_owned();
            assert!(
                answer.status < 500,
                "POST {path} {shown:?}: {} {}",
                answer.status,
                answer.body
            );
            if answer.status >= 400 {
                problem(&answer, answer.status);
            }
        }
    }
    for path in [
        "/v1/agents?limit=1&limit=2",
        "/v1/agents?cursor=%FF",
        "/v1/agents?capability=%00",
        "/v1/agents/%FF",
        "/v1/agents/w/messages?cursor=9999999999999999999999.1",
        "/v1/agents/w/messages?cursor=-1.-1",
        "/v1/agents/w/messages?state=%00",
        "/v1/memories?q=%22%22%22*:(NEAR",
        "/v1/memories?cursor=99999999999999999999",
        "/v1/graph/edges?node=%00&relationship=",
        "/v1/patterns?pattern_type=%FF",
        "/v1/handoffs?agent=bad%20id&status=nope",
        "/v1/handoffs/%FF",
        "/v1/sessions?status=%00",
        "/v1/sessions/%FF/activities",
        "/v1/checkpoints?coordination_id=",
        "/v1/coordinations/crd_x?wait_ms=-1",
        "/v1/agents/%FF/context",
        "/v1/workflows?status=nope&limit=0",
        "/v1/workflows?cursor=%FF",
        "/v1/workflows/%FF",
        "/static/%FF",
    ] {
        let answer = get(&app, path).await;
        assert!(
            answer.status < 500,
            "GET {path}: {} {}",
            answer.status,
            answer.body
        );
        if answer.status >= 400 {
            problem(&answer, answer.status);
        }
    }
    let long_key = "k".repeat(300);
    let answer = call(
        request(&app, Method::POST, "/v1/agents/w/messages")
            .header("idempotency-key", long_key)
            .json(&json!({"from": "b", "message_type": "t", "content": 1})),
    )
    .await;
    assert_eq!(field(&answer), "Idempotency-Key");
    // A key that is not visible ASCII is refused, not silently ignored (a retry would duplicate).
    let answer = call(
        request(&app, Method::POST, "/v1/agents/w/messages")
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(b"k\xe9y").unwrap(),
            )
            .json(&json!({"from": "b", "message_type": "t", "content": 1})),
    )
    .await;
    assert_eq!(answer.status, 422);
    assert_eq!(field(&answer), "Idempotency-Key");
    // The claimed message is still there under its lease.
    assert_eq!(count(&app, "w", "claimed").await, 1);
    app.stop().await;
});

// The command line: plain process tests, no broker involved.

/// Runs the real binary with `args` and `env` (every other `LTMC_*` variable removed) in `dir`;
/// returns the exit code, stdout and stderr.
async fn ltmc(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ltmc"));
    for (name, _) in std::env::vars() {
        if name.starts_with("LTMC_") {
            command.env_remove(name);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("ltmc {args:?} did not exit within 30 s"))
        .unwrap();
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// Arguments, environment, and the setting the error line must name.
type CliCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn cli_bad_values_exit_2_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[CliCase] = &[
        (&["--bind", "nope"], &[], "--bind"),
        (&[], &[("LTMC_BIND", "256.0.0.1:80")], "--bind"),
        (
            &[],
            &[("LTMC_DATABASE_URL", "postgres://x")],
            "--database-url",
        ),
        (
            &["--database-url", "sqlite://:memory:"],
            &[],
            "--database-url",
        ),
        (&["--redis-url", "http://example.com"], &[], "--redis-url"),
        (&["--key-prefix", ""], &[], "--key-prefix"),
        (&["--key-prefix", "a b"], &[], "--key-prefix"),
        (&["--admin-token", "abc"], &[], "--admin-token"),
        (&[], &[("LTMC_READ_TOKEN", "short")], "--read-token"),
        (&["--log", "info,[[["], &[], "--log"),
        (&["--log-format", "xml"], &[], "--log-format"),
        (&["--max-body-bytes", "10"], &[], "--max-body-bytes"),
        (
            &["migrate", "--database-url", "mysql://x"],
            &[],
            "--database-url",
        ),
        // Auth on without an admin: no agent could ever register.
        (
            &[],
            &[("LTMC_READ_TOKEN", "read-token-0123456789")],
            "LTMC_ADMIN_TOKEN",
        ),
        // Well-formed, but the file cannot be created: still the operator's setting to fix.
        (
            &["--database-url", "sqlite:///nonexistent-ltmc-dir/x.db"],
            &[],
            "LTMC_DATABASE_URL",
        ),
        (
            &[
                "migrate",
                "--database-url",
                "sqlite:///nonexistent-ltmc-dir/x.db",
            ],
            &[],
            "LTMC_DATABASE_URL",
        ),
    ];
    for (args, env, setting) in cases {
        let (code, stdout, stderr) = ltmc(dir.path(), args, env).await;
        assert_eq!(code, 2, "{args:?} {env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?} {env:?}: {stderr:?}");
        assert!(lines[0].contains(setting), "{args:?} {env:?}: {stderr:?}");
        assert!(stdout.is_empty(), "{stdout}");
    }
    // Nothing was created by any of them (the default database lives in the working dir).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn cli_never_repeats_a_rejected_token() {
    // A rejected token may still be a real secret (a stray space or newline): the error names
    // the setting and the reason, never the value, since start-up errors end up in logs.
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-with a-space-0123456789";
    let cases: &[CliCase] = &[
        (&["--admin-token", secret], &[], "--admin-token"),
        (&[], &[("LTMC_READ_TOKEN", secret)], "--read-token"),
        (&[], &[("LTMC_ADMIN_TOKEN", "s3cret")], "--admin-token"),
    ];
    for (args, env, setting) in cases {
        let (code, _, stderr) = ltmc(dir.path(), args, env).await;
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
        assert!(stderr.contains(setting), "{stderr:?}");
        assert!(
            !stderr.contains("s3cret"),
            "the token was printed: {stderr:?}"
        );
    }
}

#[tokio::test]
async fn cli_refuses_a_public_bind_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let url = format!("sqlite://{}", db.display());
    let (code, _, stderr) = ltmc(
        dir.path(),
        &["--bind", "0.0.0.0:0", "--database-url", &url],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr:?}");
    assert!(lines[0].contains("--insecure-no-auth"), "{stderr:?}");
    assert!(lines[0].contains("--bind"), "{stderr:?}");
    assert!(!db.exists(), "refused before touching the store");
    let (code, _, stderr) = ltmc(
        dir.path(),
        &["serve", "--database-url", &url],
        &[("LTMC_BIND", "[::]:0")],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--insecure-no-auth"), "{stderr:?}");
}

#[tokio::test]
async fn cli_openapi_prints_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = ltmc(dir.path(), &["openapi"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    let document: Value = serde_json::from_str(&stdout).expect("the document is JSON");
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3."),
        "{}",
        document["openapi"]
    );
    assert!(document["paths"]["/v1/agents"].is_object());
}

#[tokio::test]
async fn cli_migrate_creates_the_database_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let url = format!("sqlite://{}", db.display());
    for _ in 0..2 {
        // Twice: migrating a migrated store is a no-op.
        let (code, _, stderr) = ltmc(dir.path(), &["migrate", "--database-url", &url], &[]).await;
        assert_eq!(code, 0, "{stderr}");
        assert!(std::fs::metadata(&db).unwrap().len() > 0);
    }
    // The environment variable works the same way.
    let other = dir.path().join("y.db");
    let env_url = format!("sqlite://{}", other.display());
    let (code, _, stderr) =
        ltmc(dir.path(), &["migrate"], &[("LTMC_DATABASE_URL", &env_url)]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(other.exists());
}
