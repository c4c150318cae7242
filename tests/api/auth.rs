//! Access rules (API.md "Access and limits"): who may do what with which token, over HTTP and
//! WebSocket, and that a refused request changes nothing.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, handshake::client::Response};

use crate::both_brokers;
use crate::harness::{Kind, Next, Options, TestApp, Ws};
use crate::inputs::{Answer, call, problem};

const ADMIN: &str = "admin-token-0123456789";
const READ: &str = "read-token-0123456789-r";
const UNKNOWN: &str = "ltmc_agent_0000000000000000000000000000000000000000000000000000000000000000";

/// An app with an admin and a read token; `TestApp.token` is the admin token.
async fn secured(kind: Kind) -> TestApp {
    secured_with(kind, |_| {}).await
}

async fn secured_with(
    kind: Kind,
    more: impl FnOnce(&mut ltmc::config::Config) + Send + 'static,
) -> TestApp {
    TestApp::spawn_with(Options::new(kind).configure(|c| {
        c.admin_token = Some(ADMIN.into());
        c.read_token = Some(READ.into());
        more(c);
    }))
    .await
}

/// Registers `agent_id` with the admin token; returns its agent token.
async fn register(app: &TestApp, agent_id: &str) -> String {
    let (status, agent) = app
        .post(
            "/v1/agents",
            json!({"agent_id": agent_id, "capabilities": ["x"]}),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    agent["token"]
        .as_str()
        .expect("a first registration returns the token")
        .to_owned()
}

/// One request with an optional JSON body and token.
async fn answer_as(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Answer {
    let mut request = app.client.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    call(request).await
}

/// The status of a request; a 4xx must be a problem document.
async fn status_as(
    app: &TestApp,
    method: Method,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> u16 {
    let answer = answer_as(app, method, path, body, token).await;
    if answer.status >= 400 {
        problem(&answer, answer.status);
    }
    answer.status
}

/// Asserts `token` gets a 403 forbidden problem for the request.
async fn forbidden(app: &TestApp, method: Method, path: &str, body: Option<Value>, token: &str) {
    let answer = answer_as(app, method.clone(), path, body, Some(token)).await;
    let problem = problem(&answer, 403);
    assert_eq!(
        problem["type"], "urn:ltmc:problem:forbidden",
        "{method} {path}"
    );
}

/// The messages of `agent_id` in `state`, read with the admin token.
async fn messages(app: &TestApp, agent_id: &str, state: &str) -> Vec<Value> {
    let (status, page) = app
        .get(&format!("/v1/agents/{agent_id}/messages?state={state}"))
        .await;
    assert_eq!(status, 200, "{page}");
    page["items"].as_array().unwrap().clone()
}

/// Opens a WebSocket with exactly these headers (no token added).
async fn connect(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Ws, Response), tungstenite::Error> {
    let mut request = format!("ws://{}{path}", app.addr)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (stream, response) = tokio_tungstenite::connect_async(request).await?;
    Ok((Ws { stream }, response))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The stream is open and served: `?since=0` answers a `resumed` frame first.
async fn assert_served(ws: &mut Ws) {
    assert_eq!(ws.frame().await["type"], "resumed");
}

/// The server completed the handshake and closes at once with `code`, sending nothing else.
async fn assert_closed_with(ws: &mut Ws, code: u16) {
    match ws.next(Duration::from_secs(5)).await {
        Next::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), code, "{frame:?}"),
        other => panic!("expected a close with {code}, got {other:?}"),
    }
}

both_brokers!(missing_or_unknown_token_is_401, |kind| async move {
    let app = secured(kind).await;
    register(&app, "alpha").await;
    let register_gamma = json!({"agent_id": "gamma", "capabilities": []});
    let send = json!({"from": "alpha", "message_type": "t", "content": 1});
    let endpoints: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/v1/agents", None),
        (Method::GET, "/v1/agents/alpha", None),
        (Method::POST, "/v1/agents", Some(register_gamma)),
        (Method::POST, "/v1/agents/alpha/heartbeat", Some(json!({}))),
        (Method::DELETE, "/v1/agents/alpha", None),
        (Method::POST, "/v1/agents/alpha/messages", Some(send)),
        (Method::GET, "/v1/agents/alpha/messages", None),
        (
            Method::POST,
            "/v1/agents/alpha/messages/claim",
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/agents/alpha/messages/msg_x/ack",
            Some(json!({"lease_id": "lse_x"})),
        ),
    ];
    for (method, path, body) in &endpoints {
        // No Authorization at all, an unknown token, and headers that are not a bearer token.
        for header in [
            None,
            Some(bearer(UNKNOWN)),
            Some(bearer("")),
            Some(format!("Basic {ADMIN}")),
            Some(ADMIN.to_owned()),
        ] {
            let mut request = app.client.request(method.clone(), app.url(path));
            if let Some(header) = &header {
                request = request.header("authorization", header);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let answer = call(request).await;
            let problem = problem(&answer, 401);
            assert_eq!(
                problem["type"], "urn:ltmc:problem:unauthorized",
                "{method} {path} with {header:?}"
            );
            assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
        }
    }
    // Nothing happened: no gamma, alpha still there, no message, no claim.
    assert_eq!(app.get("/v1/agents/gamma").await.0, 404);
    assert_eq!(app.get("/v1/agents/alpha").await.0, 200);
    assert!(messages(&app, "alpha", "queued").await.is_empty());
    // The scheme is case-insensitive; surrounding spaces do not matter.
    for header in [format!("bearer {ADMIN}"), format!("BEARER  {ADMIN} ")] {
        let request = app
            .client
            .get(app.url("/v1/agents"))
            .header("authorization", header.as_str());
        assert_eq!(call(request).await.status, 200, "{header:?}");
    }
    // Probes answer without a token.
    assert_eq!(
        app.request_as(Method::GET, "/healthz", None, None).await.0,
        200
    );
    app.stop().await;
});

both_brokers!(admin_may_do_everything, |kind| async move {
    // `app.post` and friends send the admin token.
    let app = secured(kind).await;
    register(&app, "alpha").await;
    let beat = app
        .post("/v1/agents/alpha/heartbeat", json!({"status": "busy"}))
        .await;
    assert_eq!(beat.0, 200, "{}", beat.1);
    // As anyone, even an agent that is not registered.
    let send = json!({"from": "beta", "message_type": "t", "content": 1});
    assert_eq!(app.post("/v1/agents/alpha/messages", send).await.0, 202);
    let claimed = app
        .claim("alpha", json!({"visibility_timeout_s": 60}))
        .await;
    let base = format!(
        "/v1/agents/alpha/messages/{}",
        claimed[0]["message_id"].as_str().unwrap()
    );
    let extend = json!({"lease_id": claimed[0]["lease_id"], "visibility_timeout_s": 60});
    assert_eq!(app.post(&format!("{base}/extend"), extend).await.0, 204);
    let ack = json!({"lease_id": claimed[0]["lease_id"]});
    assert_eq!(app.post(&format!("{base}/ack"), ack).await.0, 204);
    assert_eq!(app.get("/v1/agents/alpha/messages").await.0, 200);

    let auth = bearer(ADMIN);
    for path in [
        "/v1/agents/alpha/stream?since=0",
        "/v1/events/stream?since=0",
    ] {
        let (mut ws, _) = connect(&app, path, &[("authorization", &auth)])
            .await
            .unwrap();
        assert_served(&mut ws).await;
    }

    assert_eq!(
        app.request(Method::DELETE, "/v1/agents/alpha", None)
            .await
            .0,
        204
    );
    assert_eq!(app.get("/v1/agents/alpha").await.0, 404);
    app.stop().await;
});

both_brokers!(
    first_registration_needs_the_admin_and_returns_the_token_once,
    |kind| async move {
        let app = secured(kind).await;
        let new_alpha = json!({"agent_id": "alpha", "capabilities": ["a"]});
        forbidden(
            &app,
            Method::POST,
            "/v1/agents",
            Some(new_alpha.clone()),
            READ,
        )
        .await;
        assert_eq!(
            app.get("/v1/agents/alpha").await.0,
            404,
            "the read token created nothing"
        );

        let (status, first) = app.post("/v1/agents", new_alpha.clone()).await;
        assert_eq!(status, 201, "{first}");
        let token = first["token"].as_str().unwrap().to_owned();
        assert!(token.starts_with("ltmc_agent_"), "{token}");
        assert_eq!(token.len(), "ltmc_agent_".len() + 64);

        // Never again: not on re-registration (by the admin or the agent), not on reads.
        let (status, again) = app.post("/v1/agents", new_alpha.clone()).await;
        assert_eq!(status, 200, "{again}");
        assert!(again.get("token").is_none(), "{again}");
        let (status, own) = app
            .request_as(
                Method::POST,
                "/v1/agents",
                Some(json!({"agent_id": "alpha", "capabilities": ["a", "b"]})),
                Some(&token),
            )
            .await;
        assert_eq!(status, 200, "an agent may re-register itself: {own}");
        assert!(own.get("token").is_none(), "{own}");
        assert_eq!(own["capabilities"], json!(["a", "b"]));
        let (_, read) = app.get("/v1/agents/alpha").await;
        assert!(read.get("token").is_none(), "{read}");
        let (_, list) = app.get("/v1/agents").await;
        assert!(list["items"][0].get("token").is_none(), "{list}");

        // An agent token cannot mint another agent, nor re-register one.
        let new_beta = json!({"agent_id": "beta", "capabilities": ["b"]});
        forbidden(
            &app,
            Method::POST,
            "/v1/agents",
            Some(new_beta.clone()),
            &token,
        )
        .await;
        assert_eq!(app.get("/v1/agents/beta").await.0, 404);
        let (status, beta) = app.post("/v1/agents", new_beta).await;
        assert_eq!(status, 201);
        let beta_token = beta["token"].as_str().unwrap();
        assert_ne!(beta_token, token, "each agent gets its own token");
        let takeover =
            json!({"agent_id": "beta", "capabilities": ["stolen"], "metadata": {"owner": "alpha"}});
        forbidden(&app, Method::POST, "/v1/agents", Some(takeover), &token).await;
        let (_, beta) = app.get("/v1/agents/beta").await;
        assert_eq!(beta["capabilities"], json!(["b"]));
        assert_eq!(beta["metadata"], json!({}));
        app.stop().await;
    }
);

both_brokers!(an_agent_token_acts_as_itself, |kind| async move {
    let app = secured(kind).await;
    let alpha = register(&app, "alpha").await;
    register(&app, "beta").await;
    let me = Some(alpha.as_str());

    let (status, beat) = app
        .request_as(
            Method::POST,
            "/v1/agents/alpha/heartbeat",
            Some(json!({"status": "busy"})),
            me,
        )
        .await;
    assert_eq!(status, 200, "{beat}");
    assert_eq!(beat["status"], "busy");
    // The registry is readable (discovery).
    let (status, list) = app.request_as(Method::GET, "/v1/agents", None, me).await;
    assert_eq!(status, 200);
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert_eq!(
        app.request_as(Method::GET, "/v1/agents/beta", None, me)
            .await
            .0,
        200
    );
    // Messages from itself, to anyone (itself included).
    for to in ["beta", "alpha"] {
        let send = json!({"from": "alpha", "message_type": "t", "content": to});
        let (status, receipt) = app
            .request_as(
                Method::POST,
                &format!("/v1/agents/{to}/messages"),
                Some(send),
                me,
            )
            .await;
        assert_eq!(status, 202, "{receipt}");
    }
    assert_eq!(messages(&app, "beta", "queued").await.len(), 1);
    // Its own queue: list, claim, extend, nack, ack.
    let (status, own) = app
        .request_as(Method::GET, "/v1/agents/alpha/messages", None, me)
        .await;
    assert_eq!(status, 200);
    assert_eq!(own["items"].as_array().unwrap().len(), 1);
    let (status, claimed) = app
        .request_as(
            Method::POST,
            "/v1/agents/alpha/messages/claim",
            Some(json!({})),
            me,
        )
        .await;
    assert_eq!(status, 200, "{claimed}");
    let message = &claimed["messages"][0];
    assert_eq!(message["content"], "alpha");
    let base = format!(
        "/v1/agents/alpha/messages/{}",
        message["message_id"].as_str().unwrap()
    );
    let lease = json!({"lease_id": message["lease_id"]});
    let extend = json!({"lease_id": message["lease_id"], "visibility_timeout_s": 60});
    assert_eq!(
        status_as(
            &app,
            Method::POST,
            &format!("{base}/extend"),
            Some(extend),
            me
        )
        .await,
        204
    );
    assert_eq!(
        status_as(&app, Method::POST, &format!("{base}/ack"), Some(lease), me).await,
        204
    );
    assert!(messages(&app, "alpha", "queued").await.is_empty());
    assert!(messages(&app, "alpha", "claimed").await.is_empty());
    // Its own stream.
    let auth = bearer(&alpha);
    let (mut ws, _) = connect(
        &app,
        "/v1/agents/alpha/stream?since=0",
        &[("authorization", &auth)],
    )
    .await
    .unwrap();
    assert_served(&mut ws).await;
    app.stop().await;
});

both_brokers!(
    an_agent_token_cannot_act_as_another_and_changes_nothing,
    |kind| async move {
        let app = secured(kind).await;
        let alpha = register(&app, "alpha").await;
        let beta = register(&app, "beta").await;
        // beta holds one claimed message and has one queued.
        app.send("beta", "boss", json!("first"), 1).await;
        app.send("beta", "boss", json!("second"), 0).await;
        let (status, claimed) = app
            .request_as(
                Method::POST,
                "/v1/agents/beta/messages/claim",
                Some(json!({"limit": 1, "visibility_timeout_s": 600})),
                Some(&beta),
            )
            .await;
        assert_eq!(status, 200);
        let held = claimed["messages"][0].clone();
        let id = held["message_id"].as_str().unwrap();
        let before = app.get("/v1/agents/beta").await.1;

        let lease = json!({"lease_id": held["lease_id"]});
        let message = format!("/v1/agents/beta/messages/{id}");
        let spoof = json!({"from": "beta", "message_type": "t", "content": "spoofed"});
        let refused: Vec<(Method, String, Option<Value>)> = vec![
            (
                Method::POST,
                "/v1/agents/beta/heartbeat".into(),
                Some(json!({"status": "busy"})),
            ),
            (Method::POST, "/v1/agents/beta/heartbeat".into(), None),
            (
                Method::POST,
                "/v1/agents/beta/messages/claim".into(),
                Some(json!({"limit": 10})),
            ),
            (Method::POST, format!("{message}/ack"), Some(lease.clone())),
            (Method::POST, format!("{message}/nack"), Some(lease)),
            (
                Method::POST,
                format!("{message}/extend"),
                Some(json!({"lease_id": held["lease_id"], "visibility_timeout_s": 1})),
            ),
            (Method::POST, format!("{message}/replay"), None),
            (Method::GET, "/v1/agents/beta/messages".into(), None),
            (
                Method::GET,
                "/v1/agents/beta/messages?state=claimed".into(),
                None,
            ),
            (Method::DELETE, "/v1/agents/beta".into(), None),
            // Sending as someone else, to anyone.
            (
                Method::POST,
                "/v1/agents/alpha/messages".into(),
                Some(spoof.clone()),
            ),
            (
                Method::POST,
                "/v1/agents/beta/messages".into(),
                Some(spoof.clone()),
            ),
            (
                Method::POST,
                "/v1/agents/gamma/messages".into(),
                Some(spoof),
            ),
        ];
        for (method, path, body) in refused {
            forbidden(&app, method, &path, body, &alpha).await;
        }

        // Nothing changed.
        let after = app.get("/v1/agents/beta").await.1;
        assert_eq!(after["status"], "available");
        assert_eq!(
            after["expires_at"], before["expires_at"],
            "no heartbeat happened"
        );
        let still_claimed = messages(&app, "beta", "claimed").await;
        assert_eq!(still_claimed.len(), 1);
        assert_eq!(still_claimed[0]["lease_id"], held["lease_id"]);
        assert_eq!(
            still_claimed[0]["lease_expires_at"],
            held["lease_expires_at"]
        );
        let queued = messages(&app, "beta", "queued").await;
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0]["content"], "second");
        assert!(messages(&app, "alpha", "queued").await.is_empty());
        assert!(messages(&app, "gamma", "queued").await.is_empty());
        // And beta itself still can.
        assert_eq!(
            status_as(
                &app,
                Method::POST,
                &format!("/v1/agents/beta/messages/{id}/ack"),
                Some(json!({"lease_id": held["lease_id"]})),
                Some(&beta)
            )
            .await,
            204
        );
        app.stop().await;
    }
);

