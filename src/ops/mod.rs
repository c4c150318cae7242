//! Operations endpoints: liveness, readiness, Prometheus metrics, the metrics report, SLA
//! compliance, diagnostics, the OpenAPI document and the dashboard.

pub mod dashboard;
pub mod diagnostics;
pub mod metrics;
pub mod report;
pub mod sla;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Error, Json, Problem};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(prometheus_metrics))
        .route("/v1/sla", get(sla_report))
        .route("/v1/metrics", get(metrics_report))
        .route("/v1/diagnostics", get(diagnose))
        .route("/", get(dashboard::index))
        .route("/static/{file}", get(dashboard::asset))
}

/// Diagnostics: the health checks run now (store and broker connectivity, registry, a messaging
/// round trip, stuck leases, dead letters, overdue workflow steps, SLAs), the issues found,
/// recommendations and a health score. Always answers 200, also when a backing service is down.
#[utoipa::path(get, path = "/v1/diagnostics", tag = "operations",
    responses((status = 200, body = diagnostics::Diagnostics), (status = 401, body = Problem),
              (status = 403, body = Problem)))]
pub async fn diagnose(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<diagnostics::Diagnostics>, Error> {
    who.require_reader()?;
    Ok(Json(diagnostics::run(&state).await))
}

/// The orchestration metrics report: agent coordination, workflow performance, sessions, the
/// broker and SLA compliance, from what happened over the SLA window and the state now.
#[utoipa::path(get, path = "/v1/metrics", tag = "operations",
    responses((status = 200, body = report::MetricsReport), (status = 401, body = Problem),
              (status = 403, body = Problem), (status = 503, body = Problem)))]
pub async fn metrics_report(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<report::MetricsReport>, Error> {
    who.require_reader()?;
    Ok(Json(report::build(&state).await?))
}

/// SLA compliance: the thresholds (the seed's table, configurable) against this instance's
/// measures over the sliding window (p95 latencies, success rates), each judged once it has
/// the minimum sample count (`insufficient_data` before, which breaks no SLA).
#[utoipa::path(get, path = "/v1/sla", tag = "operations",
    responses((status = 200, body = sla::SlaReport), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub async fn sla_report(
    State(state): State<AppState>,
    who: Principal,
) -> Result<Json<sla::SlaReport>, Error> {
    who.require_reader()?;
    Ok(Json(sla::current(&state, crate::common::now_ms())))
}

/// Prometheus metrics in the text exposition format (the gauges of shared state are read now).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format, version 0.0.4",
               content_type = "text/plain")))]
pub async fn prometheus_metrics(State(state): State<AppState>) -> Result<Response, Error> {
    let metrics = &state.metrics;
    let reader = state.store.reader();
    // Read everything first, then set: a concurrent scrape never sees a half-updated family.
    let queues = crate::messages::db::count_by_state(reader).await?;
    let sessions = crate::sessions::db::count_active(reader).await?;
    let executing = crate::workflows::db::count_executing(reader).await?;
    let active = state.broker.active_count(crate::common::now_ms()).await;
    let size = state.store.size().await?;
    for known in ["queued", "claimed", "acked", "dead"] {
        let count = queues
            .iter()
            .find(|(s, _)| s == known)
            .map_or(0, |(_, n)| *n);
        metrics.queue.with_label_values(&[known]).set(count);
    }
    metrics.sessions_active.set(sessions);
    metrics
        .new_work_backlog
        .set(state.admission.backlog() as i64);
    metrics
        .new_work_backlog_limit
        .set(state.admission.limit() as i64);
    metrics.database_bytes.set(size.bytes);
    metrics.database_free_bytes.set(size.free_bytes);
    for pattern in ["sequential", "parallel", "dependency_based", "event_driven"] {
        let count = executing
            .iter()
            .find(|(p, _)| p == pattern)
            .map_or(0, |(_, n)| *n);
        metrics
            .workflows_active
            .with_label_values(&[pattern])
            .set(count);
    }
    // Presence lives in the broker: while it is down `ltmc_broker_up` says so and the agents
    // gauge keeps its last value.
    metrics.broker_up.set(i64::from(active.is_ok()));
    if let Ok(active) = active {
        metrics.agents_active.set(active as i64);
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.encode(),
    )
        .into_response())
}

/// `{status}` of the probes.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// Liveness: 200 while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Readiness: 200 when the store and the broker answer, else 503 naming the one that is down.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Problem)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, Error> {
    if let Err(e) = state.store.ping().await {
        return Err(Error::Unavailable(format!("store is unavailable: {e}")));
    }
    state.broker.ping().await?;
    Ok(Json(Health { status: "ready" }))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}
