//! HTTP handlers of agent contexts and syncs. An agent reads and writes its own context (the
//! admin any, read tokens read); syncs need the admin token.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
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

/// `If-Match: <version>` (quoted as the `ETag` is, or not); `*` (any version) checks nothing,
/// as the context always exists (version 0 before the first write).
fn if_match(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let value = value.to_str().map(str::trim).unwrap_or_default();
    if value == "*" {
        return Ok(None);
    }
    value
        .trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .map(Some)
        .map_err(|_| Error::invalid("If-Match", "must be the context version, e.g. If-Match: 3"))
}

/// A context with its version as the `ETag` (`"3"`), for the next `If-Match`.
fn tagged(context: Context) -> impl IntoResponse {
    let etag = format!("\"{}\"", context.version);
    ([(header::ETAG, etag)], Json(context))
}

/// An agent's context (`version` 0 and no values until the first write).
#[utoipa::path(get, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path)),
    responses((status = 200, body = Context, headers(("ETag" = String, description = "The version, quoted"))), (status = 403, body = Problem)))]
pub async fn get_context(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
) -> Result<impl IntoResponse> {
    who.require_read_of(&agent_id)?;
    Ok(tagged(super::get(&state, &agent_id).await?))
}

/// Replace an agent's context; with `If-Match: <version>`, 409 when it changed since.
#[utoipa::path(put, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path), ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"?[0-9]+"?)$"#, description = "The version read (the `ETag`, quoted or not), or `*`")),
    request_body = ContextWrite,
    responses((status = 200, body = Context, headers(("ETag" = String, description = "The version, quoted"))), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem)))]
pub async fn replace(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ContextWrite>,
) -> Result<impl IntoResponse> {
    who.require_agent(&agent_id)?;
    let if_match = if_match(&headers)?;
    Ok(tagged(
        super::update(&state, &agent_id, body, false, if_match).await?,
    ))
}

/// Merge into an agent's context (a null value removes the key); `If-Match` as for PUT.
#[utoipa::path(patch, path = "/v1/agents/{agent_id}/context", tag = "contexts",
    params(("agent_id" = String, Path), ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"?[0-9]+"?)$"#, description = "The version read (the `ETag`, quoted or not), or `*`")),
    request_body = ContextWrite,
    responses((status = 200, body = Context, headers(("ETag" = String, description = "The version, quoted"))), (status = 403, body = Problem), (status = 409, body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem)))]
pub async fn merge(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<ContextWrite>,
) -> Result<impl IntoResponse> {
    who.require_agent(&agent_id)?;
    let if_match = if_match(&headers)?;
    Ok(tagged(
        super::update(&state, &agent_id, body, true, if_match).await?,
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
