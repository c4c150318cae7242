//! Wiring: the shared [`AppState`], the router with its layers, and [`App::run`], which serves
//! until the shutdown token is cancelled and then waits for streams and loops to finish.
//! The caller owns the listener (bound by [`App::build`], port 0 in tests) and the stop signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderValue;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::LatencyUnit;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::admission::Admission;
use crate::broker::Broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::hub::Hub;
use crate::events::stream::StreamSlots;
use crate::ops::metrics::Metrics;
use crate::server;
use crate::store::Store;
use crate::{
    agents, background, checkpoints, contexts, coordinations, events, handoffs, memory, messages,
    ops, sessions, workflows,
};

/// What every handler and loop shares: one pointer, so the clones axum makes for each
/// extractor and middleware of every request cost one atomic increment (a clone of the fields
/// themselves was a few percent of the server's CPU under load).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub broker: Broker,
    pub hub: Arc<Hub>,
    pub stream_slots: Arc<StreamSlots>,
    /// Where sends, acks and claims queue for their batched turn on the write connection.
    pub batcher: messages::batch::Batcher,
    /// Where new workflow runs and step results queue for theirs.
    pub engine: workflows::batch::Batcher,
    /// This instance's Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The bound on new work waiting for the store.
    pub admission: Arc<Admission>,
    /// Cancelled when the service stops: loops and streams select on it.
    pub shutdown: CancellationToken,
    /// Streams and loops hold a token of it, so shutdown can wait for them.
    pub tracker: TaskTracker,
}

/// A bound, ready-to-run service.
pub struct App {
    state: AppState,
    listener: TcpListener,
    committer: messages::batch::Committer,
    engine: workflows::batch::Committer,
}

