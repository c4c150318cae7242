//! HTTP handlers of the agent registry.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};

use super::{Agent, AgentQuery, Heartbeat, NewAgent};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::Page;
use crate::error::{Json, OptionalJson, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agents", post(register).get(list))
        .route("/v1/agents/{agent_id}", get(get_agent).delete(delete))
        .route("/v1/agents/{agent_id}/heartbeat", post(heartbeat))
}

/// Register an agent, or refresh it when it exists.
///
/// With auth on, a first registration needs the admin token and returns the agent's own token
/// (once); a re-registration may use the agent's token.
#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = NewAgent,
    responses(
        (status = 201, description = "Registered", body = Agent),
        (status = 200, description = "Re-registered (refreshed)", body = Agent),
        (status = 403, body = Problem), (status = 422, body = Problem),
    ))]
pub async fn register(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewAgent>,
) -> Result<impl IntoResponse> {
    let (agent, created) = super::register(&state, &who, new).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(agent)))
}

/// List agents, optionally by capability and status.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", params(AgentQuery),
    responses((status = 200, body = Page<Agent>), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    _who: Principal,
    Query(query): Query<AgentQuery>,
) -> Result<Json<Page<Agent>>> {
    Ok(Json(super::list(&state, query).await?))
}

/// One agent.
#[utoipa::path(get, path = "/v1/agents/{agent_id}", tag = "agents",
    params(("agent_id" = String, Path)),
    responses((status = 200, body = Agent), (status = 404, body = Problem)))]
pub async fn get_agent(
    State(state): State<AppState>,
    _who: Principal,
    Path(agent_id): Path<String>,
) -> Result<Json<Agent>> {
    Ok(Json(super::get(&state, &agent_id).await?))
}

/// Heartbeat: refresh the agent's TTL and optionally its status.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/heartbeat", tag = "agents",
    params(("agent_id" = String, Path)), request_body(content = Option<Heartbeat>),
    responses((status = 200, body = Agent), (status = 404, body = Problem), (status = 503, body = Problem)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    OptionalJson(beat): OptionalJson<Heartbeat>,
) -> Result<Json<Agent>> {
    who.require_agent(&agent_id)?;
    Ok(Json(super::heartbeat(&state, &agent_id, beat).await?))
}

/// Deregister an agent (its queued messages stay).
#[utoipa::path(delete, path = "/v1/agents/{agent_id}", tag = "agents",
    params(("agent_id" = String, Path)),
    responses((status = 204, description = "Deleted"), (status = 404, body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
) -> Result<StatusCode> {
    who.require_agent(&agent_id)?;
    super::delete(&state, &agent_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
