//! Prometheus metrics move with real traffic, and `promtool check metrics` finds no problem in
//! the exposition.

use std::process::Stdio;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::both_brokers;
use crate::harness::TestApp;

async fn scrape(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    response.text().await.unwrap()
}

/// The value of the sample `series` (name with its labels, as exposed), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

both_brokers!(counters_and_gauges_move_with_traffic, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.ensure_registered(&["w"]).await;
    let before = scrape(&app).await;
    let mut stream = app.ws("/v1/agents/worker/stream", &[]).await.unwrap();
    for n in 0..10 {
        app.send("worker", "boss", json!(n), 0).await;
    }
    for _ in 0..10 {
        stream.frame().await;
    }
    let after = scrape(&app).await;
    let grew = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        grew(r#"ltmc_messages_total{outcome="sent"}"#),
        10.0,
        "{after}"
    );
    assert_eq!(
        grew(
            r#"ltmc_http_requests_total{method="POST",route="/v1/agents/{agent_id}/messages",status="202"}"#
        ),
        10.0
    );
    assert_eq!(
        sample(&after, r#"ltmc_queue_messages{state="queued"}"#),
        10.0
    );
    assert_eq!(sample(&after, "ltmc_streams_open"), 1.0);

    let claimed = app
        .claim("worker", json!({"limit": 4, "auto_ack": true}))
        .await;
    assert_eq!(claimed.len(), 4);
    let run = app
        .post(
            "/v1/workflows",
            json!({"name": "m", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "w"}]}),
        )
        .await
        .1;
    let step = app.claim("w", json!({"auto_ack": true})).await;
    let path = format!(
        "/v1/workflows/{}/steps/s/result",
        run["workflow_id"].as_str().unwrap()
    );
    let body = json!({"agent_id": "w", "attempt": step[0]["content"]["attempt"], "success": true});
    assert_eq!(app.post(&path, body).await.0, 200);
    drop(stream);
    // The server notices the closed stream on its own time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let last = loop {
        let text = scrape(&app).await;
        if sample(&text, "ltmc_streams_open") == 0.0 {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stream stays open: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let grew = |series: &str| sample(&last, series) - sample(&before, series);
    assert_eq!(grew(r#"ltmc_messages_total{outcome="claimed"}"#), 5.0);
    assert_eq!(grew(r#"ltmc_messages_total{outcome="acked"}"#), 5.0);
    assert_eq!(sample(&last, r#"ltmc_queue_messages{state="queued"}"#), 6.0);
    assert_eq!(
        grew(r#"ltmc_workflows_total{pattern="parallel",status="completed"}"#),
        1.0
    );
    assert_eq!(
        grew(r#"ltmc_workflow_steps_total{outcome="succeeded"}"#),
        1.0
    );
    assert_eq!(sample(&last, "ltmc_streams_open"), 0.0);
    assert_eq!(
        grew(r#"ltmc_stream_closes_total{reason="client_gone"}"#),
        1.0
    );
    app.stop().await;
});

// The exposition passes `promtool check metrics` (Prometheus' own linter) after traffic that
// touches every family.
both_brokers!(promtool_finds_no_problem, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("w", &["x"]).await;
    app.ensure_registered(&["boss"]).await;
    app.send("w", "boss", json!("hi"), 3).await;
    let (_, handoff) = app
        .post(
            "/v1/handoffs",
            json!({"from_agent": "boss", "to_agent": "w", "context": {}}),
        )
        .await;
    let accept = format!(
        "/v1/handoffs/{}/accept",
        handoff["handoff_id"].as_str().unwrap()
    );
    assert_eq!(app.post(&accept, json!({"agent_id": "w"})).await.0, 200);
    app.post("/v1/sessions", json!({"session_type": "t"})).await;
    app.get("/v1/nope").await;
    let text = scrape(&app).await;
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be on PATH for the metrics test (apt-get install prometheus)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = promtool.wait_with_output().await.unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "{said}\n{text}"
    );
    assert!(
        text.contains("ltmc_handoff_accept_seconds_count 1"),
        "{text}"
    );
    assert!(text.contains(r#"route="unmatched",status="404""#), "{text}");
    app.stop().await;
});

// The SLA report compares the window's measures with the thresholds: compliant with the seed's
// table, non-compliant once a threshold is configured below what was measured.
both_brokers!(
    sla_turns_non_compliant_below_measured_latency,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let strict = TestApp::spawn_with(crate::harness::Options::new(kind).configure(|c| {
            c.sla_thresholds = ltmc::ops::sla::Thresholds::with_overrides(
                r#"{"session_management": {"session_creation_time_ms": 0}}"#,
            )
            .unwrap();
            c.sla_min_samples = 1;
        }))
        .await;
        for app in [&app, &strict] {
            assert_eq!(
                app.post("/v1/sessions", json!({"session_type": "t"}))
                    .await
                    .0,
                201
            );
        }
        let (status, relaxed) = app.get("/v1/sla").await;
        assert_eq!(status, 200, "{relaxed}");
        // Only this component: the others' thresholds (10 ms for a send) a loaded CI machine may break.
        assert_eq!(
            relaxed["components"]["session_management"]["compliant"], true,
            "{relaxed}"
        );
        let session = &relaxed["components"]["session_management"];
        assert!(
            session["measured"]["p95_session_creation_ms"]
                .as_f64()
                .unwrap()
                > 0.0
        );
        assert_eq!(session["samples"]["p95_session_creation_ms"], 1);
        assert_eq!(session["thresholds"]["session_creation_time_ms"], 100.0);
        assert_eq!(
            relaxed["components"]["workflow_execution"]["measured"]["workflows_completed_rate"],
            json!(null)
        );

        let (_, report) = strict.get("/v1/sla").await;
        assert_eq!(report["overall_compliant"], false, "{report}");
        let session = &report["components"]["session_management"];
        assert_eq!(session["compliant"], false);
        assert_eq!(session["violations"], json!(["session_creation_time_ms"]));
        assert_eq!(report["components"]["agent_handoff"]["compliant"], true);
        strict.stop().await;
        app.stop().await;
    }
);

// The JSON report is computed from what happened: a handoff accepted and completed, a session, a
// parallel workflow run to completion by a registered agent.
both_brokers!(metrics_report_reflects_what_happened, |kind| async move {
    let app = TestApp::spawn(kind).await;
    app.register("w", &["x"]).await;
    app.ensure_registered(&["boss"]).await;
    let (_, empty) = app.get("/v1/metrics").await;
    assert_eq!(
        empty["agent_coordination"]["average_handoff_time_ms"],
        json!(null)
    );
    assert_eq!(
        empty["workflow_performance"]["workflow_completion_rate"],
        json!(null)
    );

    let (_, handoff) = app
        .post(
            "/v1/handoffs",
            json!({"from_agent": "boss", "to_agent": "w", "context": {"k": 1}}),
        )
        .await;
    let id = handoff["handoff_id"].as_str().unwrap();
    let digest = handoff["context_digest"].clone();
    let accept = json!({"agent_id": "w", "context_digest": digest});
    assert_eq!(
        app.post(&format!("/v1/handoffs/{id}/accept"), accept)
            .await
            .0,
        200
    );
    assert_eq!(
        app.post(&format!("/v1/handoffs/{id}/complete"), json!({}))
            .await
            .0,
        200
    );
    app.post("/v1/sessions", json!({"session_type": "t"})).await;
    let run = app
        .post(
            "/v1/workflows",
            json!({"name": "r", "pattern": "parallel", "steps": [
                {"step_id": "a", "agent": "w"}, {"step_id": "b", "agent": "w"}]}),
        )
        .await
        .1;
    let (_, during) = app.get("/v1/metrics").await;
    assert_eq!(during["workflow_performance"]["active_workflows"], 1);
    // Two steps held out of w's capacity of one task (the default): utilisation counts them.
    assert!(
        during["agent_coordination"]["agent_utilization"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let claimed = app.claim("w", json!({"limit": 10, "auto_ack": true})).await;
    for step in claimed
        .iter()
        .filter(|m| m["message_type"] == "workflow.step")
    {
        let path = format!(
            "/v1/workflows/{}/steps/{}/result",
            run["workflow_id"].as_str().unwrap(),
            step["content"]["step_id"].as_str().unwrap()
        );
        let body = json!({"agent_id": "w", "attempt": step["content"]["attempt"], "success": true});
        assert_eq!(app.post(&path, body).await.0, 200);
    }
    let (status, report) = app.get("/v1/metrics").await;
    assert_eq!(status, 200, "{report}");
    let agents = &report["agent_coordination"];
    // w, and boss (registered to hand off).
    assert_eq!(agents["active_agents"], 2);
    assert!(agents["average_handoff_time_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(agents["coordination_success_rate"], 1.0);
    assert!(
        agents["coordination_operations_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let workflows = &report["workflow_performance"];
    assert_eq!(workflows["active_workflows"], 0);
    assert_eq!(workflows["workflow_completion_rate"], 1.0);
    assert_eq!(workflows["workflow_pattern_usage"], json!({"parallel": 1}));
    assert!(workflows["parallel_efficiency"].as_f64().unwrap() > 0.0);
    assert!(workflows["average_workflow_duration_ms"].as_f64().is_some());
    assert_eq!(report["session_management"]["active_sessions"], 1);
    assert_eq!(
        report["session_management"]["sessions_created_in_window"],
        1
    );
    assert_eq!(
        report["broker_performance"]["broker"],
        app.state.broker.name()
    );
    assert!(report["sla_compliance"]["overall_compliant"].is_boolean());
    app.stop().await;
});

/// A toy run: one handoff accepted by hand, slower than its threshold, and one whose accept
/// came with a wrong digest twice before the right one.
async fn toy_run(app: &TestApp) {
    app.register("boss", &["plan"]).await;
    app.register("w", &["x"]).await;
    let offer = json!({"from_agent": "boss", "to_agent": "w", "context": {"k": 1}});
    let (_, slow) = app.post("/v1/handoffs", offer.clone()).await;
    // Slower than the 1 ms threshold these tests configure.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let accept = format!(
        "/v1/handoffs/{}/accept",
        slow["handoff_id"].as_str().unwrap()
    );
    assert_eq!(app.post(&accept, json!({"agent_id": "w"})).await.0, 200);

    let (_, retried) = app.post("/v1/handoffs", offer).await;
    let accept = format!(
        "/v1/handoffs/{}/accept",
        retried["handoff_id"].as_str().unwrap()
    );
    let wrong = json!({"agent_id": "w", "context_digest": "0".repeat(64)});
    for _ in 0..2 {
        assert_eq!(app.post(&accept, wrong.clone()).await.0, 409);
    }
    let right = json!({"agent_id": "w", "context_digest": retried["context_digest"]});
    assert_eq!(app.post(&accept, right).await.0, 200);
}

fn strict_handoffs(c: &mut ltmc::config::Config) {
    c.sla_thresholds = ltmc::ops::sla::Thresholds::with_overrides(
        r#"{"agent_handoff": {"max_handoff_time_ms": 1}}"#,
    )
    .unwrap();
}

// Too few samples judge nothing: the toy run stays compliant, with insufficient data, and the
// broker's part names the broker that runs; diagnostics agree.
both_brokers!(sla_quiet_system_has_insufficient_data, |kind| async move {
    let app =
        TestApp::spawn_with(crate::harness::Options::new(kind).configure(strict_handoffs)).await;
    toy_run(&app).await;
    let (_, sla) = app.get("/v1/sla").await;
    assert_eq!(sla["overall_compliant"], true, "{sla}");
    assert_eq!(sla["min_samples"], 20);
    let handoff = &sla["components"]["agent_handoff"];
    assert_eq!(handoff["compliant"], true, "{sla}");
    assert_eq!(handoff["status"], "insufficient_data");
    assert_eq!(handoff["violations"], json!([]));
    assert!(handoff["measured"]["p95_handoff_time_ms"].as_f64().unwrap() > 1.0);
    assert_eq!(handoff["samples"]["p95_handoff_time_ms"], 2);
    // The mismatch counts once, however often it was retried.
    assert_eq!(handoff["samples"]["context_preserved_rate"], 1, "{sla}");
    assert_eq!(handoff["measured"]["context_preserved_rate"], 0.0);
    let broker = match kind {
        crate::harness::Kind::Memory => "in-process",
        crate::harness::Kind::Redis => "redis",
    };
    let coordination = &sla["components"]["redis_coordination"];
    assert_eq!(coordination["broker"], broker, "{sla}");
    assert!(
        coordination["label"].as_str().unwrap().contains(broker),
        "{sla}"
    );

    let (_, metrics) = app.get("/v1/metrics").await;
    assert_eq!(metrics["sla_compliance"]["overall_compliant"], true);
    let (_, diagnostics) = app.get("/v1/diagnostics").await;
    let check = &diagnostics["checks"]["sla_compliance"];
    assert_eq!(check["status"], "passed", "{diagnostics}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("insufficient data"),
        "{diagnostics}"
    );
    let connectivity = diagnostics["checks"]["broker_connectivity"]["detail"]
        .as_str()
        .unwrap();
    assert!(connectivity.contains(broker), "{diagnostics}");
    app.stop().await;
});

// Past the minimum sample count the verdict is computed: the same run breaks the handoff time,
// while context preservation (one sample, the mismatch counted once) is still not judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_judges_past_the_minimum_samples() {
    let app = TestApp::spawn_with(
        crate::harness::Options::new(crate::harness::Kind::Memory).configure(|c| {
            strict_handoffs(c);
            c.sla_min_samples = 2;
        }),
    )
    .await;
    toy_run(&app).await;
    let (_, sla) = app.get("/v1/sla").await;
    assert_eq!(sla["overall_compliant"], false, "{sla}");
    let handoff = &sla["components"]["agent_handoff"];
    assert_eq!(handoff["status"], "violated");
    assert_eq!(
        handoff["violations"],
        json!(["max_handoff_time_ms"]),
        "{sla}"
    );
    app.stop().await;
}

/// Diagnostics run the real checks: all pass on a healthy service; with Redis killed the broker
/// check fails (the report still answers, with the issue and a recommendation), and it passes
/// again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_fail_when_redis_dies_and_recover() {
    let mut app = TestApp::spawn(crate::harness::Kind::Redis).await;
    if !app.redis.as_ref().unwrap().owned() {
        eprintln!("skipped: LTMC_TEST_REDIS_URL is a shared Redis this test must not kill");
        return;
    }
    let (status, healthy) = app.get("/v1/diagnostics").await;
    assert_eq!(status, 200, "{healthy}");
    for name in [
        "sqlite_connectivity",
        "broker_connectivity",
        "agent_registry",
        "coordination_messaging",
        "stuck_leases",
        "dead_letters",
        "overdue_workflows",
        "sla_compliance",
        "storage",
    ] {
        let check = &healthy["checks"][name];
        assert!(
            check["status"] == "passed" || check["status"] == "warning",
            "{name}: {healthy}"
        );
    }
    // Up (a slow answer on a loaded machine is a warning, not a failure).
    assert_ne!(healthy["checks"]["broker_connectivity"]["status"], "failed");
    assert_ne!(
        healthy["checks"]["coordination_messaging"]["status"],
        "failed"
    );
    let healthy_score = healthy["health_score"].as_u64().unwrap();

    app.redis.as_mut().unwrap().kill().await;
    let (status, down) = app.get("/v1/diagnostics").await;
    assert_eq!(status, 200, "{down}");
    assert_eq!(
        down["checks"]["broker_connectivity"]["status"], "failed",
        "{down}"
    );
    assert!(down["health_score"].as_u64().unwrap() < healthy_score);
    assert!(
        down["issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().starts_with("broker_connectivity")),
        "{down}"
    );
    assert!(
        down["recommendations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("LTMC_REDIS_URL")),
        "{down}"
    );

    app.redis.as_mut().unwrap().restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, now) = app.get("/v1/diagnostics").await;
        if now["checks"]["broker_connectivity"]["status"] != "failed" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {now}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    app.stop().await;
}
