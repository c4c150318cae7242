//! Workflows end to end with real agent clients (claim the `workflow.step` message, post the
//! result): each pattern, a DAG with a failing branch, cycles, capability routing, timeouts and
//! retries (the timer driven directly, with a clock moved forward), late results, cancel,
//! event-driven steps whose event came first, and auth.

use ltmc::common::now_ms;
use serde_json::{Value, json};

use crate::both_brokers;
use crate::harness::{Next, TestApp};

/// Claims `agent`'s next `workflow.step` message (acking it) and returns its content.
async fn take_step(app: &TestApp, agent: &str) -> Value {
    let claimed = app.claim(agent, json!({"limit": 1})).await;
    assert_eq!(claimed.len(), 1, "{agent} has no step message");
    let message = &claimed[0];
    assert_eq!(message["message_type"], "workflow.step");
    let (status, _) = app
        .post(
            &format!(
                "/v1/agents/{agent}/messages/{}/ack",
                message["message_id"].as_str().unwrap()
            ),
            json!({"lease_id": message["lease_id"]}),
        )
        .await;
    assert_eq!(status, 204);
    message["content"].clone()
}

/// Posts the result of the attempt described by `step` (a `workflow.step` content).
async fn answer(
    app: &TestApp,
    agent: &str,
    step: &Value,
    success: bool,
    output: Value,
) -> (u16, Value) {
    let path = format!(
        "/v1/workflows/{}/steps/{}/result",
        step["workflow_id"].as_str().unwrap(),
        step["step_id"].as_str().unwrap()
    );
    let mut body = json!({"agent_id": agent, "attempt": step["attempt"], "success": success});
    if success {
        body["output"] = output;
    } else {
        body["error"] = json!("it broke");
    }
    app.post(&path, body).await
}

