//! HTTP handlers of the message queues.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

use super::{
    Ack, ClaimRequest, Claimed, Extend, Message, MessageQuery, Nack, NewMessage, SendReceipt,
};
use crate::admission::{Messages, Room};
use crate::app::AppState;
use crate::auth::Principal;
use crate::common::{Empty, Page};
use crate::error::{Error, Json, OptionalJson, Path, Problem, Query, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agents/{agent_id}/messages", post(send).get(list))
        .route("/v1/agents/{agent_id}/messages/claim", post(claim))
        .route("/v1/agents/{agent_id}/messages/{message_id}/ack", post(ack))
        .route(
            "/v1/agents/{agent_id}/messages/{message_id}/nack",
            post(nack),
        )
        .route(
            "/v1/agents/{agent_id}/messages/{message_id}/extend",
            post(extend),
        )
        .route(
            "/v1/agents/{agent_id}/messages/{message_id}/replay",
            post(replay),
        )
}

/// Send a message to `agent_id` (who need not be registered yet: it waits, and the receipt's
/// `recipient_registered` is false).
///
/// 202 means the message is committed to the store. With an `Idempotency-Key` header, a retry
/// with the same key (from the same sender to the same recipient) answers the first receipt and
/// enqueues nothing. 429 `queue full` when the recipient already has its limit of waiting
/// messages; 429 `overloaded` when the new work waiting for the store passes its bound (work
/// already accepted goes first). Both carry `Retry-After` and enqueue nothing.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages", tag = "messages",
    params(("agent_id" = String, Path, description = "The recipient"),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe")),
    request_body = NewMessage,
    responses(
        (status = 202, body = SendReceipt), (status = 403, body = Problem),
        (status = 413, body = Problem), (status = 422, body = Problem), (status = 429, body = Problem),
    ))]
pub async fn send(
    State(state): State<AppState>,
    who: Principal,
    _: Room<Messages>,
    Path(to): Path<String>,
    headers: HeaderMap,
    Json(new): Json<NewMessage>,
) -> Result<(StatusCode, Json<SendReceipt>)> {
    who.require_agent(&new.from)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Error::invalid(
                "Idempotency-Key",
                "must be visible ASCII (at most 256 bytes)",
            )
        })?),
    };
    let receipt = super::send(&state, &to, new, key).await?;
    Ok((StatusCode::ACCEPTED, Json(receipt)))
}

/// Claim messages under a fresh lease, highest priority first, then FIFO.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages/claim", tag = "messages",
    params(("agent_id" = String, Path)), request_body(content = Option<ClaimRequest>),
    responses((status = 200, body = Claimed), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn claim(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    OptionalJson(request): OptionalJson<ClaimRequest>,
) -> Result<Json<Claimed>> {
    who.require_agent(&agent_id)?;
    Ok(Json(super::claim(&state, &agent_id, request).await?))
}

/// Ack a claimed message (204 again for a repeated ack under the same lease).
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages/{message_id}/ack", tag = "messages",
    params(("agent_id" = String, Path), ("message_id" = String, Path)), request_body = Ack,
    responses((status = 204, description = "Acked"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn ack(
    State(state): State<AppState>,
    who: Principal,
    Path((agent_id, message_id)): Path<(String, String)>,
    Json(body): Json<Ack>,
) -> Result<StatusCode> {
    who.require_agent(&agent_id)?;
    super::ack(&state, &agent_id, &message_id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Give a claimed message back: it returns to its old place in the queue.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages/{message_id}/nack", tag = "messages",
    params(("agent_id" = String, Path), ("message_id" = String, Path)), request_body = Nack,
    responses((status = 204, description = "Back in the queue"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn nack(
    State(state): State<AppState>,
    who: Principal,
    Path((agent_id, message_id)): Path<(String, String)>,
    Json(body): Json<Nack>,
) -> Result<StatusCode> {
    who.require_agent(&agent_id)?;
    super::nack(&state, &agent_id, &message_id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keep a lease alive.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages/{message_id}/extend", tag = "messages",
    params(("agent_id" = String, Path), ("message_id" = String, Path)), request_body = Extend,
    responses((status = 204, description = "Extended"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn extend(
    State(state): State<AppState>,
    who: Principal,
    Path((agent_id, message_id)): Path<(String, String)>,
    Json(body): Json<Extend>,
) -> Result<StatusCode> {
    who.require_agent(&agent_id)?;
    super::extend(&state, &agent_id, &message_id, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Put a dead letter back in the queue.
#[utoipa::path(post, path = "/v1/agents/{agent_id}/messages/{message_id}/replay", tag = "messages",
    params(("agent_id" = String, Path), ("message_id" = String, Path)),
    responses((status = 204, description = "Queued again"), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn replay(
    State(state): State<AppState>,
    who: Principal,
    Path((agent_id, message_id)): Path<(String, String)>,
    OptionalJson(_): OptionalJson<Empty>,
) -> Result<StatusCode> {
    who.require_agent(&agent_id)?;
    super::replay(&state, &agent_id, &message_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An agent's messages in one state (default `queued`), in claim order. Claims nothing.
#[utoipa::path(get, path = "/v1/agents/{agent_id}/messages", tag = "messages",
    params(("agent_id" = String, Path), MessageQuery),
    responses((status = 200, body = Page<Message>), (status = 403, body = Problem), (status = 422, body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Path(agent_id): Path<String>,
    Query(query): Query<MessageQuery>,
) -> Result<Json<Page<Message>>> {
    who.require_read_of(&agent_id)?;
    Ok(Json(super::list(&state, &agent_id, query).await?))
}
