//! Sessions: ids, activities (newest first, the last 100 kept, each extending the life),
//! expiry, end, the broker's versioned hot copy (record and activity ring), and survival across a
//! restart of the service and a FLUSHALL of Redis.

use ltmc::broker::{Broker, Hot, HotWrite};
use ltmc::common::now_ms;
use serde_json::json;

use crate::both_brokers;
use crate::harness::{Kind, Options, TestApp};

both_brokers!(activities_newest_first_capped_at_100, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let (status, session) = app
        .post(
            "/v1/sessions",
            json!({"session_type": "code_review", "context": {"repo": "ltmc"}}),
        )
        .await;
    assert_eq!(status, 201, "{session}");
    let id = session["session_id"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = id.split('_').collect();
    assert_eq!(parts[0], "sess");
    assert!(parts[1].parse::<i64>().unwrap() > 1_700_000_000);
    assert_eq!(parts[2].len(), 16);
    assert_eq!(session["status"], "active");

    let path = format!("/v1/sessions/{id}/activities");
    let mut last_deadline = session["expires_at"].as_str().unwrap().to_owned();
    for i in 0..105 {
        let (status, receipt) = app
            .post(
                &path,
                json!({"activity_type": "edit", "details": {"n": i}, "agent_id": "coder"}),
            )
            .await;
        assert_eq!(status, 201, "{receipt}");
        assert_eq!(receipt["activity_count"], i + 1);
        let deadline = receipt["expires_at"].as_str().unwrap().to_owned();
        assert!(deadline >= last_deadline, "each activity extends the life");
        last_deadline = deadline;
    }
    let (_, activities) = app.get(&path).await;
    let items = activities["items"].as_array().unwrap();
    assert_eq!(items.len(), 100);
    assert_eq!(items[0]["details"]["n"], 104, "newest first");
    assert_eq!(items[99]["details"]["n"], 5);
    let (_, fetched) = app.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(fetched["activity_count"], 105);
    let (_, listed) = app
        .get("/v1/sessions?status=active&session_type=code_review")
        .await;
    assert_eq!(listed["items"][0]["session_id"], id.as_str());
    // A memory of it was recorded.
    assert_eq!(
        app.get(&format!("/v1/memories?tag={id}")).await.1["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.post(
            "/v1/sessions/sess_1_0000000000000000/activities",
            json!({"activity_type": "x"})
        )
        .await
        .0,
        404
    );
    app.stop().await;
});