async fn submit(app: &TestApp, def: Value) -> Value {
    let named: Vec<&str> = def["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|step| step["agent"].as_str())
        .collect();
    app.ensure_registered(&named).await;
    let (status, run) = app.post("/v1/workflows", def).await;
    assert_eq!(status, 201, "{run}");
    run
}

fn step_status(run: &Value, step_id: &str) -> String {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == step_id)
        .unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

both_brokers!(
    sequential_hands_over_with_previous_results,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        for (agent, caps) in [
            ("plan", vec!["planning"]),
            ("code", vec!["coding"]),
            ("test", vec!["testing"]),
        ] {
            app.register(agent, &caps).await;
        }
        let mut firehose = app
            .ws("/v1/events/stream?topics=workflows", &[])
            .await
            .unwrap();
        let run = submit(
            &app,
            json!({"name": "ship", "pattern": "sequential", "steps": [
            {"step_id": "design", "agent": "plan", "input": {"goal": "login"}},
            {"step_id": "build", "capability": "coding"},
            {"step_id": "verify", "agent": "test"}]}),
        )
        .await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        assert!(id.starts_with("wf_"));
        assert_eq!(run["status"], "executing");
        assert_eq!(run["current_step"], "design");
        assert_eq!(step_status(&run, "build"), "pending");

        let design = take_step(&app, "plan").await;
        assert_eq!(design["attempt"], 1);
        assert_eq!(design["input"], json!({"goal": "login"}));
        assert_eq!(design["previous_results"], json!({}));
        assert!(
            app.claim("code", json!({})).await.is_empty(),
            "one step at a time"
        );
        let (status, after) = answer(&app, "plan", &design, true, json!({"spec": "v1"})).await;
        assert_eq!(status, 200, "{after}");
        assert_eq!(after["current_step"], "build");

        let build = take_step(&app, "code").await;
        assert_eq!(build["previous_results"], json!({"design": {"spec": "v1"}}));
        answer(&app, "code", &build, true, json!("built")).await;
        let verify = take_step(&app, "test").await;
        assert_eq!(
            verify["previous_results"],
            json!({"design": {"spec": "v1"}, "build": "built"})
        );
        let (_, done) = answer(&app, "test", &verify, true, json!({"ok": true})).await;
        assert_eq!(done["status"], "completed");
        assert!(done["finished_at"].is_string());
        assert_eq!(done["steps"][2]["output"], json!({"ok": true}));

        // A handoff between each pair of consecutive agents, with the previous output as context.
        let (_, handoffs) = app.get("/v1/handoffs?agent=code").await;
        let from_plan = handoffs["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["from_agent"] == "plan")
            .expect("plan → code handoff");
        assert_eq!(from_plan["status"], "completed");
        assert_eq!(from_plan["workflow_id"], id.as_str());
        assert_eq!(
            from_plan["context"]["previous_output"],
            json!({"spec": "v1"})
        );
        // Learning records: precedes edges, the pattern, a memory.
        let (_, edges) = app
            .get(&format!(
                "/v1/graph/edges?node=workflow_step:{id}/design&relationship=precedes"
            ))
            .await;
        assert_eq!(
            edges["items"][0]["target"],
            format!("workflow_step:{id}/build")
        );
        let (_, stats) = app.get("/v1/patterns/stats").await;
        let types = stats["types"].as_array().unwrap();
        assert!(
            types
                .iter()
                .any(|t| t["pattern_type"] == "successful_orchestration"),
            "{stats}"
        );
        // Progress on the event stream.
        let mut kinds = Vec::new();
        while kinds.last().map(String::as_str) != Some("workflow.completed") {
            kinds.push(firehose.frame().await["type"].as_str().unwrap().to_owned());
        }
        assert_eq!(kinds.first().unwrap(), "workflow.started");
        assert_eq!(
            kinds
                .iter()
                .filter(|k| *k == "workflow.step.succeeded")
                .count(),
            3
        );
        assert_eq!(
            kinds
                .iter()
                .filter(|k| *k == "workflow.step.dispatched")
                .count(),
            3
        );
        app.stop().await;
    }
);

both_brokers!(parallel_waits_for_every_step, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let run = submit(
        &app,
        json!({"name": "fan", "pattern": "parallel", "steps": [
            {"step_id": "a", "agent": "w1"}, {"step_id": "b", "agent": "w2"},
            {"step_id": "c", "agent": "w3"}]}),
    )
    .await;
    assert!(
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "dispatched")
    );
    let a = take_step(&app, "w1").await;
    let b = take_step(&app, "w2").await;
    let c = take_step(&app, "w3").await;
    assert_eq!(
        answer(&app, "w2", &b, false, json!(null)).await.1["status"],
        "executing"
    );
    assert_eq!(
        answer(&app, "w1", &a, true, json!(1)).await.1["status"],
        "executing"
    );
    let (_, done) = answer(&app, "w3", &c, true, json!(3)).await;
    assert_eq!(
        done["status"], "failed",
        "a failed step fails the run, after the barrier"
    );
    assert_eq!(step_status(&done, "b"), "failed");
    assert_eq!(done["steps"][1]["error"], "it broke");
    assert_eq!(step_status(&done, "c"), "succeeded");
    app.stop().await;
});

