//! WebSocket streams: per-agent notifications and the firehose, resume without gaps, slow
//! consumers, several instances over one Redis, Redis restarts, shutdown and frame limits.

use std::time::Duration;

use ltmc::common::now_ms;
use ltmc::events::{Event, NewEvent};
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::both_brokers;
use crate::harness::{Kind, Next, Options, TestApp, Ws, db_path};

/// The `message_id` of a notification (agent-stream or firehose frame).
fn message_id(frame: &Value) -> &str {
    frame["message_id"]
        .as_str()
        .or_else(|| frame["data"]["message_id"].as_str())
        .unwrap_or_else(|| panic!("no message_id in {frame}"))
}

fn seq(frame: &Value) -> i64 {
    frame["seq"]
        .as_i64()
        .unwrap_or_else(|| panic!("no seq in {frame}"))
}

/// `at` is RFC 3339 UTC with milliseconds.
fn assert_timestamp(frame: &Value) {
    let at = frame["at"]
        .as_str()
        .unwrap_or_else(|| panic!("no at in {frame}"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(at).is_ok() && at.len() == 24 && at.ends_with('Z'),
        "at is not RFC 3339 UTC with milliseconds: {at}"
    );
}

/// Reads `n` frames and returns their message ids.
async fn message_ids(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(message_id(&ws.frame().await).to_owned());
    }
    ids
}

/// Asserts the stream is open and quiet: sends a probe message to `agent` and expects exactly
/// that as the next frame (an earlier unexpected frame would arrive first).
async fn expect_next_is_probe(app: &TestApp, ws: &mut Ws, agent: &str) {
    let probe = app.send(agent, "probe", json!("probe"), 0).await;
    let frame = ws.frame().await;
    assert_eq!(message_id(&frame), probe, "unexpected frame {frame}");
}

/// Opens a stream whose client socket has a tiny receive buffer, so server writes block soon
/// when the client does not read.
async fn ws_with_small_receive_buffer(app: &TestApp, path: &str) -> Ws {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(app.addr).await.unwrap();
    let mut request = format!("ws://{}{path}", app.addr)
        .into_client_request()
        .unwrap();
    if let Some(token) = &app.token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (stream, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp))
        .await
        .unwrap();
    Ws { stream }
}

both_brokers!(notifications_reach_the_right_streams, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let mut bob = app.ws("/v1/agents/bob/stream", &[]).await.unwrap();
    let mut messages = app
        .ws("/v1/events/stream?topics=messages", &[])
        .await
        .unwrap();
    let mut agents = app
        .ws("/v1/events/stream?topics=agents", &[])
        .await
        .unwrap();

    let to_alice = app.send("alice", "boss", json!({"task": 1}), 7).await;
    let frame = alice.frame().await;
    assert_eq!(frame["type"], "new_message");
    assert_eq!(frame["message_id"], to_alice.as_str());
    assert_eq!(frame["from"], "boss");
    assert_eq!(frame["priority"], 7);
    assert_timestamp(&frame);
    let alice_seq = seq(&frame);

    // Bob's stream skips alice's message: its first frame is bob's own.
    let to_bob = app.send("bob", "boss", json!({"task": 2}), 0).await;
    let frame = bob.frame().await;
    assert_eq!(frame["type"], "new_message");
    assert_eq!(frame["message_id"], to_bob.as_str());
    assert!(seq(&frame) > alice_seq, "seq only grows");

    // The firehose has both, in order, as {topic, type, seq, at, data}.
    let first = messages.frame().await;
    assert_eq!(first["topic"], "messages");
    assert_eq!(first["type"], "new_message");
    assert_eq!(seq(&first), alice_seq);
    assert_timestamp(&first);
    assert_eq!(first["data"]["message_id"], to_alice.as_str());
    assert_eq!(first["data"]["to"], "alice");
    assert_eq!(message_id(&messages.frame().await), to_bob);

    // The agents topic saw neither message: its first frame is the registration that follows.
    app.register("carol", &["x"]).await;
    let frame = agents.frame().await;
    assert_eq!(frame["topic"], "agents");
    assert_eq!(frame["type"], "agent.registered");
    // … which is neither on the messages topic nor on alice's stream: their next frame is this.
    let next = app.send("alice", "boss", json!({"task": 3}), 0).await;
    assert_eq!(message_id(&messages.frame().await), next);
    assert_eq!(message_id(&alice.frame().await), next);

    // An unknown topic is refused before the upgrade.
    match app
        .ws("/v1/events/stream?topics=messages,gossip", &[])
        .await
    {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 422);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(
                body.contains("gossip"),
                "the problem names the topic: {body}"
            );
        }
        other => panic!("expected 422, got {:?}", other.map(|_| "an open stream")),
    }
    app.stop().await;
});

