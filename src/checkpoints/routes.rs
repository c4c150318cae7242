//! HTTP handlers of checkpoints. Saving needs the admin token; restoring a read token.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{Checkpoint, CheckpointQuery, NewCheckpoint, db};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Page, PageQuery, validate_name};
use crate::error::{Json, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/checkpoints", post(save).get(list))
        .route("/v1/checkpoints/{checkpoint_id}", get(restore))
}

/// Save a coordination checkpoint.
#[utoipa::path(post, path = "/v1/checkpoints", tag = "checkpoints", request_body = NewCheckpoint,
    responses((status = 201, body = Checkpoint), (status = 403, body = Problem), (status = 413, body = Problem),
              (status = 422, body = Problem)))]
pub async fn save(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewCheckpoint>,
) -> Result<(StatusCode, Json<Checkpoint>)> {
    who.require_admin()?;
    Ok((StatusCode::CREATED, Json(super::save(&state, new).await?)))
}

/// Restore a checkpoint: from the broker's cache when it has it (`source: cache`), else from the
/// store (`source: store`).
#[utoipa::path(get, path = "/v1/checkpoints/{checkpoint_id}", tag = "checkpoints",
    params(("checkpoint_id" = String, Path)),
    responses((status = 200, body = Checkpoint), (status = 404, body = Problem)))]
pub async fn restore(
    State(state): State<AppState>,
    who: Principal,
    Path(checkpoint_id): Path<String>,
) -> Result<Json<Checkpoint>> {
    who.require_reader()?;
    Ok(Json(super::restore(&state, &checkpoint_id).await?))
}

/// A coordination's checkpoints, newest first.
#[utoipa::path(get, path = "/v1/checkpoints", tag = "checkpoints", params(CheckpointQuery),
    responses((status = 200, body = Page<Checkpoint>), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<CheckpointQuery>,
) -> Result<Json<Page<Checkpoint>>> {
    who.require_reader()?;
    validate_name("coordination_id", &query.coordination_id, 128)?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list(
        state.store.reader(),
        &query.coordination_id,
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, |row| row)))
}
