//! The HTTP server: our own accept loop in place of `axum::serve`, so that no client can starve
//! the service of connections or file descriptors.
//!
//! - A request's head must arrive in full within the header timeout (hyper's
//!   `header_read_timeout`). hyper starts that timer when a connection opens *and* again as soon
//!   as a keep-alive connection has answered a request, so the same timeout closes slow clients
//!   (one header line, then nothing) and idle keep-alive connections alike.
//! - At most `max_connections` connections are open, WebSocket streams included: a connection's
//!   permit lives inside its socket, so an upgraded stream holds it until the stream closes.
//! - At the cap, the connection that has waited longest for its next request (a slow or idle
//!   client, or one still sending a request's body; never one whose request is being handled or
//!   answered, never an upgraded stream) is closed to make room for the new one. A connection
//!   counts as waiting from its accept on. Only when none is waiting does accepting pause, looking
//!   again every 100 ms, until a slot frees. So a fresh request (`/healthz`, say) is still served
//!   while slow clients fill the cap.
//! - The soft file-descriptor limit is raised to the hard one at start, and the cap is lowered
//!   below it (keeping [`FD_RESERVE`] for the database, Redis and logs), so the cap binds before
//!   the process runs out of descriptors.
//! - An accept that fails anyway (EMFILE, ENFILE, ENOBUFS, …) backs off, 10 ms doubling up to 1 s
//!   and logged at most once a second, instead of spinning. A connection aborted by its client
//!   before it was accepted is only skipped.
//! - Graceful shutdown keeps `axum::serve`'s order: stop accepting, let every connection finish
//!   the request in progress, return when all have closed. A connection waiting for a request
//!   (idle, or a slow client's unfinished head) is closed at once rather than waited for.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// File descriptors kept out of the connection cap: the SQLite files, the Redis pool and
/// subscription, logs, and the one socket accepted before the cap is checked.
pub const FD_RESERVE: u64 = 64;

/// How connections are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long a connection may take to send a request's head (and an idle keep-alive
    /// connection may wait for its next request).
    pub header_timeout: Duration,
    /// Open connections at most, WebSocket streams included.
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `shutdown` is cancelled and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(settings.max_connections));
    let waiting = Arc::new(Waiting::default());
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let mut backoff = Backoff::default();
    'accept: loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    stream
                }
                Err(e) if aborted_by_client(&e) => continue,
                Err(e) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = backoff.wait(&e) => continue,
                    }
                }
            },
        };
        // At the cap: evict the longest waiting, and again every 100 ms while no slot frees (a
        // connection busy now may be waiting soon).
        let permit = loop {
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                break permit;
            }
            waiting.evict_longest_waiting();
            tokio::select! {
                _ = shutdown.cancelled() => break 'accept,
                permit = permits.clone().acquire_owned() => break permit.expect("the semaphore is never closed"),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        // Waiting from its accept on, before its task first runs: evictable at once.
        let slot = Arc::new(Slot::new(waiting.clone()));
        slot.waiting();
        connections.spawn(connection(
            Held {
                stream,
                _permit: permit,
            },
            builder.clone(),
            router.clone(),
            slot,
            shutdown.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One connection, from its accept to its close (or its upgrade: the socket then belongs to the
/// WebSocket task, permit included).
async fn connection(
    io: Held,
    builder: http1::Builder,
    router: Router,
    slot: Arc<Slot>,
    shutdown: CancellationToken,
) {
    let evicted = slot.evicted.clone();
    let service = {
        let slot = slot.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (router, slot) = (router.clone(), slot.clone());
            async move {
                // A request whose body is still to come stays evictable until the body has
                // arrived: a client trickling a body is as slow as one trickling its head.
                let request = if request.body().is_end_stream() {
                    slot.busy();
                    request.map(Body::new)
                } else {
                    let slot = slot.clone();
                    request.map(|body| Body::new(Upload { body, slot }))
                };
                let response = router.oneshot(request).await?;
                // An upgraded connection is a stream now: never idle, never evicted. Any other
                // waits for its next request once its answer has been written to the end.
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    return Ok::<_, Infallible>(response);
                }
                Ok(response.map(|body| Body::new(Answer { body, slot })))
            }
        })
    };
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        // Dropping the connection closes it.
        _ = evicted.cancelled() => return,
        _ = shutdown.cancelled() => {}
    }
    // Only a request in progress is worth waiting for: a slow client's unfinished head is not.
    if slot.is_waiting() {
        return;
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = evicted.cancelled() => {}
    }
}

