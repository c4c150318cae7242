//! Durable priority queues: order, leases, redelivery, dead letters, replay, limits.

use ltmc::common::now_ms;
use serde_json::json;

use crate::both_brokers;
use crate::harness::{Options, TestApp};

both_brokers!(
    priority_then_fifo_also_across_redelivery,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let low1 = app.send("worker", "boss", json!("low1"), 0).await;
        let high = app.send("worker", "boss", json!("high"), 9).await;
        let low2 = app.send("worker", "boss", json!("low2"), 0).await;
        let mid = app.send("worker", "boss", json!("mid"), 5).await;

        let ids = |messages: &[serde_json::Value]| -> Vec<String> {
            messages
                .iter()
                .map(|m| m["message_id"].as_str().unwrap().to_owned())
                .collect()
        };
        // Claim the first two, let their leases run out: they go back to their old places.
        let first = app
            .claim("worker", json!({"limit": 2, "visibility_timeout_s": 1}))
            .await;
        assert_eq!(ids(&first), [high.clone(), mid.clone()]);
        let reaped = ltmc::messages::reap_tick(&app.state, now_ms() + 1_500)
            .await
            .unwrap();
        assert_eq!(reaped.redelivered, 2);

        let all = app.claim("worker", json!({"limit": 10})).await;
        assert_eq!(ids(&all), [high, mid, low1, low2]);
        assert_eq!(all[0]["delivery_count"], 2);
        assert_eq!(all[2]["delivery_count"], 1);
        assert_eq!(all[0]["content"], "high");
        app.stop().await;
    }
);

both_brokers!(
    lease_expiry_redelivers_then_dead_letters_then_replay,
    |kind| async move {
        let app =
            TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_deliveries = 2))
                .await;
        let poison = app.send("worker", "boss", json!({"poison": true}), 5).await;
        let healthy = app.send("worker", "boss", json!({"ok": true}), 0).await;

        // Two deliveries of the poison message, each lease running out.
        let mut now = now_ms();
        for delivery in 1..=2 {
            let got = app
                .claim("worker", json!({"limit": 1, "visibility_timeout_s": 1}))
                .await;
            assert_eq!(got[0]["message_id"], poison.as_str());
            assert_eq!(got[0]["delivery_count"], delivery);
            now += 2_000;
            ltmc::messages::reap_tick(&app.state, now).await.unwrap();
        }
        // It is dead now and does not block the message behind it.
        let (_, dead) = app.get("/v1/agents/worker/messages?state=dead").await;
        assert_eq!(dead["items"][0]["message_id"], poison.as_str());
        let next = app.claim("worker", json!({"limit": 10})).await;
        assert_eq!(next.len(), 1);
        assert_eq!(next[0]["message_id"], healthy.as_str());

        // Replay puts it back with a fresh budget; a second replay is a conflict.
        let replay = format!("/v1/agents/worker/messages/{poison}/replay");
        assert_eq!(app.post(&replay, json!({})).await.0, 204);
        assert_eq!(app.post(&replay, json!({})).await.0, 409);
        let again = app.claim("worker", json!({"limit": 10})).await;
        assert_eq!(again[0]["message_id"], poison.as_str());
        assert_eq!(again[0]["delivery_count"], 1);
        // Unknown message: 404.
        assert_eq!(
            app.post("/v1/agents/worker/messages/msg_nope/replay", json!({}))
                .await
                .0,
            404
        );
        app.stop().await;
    }
);

