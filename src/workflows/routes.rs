//! HTTP handlers of workflows. Submitting, cancelling and posting events need the admin token; a
//! step's result comes from the agent holding it (its own token); runs are readable by read
//! tokens.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::definition::WorkflowDefinition;
use super::{EventAccepted, StepResult, TriggerEvent, Workflow, WorkflowQuery};
use crate::admission::{Room, Workflows};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Empty, Page};
use crate::error::{Json, OptionalJson, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/workflows", post(submit).get(list))
        .route("/v1/workflows/{workflow_id}", get(get_workflow))
        .route(
            "/v1/workflows/{workflow_id}/steps/{step_id}/result",
            post(result),
        )
        .route("/v1/workflows/{workflow_id}/cancel", post(cancel))
        .route("/v1/events", post(post_event))
}

/// Submit a workflow: validated (422 names the field, a cycle its path, a step's `agent` that is
/// not registered), then started. 429 `overloaded` (with `Retry-After`) when the new work waiting
/// for the store passes its bound: nothing was started.
#[utoipa::path(post, path = "/v1/workflows", tag = "workflows", request_body = WorkflowDefinition,
    responses((status = 201, body = Workflow), (status = 403, body = Problem), (status = 413, body = Problem),
              (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn submit(
    State(state): State<AppState>,
    who: Principal,
    _: Room<Workflows>,
    Json(def): Json<WorkflowDefinition>,
) -> Result<(StatusCode, Json<Workflow>)> {
    who.require_admin()?;
    Ok((StatusCode::CREATED, Json(super::submit(&state, def).await?)))
}

/// Workflow runs, newest first, optionally by status.
#[utoipa::path(get, path = "/v1/workflows", tag = "workflows", params(WorkflowQuery),
    responses((status = 200, body = Page<Workflow>), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<WorkflowQuery>,
) -> Result<Json<Page<Workflow>>> {
    who.require_reader()?;
    Ok(Json(super::list(&state, query).await?))
}

/// A workflow run with every step.
#[utoipa::path(get, path = "/v1/workflows/{workflow_id}", tag = "workflows",
    params(("workflow_id" = String, Path)),
    responses((status = 200, body = Workflow), (status = 404, body = Problem)))]
pub async fn get_workflow(
    State(state): State<AppState>,
    who: Principal,
    Path(workflow_id): Path<String>,
) -> Result<Json<Workflow>> {
    who.require_reader()?;
    Ok(Json(super::get(&state, &workflow_id).await?))
}

/// The result of a step's attempt, from the agent holding it (409 otherwise: another agent, a
/// superseded or timed-out attempt, a step that is not out).
#[utoipa::path(post, path = "/v1/workflows/{workflow_id}/steps/{step_id}/result", tag = "workflows",
    params(("workflow_id" = String, Path), ("step_id" = String, Path)), request_body = StepResult,
    responses((status = 200, body = Workflow), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 413, body = Problem), (status = 422, body = Problem)))]
pub async fn result(
    State(state): State<AppState>,
    who: Principal,
    Path((workflow_id, step_id)): Path<(String, String)>,
    Json(body): Json<StepResult>,
) -> Result<Json<Workflow>> {
    who.require_agent(&body.agent_id)?;
    Ok(Json(
        super::result(&state, &workflow_id, &step_id, body).await?,
    ))
}

/// Cancel an executing run: pending steps become `cancelled`, holders are notified.
#[utoipa::path(post, path = "/v1/workflows/{workflow_id}/cancel", tag = "workflows",
    params(("workflow_id" = String, Path)),
    responses((status = 200, body = Workflow), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(workflow_id): Path<String>,
    OptionalJson(_): OptionalJson<Empty>,
) -> Result<Json<Workflow>> {
    who.require_admin()?;
    Ok(Json(super::cancel(&state, &workflow_id).await?))
}

/// Post an event: starts the `event_driven` steps whose `trigger` it names (and is remembered
/// for a minute, for steps that begin waiting just after).
#[utoipa::path(post, path = "/v1/events", tag = "workflows", request_body = TriggerEvent,
    responses((status = 202, body = EventAccepted), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 422, body = Problem)))]
pub async fn post_event(
    State(state): State<AppState>,
    who: Principal,
    Json(event): Json<TriggerEvent>,
) -> Result<(StatusCode, Json<EventAccepted>)> {
    who.require_admin()?;
    Ok((
        StatusCode::ACCEPTED,
        Json(super::post_event(&state, event).await?),
    ))
}