both_brokers!(dag_failure_skips_dependants_only, |kind| async move {
    let app = TestApp::spawn(kind).await;
    // a → b → c, a → d; e on its own.
    let run = submit(
        &app,
        json!({"name": "dag", "pattern": "dependency_based", "steps": [
            {"step_id": "a", "agent": "x"},
            {"step_id": "b", "agent": "x", "depends_on": ["a"]},
            {"step_id": "c", "agent": "x", "depends_on": ["b"]},
            {"step_id": "d", "agent": "y", "depends_on": ["a"]},
            {"step_id": "e", "agent": "y"}]}),
    )
    .await;
    let id = run["workflow_id"].as_str().unwrap().to_owned();
    assert_eq!(step_status(&run, "a"), "dispatched");
    assert_eq!(step_status(&run, "e"), "dispatched");
    assert_eq!(step_status(&run, "b"), "pending");
    let a = take_step(&app, "x").await;
    answer(&app, "x", &a, true, json!("A")).await;
    let b = take_step(&app, "x").await;
    assert_eq!(b["step_id"], "b");
    assert_eq!(b["previous_results"], json!({"a": "A"}));
    let (_, after_b) = answer(&app, "x", &b, false, json!(null)).await;
    assert_eq!(step_status(&after_b, "c"), "skipped");
    assert_eq!(after_b["status"], "executing", "d and e still run");
    let mut last = Value::Null;
    for _ in 0..2 {
        let step = take_step(&app, "y").await;
        last = answer(&app, "y", &step, true, json!("ok")).await.1;
    }
    assert_eq!(step_status(&last, "d"), "succeeded");
    assert_eq!(step_status(&last, "e"), "succeeded");
    assert_eq!(last["status"], "failed");
    let (_, stats) = app.get("/v1/patterns/stats").await;
    assert!(
        stats["types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["pattern_type"] == "orchestration_failure"),
        "{stats}"
    );
    assert_eq!(
        stats["workflow_patterns"],
        json!([{"pattern_type": "dependency_based", "uses": 1, "successes": 0, "failures": 1,
                "success_rate": 0.0}])
    );
    assert_eq!(
        app.get(&format!("/v1/workflows/{id}")).await.1["status"],
        "failed"
    );
    app.stop().await;
});

both_brokers!(
    invalid_definitions_are_422_with_the_field,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let (status, problem) = app
            .post(
                "/v1/workflows",
                json!({"name": "loop", "pattern": "dependency_based", "steps": [
                {"step_id": "a", "agent": "x", "depends_on": ["c"]},
                {"step_id": "b", "agent": "x", "depends_on": ["a"]},
                {"step_id": "c", "agent": "x", "depends_on": ["b"]}]}),
            )
            .await;
        assert_eq!(status, 422, "{problem}");
        let message = problem["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("a -> c -> b -> a")
                || message.contains("a -> b -> c -> a")
                || message.contains("cycle"),
            "{message}"
        );
        assert!(message.contains("cycle"), "{message}");
        for (def, field) in [
            (
                json!({"name": "x", "pattern": "sequential", "steps": []}),
                "steps",
            ),
            (
                json!({"name": "x", "pattern": "sequential", "steps": [{"step_id": "a"}]}),
                "steps[0]",
            ),
            (
                json!({"name": "x", "pattern": "event_driven", "steps": [{"step_id": "a", "agent": "x"}]}),
                "steps[0].trigger",
            ),
            (
                json!({"name": "x", "pattern": "sequential", "steps": [{"step_id": "a", "agent": "x"}, {"step_id": "a", "agent": "x"}]}),
                "steps[1].step_id",
            ),
        ] {
            let (status, problem) = app.post("/v1/workflows", def).await;
            assert_eq!(status, 422, "{problem}");
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
        assert_eq!(
            app.get("/v1/workflows").await.1["items"],
            json!([]),
            "nothing was created"
        );
        app.stop().await;
    }
);

both_brokers!(
    capability_routing_picks_least_loaded_and_waits,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        for (agent, max) in [("big", 2), ("small", 1)] {
            let (status, _) = app
            .post(
                "/v1/agents",
                json!({"agent_id": agent, "capabilities": ["lint"], "max_concurrent_tasks": max}),
            )
            .await;
            assert_eq!(status, 201);
        }
        let run = submit(
            &app,
            json!({"name": "lint", "pattern": "parallel", "steps": [
            {"step_id": "s1", "capability": "lint"}, {"step_id": "s2", "capability": "lint"},
            {"step_id": "s3", "capability": "lint"}, {"step_id": "s4", "capability": "lint"}]}),
        )
        .await;
        let holders: Vec<&str> = run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["agent_id"].as_str().unwrap_or("-"))
            .collect();
        // 0/2 vs 0/1 → big (fewer held, then the id); 1/2 vs 0/1 → small; 1/2 vs 1/1 → big; full.
        assert_eq!(holders, ["big", "small", "big", "-"]);
        assert_eq!(step_status(&run, "s4"), "waiting");
        assert_eq!(run["current_step"], "s1");
        // current_tasks counts the steps each holds.
        assert_eq!(app.get("/v1/agents/big").await.1["current_tasks"], 2);
        let (_, listed) = app.get("/v1/agents?capability=lint").await;
        let tasks: Vec<&Value> = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| &a["current_tasks"])
            .collect();
        assert_eq!(tasks, [&json!(2), &json!(1)]);
        // An agent at its limit never gets more; when one frees a slot, the waiting step goes there.
        let small = take_step(&app, "small").await;
        let (_, after) = answer(&app, "small", &small, true, json!(null)).await;
        assert_eq!(step_status(&after, "s4"), "dispatched");
        assert_eq!(after["steps"][3]["agent_id"], "small");
        app.stop().await;
    }
);