// No `since`: "live from now" means from the handshake's answer. The server subscribes before it
// answers (the assertion below checks that directly, as the race it closes is rarely hit from
// outside), so a message sent right after the 101 is never missed.
both_brokers!(
    live_stream_sees_everything_after_its_handshake,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        for i in 0..30 {
            let agent = format!("fresh-{i}");
            let mut ws = app
                .ws(&format!("/v1/agents/{agent}/stream"), &[])
                .await
                .unwrap();
            assert!(
                app.state.hub.has_agent_listener(&agent),
                "subscribed before the 101"
            );
            let id = app.send(&agent, "boss", json!(i), 0).await;
            assert_eq!(message_id(&ws.frame().await), id, "attempt {i}");
        }
        app.stop().await;
    }
);

both_brokers!(resume_replays_exactly_what_was_missed, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let m1 = app.send("alice", "boss", json!(1), 0).await;
    let seen = alice.frame().await;
    assert_eq!(message_id(&seen), m1);
    let last_seen = seq(&seen);
    alice.stream.close(None).await.unwrap();
    drop(alice);

    // Missed while away, interleaved with traffic for someone else (and at another priority:
    // the stream follows commit order, not queue order).
    let m2 = app.send("alice", "boss", json!(2), 0).await;
    app.send("bob", "boss", json!("x"), 0).await;
    let m3 = app.send("alice", "boss", json!(3), 9).await;
    let m4 = app.send("alice", "boss", json!(4), 0).await;

    let mut alice = app
        .ws(&format!("/v1/agents/alice/stream?since={last_seen}"), &[])
        .await
        .unwrap();
    let resumed = alice.frame().await;
    assert_eq!(resumed["type"], "resumed");
    assert_eq!(resumed["recovered"], true);
    let missed = [
        alice.frame().await,
        alice.frame().await,
        alice.frame().await,
    ];
    let ids: Vec<&str> = missed.iter().map(message_id).collect();
    assert_eq!(ids, [m2.as_str(), m3.as_str(), m4.as_str()]);
    assert!(missed.windows(2).all(|w| seq(&w[0]) < seq(&w[1])));
    assert!(seq(&missed[0]) > last_seen);
    // Then live, with no duplicate of the replayed frames in between.
    let m5 = app.send("alice", "boss", json!(5), 0).await;
    let live = alice.frame().await;
    assert_eq!(message_id(&live), m5);
    drop(alice);

    // Last-Event-ID works the same way, for the firehose too.
    let after_m3 = seq(&missed[1]).to_string();
    let mut alice = app
        .ws(
            "/v1/agents/alice/stream",
            &[("last-event-id", after_m3.as_str())],
        )
        .await
        .unwrap();
    let mut firehose = app
        .ws(
            "/v1/events/stream?topics=messages",
            &[("last-event-id", after_m3.as_str())],
        )
        .await
        .unwrap();
    for ws in [&mut alice, &mut firehose] {
        let resumed = ws.frame().await;
        assert_eq!(resumed["type"], "resumed");
        assert_eq!(resumed["recovered"], true);
        assert_eq!(message_ids(ws, 2).await, [m4.clone(), m5.clone()]);
    }
    let m6 = app.send("alice", "boss", json!(6), 0).await;
    assert_eq!(message_id(&alice.frame().await), m6);
    assert_eq!(message_id(&firehose.frame().await), m6);

    // `since` wins over Last-Event-ID; both must be seqs.
    let mut both = app
        .ws(
            &format!("/v1/agents/alice/stream?since={}", seq(&live)),
            &[("last-event-id", "0")],
        )
        .await
        .unwrap();
    assert_eq!(both.frame().await["type"], "resumed");
    assert_eq!(message_id(&both.frame().await), m6);
    for (path, headers) in [
        ("/v1/agents/alice/stream?since=-1", vec![]),
        ("/v1/agents/alice/stream", vec![("last-event-id", "latest")]),
    ] {
        match app.ws(path, &headers).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 422, "{path} {headers:?}")
            }
            other => panic!("{path}: expected 422, got {:?}", other.map(|_| "open")),
        }
    }
    app.stop().await;
});

