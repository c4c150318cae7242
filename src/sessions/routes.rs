//! HTTP handlers of sessions. Opening and ending need the admin token; recording an activity the
//! admin or the token of the agent named in it; reads a read token.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{Activities, ActivityReceipt, NewActivity, NewSession, Session, SessionQuery, db};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Empty, Page, PageQuery};
use crate::error::{Json, OptionalJson, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{session_id}", get(get_session))
        .route(
            "/v1/sessions/{session_id}/activities",
            post(record).get(activities),
        )
        .route("/v1/sessions/{session_id}/end", post(end))
}

/// Open a session.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = NewSession,
    responses((status = 201, body = Session), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewSession>,
) -> Result<(StatusCode, Json<Session>)> {
    who.require_admin()?;
    Ok((StatusCode::CREATED, Json(super::create(&state, new).await?)))
}

/// One session.
#[utoipa::path(get, path = "/v1/sessions/{session_id}", tag = "sessions",
    params(("session_id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = Problem)))]
pub async fn get_session(
    State(state): State<AppState>,
    who: Principal,
    Path(session_id): Path<String>,
) -> Result<Json<Session>> {
    who.require_reader()?;
    Ok(Json(super::get(&state, &session_id).await?))
}

/// Sessions, newest first, by status and type.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", params(SessionQuery),
    responses((status = 200, body = Page<Session>), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<SessionQuery>,
) -> Result<Json<Page<Session>>> {
    who.require_reader()?;
    query.check()?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list(
        state.store.reader(),
        query.status.as_deref(),
        query.session_type.as_deref(),
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, |row| row)))
}

/// Record an activity; it extends the session's life by its `ttl_s`. 404 for an unknown or
/// expired session, 409 for an ended one.
#[utoipa::path(post, path = "/v1/sessions/{session_id}/activities", tag = "sessions",
    params(("session_id" = String, Path)), request_body = NewActivity,
    responses((status = 201, body = ActivityReceipt), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem), (status = 422, body = Problem)))]
pub async fn record(
    State(state): State<AppState>,
    who: Principal,
    Path(session_id): Path<String>,
    Json(new): Json<NewActivity>,
) -> Result<(StatusCode, Json<ActivityReceipt>)> {
    match &new.agent_id {
        Some(agent) => who.require_agent(agent)?,
        None => who.require_admin()?,
    }
    Ok((
        StatusCode::CREATED,
        Json(super::record(&state, &session_id, new).await?),
    ))
}

/// A session's activities, newest first (the newest 100 are kept).
#[utoipa::path(get, path = "/v1/sessions/{session_id}/activities", tag = "sessions",
    params(("session_id" = String, Path)),
    responses((status = 200, body = Activities), (status = 404, body = Problem)))]
pub async fn activities(
    State(state): State<AppState>,
    who: Principal,
    Path(session_id): Path<String>,
) -> Result<Json<Activities>> {
    who.require_reader()?;
    Ok(Json(Activities {
        items: super::activities(&state, &session_id).await?,
    }))
}

/// End a session.
#[utoipa::path(post, path = "/v1/sessions/{session_id}/end", tag = "sessions",
    params(("session_id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn end(
    State(state): State<AppState>,
    who: Principal,
    Path(session_id): Path<String>,
    OptionalJson(_): OptionalJson<Empty>,
) -> Result<Json<Session>> {
    who.require_admin()?;
    Ok(Json(super::end(&state, &session_id).await?))
}
