//! No web page can reach a local ltmc: a foreign `Host` (DNS rebinding) and a WebSocket upgrade
//! from a foreign `Origin` (cross-site WebSocket hijacking) are refused, with auth off and on;
//! loopback names, addresses, the server's own origin and the configured ones pass.

use tokio_tungstenite::tungstenite;

use crate::harness::{Kind, Options, TestApp};

const ADMIN: &str = "admin-token-0123456789abcdef";

async fn spawn(auth: bool) -> TestApp {
    TestApp::spawn_with(Options::new(Kind::Memory).configure(move |c| {
        c.allowed_hosts = vec!["ltmc.example.com".into(), "*.corp.example".into()];
        c.allowed_origins = vec!["https://dash.example.com".into()];
        if auth {
            c.admin_token = Some(ADMIN.into());
        }
    }))
    .await
}

/// `GET /v1/agents` with this Host; the status and body.
async fn get_with_host(app: &TestApp, host: &str) -> (u16, serde_json::Value) {
    let mut request = app.client.get(app.url("/v1/agents")).header("host", host);
    if let Some(token) = &app.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = response.json().await.unwrap();
    if status == 403 {
        assert_eq!(content_type, "application/problem+json");
    }
    (status, body)
}

/// The HTTP status a WebSocket handshake with these headers gets (101 when it opens).
async fn ws_status(app: &TestApp, headers: &[(&str, &str)]) -> u16 {
    match app.ws("/v1/events/stream", headers).await {
        Ok(_) => 101,
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

async fn hosts(auth: bool) {
    let app = spawn(auth).await;
    let port = app.addr.port();
    let (status, body) = get_with_host(&app, "attacker.example").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("LTMC_ALLOWED_HOSTS"),
        "{body}"
    );
    for refused in [
        format!("attacker.example:{port}"),
        "localhost.attacker.example".into(),
        "corp.example".into(),
    ] {
        assert_eq!(get_with_host(&app, &refused).await.0, 403, "{refused}");
    }
    for allowed in [
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("app.localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("127.0.0.2:{port}"),
        format!("[::1]:{port}"),
        format!("10.1.2.3:{port}"),
        "ltmc.example.com".into(),
        "ltmc.example.com:443".into(),
        "build.corp.example".into(),
    ] {
        let (status, body) = get_with_host(&app, &allowed).await;
        assert_eq!(status, 200, "{allowed}: {body}");
    }
    app.stop().await;
}

async fn origins(auth: bool) {
    let app = spawn(auth).await;
    let own = format!("http://{}", app.addr);
    let own_by_name = format!("http://localhost:{}", app.addr.port());
    assert_eq!(
        ws_status(&app, &[("origin", "http://evil.example")]).await,
        403
    );
    assert_eq!(ws_status(&app, &[("origin", "null")]).await, 403);
    // The same host on another port is another origin.
    assert_eq!(
        ws_status(&app, &[("origin", "http://127.0.0.1:1")]).await,
        403
    );
    assert_eq!(ws_status(&app, &[("origin", &own)]).await, 101);
    assert_eq!(
        ws_status(
            &app,
            &[
                ("origin", &own_by_name),
                ("host", &format!("localhost:{}", app.addr.port()))
            ]
        )
        .await,
        101
    );
    assert_eq!(
        ws_status(&app, &[("origin", "https://dash.example.com")]).await,
        101
    );
    assert_eq!(ws_status(&app, &[]).await, 101);
    // A plain request from a foreign page is not a WebSocket: CORS already keeps its answer
    // from the page, and the Origin rule leaves it alone.
    let mut plain = app
        .client
        .get(app.url("/healthz"))
        .header("origin", "http://evil.example");
    if let Some(token) = &app.token {
        plain = plain.bearer_auth(token);
    }
    assert_eq!(plain.send().await.unwrap().status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_are_refused_with_auth_off() {
    hosts(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_are_refused_with_auth_on() {
    hosts(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_from_foreign_origins_are_refused_with_auth_off() {
    origins(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_from_foreign_origins_are_refused_with_auth_on() {
    origins(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_star_allows_any_host_and_origin() {
    let app = TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| {
        c.allowed_hosts = vec!["*".into()];
        c.allowed_origins = vec!["*".into()];
    }))
    .await;
    assert_eq!(get_with_host(&app, "attacker.example").await.0, 200);
    assert_eq!(
        ws_status(&app, &[("origin", "http://evil.example")]).await,
        101
    );
    app.stop().await;
}