both_brokers!(
    a_read_token_reads_everything_and_changes_nothing,
    |kind| async move {
        let app = secured(kind).await;
        register(&app, "alpha").await;
        let queued = app.send("alpha", "boss", json!("queued"), 0).await;
        app.send("alpha", "boss", json!("claimed"), 9).await;
        let held = app
            .claim("alpha", json!({"limit": 1, "visibility_timeout_s": 600}))
            .await;
        let held = held[0].clone();
        let id = held["message_id"].as_str().unwrap();
        let before = app.get("/v1/agents/alpha").await.1;
        let r = Some(READ);

        for path in [
            "/v1/agents",
            "/v1/agents?capability=x",
            "/v1/agents/alpha",
            "/v1/agents/alpha/messages",
            "/v1/agents/alpha/messages?state=claimed",
            "/v1/agents/alpha/messages?state=dead",
            "/v1/agents/nobody/messages",
        ] {
            assert_eq!(
                status_as(&app, Method::GET, path, None, r).await,
                200,
                "GET {path}"
            );
        }
        let (_, listed) = app
            .request_as(Method::GET, "/v1/agents/alpha/messages", None, r)
            .await;
        assert_eq!(listed["items"][0]["message_id"], queued.as_str());
        // The firehose and an agent's stream (both GETs).
        let auth = bearer(READ);
        let (mut firehose, _) = connect(
            &app,
            "/v1/events/stream?since=0",
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
        assert_served(&mut firehose).await;
        assert_eq!(firehose.frame().await["type"], "agent.registered");
        let (mut stream, _) = connect(
            &app,
            "/v1/agents/alpha/stream?since=0",
            &[("authorization", &auth)],
        )
        .await
        .unwrap();
        assert_served(&mut stream).await;

        let lease = json!({"lease_id": held["lease_id"]});
        let writes: Vec<(Method, String, Option<Value>)> = vec![
            (
                Method::POST,
                "/v1/agents".into(),
                Some(json!({"agent_id": "gamma", "capabilities": []})),
            ),
            (
                Method::POST,
                "/v1/agents".into(),
                Some(json!({"agent_id": "alpha", "capabilities": ["changed"]})),
            ),
            (
                Method::POST,
                "/v1/agents/alpha/heartbeat".into(),
                Some(json!({"status": "busy"})),
            ),
            (
                Method::POST,
                "/v1/agents/alpha/messages".into(),
                Some(json!({"from": "alpha", "message_type": "t", "content": 1})),
            ),
            (
                Method::POST,
                "/v1/agents/alpha/messages/claim".into(),
                Some(json!({"limit": 100})),
            ),
            (
                Method::POST,
                format!("/v1/agents/alpha/messages/{id}/ack"),
                Some(lease.clone()),
            ),
            (
                Method::POST,
                format!("/v1/agents/alpha/messages/{id}/nack"),
                Some(lease.clone()),
            ),
            (
                Method::POST,
                format!("/v1/agents/alpha/messages/{id}/extend"),
                Some(json!({"lease_id": held["lease_id"], "visibility_timeout_s": 1})),
            ),
            (
                Method::POST,
                format!("/v1/agents/alpha/messages/{queued}/replay"),
                None,
            ),
            (Method::DELETE, "/v1/agents/alpha".into(), None),
        ];
        for (method, path, body) in writes {
            forbidden(&app, method, &path, body, READ).await;
        }

        // Nothing changed.
        assert_eq!(app.get("/v1/agents/gamma").await.0, 404);
        let after = app.get("/v1/agents/alpha").await.1;
        assert_eq!(after["capabilities"], json!(["x"]));
        assert_eq!(after["status"], "available");
        assert_eq!(after["expires_at"], before["expires_at"]);
        let still_queued = messages(&app, "alpha", "queued").await;
        assert_eq!(still_queued.len(), 1);
        assert_eq!(still_queued[0]["message_id"], queued.as_str());
        let still_claimed = messages(&app, "alpha", "claimed").await;
        assert_eq!(still_claimed.len(), 1);
        assert_eq!(still_claimed[0]["lease_id"], held["lease_id"]);
        assert_eq!(
            still_claimed[0]["lease_expires_at"],
            held["lease_expires_at"]
        );
        app.stop().await;
    }
);

both_brokers!(websocket_credentials, |kind| async move {
    let app = secured(kind).await;
    let alpha = register(&app, "alpha").await;
    let beta = register(&app, "beta").await;
    let path = "/v1/agents/alpha/stream?since=0";

    // The token in Authorization.
    let auth = bearer(&alpha);
    let (mut ws, _) = connect(&app, path, &[("authorization", &auth)])
        .await
        .unwrap();
    assert_served(&mut ws).await;

    // The token as the subprotocol, which the server must select (echo).
    let protocol = format!("bearer.{alpha}");
    let (mut ws, response) = connect(&app, path, &[("sec-websocket-protocol", &protocol)])
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        protocol.as_str()
    );
    assert_served(&mut ws).await;
    // Offered among other subprotocols.
    let offered = format!("json, {protocol}");
    let (mut ws, response) = connect(&app, path, &[("sec-websocket-protocol", &offered)])
        .await
        .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        protocol.as_str()
    );
    assert_served(&mut ws).await;

    // Bad or missing credentials: the handshake completes, then 4401.
    let unknown_auth = bearer(UNKNOWN);
    let unknown_protocol = format!("bearer.{UNKNOWN}");
    for stream in [path, "/v1/events/stream"] {
        let (mut ws, response) = connect(&app, stream, &[]).await.unwrap();
        assert_eq!(response.status(), 101);
        assert_closed_with(&mut ws, 4401).await;
        let (mut ws, _) = connect(&app, stream, &[("authorization", &unknown_auth)])
            .await
            .unwrap();
        assert_closed_with(&mut ws, 4401).await;
        let (mut ws, response) = connect(
            &app,
            stream,
            &[("sec-websocket-protocol", &unknown_protocol)],
        )
        .await
        .unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            unknown_protocol.as_str()
        );
        assert_closed_with(&mut ws, 4401).await;
    }

    // A valid token that is not allowed here: 4403.
    let beta_auth = bearer(&beta);
    let (mut ws, _) = connect(&app, path, &[("authorization", &beta_auth)])
        .await
        .unwrap();
    assert_closed_with(&mut ws, 4403).await;
    let beta_protocol = format!("bearer.{beta}");
    let (mut ws, _) = connect(&app, path, &[("sec-websocket-protocol", &beta_protocol)])
        .await
        .unwrap();
    assert_closed_with(&mut ws, 4403).await;
    let (mut ws, _) = connect(&app, "/v1/events/stream", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_closed_with(&mut ws, 4403).await;
    app.stop().await;
});

