//! HTTP handlers of coordination rounds. Starting one needs the admin token; an agent answers
//! for itself; the round is readable by read tokens and by its agents.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{NewResponse, NewRound, Round, RoundQuery, Started};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Json, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/coordinations", post(start))
        .route("/v1/coordinations/{coordination_id}", get(get_round))
        .route(
            "/v1/coordinations/{coordination_id}/responses",
            post(respond),
        )
}

/// Ask N agents the same question; each gets a `coordination.request` message and notification.
/// Every agent must be registered (422 names each one that is not).
#[utoipa::path(post, path = "/v1/coordinations", tag = "coordinations", request_body = NewRound,
    responses((status = 201, body = Started), (status = 403, body = Problem), (status = 422, body = Problem),
              (status = 429, body = Problem)))]
pub async fn start(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewRound>,
) -> Result<(StatusCode, Json<Started>)> {
    who.require_admin()?;
    Ok((StatusCode::CREATED, Json(super::start(&state, new).await?)))
}

/// Answer a round (only its agents, once each; 409 after it ended).
#[utoipa::path(post, path = "/v1/coordinations/{coordination_id}/responses", tag = "coordinations",
    params(("coordination_id" = String, Path)), request_body = NewResponse,
    responses((status = 202, description = "Recorded"), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn respond(
    State(state): State<AppState>,
    who: Principal,
    Path(coordination_id): Path<String>,
    Json(new): Json<NewResponse>,
) -> Result<StatusCode> {
    super::respond(&state, &who, &coordination_id, new).await?;
    Ok(StatusCode::ACCEPTED)
}

/// The round: responses, who is missing, conflicting result keys. `?wait_ms=` waits (up to
/// 30 s) for it to complete or time out.
#[utoipa::path(get, path = "/v1/coordinations/{coordination_id}", tag = "coordinations",
    params(("coordination_id" = String, Path), RoundQuery),
    responses((status = 200, body = Round), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub async fn get_round(
    State(state): State<AppState>,
    who: Principal,
    Path(coordination_id): Path<String>,
    Query(query): Query<RoundQuery>,
) -> Result<Json<Round>> {
    Ok(Json(
        super::get(&state, &who, &coordination_id, query.wait_ms).await?,
    ))
}