impl App {
    /// Opens the store (applying migrations), creates the broker and binds the listener. An
    /// error here is the operator's to fix: its message names the setting.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<App> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::open(config.sqlite_path(), metrics.clone())
            .await
            .map_err(|e| {
                Error::Internal(format!(
                    "--database-url / LTMC_DATABASE_URL: cannot open {}: {e}",
                    config.sqlite_path()
                ))
            })?;
        store
            .set_queue_cap(config.limits.max_queued_per_agent)
            .await?;
        // The hub dispatches what is committed from here on.
        let hub = Hub::new(events::db::latest_seq(store.reader()).await?);
        let broker = match &config.redis_url {
            Some(url) => Broker::redis(url, &config.key_prefix, metrics.clone(), hub.clone())?,
            None => Broker::memory(hub.clone()),
        };
        let listener = TcpListener::bind(config.bind).await.map_err(|e| {
            Error::Internal(format!(
                "--bind / LTMC_BIND: cannot listen on {}: {e}",
                config.bind
            ))
        })?;
        let (batcher, committer) = messages::batch::channel(
            store.clone(),
            broker.clone(),
            metrics.clone(),
            config.limits.max_queued_per_agent,
        );
        let (engine_batcher, engine) = workflows::batch::channel();
        let admission = Admission::new(
            config.limits.max_new_backlog,
            metrics.new_work_refused.clone(),
        );
        let state = AppState(Arc::new(Shared {
            admission,
            config: Arc::new(config),
            store,
            broker,
            hub,
            stream_slots: Arc::default(),
            batcher,
            engine: engine_batcher,
            metrics: metrics.clone(),
            shutdown,
            tracker: TaskTracker::new(),
        }));
        Ok(App {
            state,
            listener,
            committer,
            engine,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until the shutdown token is cancelled: in-flight requests finish, streams close
    /// with 1012, loops stop at a safe point, queued events are flushed to the broker.
    pub async fn run(self) -> Result<()> {
        let App {
            state,
            listener,
            committer,
            engine,
        } = self;
        let shutdown = state.shutdown.clone();
        let tracker = state.tracker.clone();
        // Stop order: the server (in-flight requests finish) → the committers (their commits) →
        // streams and the background loop (the tracker) → the publisher, which flushes every
        // event committed before it stops.
        let stop_committing = CancellationToken::new();
        let committing = tokio::spawn(committer.run(stop_committing.clone()));
        let committing_engine = tokio::spawn(engine.run(state.clone(), stop_committing.clone()));
        let stop_publishing = CancellationToken::new();
        let publishing = {
            let (broker, token) = (state.broker.clone(), stop_publishing.clone());
            tokio::spawn(async move { broker.run_publisher(token).await })
        };
        {
            let (s, b) = (state.clone(), state.broker.clone());
            tracker.spawn(async move { b.run_subscription(s.shutdown.clone()).await });
            let s = state.clone();
            tracker.spawn(async move { background::run(s).await });
        }
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let settings = connection_settings(&state.config);
        tracing::info!(%addr, broker = state.broker.name(), auth = state.config.auth_enabled(), max_connections = settings.max_connections, "ltmc serving");
        let router = router(state.clone());
        server::serve(listener, router, settings, shutdown).await;
        // Whatever ended the server, the rest still stops in order.
        state.shutdown.cancel();
        stop_committing.cancel();
        if let Err(e) = committing.await {
            tracing::error!(error = %e, "the committer failed");
        }
        if let Err(e) = committing_engine.await {
            tracing::error!(error = %e, "the workflow committer failed");
        }
        tracker.close();
        tracker.wait().await;
        stop_publishing.cancel();
        if let Err(e) = publishing.await {
            tracing::error!(error = %e, "the publisher failed");
        }
        state.store.close().await;
        tracing::info!("ltmc stopped");
        Ok(())
    }
}

/// The server's connection bounds, the cap fitted under the file-descriptor limit (raised to
/// the hard limit first).
fn connection_settings(config: &Config) -> server::Settings {
    let configured = config.limits.max_connections;
    #[cfg(unix)]
    let max_connections = match server::raise_fd_limit() {
        Ok(fd) => {
            tracing::info!(
                soft_before = fd.before,
                soft = fd.soft,
                hard = fd.hard,
                "file-descriptor limit"
            );
            let cap = server::connection_cap(configured, fd.soft);
            if cap < configured as usize {
                tracing::warn!(
                    configured,
                    cap,
                    fd_limit = fd.soft,
                    "--max-connections / LTMC_MAX_CONNECTIONS lowered to fit the file-descriptor \
                     limit (raise the hard limit, e.g. LimitNOFILE= or ulimit -Hn)"
                );
            }
            cap
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit");
            configured as usize
        }
    };
    #[cfg(not(unix))]
    let max_connections = configured as usize;
    server::Settings {
        header_timeout: Duration::from_millis(config.limits.header_timeout_ms.into()),
        max_connections,
    }
}

/// Request ids: a per-process random prefix and a counter (unique, cheap, sortable in logs).
#[derive(Clone)]
struct RequestIds {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// The whole HTTP surface with its layers.
pub fn router(state: AppState) -> Router {
    let ids = RequestIds {
        prefix: crate::common::random_hex(4).into(),
        next: Arc::default(),
    };
    let timeout = Duration::from_secs(state.config.limits.request_timeout_s.into());
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            // The matched route, not the raw path: low-cardinality span names and labels.
            let route = request
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", |p| p.as_str());
            let id = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            tracing::info_span!("request", method = %request.method(), route, request_id = id)
        })
        .on_response(DefaultOnResponse::new().latency_unit(LatencyUnit::Micros));
    Router::new()
        .merge(agents::routes::router())
        .merge(messages::routes::router())
        .merge(events::stream::router())
        .merge(memory::routes::router())
        .merge(handoffs::routes::router())
        .merge(checkpoints::routes::router())
        .merge(sessions::routes::router())
        .merge(contexts::routes::router())
        .merge(coordinations::routes::router())
        .merge(workflows::routes::router())
        .merge(ops::router())
        .fallback(|| async { Error::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            crate::error::problem_response(crate::error::Problem {
                kind: "urn:ltmc:problem:method-not-allowed".into(),
                title: "Method Not Allowed".into(),
                status: 405,
                detail: "this endpoint does not take that method".into(),
                errors: Vec::new(),
                conflicts: None,
            })
        })
        // Before every handler (and so before auth), inside the request id and the trace.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::origin::guard,
        ))
        .layer(DefaultBodyLimit::max(
            state.config.limits.max_body_bytes as usize,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(ids))
                .layer(trace)
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    Error::Unavailable("the request timed out".into()).into_response()
                }))
                .timeout(timeout),
        )
        // Outside the timeout, so a request answered 503 for taking too long is counted too.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::metrics::track_http,
        ))
        .with_state(state)
}
