//! HTTP handlers of agent contexts and syncs. An agent reads and writes its own context (the
//! admin any, read tokens read); syncs need the admin token.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

use super::{Context, ContextWrite, NewSync, SyncResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Error, Json, Path, Problem, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/agents/{agent_id}/context",
            get(get_context).put(replace).patch(merge),
        )
        .route("/v1/syncs", post(sync))
}

/// `If-Match: <version>` (quotes allowed, as for an ETag).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(value) = headers.get("if-match") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| Error::invalid("If-Match", "must be the context version, e.g. If-Match: 3"))
}

/// An agent's context (`version` 0 and no values until the first write).
#[utoipa::path(get, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path)),
    responses((status = 200, body = Context), (status = 403, body = Problem)))]
pub async fn get_context(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
) -> Result<Json<Context>> {
    who.require_read_of(&agent_id)?;
    Ok(Json(super::get(&state, &agent_id).await?))
}

/// Replace an agent's context; with `If-Match: <version>`, 409 when it changed since.
#[utoipa::path(put, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path), ("If-Match" = Option<i64>, Header, description = "The version read")),
    request_body = ContextWrite,
    responses((status = 200, body = Context), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 413, body = Problem)))]
pub async fn replace(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ContextWrite>,
) -> Result<Json<Context>> {
    who.require_agent(&agent_id)?;
    Ok(Json(
        super::update(&state, &agent_id, body, false, if_match(&headers)?).await?,
    ))
}

/// Merge into an agent's context (a null value removes the key); `If-Match` as for PUT.
#[utoipa::path(patch, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path), ("If-Match" = Option<i64>, Header, description = "The version read")),
    request_body = ContextWrite,
    responses((status = 200, body = Context), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 413, body = Problem)))]
pub async fn merge(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ContextWrite>,
) -> Result<Json<Context>> {
    who.require_agent(&agent_id)?;
    Ok(Json(
        super::update(&state, &agent_id, body, true, if_match(&headers)?).await?,
    ))
}

/// Synchronise agents' contexts: conflicts reported and resolved by strategy, the merged context
/// written to every agent. `fail_on_conflict` answers 409 and writes nothing when there are any.
#[utoipa::path(post, path = "/v1/syncs", tag = "contexts", request_body = NewSync,
    responses((status = 201, body = SyncResult), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 422, body = Problem)))]
pub async fn sync(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewSync>,
) -> Result<(StatusCode, Json<SyncResult>)> {
    who.require_admin()?;
    Ok((StatusCode::CREATED, Json(super::sync(&state, new).await?)))
}