/// Per-connection errors of `accept`: that client is gone, the next accept works.
fn aborted_by_client(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

/// The connections waiting for their next request, oldest wait first.
#[derive(Default)]
struct Waiting {
    next: AtomicU64,
    connections: Mutex<BTreeMap<u64, CancellationToken>>,
}

impl Waiting {
    /// Closes the connection that has waited longest, if any waits.
    fn evict_longest_waiting(&self) {
        // A std Mutex: held for a map operation, never across an await. The token is cancelled
        // under it, so a connection that leaves the map in `busy` (its next request arrived)
        // is either still in it and evicted before that request, or gone and never cancelled.
        let mut connections = self.connections.lock().expect("waiting lock");
        if let Some((_, evicted)) = connections.pop_first() {
            evicted.cancel();
        }
    }
}

/// A connection's place among the waiting ones.
struct Slot {
    waiting: Arc<Waiting>,
    evicted: CancellationToken,
    /// Its key in `waiting` while it waits for a request.
    key: Mutex<Option<u64>>,
}

impl Slot {
    fn new(waiting: Arc<Waiting>) -> Self {
        Slot {
            waiting,
            evicted: CancellationToken::new(),
            key: Mutex::new(None),
        }
    }

    /// Waiting for a request from now on (a fresh key: the wait starts now).
    fn waiting(&self) {
        self.busy();
        let key = self.waiting.next.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .connections
            .lock()
            .expect("waiting lock")
            .insert(key, self.evicted.clone());
        *self.key.lock().expect("slot lock") = Some(key);
    }

    fn is_waiting(&self) -> bool {
        self.key.lock().expect("slot lock").is_some()
    }

    /// Inside a request (or upgraded, or closed): not evictable.
    fn busy(&self) {
        if let Some(key) = self.key.lock().expect("slot lock").take() {
            self.waiting
                .connections
                .lock()
                .expect("waiting lock")
                .remove(&key);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy();
    }
}

/// A request body that takes its connection out of the waiting ones once it has arrived (or is
/// given up on): from then on the request is in progress.
struct Upload {
    body: Incoming,
    slot: Arc<Slot>,
}

impl hyper::body::Body for Upload {
    type Data = axum::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            self.slot.busy();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.slot.busy();
    }
}

/// A response body that puts its connection back among the waiting ones when it is dropped:
/// written to the end, or abandoned with the connection. Until then the answer is in progress,
/// so neither eviction nor shutdown cuts it short.
struct Answer {
    body: Body,
    slot: Arc<Slot>,
}

impl hyper::body::Body for Answer {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.slot.waiting();
    }
}

/// A socket with its permit: the permit is released when the socket closes, whether HTTP or a
/// WebSocket stream owned it last.
struct Held {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accept loop's back-off: 10 ms doubling to 1 s, reset by a successful accept; one log line
/// a second at most, counting the failures it did not log.
#[derive(Default)]
struct Backoff {
    delay: Duration,
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    fn reset(&mut self) {
        self.delay = Duration::ZERO;
    }

    async fn wait(&mut self, error: &io::Error) {
        self.delay = (self.delay * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::error!(
                error = %error,
                retry_in_ms = self.delay.as_millis() as u64,
                failures_not_logged = self.unlogged,
                "accept failed; backing off (at the file-descriptor limit? see LTMC_MAX_CONNECTIONS)"
            );
            self.logged_at = Some(Instant::now());
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(self.delay).await;
    }
}

/// The process's file-descriptor limits after [`raise_fd_limit`].
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now in force.
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: a server holds one descriptor per
/// connection, and the usual soft default (1024) is far below what the hard limit allows.
#[cfg(unix)]
pub fn raise_fd_limit() -> io::Result<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        } else {
            // An unlimited hard limit may be refused (Linux caps it at fs.nr_open): keep the
            // soft one, the connection cap follows it.
            tracing::warn!(error = %io::Error::last_os_error(), "cannot raise the file-descriptor limit");
        }
    }
    // rlim_t is u64 on Linux, not on every Unix.
    #[allow(clippy::unnecessary_cast)]
    Ok(FdLimit {
        before: before as u64,
        soft: limit.rlim_cur as u64,
        hard: limit.rlim_max as u64,
    })
}

/// The connection cap that fits under a soft file-descriptor limit of `fd_soft`.
pub fn connection_cap(configured: u32, fd_soft: u64) -> usize {
    let fits = fd_soft.saturating_sub(FD_RESERVE).max(1);
    u64::from(configured).min(fits) as usize
}