both_brokers!(
    timeouts_retry_then_fail_and_late_results_are_refused,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let run = submit(
            &app,
            json!({"name": "flaky", "pattern": "parallel", "steps": [
            {"step_id": "retry", "agent": "w", "timeout_ms": 50, "max_retries": 1},
            {"step_id": "once", "agent": "v", "timeout_ms": 50}]}),
        )
        .await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        let first = take_step(&app, "w").await;
        let _ = take_step(&app, "v").await;
        // The clock moves past both deadlines.
        let later = now_ms() + 1_000;
        assert_eq!(ltmc::workflows::tick(&app.state, later).await.unwrap(), 2);
        let (_, run) = app.get(&format!("/v1/workflows/{id}")).await;
        assert_eq!(step_status(&run, "retry"), "pending", "backing off");
        assert_eq!(step_status(&run, "once"), "timed_out");
        // The timed-out attempt's late result is refused.
        let (status, problem) = answer(&app, "w", &first, true, json!("late")).await;
        assert_eq!(status, 409, "{problem}");
        // After the backoff (1-1.2 s for the first retry) the second attempt goes out …
        assert_eq!(
            ltmc::workflows::tick(&app.state, later + 999)
                .await
                .unwrap(),
            0,
            "still backing off"
        );
        assert_eq!(
            ltmc::workflows::tick(&app.state, later + 1_201)
                .await
                .unwrap(),
            1
        );
        let second = take_step(&app, "w").await;
        assert_eq!(second["attempt"], 2);
        let (status, _) = answer(&app, "w", &first, true, json!("late")).await;
        assert_eq!(status, 409, "attempt 1 is superseded");
        let (status, _) = answer(&app, "intruder", &second, true, json!("x")).await;
        assert_eq!(status, 409, "another agent does not hold it");
        // … and succeeds; the run still fails for the step that ran out of attempts.
        let (status, done) = answer(&app, "w", &second, true, json!("ok")).await;
        assert_eq!(status, 200, "{done}");
        assert_eq!(step_status(&done, "retry"), "succeeded");
        assert_eq!(done["steps"][0]["attempts"], 2);
        assert_eq!(done["status"], "failed");
        // The holder repeating its result (its answer was lost) is told it was recorded; the
        // step completes once, with the first output; another outcome is refused.
        let (status, again) = answer(&app, "w", &second, true, json!("again")).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["steps"][0]["output"], "ok");
        let (status, _) = answer(&app, "w", &second, false, json!(null)).await;
        assert_eq!(status, 409, "a step completes once");
        let (_, run) = app.get(&format!("/v1/workflows/{id}")).await;
        assert_eq!(run["steps"][0]["attempts"], 2);
        app.stop().await;
    }
);