both_brokers!(streams_per_agent_token_are_limited, |kind| async move {
    let app = secured_with(kind, |c| c.limits.max_streams_per_token = 2).await;
    let alpha = register(&app, "alpha").await;
    let beta = register(&app, "beta").await;
    let path = "/v1/agents/alpha/stream?since=0";
    let auth = bearer(&alpha);

    let (mut first, _) = connect(&app, path, &[("authorization", &auth)])
        .await
        .unwrap();
    assert_served(&mut first).await;
    let protocol = format!("bearer.{alpha}");
    let (mut second, _) = connect(&app, path, &[("sec-websocket-protocol", &protocol)])
        .await
        .unwrap();
    assert_served(&mut second).await;

    // The third is refused with an HTTP 429 (the upgrade fails), however the token is presented.
    for header in [
        ("authorization", auth.as_str()),
        ("sec-websocket-protocol", protocol.as_str()),
    ] {
        match connect(&app, path, &[header]).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429, "{header:?}");
            }
            Err(other) => panic!("expected a 429 response, got {other}"),
            Ok(_) => panic!("a third stream for the same token was accepted"),
        }
    }
    // Other tokens are unaffected: beta's own stream, the admin on alpha's stream.
    let beta_auth = bearer(&beta);
    let (mut other, _) = connect(
        &app,
        "/v1/agents/beta/stream?since=0",
        &[("authorization", &beta_auth)],
    )
    .await
    .unwrap();
    assert_served(&mut other).await;
    let admin = bearer(ADMIN);
    let (mut admin_ws, _) = connect(&app, path, &[("authorization", &admin)])
        .await
        .unwrap();
    assert_served(&mut admin_ws).await;

    // Closing one frees its slot.
    first.stream.close(None).await.unwrap();
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut third = loop {
        match connect(&app, path, &[("authorization", &auth)]).await {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(response)) if response.status() == 429 => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the closed stream's slot was never released"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other}"),
        }
    };
    assert_served(&mut third).await;
    // And the limit still holds.
    assert!(matches!(
        connect(&app, path, &[("authorization", &auth)]).await,
        Err(tungstenite::Error::Http(response)) if response.status() == 429
    ));
    drop(second);
    app.stop().await;
});