both_brokers!(
    stale_lease_is_409_and_ack_is_idempotent,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let id = app.send("worker", "boss", json!(1), 0).await;
        let first = app
            .claim("worker", json!({"visibility_timeout_s": 1}))
            .await;
        let stale_lease = first[0]["lease_id"].as_str().unwrap().to_owned();
        ltmc::messages::reap_tick(&app.state, now_ms() + 1_500)
            .await
            .unwrap();
        let second = app.claim("worker", json!({})).await;
        let lease = second[0]["lease_id"].as_str().unwrap().to_owned();
        assert_ne!(lease, stale_lease);

        let ack = format!("/v1/agents/worker/messages/{id}/ack");
        let (status, problem) = app.post(&ack, json!({"lease_id": stale_lease})).await;
        assert_eq!(status, 409, "{problem}");
        assert_eq!(problem["type"], "urn:ltmc:problem:conflict");
        for verb in ["nack", "extend"] {
            let body = json!({"lease_id": stale_lease, "visibility_timeout_s": 5});
            let body = if verb == "nack" {
                json!({"lease_id": stale_lease})
            } else {
                body
            };
            assert_eq!(
                app.post(&format!("/v1/agents/worker/messages/{id}/{verb}"), body)
                    .await
                    .0,
                409
            );
        }
        let extend = json!({"lease_id": lease, "visibility_timeout_s": 60});
        assert_eq!(
            app.post(&format!("/v1/agents/worker/messages/{id}/extend"), extend)
                .await
                .0,
            204
        );
        assert_eq!(app.post(&ack, json!({"lease_id": lease})).await.0, 204);
        assert_eq!(
            app.post(&ack, json!({"lease_id": lease})).await.0,
            204,
            "a repeated ack is 204"
        );
        assert_eq!(
            app.post(&ack, json!({"lease_id": stale_lease})).await.0,
            409
        );
        assert_eq!(
            app.post(
                "/v1/agents/worker/messages/msg_unknown/ack",
                json!({"lease_id": lease})
            )
            .await
            .0,
            404
        );
        // Acked messages are gone from the queue.
        assert!(app.claim("worker", json!({})).await.is_empty());
        app.stop().await;
    }
);

both_brokers!(
    nack_returns_to_old_place_and_delay_hides,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let a = app.send("w", "b", json!("a"), 0).await;
        let b = app.send("w", "b", json!("b"), 0).await;
        let got = app.claim("w", json!({"limit": 1})).await;
        assert_eq!(got[0]["message_id"], a.as_str());
        let lease = got[0]["lease_id"].as_str().unwrap();
        assert_eq!(
            app.post(
                &format!("/v1/agents/w/messages/{a}/nack"),
                json!({"lease_id": lease})
            )
            .await
            .0,
            204
        );
        let again = app.claim("w", json!({"limit": 1})).await;
        assert_eq!(
            again[0]["message_id"],
            a.as_str(),
            "back in its old place, ahead of b"
        );
        let lease = again[0]["lease_id"].as_str().unwrap();
        let delayed = json!({"lease_id": lease, "delay_s": 60});
        assert_eq!(
            app.post(&format!("/v1/agents/w/messages/{a}/nack"), delayed)
                .await
                .0,
            204
        );
        let next = app.claim("w", json!({"limit": 10})).await;
        assert_eq!(next.len(), 1, "a is hidden for 60 s");
        assert_eq!(next[0]["message_id"], b.as_str());
        app.stop().await;
    }
);

both_brokers!(auto_ack_and_listing_claim_nothing, |kind| async move {
    let app = TestApp::spawn(kind).await;
    for i in 0..5 {
        app.send("w", "b", json!(i), (i % 3) as u8).await;
    }
    let (status, page) = app.get("/v1/agents/w/messages?limit=2").await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = app
        .get(&format!("/v1/agents/w/messages?limit=10&cursor={cursor}"))
        .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 3);
    assert!(rest["next_cursor"].is_null());

    let got = app
        .claim("w", json!({"limit": 100, "auto_ack": true}))
        .await;
    assert_eq!(got.len(), 5);
    let priorities: Vec<i64> = got
        .iter()
        .map(|m| m["priority"].as_i64().unwrap())
        .collect();
    assert_eq!(priorities, [2, 1, 1, 0, 0]);
    // Auto-acked: nothing left, nothing comes back when time passes.
    ltmc::messages::reap_tick(&app.state, now_ms() + 3_600_000)
        .await
        .unwrap();
    assert!(app.claim("w", json!({})).await.is_empty());
    app.stop().await;
});

