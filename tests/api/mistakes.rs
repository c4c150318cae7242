//! Mistakes are caught loudly: work addressed to an agent that is not registered is a 422 naming
//! it (a message still queues, and says so), a lease that does not match says so, and the command
//! line exits quietly on a closed pipe, writes no colour codes into files, refuses one value for
//! two tokens, and logs a Redis outage without flooding.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::both_brokers;
use crate::harness::TestApp;
use crate::inputs::{call, problem};

/// The `field`s of a 422, in order.
#[track_caller]
fn fields(status: u16, body: &Value) -> Vec<String> {
    assert_eq!(status, 422, "{body}");
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(
                e["message"].as_str().unwrap().contains("not registered"),
                "{e}"
            );
            e["field"].as_str().unwrap().to_owned()
        })
        .collect()
}

both_brokers!(
    work_for_an_unregistered_agent_is_422_naming_it,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        app.register("planner", &["plan"]).await;
        app.register("coder", &["code"]).await;

        // Handoffs: either end.
        let (status, body) = app
            .post(
                "/v1/handoffs",
                json!({"from_agent": "planner", "to_agent": "codr", "context": {}}),
            )
            .await;
        assert_eq!(fields(status, &body), ["to_agent"]);
        assert!(body["detail"].as_str().unwrap().contains("codr"), "{body}");
        let (status, body) = app
            .post(
                "/v1/handoffs",
                json!({"from_agent": "plannr", "to_agent": "codr", "context": {}}),
            )
            .await;
        assert_eq!(fields(status, &body), ["from_agent", "to_agent"]);
        // Coordination rounds: each missing agent, by position.
        let (status, body) = app
            .post(
                "/v1/coordinations",
                json!({"agents": ["planner", "ghost", "coder", "typo"], "topic": "t"}),
            )
            .await;
        assert_eq!(fields(status, &body), ["agents[1]", "agents[3]"]);
        // Workflow steps naming an agent; a step naming a capability may wait for one.
        let (status, body) = app
            .post(
                "/v1/workflows",
                json!({"name": "w", "pattern": "parallel", "steps": [
                    {"step_id": "a", "agent": "coder"},
                    {"step_id": "b", "agent": "codr"},
                    {"step_id": "c", "capability": "nobody-has-this"}]}),
            )
            .await;
        assert_eq!(fields(status, &body), ["steps[1].agent"]);
        // Nothing was created or queued by any of them.
        assert_eq!(app.count("/v1/handoffs").await, 0);
        assert_eq!(app.count("/v1/workflows").await, 0);
        assert_eq!(app.count("/v1/agents/coder/messages").await, 0);
        assert_eq!(app.count("/v1/agents/planner/messages").await, 0);

        let (status, run) = app
            .post(
                "/v1/workflows",
                json!({"name": "w", "pattern": "parallel", "steps": [
                    {"step_id": "a", "agent": "coder"},
                    {"step_id": "c", "capability": "nobody-has-this"}]}),
            )
            .await;
        assert_eq!(status, 201, "{run}");
        let waits = run["steps"][1]["status"].as_str().unwrap();
        assert!(["pending", "waiting"].contains(&waits), "{run}");

        // Registered means a record exists, whatever the presence: an offline agent still counts.
        let (status, body) = app
            .post(
                "/v1/agents",
                json!({"agent_id": "sleeper", "capabilities": [], "ttl_s": 1}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        ltmc::agents::expire_tick(&app.state, ltmc::common::now_ms())
            .await
            .unwrap();
        let (_, sleeper) = app.get("/v1/agents/sleeper").await;
        assert_eq!(sleeper["status"], "offline", "{sleeper}");
        let (status, body) = app
            .post(
                "/v1/handoffs",
                json!({"from_agent": "planner", "to_agent": "sleeper", "context": {}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        // A deleted agent is no longer registered.
        assert_eq!(
            app.request(reqwest::Method::DELETE, "/v1/agents/sleeper", None)
                .await
                .0,
            204
        );
        let (status, body) = app
            .post(
                "/v1/coordinations",
                json!({"agents": ["sleeper"], "topic": "t"}),
            )
            .await;
        assert_eq!(fields(status, &body), ["agents[0]"]);
        app.stop().await;
    }
);

both_brokers!(
    a_message_to_an_unregistered_agent_queues_and_says_so,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        app.register("sender", &[]).await;
        app.register("known", &[]).await;
        let send = |to: &'static str, key: Option<&'static str>| {
            let mut request = app
                .client
                .post(app.url(&format!("/v1/agents/{to}/messages")))
                .json(&json!({"from": "sender", "message_type": "t", "content": 1}));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            call(request)
        };
        let answer = send("known", None).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert_eq!(answer.body["recipient_registered"], true);
        let answer = send("unknown", None).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert_eq!(answer.body["recipient_registered"], false);
        assert_eq!(answer.body["recipient_online"], false);
        // Keyed sends store the receipt with it, and a retry answers the same.
        let first = send("unknown", Some("k1")).await;
        assert_eq!(first.body["recipient_registered"], false);
        app.register("unknown", &[]).await;
        let retry = send("unknown", Some("k1")).await;
        assert_eq!(retry.body, first.body);
        // The messages waited, and the late registrant gets them.
        let claimed = app.claim("unknown", json!({})).await;
        assert_eq!(claimed.len(), 2);
        let answer = send("unknown", None).await;
        assert_eq!(answer.body["recipient_registered"], true);
        // Many sends at once (one batch): each receipt is right for its own recipient.
        let sends: Vec<_> = (0..40)
            .map(|i| send(if i % 2 == 0 { "known" } else { "nobody" }, None))
            .collect();
        for (i, answer) in futures_util::future::join_all(sends)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(answer.status, 202);
            assert_eq!(answer.body["recipient_registered"], i % 2 == 0, "{i}");
        }
        app.stop().await;
    }
);

both_brokers!(
    a_lease_that_never_existed_does_not_match,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        app.register("w", &[]).await;
        for _ in 0..3 {
            app.send("w", "b", json!(1), 0).await;
        }
        let claimed = app.claim("w", json!({"limit": 3})).await;
        // One claim, one lease for every message it returned.
        let lease = claimed[0]["lease_id"].as_str().unwrap();
        assert!(
            claimed.iter().all(|m| m["lease_id"] == lease),
            "{claimed:?}"
        );
        let id = claimed[0]["message_id"].as_str().unwrap();
        for (action, body) in [
            ("ack", json!({"lease_id": "lse_never_issued"})),
            ("nack", json!({"lease_id": "lse_never_issued"})),
            (
                "extend",
                json!({"lease_id": "lse_never_issued", "visibility_timeout_s": 30}),
            ),
        ] {
            let answer = call(
                app.client
                    .post(app.url(&format!("/v1/agents/w/messages/{id}/{action}")))
                    .json(&body),
            )
            .await;
            let detail = problem(&answer, 409)["detail"].as_str().unwrap();
            assert!(
                detail.contains("lease does not match"),
                "{action}: {detail}"
            );
            assert!(!detail.contains("delivered again"), "{action}: {detail}");
        }
        // A message back in the queue, acked with a made-up lease: the same answer.
        let other = claimed[1]["message_id"].as_str().unwrap();
        let (status, _) = app
            .post(
                &format!("/v1/agents/w/messages/{other}/nack"),
                json!({"lease_id": lease}),
            )
            .await;
        assert_eq!(status, 204);
        let (status, body) = app
            .post(
                &format!("/v1/agents/w/messages/{other}/ack"),
                json!({"lease_id": "lse_typo"}),
            )
            .await;
        assert_eq!(status, 409);
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("lease does not match"),
            "{body}"
        );
        // The real lease still works.
        let (status, _) = app
            .post(
                &format!("/v1/agents/w/messages/{id}/ack"),
                json!({"lease_id": lease}),
            )
            .await;
        assert_eq!(status, 204);
        app.stop().await;
    }
);

