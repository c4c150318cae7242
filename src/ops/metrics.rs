//! Prometheus metrics (`GET /metrics`, the text exposition format), one registry per service
//! instance. Each instance counts its own work: what it committed (read off the events its
//! writer publishes, so a rolled-back change never counts), the requests it served, the streams
//! it holds, its broker calls. Gauges of shared state (queue depths, active agents, sessions and
//! runs) are read from the store and the broker when scraped. Labels are low-cardinality: routes
//! are the matched templates, never agent or workflow ids.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::app::AppState;
use crate::common::now_ms;
use crate::events::Event;
use crate::ops::sla::{Measure, Windows};

/// Latency buckets in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Durations of work in seconds: 10 ms to 1 h.
const WORK_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Every metric the service exports.
pub struct Metrics {
    registry: Registry,
    /// `route` is the matched path template (`unmatched` for 404s of unknown paths).
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub messages: IntCounterVec,
    pub handoffs: IntCounterVec,
    pub handoff_accept: Histogram,
    pub workflows_started: IntCounterVec,
    pub workflows: IntCounterVec,
    pub workflow_duration: HistogramVec,
    pub steps_dispatched: IntCounterVec,
    pub workflow_steps: IntCounterVec,
    pub step_duration: HistogramVec,
    pub streams_open: IntGauge,
    pub stream_closes: IntCounterVec,
    pub broker_ops: HistogramVec,
    pub broker_errors: IntCounterVec,
    // Read when scraped.
    pub queue: IntGaugeVec,
    pub agents_active: IntGauge,
    pub broker_up: IntGauge,
    pub sessions_active: IntGauge,
    pub workflows_active: IntGaugeVec,
    pub database_bytes: IntGauge,
    pub database_free_bytes: IntGauge,
    /// Rows purged past their retention, by kind (counted by the instance that purged them).
    pub purged_rows: IntCounterVec,
    /// New work refused past the admission bound, by kind.
    pub new_work_refused: IntCounterVec,
    pub new_work_backlog: IntGauge,
    pub new_work_backlog_limit: IntGauge,
    /// The SLA report's sliding windows.
    pub sla: Windows,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid counter");
    registry
        .register(Box::new(metric.clone()))
        .expect("a unique metric name");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("a valid histogram");
    registry
        .register(Box::new(metric.clone()))
        .expect("a unique metric name");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid gauge");
    registry
        .register(Box::new(metric.clone()))
        .expect("a unique metric name");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let single = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("a valid gauge");
            r.register(Box::new(metric.clone()))
                .expect("a unique metric name");
            metric
        };
        let handoff_accept = {
            let opts = HistogramOpts::new(
                "ltmc_handoff_accept_seconds",
                "Time from a handoff's initiation to its acceptance.",
            )
            .buckets(LATENCY_BUCKETS.to_vec());
            let metric = Histogram::with_opts(opts).expect("a valid histogram");
            r.register(Box::new(metric.clone()))
                .expect("a unique metric name");
            metric
        };
        Metrics {
            http_requests: counter(
                &r,
                "ltmc_http_requests_total",
                "HTTP requests served, by matched route, method and status.",
                &["method", "route", "status"],
            ),
            http_duration: histogram(
                &r,
                "ltmc_http_request_duration_seconds",
                "HTTP request latency, by matched route and method.",
                &["method", "route"],
                LATENCY_BUCKETS,
            ),
            messages: counter(
                &r,
                "ltmc_messages_total",
                "Messages sent, claimed, acked, nacked, redelivered and dead-lettered.",
                &["outcome"],
            ),
            handoffs: counter(
                &r,
                "ltmc_handoffs_total",
                "Handoff transitions: initiated, accepted, completed, failed, rejected, cancelled, expired.",
                &["outcome"],
            ),
            handoff_accept,
            workflows_started: counter(
                &r,
                "ltmc_workflows_started_total",
                "Workflow runs submitted, by pattern.",
                &["pattern"],
            ),
            workflows: counter(
                &r,
                "ltmc_workflows_total",
                "Workflow runs ended, by pattern and status (completed, failed, cancelled).",
                &["pattern", "status"],
            ),
            workflow_duration: histogram(
                &r,
                "ltmc_workflow_duration_seconds",
                "Workflow run time, submit to end, by pattern and status.",
                &["pattern", "status"],
                WORK_BUCKETS,
            ),
            steps_dispatched: counter(
                &r,
                "ltmc_workflow_steps_dispatched_total",
                "Workflow step attempts put out to agents.",
                &[],
            ),
            workflow_steps: counter(
                &r,
                "ltmc_workflow_steps_total",
                "Workflow step attempts ended, by outcome (succeeded, failed, timed_out).",
                &["outcome"],
            ),
            step_duration: histogram(
                &r,
                "ltmc_workflow_step_duration_seconds",
                "Step attempt time, dispatch to result or timeout, by outcome.",
                &["outcome"],
                WORK_BUCKETS,
            ),
            streams_open: single("ltmc_streams_open", "WebSocket streams open now."),
            stream_closes: counter(
                &r,
                "ltmc_stream_closes_total",
                "WebSocket streams closed, by reason.",
                &["reason"],
            ),
            broker_ops: histogram(
                &r,
                "ltmc_broker_operation_seconds",
                "Broker (Redis) command latency, by operation.",
                &["operation"],
                LATENCY_BUCKETS,
            ),
            broker_errors: counter(
                &r,
                "ltmc_broker_errors_total",
                "Broker (Redis) commands that failed or timed out, by operation.",
                &["operation"],
            ),
            queue: gauge(
                &r,
                "ltmc_queue_messages",
                "Messages in the queues now, by state.",
                &["state"],
            ),
            broker_up: single(
                "ltmc_broker_up",
                "1 when the broker answered the last scrape, else 0.",
            ),
            agents_active: single(
                "ltmc_agents_active",
                "Agents present now (heartbeat within their ttl).",
            ),
            sessions_active: single("ltmc_sessions_active", "Sessions active now."),
            workflows_active: gauge(
                &r,
                "ltmc_workflows_executing",
                "Workflow runs executing now, by pattern.",
                &["pattern"],
            ),
            database_bytes: single(
                "ltmc_database_bytes",
                "Size of the SQLite database file (page_count × page_size, WAL not included).",
            ),
            database_free_bytes: single(
                "ltmc_database_free_bytes",
                "Free pages inside the database file not yet given back to the file system.",
            ),
            purged_rows: counter(
                &r,
                "ltmc_purged_rows_total",
                "Rows purged past their retention, by kind.",
                &["kind"],
            ),
            new_work_refused: counter(
                &r,
                "ltmc_new_work_refused_total",
                "New work refused with 429 past the admission bound, by kind.",
                &["kind"],
            ),
            new_work_backlog: single(
                "ltmc_new_work_backlog",
                "New work admitted and waiting for the store now, in units (a message, a \
                 workflow step, a handoff).",
            ),
            new_work_backlog_limit: single(
                "ltmc_new_work_backlog_limit",
                "The bound on ltmc_new_work_backlog (--max-new-backlog).",
            ),
            registry: r,
            sla: Windows::default(),
        }
    }

    /// Counts `rows` purged of `kind`.
    pub fn purged(&self, kind: &str, rows: u64) {
        self.purged_rows.with_label_values(&[kind]).inc_by(rows);
    }

    /// Rows purged so far, by kind.
    pub fn purged_so_far(&self) -> std::collections::BTreeMap<String, u64> {
        prometheus::core::Collector::collect(&self.purged_rows)
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|m| {
                let kind = m.get_label().first().map(|l| l.value().to_owned());
                (kind.unwrap_or_default(), m.get_counter().get_value() as u64)
            })
            .collect()
    }

    /// Counts what a committed event of this instance says happened.
    pub fn observe(&self, event: &Event) {
        self.sla.operation(event.at);
        let data = &event.data;
        let text = |key: &str| data[key].as_str().unwrap_or("unknown").to_owned();
        match event.kind.as_str() {
            "new_message" if data["redelivered"] == true => {
                self.messages.with_label_values(&["redelivered"]).inc();
            }
            "new_message" => self.messages.with_label_values(&["sent"]).inc(),
            "message.dead_lettered" => self.messages.with_label_values(&["dead_lettered"]).inc(),
            "handoff.offered" => self.handoffs.with_label_values(&["initiated"]).inc(),
            kind if kind.starts_with("handoff.") => {
                let outcome = kind.trim_start_matches("handoff.");
                self.handoffs.with_label_values(&[outcome]).inc();
                let success = match outcome {
                    "completed" => Some(1.0),
                    "failed" | "rejected" | "expired" => Some(0.0),
                    _ => None,
                };
                if let Some(success) = success {
                    self.sla.record(Measure::HandoffSuccess, event.at, success);
                }
            }
            "workflow.started" => {
                self.workflows_started
                    .with_label_values(&[&text("pattern")])
                    .inc();
            }
            "workflow.completed" | "workflow.failed" | "workflow.cancelled" => {
                let labels = [text("pattern"), text("status")];
                self.workflows.with_label_values(&labels).inc();
                match event.kind.as_str() {
                    "workflow.completed" => {
                        self.sla.record(Measure::WorkflowCompleted, event.at, 1.0)
                    }
                    "workflow.failed" => self.sla.record(Measure::WorkflowCompleted, event.at, 0.0),
                    _ => {}
                }
                if let Some(efficiency) = data["parallel_efficiency"].as_f64() {
                    self.sla
                        .record(Measure::ParallelEfficiency, event.at, efficiency);
                }
                if let Some(ms) = data["execution_time_ms"].as_i64() {
                    if event.kind != "workflow.cancelled" {
                        self.sla
                            .record(Measure::WorkflowDuration, event.at, ms as f64);
                    }
                    self.workflow_duration
                        .with_label_values(&labels)
                        .observe(Duration::from_millis(ms.max(0) as u64).as_secs_f64());
                }
            }
            "workflow.step.dispatched" => {
                self.steps_dispatched.with_label_values::<&str>(&[]).inc();
            }
            "workflow.step.succeeded" | "workflow.step.failed" | "workflow.step.timed_out" => {
                let outcome = event.kind.trim_start_matches("workflow.step.");
                self.workflow_steps.with_label_values(&[outcome]).inc();
                if let Some(ms) = data["duration_ms"].as_i64() {
                    self.sla.record(Measure::StepTime, event.at, ms as f64);
                    self.step_duration
                        .with_label_values(&[outcome])
                        .observe(Duration::from_millis(ms.max(0) as u64).as_secs_f64());
                }
            }
            _ => {}
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics not encoded");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Middleware: counts and times each request by matched route (`unmatched` for unknown paths),
/// method and status.
pub async fn track_http(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let metrics = &state.metrics;
    let elapsed = started.elapsed();
    if response.status().is_success() {
        let measure = match (method, route.as_str()) {
            ("POST", "/v1/sessions") => Some(Measure::SessionCreate),
            ("POST", "/v1/sessions/{session_id}/activities") => Some(Measure::SessionUpdate),
            ("GET", "/v1/sessions/{session_id}") => Some(Measure::SessionRecovery),
            ("POST", "/v1/agents/{agent_id}/messages") => Some(Measure::MessageDelivery),
            ("POST", "/v1/syncs") => Some(Measure::StateSync),
            _ => None,
        };
        if let Some(measure) = measure {
            let ms = elapsed.as_secs_f64() * 1000.0;
            metrics.sla.record(measure, now_ms(), ms);
        }
    }
    let status = response.status().as_u16().to_string();
    metrics
        .http_requests
        .with_label_values(&[method, &route, &status])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[method, &route])
        .observe(elapsed.as_secs_f64());
    response
}
