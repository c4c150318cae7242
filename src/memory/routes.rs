//! HTTP handlers of memories, graph edges and patterns. Writes need the admin token; reads a
//! read or admin token (agent tokens act only as their agent).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};

use super::{
    Edge, EdgeQuery, Memory, MemoryPatch, MemoryQuery, NewEdge, NewMemory, NewPattern, Pattern,
    PatternQuery, PatternStats, PatternTypeStats, db,
};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Page, PageQuery};
use crate::error::{Error, Json, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/memories", post(store).get(list))
        .route("/v1/memories/{memory_id}", get(get_memory).patch(update))
        .route("/v1/graph/edges", post(link).get(edges))
        .route("/v1/patterns", post(record).get(patterns))
        .route("/v1/patterns/stats", get(stats))
}

/// Store a memory.
#[utoipa::path(post, path = "/v1/memories", tag = "memory", request_body = NewMemory,
    responses((status = 201, body = Memory), (status = 403, body = Problem),
              (status = 413, body = Problem), (status = 422, body = Problem)))]
pub async fn store(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewMemory>,
) -> Result<(StatusCode, Json<Memory>)> {
    who.require_admin()?;
    let mut tx = state.store.begin().await?;
    let memory = super::store_memory(&mut tx, new).await?;
    tx.commit(&state.broker).await?;
    Ok((StatusCode::CREATED, Json(memory)))
}

/// Memories, newest first, by tag and full-text search.
#[utoipa::path(get, path = "/v1/memories", tag = "memory", params(MemoryQuery),
    responses((status = 200, body = Page<Memory>), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<MemoryQuery>,
) -> Result<Json<Page<Memory>>> {
    who.require_reader()?;
    let fts = query.search()?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list_memories(
        state.store.reader(),
        query.tag.as_deref(),
        fts.as_deref(),
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, Memory::from)))
}

/// One memory.
#[utoipa::path(get, path = "/v1/memories/{memory_id}", tag = "memory",
    params(("memory_id" = String, Path)),
    responses((status = 200, body = Memory), (status = 404, body = Problem)))]
pub async fn get_memory(
    State(state): State<AppState>,
    who: Principal,
    Path(memory_id): Path<String>,
) -> Result<Json<Memory>> {
    who.require_reader()?;
    let memory = db::get_memory(state.store.reader(), &memory_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no memory {memory_id:?}")))?;
    Ok(Json(memory.into()))
}

/// Change a memory: content and tags are replaced, metadata keys merged (null removes a key).
#[utoipa::path(patch, path = "/v1/memories/{memory_id}", tag = "memory",
    params(("memory_id" = String, Path)), request_body = MemoryPatch,
    responses((status = 200, body = Memory), (status = 404, body = Problem), (status = 422, body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    who: Principal,
    Path(memory_id): Path<String>,
    Json(patch): Json<MemoryPatch>,
) -> Result<Json<Memory>> {
    who.require_admin()?;
    let mut tx = state.store.begin().await?;
    let memory = super::update_memory(&mut tx, &memory_id, patch).await?;
    tx.commit(&state.broker).await?;
    Ok(Json(memory))
}

/// Add a graph edge `source —relationship→ target`.
#[utoipa::path(post, path = "/v1/graph/edges", tag = "memory", request_body = NewEdge,
    responses((status = 201, body = Edge), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn link(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewEdge>,
) -> Result<(StatusCode, Json<Edge>)> {
    who.require_admin()?;
    let mut tx = state.store.begin().await?;
    let edge = super::link(&mut tx, new).await?;
    tx.commit(&state.broker).await?;
    Ok((StatusCode::CREATED, Json(edge)))
}

/// Graph edges, newest first, from or to a node and by relationship.
#[utoipa::path(get, path = "/v1/graph/edges", tag = "memory", params(EdgeQuery),
    responses((status = 200, body = Page<Edge>), (status = 422, body = Problem)))]
pub async fn edges(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<EdgeQuery>,
) -> Result<Json<Page<Edge>>> {
    who.require_reader()?;
    query.check()?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list_edges(
        state.store.reader(),
        query.node.as_deref(),
        query.relationship.as_deref(),
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, Edge::from)))
}

/// Record a pattern (with its outcome, when known).
#[utoipa::path(post, path = "/v1/patterns", tag = "memory", request_body = NewPattern,
    responses((status = 201, body = Pattern), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn record(
    State(state): State<AppState>,
    who: Principal,
    Json(new): Json<NewPattern>,
) -> Result<(StatusCode, Json<Pattern>)> {
    who.require_admin()?;
    let mut tx = state.store.begin().await?;
    let pattern = super::record_pattern(&mut tx, new).await?;
    tx.commit(&state.broker).await?;
    Ok((StatusCode::CREATED, Json(pattern)))
}

/// Patterns, newest first, by type.
#[utoipa::path(get, path = "/v1/patterns", tag = "memory", params(PatternQuery),
    responses((status = 200, body = Page<Pattern>), (status = 422, body = Problem)))]
pub async fn patterns(
    State(state): State<AppState>,
    who: Principal,
    Query(query): Query<PatternQuery>,
) -> Result<Json<Page<Pattern>>> {
    who.require_reader()?;
    query.check()?;
    let (limit, before) = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    }
    .newest_first(state.config.limits.max_page_size)?;
    let rows = db::list_patterns(
        state.store.reader(),
        query.pattern_type.as_deref(),
        before,
        limit + 1,
    )
    .await?;
    Ok(Json(Page::from_seq_rows(rows, limit, Pattern::from)))
}

/// Uses and success rate per pattern type.
#[utoipa::path(get, path = "/v1/patterns/stats", tag = "memory",
    responses((status = 200, body = PatternStats)))]
pub async fn stats(State(state): State<AppState>, who: Principal) -> Result<Json<PatternStats>> {
    who.require_reader()?;
    let rows = |rows: Vec<(String, i64, i64, i64)>| {
        rows.into_iter()
            .map(
                |(pattern_type, uses, successes, failures)| PatternTypeStats {
                    pattern_type,
                    uses: uses as u64,
                    successes: successes as u64,
                    failures: failures as u64,
                    success_rate: (successes + failures > 0)
                        .then(|| successes as f64 / (successes + failures) as f64),
                },
            )
            .collect()
    };
    let reader = state.store.reader();
    Ok(Json(PatternStats {
        types: rows(db::pattern_stats(reader).await?),
        workflow_patterns: rows(db::workflow_pattern_stats(reader).await?),
    }))
}