both_brokers!(queue_cap_answers_429, |kind| async move {
    let app =
        TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_queued_per_agent = 3))
            .await;
    for i in 0..3 {
        app.send("w", "b", json!(i), 0).await;
    }
    let (status, problem) = app
        .post(
            "/v1/agents/w/messages",
            json!({"from": "b", "message_type": "t", "content": 4}),
        )
        .await;
    assert_eq!(status, 429);
    assert!(problem["detail"].as_str().unwrap().contains("queue full"));
    // Other recipients are unaffected; acking frees a slot.
    app.send("other", "b", json!(1), 0).await;
    let got = app.claim("w", json!({"limit": 1})).await;
    let ack = json!({"lease_id": got[0]["lease_id"]});
    let id = got[0]["message_id"].as_str().unwrap();
    assert_eq!(
        app.post(&format!("/v1/agents/w/messages/{id}/ack"), ack)
            .await
            .0,
        204
    );
    app.send("w", "b", json!(5), 0).await;
    app.stop().await;
});

both_brokers!(idempotency_key_makes_retries_safe, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let send = || {
        app.client
            .post(app.url("/v1/agents/w/messages"))
            .header("idempotency-key", "retry-1")
            .json(&json!({"from": "b", "message_type": "t", "content": "once"}))
            .send()
    };
    let first: serde_json::Value = send().await.unwrap().json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(second.status(), 202);
    let second: serde_json::Value = second.json().await.unwrap();
    assert_eq!(first["message_id"], second["message_id"]);
    assert_eq!(app.claim("w", json!({"limit": 10})).await.len(), 1);
    app.stop().await;
});

both_brokers!(
    concurrent_claims_share_a_queue_without_overlap,
    |kind| async move {
        // Claims arriving together run as one statement per round: a second claim for the
        // same agent takes what the first left, never the same message.
        let app = TestApp::spawn(kind).await;
        for i in 0..60 {
            app.send("shared", "b", json!(i), 0).await;
        }
        for i in 0..5 {
            app.send("other", "b", json!(i), 0).await;
        }
        let shared = (0..6).map(|_| app.claim("shared", json!({"limit": 10})));
        let other = (0..3).map(|_| app.claim("other", json!({"limit": 2, "auto_ack": true})));
        let (shared, other) = tokio::join!(
            futures_util::future::join_all(shared),
            futures_util::future::join_all(other)
        );
        let mut contents: Vec<i64> = shared
            .iter()
            .flatten()
            .map(|m| m["content"].as_i64().unwrap())
            .collect();
        assert!(
            shared.iter().all(|batch| batch.len() == 10),
            "each claim takes its limit"
        );
        contents.sort_unstable();
        assert_eq!(contents, (0..60).collect::<Vec<_>>(), "every message once");
        let leases: std::collections::HashSet<&str> = shared
            .iter()
            .map(|batch| {
                let lease = batch[0]["lease_id"].as_str().unwrap();
                assert!(batch.iter().all(|m| m["lease_id"] == lease));
                lease
            })
            .collect();
        assert_eq!(leases.len(), 6, "one lease per claim");
        // In claim order within each claim.
        for batch in &shared {
            let order: Vec<i64> = batch
                .iter()
                .map(|m| m["content"].as_i64().unwrap())
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        }
        let mut sizes: Vec<usize> = other.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        assert_eq!(
            sizes,
            [1, 2, 2],
            "the limits of the other agent's claims, 5 in all"
        );
        assert!(app.claim("shared", json!({})).await.is_empty());
        assert!(app.claim("other", json!({})).await.is_empty());
        let (_, depth) = app
            .get("/v1/agents/shared/messages?state=claimed&limit=100")
            .await;
        assert_eq!(depth["items"].as_array().unwrap().len(), 60);
        app.stop().await;
    }
);