both_brokers!(
    resume_past_the_retained_history_is_not_recovered,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let mut firehose = app
            .ws("/v1/events/stream?topics=messages", &[])
            .await
            .unwrap();
        let m1 = app.send("alice", "boss", json!(1), 0).await;
        let m2 = app.send("alice", "boss", json!(2), 0).await;
        let s1 = seq(&firehose.frame().await);
        let s2 = seq(&firehose.frame().await);
        drop(firehose);

        // 1000 newer events: the log always keeps the newest 1000, so m1 and m2 may go.
        let mut tx = app.state.store.begin().await.unwrap();
        for i in 0..1000 {
            tx.emit(NewEvent::new("agents", "test.filler", json!({"i": i})));
        }
        tx.commit(&app.state.broker).await.unwrap();
        // Young events are kept whatever their number …
        assert_eq!(
            ltmc::events::prune_tick(&app.state, now_ms())
                .await
                .unwrap(),
            0
        );
        let mut alice = app
            .ws(&format!("/v1/agents/alice/stream?since={s1}"), &[])
            .await
            .unwrap();
        assert_eq!(alice.frame().await["recovered"], true);
        assert_eq!(message_id(&alice.frame().await), m2);
        drop(alice);
        // … past the retention, all but the newest 1000 go.
        let day_later = now_ms() + 25 * 3_600_000;
        assert_eq!(
            ltmc::events::prune_tick(&app.state, day_later)
                .await
                .unwrap(),
            2
        );

        // From before the pruned history: recovered:false, and what is left (nothing of alice's).
        let mut alice = app
            .ws(&format!("/v1/agents/alice/stream?since={s1}"), &[])
            .await
            .unwrap();
        let resumed = alice.frame().await;
        assert_eq!(resumed["type"], "resumed");
        assert_eq!(resumed["recovered"], false);
        let m3 = app.send("alice", "boss", json!(3), 0).await;
        assert_eq!(message_id(&alice.frame().await), m3, "live after the gap");
        // The client re-reads state over REST: nothing was lost from the queue.
        let (_, queued) = app.get("/v1/agents/alice/messages").await;
        let queued: Vec<&str> = queued["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["message_id"].as_str().unwrap())
            .collect();
        assert_eq!(queued, [m1.as_str(), m2.as_str(), m3.as_str()]);

        // From exactly where the pruning stopped nothing is missing: recovered:true.
        let mut agents = app
            .ws(&format!("/v1/events/stream?topics=agents&since={s2}"), &[])
            .await
            .unwrap();
        let resumed = agents.frame().await;
        assert_eq!(resumed["recovered"], true);
        let first = agents.frame().await;
        assert_eq!(first["type"], "test.filler");
        assert_eq!(first["data"]["i"], 0);
        let mut before = app
            .ws(
                &format!("/v1/events/stream?topics=agents&since={}", s2 - 1),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(before.frame().await["recovered"], false);
        app.stop().await;
    }
);

both_brokers!(expired_lease_notifies_the_stream_again, |kind| async move {
    let app =
        TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.max_deliveries = 2)).await;
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let id = app.send("alice", "boss", json!("work"), 3).await;
    let first = alice.frame().await;
    assert_eq!(message_id(&first), id);
    assert!(first.get("redelivered").is_none(), "{first}");

    let claimed = app.claim("alice", json!({"visibility_timeout_s": 1})).await;
    assert_eq!(claimed[0]["message_id"], id.as_str());
    // A lease still running is left alone and notifies nobody.
    let reaped = ltmc::messages::reap_tick(&app.state, now_ms())
        .await
        .unwrap();
    assert_eq!(reaped.redelivered, 0);
    let mut now = now_ms() + 1_500;
    let reaped = ltmc::messages::reap_tick(&app.state, now).await.unwrap();
    assert_eq!(reaped.redelivered, 1);
    let again = alice.frame().await;
    assert_eq!(again["type"], "new_message");
    assert_eq!(again["message_id"], id.as_str());
    assert_eq!(again["redelivered"], true);
    assert_eq!(again["priority"], 3);
    assert_eq!(again["delivery_count"], 1);
    assert!(seq(&again) > seq(&first));

    // The last allowed delivery runs out too: the stream hears of the dead letter.
    app.claim("alice", json!({"visibility_timeout_s": 1})).await;
    now += 1_500;
    let reaped = ltmc::messages::reap_tick(&app.state, now).await.unwrap();
    assert_eq!(reaped.dead_lettered, 1);
    let dead = alice.frame().await;
    assert_eq!(dead["type"], "message.dead_lettered");
    assert_eq!(dead["message_id"], id.as_str());
    assert_eq!(dead["delivery_count"], 2);

    // A replay puts it back, and the stream is told so, sender included.
    let replay = format!("/v1/agents/alice/messages/{id}/replay");
    assert_eq!(app.post(&replay, json!({})).await.0, 204);
    let replayed = alice.frame().await;
    assert_eq!(replayed["type"], "new_message");
    assert_eq!(replayed["message_id"], id.as_str());
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["from"], "boss");
    app.stop().await;
});