// The command line, run as a child process.

fn ltmc() -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ltmc"));
    for (name, _) in std::env::vars() {
        if name.starts_with("LTMC_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

#[tokio::test]
async fn cli_openapi_into_a_closed_pipe_exits_quietly() {
    let mut child = ltmc()
        .arg("openapi")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, then close the pipe, as `| head -c 10` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 10];
    stdout.read_exact(&mut first).await.unwrap();
    drop(stdout);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[tokio::test]
async fn cli_refuses_one_value_for_the_admin_and_read_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = "same-token-0123456789";
    let output = ltmc()
        .current_dir(dir.path())
        .env("LTMC_ADMIN_TOKEN", token)
        .env("LTMC_READ_TOKEN", token)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr:?}");
    assert!(lines[0].contains("LTMC_ADMIN_TOKEN"), "{stderr:?}");
    assert!(lines[0].contains("LTMC_READ_TOKEN"), "{stderr:?}");
    assert!(
        !lines[0].contains(token),
        "the token was printed: {stderr:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Runs `ltmc serve` with `args` for `secs` seconds (stderr a pipe, not a terminal), then stops
/// it; returns what it logged.
async fn serve_for(args: &[&str], secs: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let mut child = ltmc()
        .args(["--bind", "127.0.0.1:0", "--database-url", &url])
        .args(args)
        .env("LTMC_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = tokio::spawn(async move {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log).await;
        log
    });
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let pid = child.id().expect("running");
    // SIGTERM: a graceful stop, so the log ends cleanly.
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("stops")
        .unwrap();
    reader.await.unwrap()
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let log = serve_for(&["--log", "debug"], 1).await;
    assert!(log.contains("ltmc serving"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a pipe: {log:?}");
}

#[tokio::test]
async fn an_unreachable_redis_is_logged_with_backoff() {
    // A port nothing listens on: every command, tick and reconnect fails for the whole run.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let log = serve_for(&["--redis-url", &url, "--tick-ms", "50"], 5).await;
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    // Before: about eight a second (a tick every 250 ms, two lines each), 80 here at 20 ticks a
    // second. Now: the first failure, then summaries at 1, 3 and 7 s.
    assert!(!warnings.is_empty(), "the outage is reported: {log}");
    assert!(
        warnings.len() <= 5,
        "{} warnings in 5 s:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(warnings[0].contains("redis is unavailable"), "{log}");
}
