//! HTTP handlers of handoffs.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{Accept, Complete, Handoff, HandoffQuery, NewHandoff, Reject, db};
use crate::admission::{Handoffs, Room};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Empty, Page, PageQuery};
use crate::error::{Json, OptionalJson, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/handoffs", post(initiate).get(list))
        .route("/v1/handoffs/{handoff_id}", get(get_handoff))
        .route("/v1/handoffs/{handoff_id}/accept", post(accept))
        .route("/v1/handoffs/{handoff_id}/complete", post(complete))
        .route("/v1/handoffs/{handoff_id}/reject", post(reject))
        .route("/v1/handoffs/{handoff_id}/cancel", post(cancel))
}

/// Hand work over to another agent, with its context.
///
/// Records a memory and the graph edge `agent:{from} —hands_off_to→ agent:{to}`, queues a
/// `handoff.offered` message for `to_agent` and notifies its stream. 422 when the session's or
/// workflow's chain of handoffs has used up its hop budget (the detail names the chain), and
/// when `from_agent` or `to_agent` is not registered (naming it). 429 `overloaded` (with
/// `Retry-After`) when the new work waiting for the store passes its bound: nothing recorded.
#[utoipa::path(post, path = "/v1/handoffs", tag = "handoffs", request_body = NewHandoff,
    responses((status = 201, body = Handoff), (status = 403, body = Problem), (status = 413, body = Problem),
              (status = 422, body = Problem), (status = 429, body = Problem)))]
pub async fn initiate(
    State(state): State<AppState>,
    who: Principal,
    _: Room<Handoffs>,
    Json(new): Json<NewHandoff>,
) -> Result<(StatusCode, Json<Handoff>)> {
    Ok((
        StatusCode::CREATED,
        Json(super::initiate(&state, &who, new).await?),
    ))
}

/// One handoff, with its context.
#[utoipa::path(get, path = "/v1/handoffs/{handoff_id}", tag = "handoffs",
    params(("handoff_id" = String, Path)),
    responses((status = 200, body = Handoff), (status = 404, body = Problem)))]
pub async fn get_handoff(
    State(state): State<AppState>,
    who: Principal,
    Path(handoff_id): Path<String>,
) -> Result<Json<Handoff>> {
    Ok(Json(super::get(&state, &who, &handoff_id).await?))
}

/// Handoffs, newest first, by agent (from or to) and status.
#[utoipa::path(get, path = "/v1/handoffs", tag = "handoffs", params(HandoffQuery),
    responses((status = 200, body = Page<Handoff>), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<HandoffQuery>,
) -> Result<Json<Page<Handoff>>> {
    super::check_query(&who, &query)?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list(
        state.store.reader(),
        query.agent.as_deref(),
        query.status.as_deref(),
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, Into::into)))
}

/// Accept an offer (only the addressed agent); 409 when `context_digest` differs from the
/// stored context's or the handoff is no longer `initiated`.
#[utoipa::path(post, path = "/v1/handoffs/{handoff_id}/accept", tag = "handoffs",
    params(("handoff_id" = String, Path)), request_body = Accept,
    responses((status = 200, body = Handoff), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub async fn accept(
    State(state): State<AppState>,
    who: Principal,
    Path(handoff_id): Path<String>,
    Json(body): Json<Accept>,
) -> Result<Json<Handoff>> {
    Ok(Json(super::accept(&state, &who, &handoff_id, body).await?))
}

/// Finish accepted work (only the addressed agent): `completed`, or `failed` with `success: false`.
#[utoipa::path(post, path = "/v1/handoffs/{handoff_id}/complete", tag = "handoffs",
    params(("handoff_id" = String, Path)), request_body(content = Option<Complete>),
    responses((status = 200, body = Handoff), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn complete(
    State(state): State<AppState>,
    who: Principal,
    Path(handoff_id): Path<String>,
    OptionalJson(body): OptionalJson<Complete>,
) -> Result<Json<Handoff>> {
    Ok(Json(
        super::complete(&state, &who, &handoff_id, body).await?,
    ))
}

/// Decline an offer (only the addressed agent).
#[utoipa::path(post, path = "/v1/handoffs/{handoff_id}/reject", tag = "handoffs",
    params(("handoff_id" = String, Path)), request_body = Reject,
    responses((status = 200, body = Handoff), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub async fn reject(
    State(state): State<AppState>,
    who: Principal,
    Path(handoff_id): Path<String>,
    Json(body): Json<Reject>,
) -> Result<Json<Handoff>> {
    Ok(Json(super::reject(&state, &who, &handoff_id, body).await?))
}

/// Withdraw an offer (only the initiating agent).
#[utoipa::path(post, path = "/v1/handoffs/{handoff_id}/cancel", tag = "handoffs",
    params(("handoff_id" = String, Path)),
    responses((status = 200, body = Handoff), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(handoff_id): Path<String>,
    OptionalJson(_): OptionalJson<Empty>,
) -> Result<Json<Handoff>> {
    Ok(Json(super::cancel(&state, &who, &handoff_id).await?))
}