both_brokers!(
    cancel_stops_the_run_and_tells_the_holder,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let mut holder = app.ws("/v1/agents/w/stream", &[]).await.unwrap();
        let run = submit(
            &app,
            json!({"name": "long", "pattern": "sequential", "steps": [
            {"step_id": "one", "agent": "w"}, {"step_id": "two", "agent": "w"}]}),
        )
        .await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        let one = take_step(&app, "w").await;
        let (status, cancelled) = app
            .post(&format!("/v1/workflows/{id}/cancel"), json!({}))
            .await;
        assert_eq!(status, 200, "{cancelled}");
        assert_eq!(cancelled["status"], "cancelled");
        assert_eq!(step_status(&cancelled, "one"), "cancelled");
        assert_eq!(step_status(&cancelled, "two"), "cancelled");
        let mut kinds = Vec::new();
        while let Next::Frame(frame) = holder.next(std::time::Duration::from_millis(500)).await {
            kinds.push(frame["type"].as_str().unwrap_or_default().to_owned());
        }
        assert!(
            kinds.contains(&"workflow.step.cancelled".to_owned()),
            "{kinds:?}"
        );
        assert_eq!(answer(&app, "w", &one, true, json!(1)).await.0, 409);
        assert_eq!(
            app.post(&format!("/v1/workflows/{id}/cancel"), json!({}))
                .await
                .0,
            409
        );
        assert_eq!(
            app.post("/v1/workflows/wf_nope/cancel", json!({})).await.0,
            404
        );
        let (_, listed) = app.get("/v1/workflows?status=cancelled").await;
        assert_eq!(listed["items"][0]["workflow_id"], id.as_str());
        app.stop().await;
    }
);

both_brokers!(
    event_driven_steps_see_events_sent_before_they_wait,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        // The event comes first …
        let (status, accepted) = app
            .post(
                "/v1/events",
                json!({"name": "pr.opened", "payload": {"pr": 7}}),
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(accepted["steps_started"], 0);
        // … and still starts the step that begins waiting for it now.
        let run = submit(
            &app,
            json!({"name": "on-pr", "pattern": "event_driven", "steps": [
            {"step_id": "review", "agent": "r", "trigger": "pr.opened"},
            {"step_id": "merge", "agent": "m", "trigger": "step:review"},
            {"step_id": "deploy", "agent": "d", "trigger": "release.cut"}]}),
        )
        .await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        assert_eq!(step_status(&run, "review"), "dispatched");
        assert_eq!(step_status(&run, "merge"), "pending");
        let review = take_step(&app, "r").await;
        assert_eq!(review["previous_results"], json!({"pr.opened": {"pr": 7}}));
        answer(&app, "r", &review, true, json!({"approved": true})).await;
        // A step's completion is the event `step:<step_id>`.
        let merge = take_step(&app, "m").await;
        assert_eq!(
            merge["previous_results"],
            json!({"step:review": {"approved": true}})
        );
        let (_, after) = answer(&app, "m", &merge, true, json!(null)).await;
        assert_eq!(
            after["status"], "executing",
            "deploy still waits for its event"
        );
        let (_, accepted) = app
            .post(
                "/v1/events",
                json!({"name": "release.cut", "workflow_id": id}),
            )
            .await;
        assert_eq!(accepted["steps_started"], 1);
        let deploy = take_step(&app, "d").await;
        let (_, done) = answer(&app, "d", &deploy, true, json!(null)).await;
        assert_eq!(done["status"], "completed");
        assert_eq!(
            app.post("/v1/events", json!({"name": "step:review"}))
                .await
                .0,
            422,
            "step: events are the engine's own"
        );
        app.stop().await;
    }
);