// A client resuming from a position the log never reached (say the database was replaced) is
// told the gap is not recoverable and carries on live, rather than waiting for seqs to catch up.
both_brokers!(
    resume_from_beyond_the_log_is_not_recovered,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        app.send("alice", "boss", json!(0), 0).await;
        let mut alice = app
            .ws("/v1/agents/alice/stream?since=1000000", &[])
            .await
            .unwrap();
        let resumed = alice.frame().await;
        assert_eq!(resumed["type"], "resumed");
        assert_eq!(resumed["recovered"], false);
        let live = app.send("alice", "boss", json!(1), 0).await;
        assert_eq!(alice.frame().await["message_id"], live.as_str());
        app.stop().await;
    }
);

both_brokers!(
    slow_consumer_is_closed_and_others_keep_receiving,
    |kind| async move {
        let app =
            TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.stream_buffer = 4)).await;
        let mut healthy = app.ws("/v1/agents/calm/stream", &[]).await.unwrap();
        let mut slow = ws_with_small_receive_buffer(&app, "/v1/agents/flood/stream").await;
        // Make sure the slow stream is live before flooding it.
        let warm_up = app.send("flood", "boss", json!(0), 0).await;
        assert_eq!(message_id(&slow.frame().await), warm_up);
        let before = app.send("calm", "boss", json!("before"), 0).await;
        assert_eq!(message_id(&healthy.frame().await), before);

        // Large notifications for `flood`, which never reads: its socket fills, the server's
        // write blocks, its buffer of 4 fills and the hub lets it go.
        let padding = "x".repeat(60_000);
        let mut emitted = 0;
        while app.state.hub.has_agent_listener("flood") {
            assert!(
                emitted < 500,
                "the slow consumer was never dropped after {emitted} events of 60 kB"
            );
            let mut tx = app.state.store.begin().await.unwrap();
            tx.emit(
                NewEvent::new("messages", "test.bulk", json!({"padding": padding}))
                    .to_agent("flood"),
            );
            tx.commit(&app.state.broker).await.unwrap();
            emitted += 1;
            tokio::task::yield_now().await;
        }
        // Meanwhile the healthy stream is served as usual.
        let during = app.send("calm", "boss", json!("during"), 0).await;
        assert_eq!(message_id(&healthy.frame().await), during);

        // The slow client finally reads: what was buffered, then a reconnectable 4008.
        assert_eq!(
            slow.close_code().await,
            Some(4008),
            "after {emitted} events"
        );
        let after = app.send("calm", "boss", json!("after"), 0).await;
        assert_eq!(message_id(&healthy.frame().await), after);
        app.stop().await;
    }
);

