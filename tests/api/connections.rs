//! Nobody can starve the server: slow and idle connections are closed by the header timeout,
//! at the connection cap the longest-waiting connection makes room, and the binary raises its
//! file-descriptor limit so `/healthz` answers while a thousand slow clients hold connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Kind, Options, Process, TestApp};

/// A request line and one header, then nothing: the classic slowloris.
const SLOW_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n";

/// Reads until the server closes the connection; returns what it sent and when it closed.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Instant) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection was still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (received, Instant::now()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// True while the server has neither closed nor written to the connection.
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn slow_client(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(SLOW_HEAD).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_after_the_header_timeout() {
    let app = TestApp::spawn_with(
        Options::new(Kind::Memory).configure(|c| c.limits.header_timeout_ms = 1000),
    )
    .await;
    // Upgraded, a stream is no longer HTTP: the header timeout does not apply to it.
    let mut stream = app.ws("/v1/events/stream", &[]).await.unwrap();

    // One header line, then nothing.
    let opened = Instant::now();
    let mut slow = slow_client(app.addr).await;
    let (_, closed) = until_closed(&mut slow, Duration::from_secs(5)).await;
    let slow_ms = (closed - opened).as_millis();

    // A keep-alive connection answered once, then idle.
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    let answered = Instant::now();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let (_, closed) = until_closed(&mut idle, Duration::from_secs(5)).await;
    let idle_ms = (closed - answered).as_millis();

    // A connection that never sends a byte.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let (_, closed) = until_closed(&mut silent, Duration::from_secs(5)).await;
    let silent_ms = (closed - opened).as_millis();

    eprintln!(
        "header timeout 1000 ms: slow head closed after {slow_ms} ms, idle keep-alive after \
         {idle_ms} ms, silent after {silent_ms} ms"
    );
    for ms in [slow_ms, idle_ms, silent_ms] {
        assert!(ms >= 900, "closed before the timeout: {ms} ms");
    }
    // Seconds later, the stream still receives.
    app.register("timeout-watcher", &[]).await;
    assert_eq!(stream.frame().await["type"], "agent.registered");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_longest_waiting_connection_makes_room() {
    let app = TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| {
        c.limits.max_connections = 20;
        c.limits.header_timeout_ms = 60_000;
    }))
    .await;
    // A stream holds a connection too, but is never evicted.
    let mut stream = app.ws("/v1/events/stream", &[]).await.unwrap();
    let mut slow = Vec::new();
    for _ in 0..30 {
        slow.push(slow_client(app.addr).await);
    }
    // The cap is full of slow clients, and still a new request is served.
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 200);
    // The oldest waits made room; the newest are still open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open: Vec<bool> = slow.iter().map(still_open).collect();
    let closed = open.iter().filter(|o| !**o).count();
    assert!(closed >= 11, "at most 19 fit beside the stream: {open:?}");
    assert!(!open[0] && open[29], "{open:?}");
    // The stream still receives.
    app.register("cap-watcher", &[]).await;
    assert_eq!(stream.frame().await["type"], "agent.registered");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_connection_trickling_a_body_makes_room_too() {
    let app = TestApp::spawn_with(Options::new(Kind::Memory).configure(|c| {
        c.limits.max_connections = 10;
        c.limits.header_timeout_ms = 60_000;
    }))
    .await;
    // Whole heads announcing a body, then one byte of it: each is a request not yet in progress.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(
                b"POST /v1/agents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                  content-type: application/json\r\ncontent-length: 100\r\n\r\n{",
            )
            .await
            .unwrap();
        slow.push(stream);
    }
    let health = app
        .client
        .get(app.url("/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/healthz answers while slow bodies fill the cap");
    assert_eq!(health.status(), 200);
    // The oldest made room.
    until_closed(&mut slow[0], Duration::from_secs(5)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_while_a_thousand_slow_clients_hold_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::harness::db_path(&dir);
    // A soft limit of 256 could not hold 1 000 sockets: the server must raise it to the hard one.
    let (process, startup) =
        Process::start_with_fd_limit(&db, &["--header-timeout-ms", "60000"], 256, 2048).await;
    let limit = startup
        .iter()
        .find(|l| l["fields"]["message"] == "file-descriptor limit")
        .expect("the limit is logged at start");
    assert_eq!(limit["fields"]["soft_before"], 256, "{limit}");
    assert_eq!(limit["fields"]["soft"], 2048, "{limit}");

    let mut slow = Vec::new();
    for _ in 0..1000 {
        slow.push(slow_client(process.addr).await);
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    let health = client
        .get(format!("http://{}/healthz", process.addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("/healthz answers while 1 000 slow clients are connected");
    assert_eq!(health.status(), 200);
    let open = slow.iter().filter(|s| still_open(s)).count();
    eprintln!(
        "1000 slow clients, fd limit 256 raised to 2048: /healthz answered in {} ms, {open} \
         slow connections still open",
        started.elapsed().as_millis()
    );
    assert_eq!(open, 1000, "every slow client is still connected");
}