both_brokers!(
    results_arriving_together_each_end_their_step_once,
    |kind| async move {
        // Results that arrive together are committed together: each ends its own step once, a
        // repeat is answered 200, a result from an agent that does not hold the step 409.
        let app = TestApp::spawn(kind).await;
        let agents = ["r0", "r1", "r2", "r3"];
        let steps: Vec<Value> = (0..40)
            .map(|i| json!({"step_id": format!("s{i}"), "agent": agents[i % 4]}))
            .collect();
        let run = submit(
            &app,
            json!({"name": "burst", "pattern": "parallel", "steps": steps}),
        )
        .await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        let mut taken = Vec::new();
        for agent in agents {
            let claimed = app
                .claim(agent, json!({"limit": 100, "auto_ack": true}))
                .await;
            assert_eq!(claimed.len(), 10, "{agent}'s steps");
            taken.extend(claimed.into_iter().map(|m| (agent, m["content"].clone())));
        }
        let by = |agent: &str| json!({"by": agent});
        let (first, again, intruders) = tokio::join!(
            futures_util::future::join_all(taken.iter().map(|(a, step)| answer(
                &app,
                a,
                step,
                true,
                by(a)
            ))),
            futures_util::future::join_all(taken[..10].iter().map(|(a, step)| answer(
                &app,
                a,
                step,
                true,
                by(a)
            ))),
            futures_util::future::join_all(taken[10..15].iter().map(|(_, step)| answer(
                &app,
                "intruder",
                step,
                true,
                by("x")
            ))),
        );
        assert!(first.iter().all(|(status, _)| *status == 200), "{first:?}");
        assert!(again.iter().all(|(status, _)| *status == 200), "{again:?}");
        assert!(
            intruders.iter().all(|(status, _)| *status == 409),
            "{intruders:?}"
        );

        let (_, done) = app.get(&format!("/v1/workflows/{id}")).await;
        assert_eq!(done["status"], "completed", "{done}");
        for step in done["steps"].as_array().unwrap() {
            assert_eq!(step["status"], "succeeded");
            assert_eq!(step["attempts"], 1);
            assert_eq!(step["output"], json!({"by": step["agent_id"]}));
        }
        let (succeeded, twice) = steps_completed_twice(&crate::harness::db_path(&app.dir)).await;
        assert_eq!((succeeded, twice), (40, 0), "each step succeeded once");
        // The run's learning record names every agent once.
        let (_, memories) = app.get("/v1/memories?tag=workflow&limit=10").await;
        let record = memories["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["metadata"]["workflow_id"] == id.as_str())
            .expect("the run's memory");
        assert_eq!(record["metadata"]["agents"], json!(agents));
        assert_eq!(record["metadata"]["status"], "completed");
        app.stop().await;
    }
);

/// A simulated agent's turn against `base`: claims its step messages (short leases, so a message
/// claimed before a crash comes back soon), posts each result and acks. A 409 means the step was
/// already answered (e.g. the answer committed but the crash lost the reply): ack and move on.
/// Returns how many results were accepted.
async fn agent_turn(client: &reqwest::Client, base: &str, agent: &str) -> usize {
    let Ok(response) = client
        .post(format!("{base}/v1/agents/{agent}/messages/claim"))
        .json(&json!({"limit": 20, "visibility_timeout_s": 1}))
        .send()
        .await
    else {
        return 0;
    };
    let Ok(claimed) = response.json::<Value>().await else {
        return 0;
    };
    let mut accepted = 0;
    for message in claimed["messages"].as_array().cloned().unwrap_or_default() {
        let step = &message["content"];
        let path = format!(
            "{base}/v1/workflows/{}/steps/{}/result",
            step["workflow_id"].as_str().unwrap(),
            step["step_id"].as_str().unwrap()
        );
        let body = json!({"agent_id": agent, "attempt": step["attempt"], "success": true,
                          "output": {"by": agent}});
        let Ok(answer) = client.post(path).json(&body).send().await else {
            return accepted;
        };
        match answer.status().as_u16() {
            200 => accepted += 1,
            409 => {}
            other => panic!("result answered {other}"),
        }
        let ack = format!(
            "{base}/v1/agents/{agent}/messages/{}/ack",
            message["message_id"].as_str().unwrap()
        );
        if client
            .post(ack)
            .json(&json!({"lease_id": message["lease_id"]}))
            .send()
            .await
            .is_err()
        {
            return accepted;
        }
    }
    accepted
}

/// How many steps completed more than once, from the event log in the SQLite file.
async fn steps_completed_twice(db: &std::path::Path) -> (usize, usize) {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT data FROM event WHERE type = 'workflow.step.succeeded'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let mut seen = std::collections::HashMap::new();
    for (data,) in rows {
        let data: Value = serde_json::from_str(&data).unwrap();
        *seen
            .entry(format!("{}/{}", data["workflow_id"], data["step_id"]))
            .or_insert(0) += 1;
    }
    (seen.len(), seen.values().filter(|n| **n > 1).count())
}

async fn completed(client: &reqwest::Client, base: &str) -> usize {
    let Ok(response) = client
        .get(format!("{base}/v1/workflows?status=completed&limit=500"))
        .send()
        .await
    else {
        return 0;
    };
    response
        .json::<Value>()
        .await
        .map_or(0, |page| page["items"].as_array().map_or(0, Vec::len))
}

const AGENTS: [&str; 4] = ["k0", "k1", "k2", "k3"];

/// 100 workflows (sequential and parallel, 3 steps each) over 4 agents.
async fn submit_hundred(client: &reqwest::Client, base: &str) {
    for agent in AGENTS {
        let body = json!({"agent_id": agent, "capabilities": []});
        let status = client
            .post(format!("{base}/v1/agents"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success(), "register {agent}: {status}");
    }
    for n in 0..100 {
        let pattern = if n % 2 == 0 { "parallel" } else { "sequential" };
        let steps: Vec<Value> = (0..3)
            .map(|i| json!({"step_id": format!("s{i}"), "agent": AGENTS[(n + i) % 4]}))
            .collect();
        let status = client
            .post(format!("{base}/v1/workflows"))
            .json(&json!({"name": format!("w{n}"), "pattern": pattern, "steps": steps}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
}

/// The real binary, killed with SIGKILL in the middle of 100 concurrent workflows: after the
/// restart every run completes, and no step completes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_survive_kill_9_without_completing_a_step_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::harness::db_path(&dir);
    let client = reqwest::Client::new();
    let mut first = crate::harness::Process::start(&db, &[]).await;
    let base = format!("http://{}", first.addr);
    submit_hundred(&client, &base).await;
    let mut answered = 0;
    while answered < 150 {
        for agent in AGENTS {
            answered += agent_turn(&client, &base, agent).await;
        }
    }
    first.child.kill().await.unwrap();

    let second = crate::harness::Process::start(&db, &[]).await;
    let base = format!("http://{}", second.addr);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while completed(&client, &base).await < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "runs did not complete"
        );
        let mut moved = 0;
        for agent in AGENTS {
            moved += agent_turn(&client, &base, agent).await;
        }
        if moved == 0 {
            // Messages claimed before the kill come back when their 1 s leases run out.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    let (steps, twice) = steps_completed_twice(&db).await;
    assert_eq!((steps, twice), (300, 0));
}

/// Two instances over one database and one Redis: runs submitted to either complete with
/// results posted to either, the same result raced to both is taken once, and no step completes
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_runs_without_double_transitions() {
    let a = TestApp::spawn(crate::harness::Kind::Redis).await;
    let redis = a
        .redis
        .as_ref()
        .map(|r| (r.url.clone(), a.state.config.key_prefix.clone()));
    let mut options = crate::harness::Options::new(crate::harness::Kind::Redis);
    options.dir = Some(a.dir.clone());
    options.redis_url = redis;
    let b = TestApp::spawn_with(options).await;
    let client = reqwest::Client::new();
    let bases = [a.url(""), b.url("")];

    // Two outcomes of one attempt raced to the two instances: exactly one is taken.
    let run = submit(
        &a,
        json!({"name": "race", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "k0"}]}),
    )
    .await;
    let step = take_step(&b, "k0").await;
    let path = format!(
        "/v1/workflows/{}/steps/s/result",
        run["workflow_id"].as_str().unwrap()
    );
    let body =
        |success: bool| json!({"agent_id": "k0", "attempt": step["attempt"], "success": success});
    let (first, second) = tokio::join!(a.post(&path, body(true)), b.post(&path, body(false)));
    let mut statuses = [first.0, second.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409]);
    let (_, raced) = a
        .get(&format!(
            "/v1/workflows/{}",
            run["workflow_id"].as_str().unwrap()
        ))
        .await;
    let winner = if first.0 == 200 {
        "succeeded"
    } else {
        "failed"
    };
    assert_eq!(raced["steps"][0]["status"], winner);

    a.ensure_registered(&AGENTS).await;
    for n in 0..40 {
        let pattern = if n % 2 == 0 { "parallel" } else { "sequential" };
        let steps: Vec<Value> = (0..3)
            .map(|i| json!({"step_id": format!("s{i}"), "agent": AGENTS[(n + i) % 4]}))
            .collect();
        let status = client
            .post(format!("{}/v1/workflows", bases[n % 2]))
            .json(&json!({"name": format!("w{n}"), "pattern": pattern, "steps": steps}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut turn = 0;
    // The raced run completed only if the success won.
    let expected = 40 + usize::from(first.0 == 200);
    while completed(&client, &bases[0]).await < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "runs did not complete"
        );
        for agent in AGENTS {
            turn += 1;
            agent_turn(&client, &bases[turn % 2], agent).await;
        }
    }
    let (steps, twice) = steps_completed_twice(&crate::harness::db_path(&a.dir)).await;
    assert_eq!((steps, twice), (120 + usize::from(first.0 == 200), 0));
    b.stop().await;
    a.stop().await;
}

// Bad input to the workflow endpoints is a clear 4xx and changes nothing: unknown fields, an
// oversized output or payload, an empty event name, a result for an unknown step.
both_brokers!(
    bad_input_is_refused_and_changes_nothing,
    |kind| async move {
        let app = TestApp::spawn_with(
            crate::harness::Options::new(kind).configure(|c| c.limits.max_content_bytes = 1024),
        )
        .await;
        let def =
            json!({"name": "w", "pattern": "parallel", "steps": [{"step_id": "s", "agent": "w"}]});
        let mut typo = def.clone();
        typo["stepz"] = json!([]);
        assert_eq!(app.post("/v1/workflows", typo).await.0, 422);
        let run = submit(&app, def).await;
        let id = run["workflow_id"].as_str().unwrap().to_owned();
        let step = take_step(&app, "w").await;
        let path = format!("/v1/workflows/{id}/steps/s/result");
        let result = |extra: Value| {
            let mut body = json!({"agent_id": "w", "attempt": step["attempt"], "success": true});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            body
        };
        let cases = [
            (path.clone(), result(json!({"atempt": 1})), 422),
            (
                path.clone(),
                result(json!({"output": "x".repeat(2000)})),
                413,
            ),
            (
                path.clone(),
                result(json!({"error": "e".repeat(5000)})),
                422,
            ),
            (path.clone(), result(json!({"agent_id": "bad id"})), 422),
            (
                format!("/v1/workflows/{id}/steps/nope/result"),
                result(json!({})),
                404,
            ),
            (
                "/v1/workflows/wf_nope/steps/s/result".into(),
                result(json!({})),
                404,
            ),
            ("/v1/events".into(), json!({"name": ""}), 422),
            (
                "/v1/events".into(),
                json!({"name": "e", "payload": {"p": "x".repeat(2000)}}),
                413,
            ),
            (
                "/v1/events".into(),
                json!({"name": "e", "workflow_id": "wf_nope"}),
                404,
            ),
            ("/v1/events".into(), json!({"name": "e", "extra": 1}), 422),
        ];
        for (path, body, expected) in cases {
            let (status, problem) = app.post(&path, body.clone()).await;
            assert_eq!(status, expected, "{path} {body}: {problem}");
            assert!(
                problem["title"].is_string(),
                "a problem document: {problem}"
            );
        }
        let (_, unchanged) = app.get(&format!("/v1/workflows/{id}")).await;
        assert_eq!(step_status(&unchanged, "s"), "dispatched");
        assert_eq!(unchanged["steps"][0]["attempts"], 1);
        assert_eq!(app.get("/v1/workflows?status=nope").await.0, 422);
        app.stop().await;
    }
);