both_brokers!(
    idle_sessions_expire_and_ended_ones_take_nothing,
    |kind| async move {
        let app = TestApp::spawn(kind).await;
        let (_, short) = app
            .post("/v1/sessions", json!({"session_type": "t", "ttl_s": 1}))
            .await;
        let short_id = short["session_id"].as_str().unwrap().to_owned();
        assert_eq!(
            ltmc::sessions::expire_tick(&app.state, now_ms())
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            ltmc::sessions::expire_tick(&app.state, now_ms() + 1_500)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            app.get(&format!("/v1/sessions/{short_id}")).await.1["status"],
            "expired"
        );
        let (status, _) = app
            .post(
                &format!("/v1/sessions/{short_id}/activities"),
                json!({"activity_type": "late"}),
            )
            .await;
        assert_eq!(status, 404, "an expired session takes no activity");

        let (_, session) = app.post("/v1/sessions", json!({"session_type": "t"})).await;
        let id = session["session_id"].as_str().unwrap().to_owned();
        let (status, ended) = app.post(&format!("/v1/sessions/{id}/end"), json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(ended["status"], "ended");
        assert_eq!(
            app.post(&format!("/v1/sessions/{id}/end"), json!({}))
                .await
                .0,
            409
        );
        assert_eq!(
            app.post(
                &format!("/v1/sessions/{id}/activities"),
                json!({"activity_type": "x"})
            )
            .await
            .0,
            409
        );
        app.stop().await;
    }
);

both_brokers!(sessions_survive_a_restart_and_a_flush, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let (_, session) = app
        .post(
            "/v1/sessions",
            json!({"session_type": "t", "context": {"k": 1}}),
        )
        .await;
    let id = session["session_id"].as_str().unwrap().to_owned();
    app.post(
        &format!("/v1/sessions/{id}/activities"),
        json!({"activity_type": "a"}),
    )
    .await;
    if kind == Kind::Redis && app.redis.as_ref().unwrap().owned() {
        app.redis.as_ref().unwrap().flushall().await;
        let (_, after_flush) = app.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!(after_flush["activity_count"], 1);
    }
    // A second instance over the same database (and, for Redis, the same server, which the first
    // app keeps running).
    let dir = app.dir.clone();
    let redis = app
        .redis
        .as_ref()
        .map(|r| (r.url.clone(), app.state.config.key_prefix.clone()));
    let mut options = Options::new(kind);
    options.dir = Some(dir);
    options.redis_url = redis;
    let second = TestApp::spawn_with(options).await;
    let (_, restored) = second.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(restored["activity_count"], 1);
    assert_eq!(restored["context"]["k"], 1);
    let (status, receipt) = second
        .post(
            &format!("/v1/sessions/{id}/activities"),
            json!({"activity_type": "b"}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(receipt["activity_count"], 2);
    assert_eq!(
        second.get(&format!("/v1/sessions/{id}/activities")).await.1["items"][0]["activity_type"],
        "b"
    );
    second.stop().await;
    app.stop().await;
});

/// The real binary, killed with SIGKILL mid-session: the session, its counter and its log are
/// all there after the restart, and it takes new activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::harness::db_path(&dir);
    let client = reqwest::Client::new();
    let mut first = crate::harness::Process::start(&db, &[]).await;
    let base = format!("http://{}", first.addr);
    let session: serde_json::Value = client
        .post(format!("{base}/v1/sessions"))
        .json(&json!({"session_type": "t"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = session["session_id"].as_str().unwrap().to_owned();
    for n in 0..3 {
        let status = client
            .post(format!("{base}/v1/sessions/{id}/activities"))
            .json(&json!({"activity_type": "edit", "details": {"n": n}}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 201);
    }
    first.child.kill().await.unwrap();

    let second = crate::harness::Process::start(&db, &[]).await;
    let base = format!("http://{}", second.addr);
    let restored: serde_json::Value = client
        .get(format!("{base}/v1/sessions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(restored["status"], "active");
    assert_eq!(restored["activity_count"], 3);
    let log: serde_json::Value = client
        .get(format!("{base}/v1/sessions/{id}/activities"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["items"][0]["details"]["n"], 2);
    let status = client
        .post(format!("{base}/v1/sessions/{id}/activities"))
        .json(&json!({"activity_type": "after"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 201);
}

// The broker's versioned hot copy, driven directly: writers that arrive out of order never leave
// an older record or a log with a gap, and a stale fill never replaces a newer copy.
both_brokers!(hot_copies_take_writes_in_any_order, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let broker = &app.state.broker;
    let now = now_ms();
    async fn write_at(broker: &Broker, now: i64, version: i64, w: HotWrite<'_>) -> Hot {
        broker
            .hot_write("t:1", version, w, 3, 60_000, now)
            .await
            .unwrap();
        broker.hot_get("t:1", now).await.unwrap().unwrap()
    }
    let write = |version, w| write_at(broker, now, version, w);
    let hot = |version: i64, record: Option<&str>, log: Option<&[&str]>| Hot {
        version,
        record: record.map(str::to_owned),
        log: log.map(|l| l.iter().map(|e| e.to_string()).collect()),
    };
    assert_eq!(broker.hot_get("t:1", now).await.unwrap(), None);
    let empty: &[String] = &[];
    let fill = |record, log| HotWrite::Fill { record, log };
    let push = |record, entry, previous| HotWrite::Push {
        record,
        entry,
        previous,
    };
    assert_eq!(
        write(0, fill("r0", Some(empty))).await,
        hot(0, Some("r0"), Some(&[]))
    );
    assert_eq!(
        write(2, push("r2", "a", 0)).await,
        hot(2, Some("r2"), Some(&["a"]))
    );
    // Version 4's push is late: 6 arrives first, so the log would have a gap and is dropped.
    assert_eq!(write(6, push("r6", "c", 4)).await, hot(6, Some("r6"), None));
    assert_eq!(write(4, push("r4", "b", 2)).await, hot(6, Some("r6"), None));
    // A fill from a read that began before version 6 committed is refused …
    let stale: &[String] = &["b".into(), "a".into()];
    assert_eq!(
        write(4, fill("r4", Some(stale))).await,
        hot(6, Some("r6"), None)
    );
    // … one at version 6 restores the log; the copy then grows again, keeping the newest 3.
    let whole: &[String] = &["c".into(), "b".into(), "a".into()];
    assert_eq!(
        write(6, fill("r6", Some(whole))).await,
        hot(6, Some("r6"), Some(&["c", "b", "a"]))
    );
    assert_eq!(
        write(8, push("r8", "d", 6)).await,
        hot(8, Some("r8"), Some(&["d", "c", "b"]))
    );
    // A mark without a record (expiry) keeps the log; a fill of the record at that version
    // brings the record back without touching the log.
    let mark = write(
        9,
        HotWrite::Mark {
            record: None,
            previous: 8,
        },
    )
    .await;
    assert_eq!(mark, hot(9, None, Some(&["d", "c", "b"])));
    assert_eq!(
        write(9, fill("r9", None)).await,
        hot(9, Some("r9"), Some(&["d", "c", "b"]))
    );
    // An older mark or push changes nothing.
    assert_eq!(
        write(
            8,
            HotWrite::Mark {
                record: Some("r8"),
                previous: 6
            }
        )
        .await,
        hot(9, Some("r9"), Some(&["d", "c", "b"]))
    );
    // A mark that skips a version (the push before it arrived late, or never): the log may miss
    // that entry, so it is dropped; the late push then changes nothing.
    let skipped = write(
        13,
        HotWrite::Mark {
            record: Some("r13"),
            previous: 12,
        },
    )
    .await;
    assert_eq!(skipped, hot(13, Some("r13"), None));
    assert_eq!(
        write(12, push("r12", "f", 10)).await,
        hot(13, Some("r13"), None)
    );
    app.stop().await;
});

// Concurrent activities on one session: the activity ring the broker serves is exactly what the
// store holds, and after a FLUSHALL (Redis) the first read answers from the store and refills it.
both_brokers!(activity_ring_matches_the_store, |kind| async move {
    let app = TestApp::spawn(kind).await;
    let (_, session) = app
        .post("/v1/sessions", json!({"session_type": "ring"}))
        .await;
    let id = session["session_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/sessions/{id}/activities");
    let record = |i: usize| {
        let app = &app;
        let path = &path;
        async move {
            let (status, _) = app
                .post(path, json!({"activity_type": "edit", "details": {"i": i}}))
                .await;
            assert_eq!(status, 201);
        }
    };
    futures_util::future::join_all((0..120).map(record)).await;
    let from_store = || async {
        let (_, activities) = ltmc::sessions::db::with_activities(app.state.store.reader(), &id)
            .await
            .unwrap()
            .unwrap();
        serde_json::to_value(activities).unwrap()
    };
    let hot = app
        .state
        .broker
        .hot_get(&format!("sess:{id}"), now_ms())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hot.version, 240);
    let (_, listed) = app.get(&path).await;
    assert_eq!(listed["items"], from_store().await);
    assert_eq!(listed["items"].as_array().unwrap().len(), 100);
    if kind == Kind::Redis && app.redis.as_ref().unwrap().owned() {
        app.redis.as_ref().unwrap().flushall().await;
        record(120).await;
        let (_, listed) = app.get(&path).await;
        assert_eq!(listed["items"][0]["details"]["i"], 120);
        assert_eq!(listed["items"], from_store().await);
        let refilled = app
            .state
            .broker
            .hot_get(&format!("sess:{id}"), now_ms())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(refilled.log.map(|log| log.len()), Some(100));
    }
    app.stop().await;
});