both_brokers!(a_deleted_agents_token_stops_working, |kind| async move {
    let app = secured(kind).await;
    let alpha = register(&app, "alpha").await;
    let beta = register(&app, "beta").await;
    assert_eq!(
        app.request_as(Method::GET, "/v1/agents", None, Some(&alpha))
            .await
            .0,
        200
    );

    // Deleted by the admin.
    assert_eq!(
        app.request(Method::DELETE, "/v1/agents/alpha", None)
            .await
            .0,
        204
    );
    assert_eq!(
        status_as(&app, Method::GET, "/v1/agents", None, Some(&alpha)).await,
        401
    );
    assert_eq!(
        status_as(
            &app,
            Method::POST,
            "/v1/agents/alpha/heartbeat",
            Some(json!({})),
            Some(&alpha)
        )
        .await,
        401
    );
    let reregister = json!({"agent_id": "alpha", "capabilities": []});
    assert_eq!(
        status_as(
            &app,
            Method::POST,
            "/v1/agents",
            Some(reregister.clone()),
            Some(&alpha)
        )
        .await,
        401
    );
    let auth = bearer(&alpha);
    let (mut ws, _) = connect(&app, "/v1/agents/alpha/stream", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_closed_with(&mut ws, 4401).await;

    // Registered again: a new token; the old one stays dead.
    let (status, again) = app.post("/v1/agents", reregister).await;
    assert_eq!(status, 201, "{again}");
    let fresh = again["token"].as_str().unwrap();
    assert_ne!(fresh, alpha);
    assert_eq!(
        status_as(&app, Method::GET, "/v1/agents", None, Some(&alpha)).await,
        401
    );
    assert_eq!(
        status_as(&app, Method::GET, "/v1/agents", None, Some(fresh)).await,
        200
    );

    // An agent may delete itself; its token dies with it.
    assert_eq!(
        status_as(&app, Method::DELETE, "/v1/agents/beta", None, Some(&beta)).await,
        204
    );
    assert_eq!(
        status_as(&app, Method::GET, "/v1/agents", None, Some(&beta)).await,
        401
    );
    assert_eq!(app.get("/v1/agents/beta").await.0, 404);
    app.stop().await;
});

// Workflows: only the admin submits, cancels and posts events; a step's result comes from the
// agent holding it, with its own token — another agent's token is 403 and changes nothing.
both_brokers!(
    workflow_steps_answer_only_to_their_holder,
    |kind| async move {
        let app = secured(kind).await;
        let holder = register(&app, "holder").await;
        let other = register(&app, "other").await;
        let def = json!({"name": "w", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "holder"}]});
        for token in [READ, other.as_str()] {
            let refused = answer_as(
                &app,
                Method::POST,
                "/v1/workflows",
                Some(def.clone()),
                Some(token),
            )
            .await;
            assert_eq!(refused.status, 403);
        }
        let (status, run) = app.post("/v1/workflows", def).await;
        assert_eq!(status, 201, "{run}");
        let path = format!(
            "/v1/workflows/{}/steps/s/result",
            run["workflow_id"].as_str().unwrap()
        );
        let result = |agent: &str| json!({"agent_id": agent, "attempt": 1, "success": true});
        let posing = answer_as(
            &app,
            Method::POST,
            &path,
            Some(result("holder")),
            Some(&other),
        )
        .await;
        assert_eq!(posing.status, 403);
        problem(&posing, 403);
        let (_, unchanged) = app
            .get(&format!(
                "/v1/workflows/{}",
                run["workflow_id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(unchanged["steps"][0]["status"], "dispatched");
        let own = answer_as(
            &app,
            Method::POST,
            &path,
            Some(result("holder")),
            Some(&holder),
        )
        .await;
        assert_eq!(own.status, 200, "{}", own.body);
        let event = answer_as(
            &app,
            Method::POST,
            "/v1/events",
            Some(json!({"name": "e"})),
            Some(&holder),
        )
        .await;
        assert_eq!(event.status, 403);
        app.stop().await;
    }
);