both_brokers!(
    a_consumer_that_stops_reading_is_told_4008_and_a_silent_one_1008,
    |kind| async move {
        let app =
            TestApp::spawn_with(Options::new(kind).configure(|c| c.limits.ping_interval_s = 1))
                .await;
        // Both stop reading (and so answering pings) right after the handshake; notifications
        // keep coming for `reader`, none for `quiet`.
        let mut reader = app.ws("/v1/agents/reader/stream", &[]).await.unwrap();
        let mut quiet = app.ws("/v1/agents/quiet/stream", &[]).await.unwrap();
        let mut sent = Vec::new();
        for i in 0..15 {
            sent.push(app.send("reader", "boss", json!(i), 0).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Reading again: the notifications sent before the close, in order, then 4008 (not
        // 1008 "no pong").
        let mut received = Vec::new();
        let close = loop {
            match reader.next(Duration::from_secs(5)).await {
                Next::Frame(frame) => received.push(message_id(&frame).to_owned()),
                Next::Closed(close) => break close.map(|c| u16::from(c.code)),
                Next::Timeout => panic!("the stream was not closed"),
            }
        };
        assert!(
            !received.is_empty() && sent.starts_with(&received),
            "{received:?}"
        );
        assert_eq!(close, Some(4008));
        // A stream with nothing to read that stops answering pings is a dead peer: 1008.
        assert_eq!(quiet.close_code().await, Some(1008));
        app.stop().await;
    }
);

/// Two instances over one database and one Redis: a notification reaches the stream wherever
/// the client is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_span_instances_sharing_redis() {
    let a = TestApp::spawn(Kind::Redis).await;
    let redis_url = a.redis.as_ref().unwrap().url.clone();
    let b = TestApp::spawn_with(Options {
        dir: Some(a.dir.clone()),
        redis_url: Some((redis_url, a.state.config.key_prefix.clone())),
        ..Options::new(Kind::Redis)
    })
    .await;
    let mut on_a = a.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let mut on_b = b.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let mut firehose_b = b
        .ws("/v1/events/stream?topics=messages", &[])
        .await
        .unwrap();

    let via_a = a.send("alice", "boss", json!("via a"), 0).await;
    assert_eq!(message_id(&on_b.frame().await), via_a);
    assert_eq!(message_id(&firehose_b.frame().await), via_a);
    let via_b = b.send("alice", "boss", json!("via b"), 0).await;
    assert_eq!(message_id(&on_a.frame().await), via_a);
    assert_eq!(message_id(&on_a.frame().await), via_b);
    assert_eq!(message_id(&on_b.frame().await), via_b);
    // Both instances serve the same queue.
    let claimed = b.claim("alice", json!({"limit": 10})).await;
    assert_eq!(claimed.len(), 2);
    b.stop().await;
    a.stop().await;
}

/// Commits a notification for `agent` without publishing it (the test publishes it, or not), as
/// another writer of the same database would: on a connection of its own.
async fn commit_unpublished(app: &TestApp, agent: &str, message_id: &str) -> Event {
    use sqlx::Connection as _;
    let url = format!("sqlite://{}", db_path(&app.dir).display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let event = NewEvent::new(
        "messages",
        "test.unpublished",
        json!({ "message_id": message_id }),
    );
    ltmc::events::db::append(&mut conn, &[(now_ms(), event.to_agent(agent))])
        .await
        .unwrap();
    conn.close().await.unwrap();
    let logged = ltmc::events::db::after_for_agent(app.state.store.reader(), agent, 0, 100_000)
        .await
        .unwrap();
    logged.into_iter().last().unwrap()
}

// can arrive out of `seq` order, and a publication can be lost (Redis busy or down). A stream
// still gets every event, once, in order (from the log).
both_brokers!(
    publication_out_of_order_or_lost_leaves_no_gap,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
        let first = app.send("alice", "boss", json!(1), 0).await;
        assert_eq!(message_id(&alice.frame().await), first);

        // Two publications that cross.
        let older = commit_unpublished(&app, "alice", "crossed-0").await;
        let newer = commit_unpublished(&app, "alice", "crossed-1").await;
        app.state.broker.publish(newer);
        app.state.broker.publish(older);
        assert_eq!(message_ids(&mut alice, 2).await, ["crossed-0", "crossed-1"]);
        expect_next_is_probe(&app, &mut alice, "alice").await;

        // A publication that never comes: the next one brings it along.
        commit_unpublished(&app, "alice", "lost").await;
        let next = app.send("alice", "boss", json!(2), 0).await;
        assert_eq!(message_ids(&mut alice, 2).await, ["lost".to_owned(), next]);
        expect_next_is_probe(&app, &mut alice, "alice").await;
        app.stop().await;
    }
);

/// Redis restarts (empty) under an open stream: readiness says so, the service reconnects by
/// itself and the stream gets what was sent meanwhile, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_a_redis_restart() {
    let mut app = TestApp::spawn(Kind::Redis).await;
    if !app.redis.as_ref().unwrap().owned() {
        eprintln!("skipped: LTMC_TEST_REDIS_URL is a shared Redis this test must not kill");
        return;
    }
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let before = app.send("alice", "boss", json!("before"), 0).await;
    assert_eq!(message_id(&alice.frame().await), before);

    app.redis.as_mut().unwrap().kill().await;
    let (status, problem) = app.get("/readyz").await;
    assert_eq!(status, 503, "{problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("redis"),
        "{problem}"
    );
    // Sends still succeed: the store is the truth. And this instance's own streams hear of
    // them at once: its events reach its streams without a Redis round trip.
    let during = [
        app.send("alice", "boss", json!("during 1"), 0).await,
        app.send("alice", "boss", json!("during 2"), 5).await,
    ];
    assert_eq!(message_ids(&mut alice, 2).await, during);

    app.redis.as_mut().unwrap().restart().await;
    app.wait_ready().await;
    // The reconnect's resync re-reads the log: nothing new, nothing twice.
    let after = app.send("alice", "boss", json!("after"), 0).await;
    assert_eq!(message_id(&alice.frame().await), after, "no duplicates");
    app.stop().await;
}

both_brokers!(shutdown_closes_streams_with_1012, |kind| async move {
    let mut app = TestApp::spawn(kind).await;
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    let mut firehose = app.ws("/v1/events/stream", &[]).await.unwrap();
    app.send("alice", "boss", json!(1), 0).await;
    let last = seq(&alice.frame().await);

    app.begin_shutdown();
    assert_eq!(alice.close_code().await, Some(1012));
    assert_eq!(firehose.close_code().await, Some(1012));
    let dir = app.dir.clone();
    let redis = app.redis.take();
    let prefix = app.state.config.key_prefix.clone();
    app.join().await;

    // 1012 is reconnectable: a new instance over the same store resumes the stream.
    let app = TestApp::spawn_with(Options {
        dir: Some(dir),
        redis_url: redis.as_ref().map(|r| (r.url.clone(), prefix)),
        ..Options::new(kind)
    })
    .await;
    let missed = app.send("alice", "boss", json!(2), 0).await;
    let mut alice = app
        .ws(&format!("/v1/agents/alice/stream?since={last}"), &[])
        .await
        .unwrap();
    assert_eq!(alice.frame().await["recovered"], true);
    assert_eq!(message_id(&alice.frame().await), missed);
    app.stop().await;
    drop(redis);
});

both_brokers!(client_frames_are_limited_to_64_kib, |kind| async move {
    let app = TestApp::spawn(kind).await;
    // Up to the limit the connection stays open (client frames are otherwise ignored).
    let mut alice = app.ws("/v1/agents/alice/stream", &[]).await.unwrap();
    alice.send_text(r#"{"hello":1}"#.into()).await.unwrap();
    alice.send_text("x".repeat(64 << 10)).await.unwrap();
    expect_next_is_probe(&app, &mut alice, "alice").await;

    // One byte more: closed with 1009 (message too big).
    let mut big = app.ws("/v1/agents/bob/stream", &[]).await.unwrap();
    big.send_text("x".repeat((64 << 10) + 1)).await.unwrap();
    match big.next(Duration::from_secs(5)).await {
        Next::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), 1009, "{frame:?}"),
        other => panic!("expected a 1009 close, got {other:?}"),
    }
    // The other stream is unaffected.
    expect_next_is_probe(&app, &mut alice, "alice").await;
    app.stop().await;
});
