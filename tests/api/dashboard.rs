//! The dashboard in a real browser: headless Chromium (Debian's `chromium`), driven over the
//! DevTools protocol on a WebSocket, against a real server with auth on. The page asks for a
//! read token, then shows agents, queue depths, a handoff and a workflow's progress live as the
//! test makes them happen; a screenshot is saved as a test artifact.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Kind, Options, TestApp};

const ADMIN: &str = "admin-token-dashboard-0123";
const READ: &str = "read-token-dashboard-0123";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    page: Socket,
    next_id: u64,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = tokio::process::Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium must be on PATH for the dashboard test (apt-get install chromium)");
        // Chromium writes the port it chose into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file)
                && let Some(port) = text.lines().next().and_then(|l| l.parse().ok())
            {
                break port;
            }
            assert!(Instant::now() < deadline, "chromium did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_owned();
        let (page, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser {
            _child: child,
            _profile: profile,
            page,
            next_id: 0,
        }
    }

    /// One DevTools command; its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        self.page.send(Message::Text(command.into())).await.unwrap();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .expect("DevTools answers")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = message {
                let answer: Value = serde_json::from_str(&text).unwrap();
                if answer["id"] == id {
                    assert!(answer["error"].is_null(), "{method}: {answer}");
                    return answer["result"].clone();
                }
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Waits (up to 15 s) until `expression` evaluates to `expected` in the page.
    async fn wait_for(&mut self, expression: &str, expected: Value) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let value = self.eval(expression).await;
            if value == expected {
                return;
            }
            if Instant::now() > deadline {
                let page = self.eval("document.body.innerText").await;
                panic!("{expression} is {value}, not {expected}; the page shows:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, path: &std::path::Path) {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_agents_queues_handoffs_and_workflows_live() {
    let app = TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| {
        c.admin_token = Some(ADMIN.into());
        c.read_token = Some(READ.into());
    }))
    .await;
    let mut browser = Browser::launch().await;
    browser
        .call("Page.navigate", json!({"url": app.url("/")}))
        .await;
    // Auth is on: the page asks for a token first.
    browser
        .wait_for("!document.getElementById('login').hidden", json!(true))
        .await;
    browser
        .eval(&format!(
            "document.getElementById('token').value = '{READ}';
             document.getElementById('login').requestSubmit(); true"
        ))
        .await;
    browser
        .wait_for(
            "document.getElementById('connection').textContent",
            json!("live"),
        )
        .await;
    let shown = "getComputedStyle(document.getElementById('login')).display";
    browser.wait_for(shown, json!("none")).await;

    // Agents register: their rows appear.
    for agent in ["planner", "coder"] {
        let (status, _) = app
            .post(
                "/v1/agents",
                json!({"agent_id": agent, "capabilities": ["code"]}),
            )
            .await;
        assert_eq!(status, 201);
    }
    browser
        .wait_for("document.querySelectorAll('[data-agent]').length", json!(2))
        .await;
    browser
        .wait_for(
            "document.querySelector('[data-agent=\"coder\"] td:nth-child(2)').textContent",
            json!("available"),
        )
        .await;

    // Messages queue up: the queue depth follows.
    for n in 0..3 {
        app.send("planner", "coder", json!(n), 0).await;
    }
    browser
        .wait_for(
            "document.querySelector('[data-queue=\"queued\"]')?.textContent",
            json!("3"),
        )
        .await;

    // A handoff.
    let (_, handoff) = app
        .post(
            "/v1/handoffs",
            json!({"from_agent": "planner", "to_agent": "coder", "context": {}}),
        )
        .await;
    let handoff_id = handoff["handoff_id"].as_str().unwrap().to_owned();
    browser
        .wait_for(
            &format!("document.querySelector('[data-handoff=\"{handoff_id}\"] span')?.textContent"),
            json!("initiated"),
        )
        .await;

    // A workflow runs: its progress is drawn live, to completion.
    let (_, run) = app
        .post(
            "/v1/workflows",
            json!({"name": "ship-it", "pattern": "sequential", "steps": [
                {"step_id": "plan", "agent": "planner"}, {"step_id": "code", "capability": "code"}]}),
        )
        .await;
    let id = run["workflow_id"].as_str().unwrap().to_owned();
    let status =
        format!("document.querySelector('[data-workflow=\"{id}\"] [data-status]')?.textContent");
    browser.wait_for(&status, json!("executing")).await;
    for agent in ["planner", "coder"] {
        let claimed = app
            .claim(agent, json!({"limit": 10, "auto_ack": true}))
            .await;
        let step = claimed
            .iter()
            .find(|m| m["message_type"] == "workflow.step")
            .unwrap_or_else(|| panic!("{agent} got no step"));
        let path = format!(
            "/v1/workflows/{id}/steps/{}/result",
            step["content"]["step_id"].as_str().unwrap()
        );
        let body =
            json!({"agent_id": agent, "attempt": step["content"]["attempt"], "success": true});
        assert_eq!(app.post(&path, body).await.0, 200);
    }
    browser.wait_for(&status, json!("completed")).await;
    browser
        .wait_for(
            &format!(
                "document.querySelectorAll('[data-workflow=\"{id}\"] .step.succeeded').length"
            ),
            json!(2),
        )
        .await;
    // A thousand agents more: every row arrives, live.
    futures_util::stream::iter(0..1000)
        .for_each_concurrent(32, |n| {
            let app = &app;
            async move {
                let body = json!({"agent_id": format!("bulk-{n:04}"), "capabilities": ["bulk"]});
                assert_eq!(app.post("/v1/agents", body).await.0, 201);
            }
        })
        .await;
    browser
        .wait_for(
            "document.querySelectorAll('[data-agent]').length",
            json!(1002),
        )
        .await;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    browser.screenshot(&shot).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("dashboard screenshot: {}", shot.display());
    app.stop().await;
}
