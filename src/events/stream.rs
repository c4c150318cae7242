//! The WebSocket endpoints: an agent's notification stream and the dashboard firehose.
//!
//! A connection subscribes to the hub *before* it reads the log, so nothing committed in between
//! is missed; frames at or below the last `seq` sent are dropped, so the overlap never shows.
//! Both happen before the handshake is answered: a client holding its `101` misses nothing
//! committed after it, even without `?since=`.
//! Each connection is one `select!` over its hub buffer, the client, the ping timer and the
//! shutdown token; it holds a task-tracker token, so shutdown waits until it has said goodbye.
//!
//! Close codes: 4401 bad or missing credentials, 4403 not allowed, 4008 slow consumer, 1012 the
//! server is restarting, 1008 the client stopped answering pings, 1009 a client frame over
//! 64 KiB. All but 4401/4403 are reconnectable with `?since=`.
//!
//! A client that stops reading is a slow consumer (4008) once its hub buffer overflows, once a
//! frame cannot leave within [`SEND_TIMEOUT`], or once a ping stays unanswered for a whole
//! interval while frames were sent to it; 1008 is for a quiet stream whose pings go unanswered
//! (a dead peer). The close frame queues behind what the client has not read: it is written
//! within [`SEND_TIMEOUT`] or never, so a client that reads nothing for that long sees the
//! buffered frames and then the connection ending without a close frame (1006 in browsers),
//! which it should treat like 4008.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use utoipa::IntoParams;

use super::hub::{Delivery, Interest, Subscription};
use super::{TOPICS, db};
use crate::app::AppState;
use crate::auth::{Principal, bearer_subprotocol};
use crate::common::validate_agent_id;
use crate::error::{Error, Path, Query, Result};

/// Largest frame or message a client may send.
const MAX_CLIENT_FRAME: usize = 64 << 10;
/// Events read from the log per query while catching up.
const CATCH_UP_PAGE: i64 = 500;
/// How long one frame may take to leave before the peer counts as stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The reason sent with 4008.
const SLOW_CONSUMER: &str = "slow consumer";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/agents/{agent_id}/stream", get(agent_stream))
        .route("/v1/events/stream", get(firehose))
}

/// Resume position of a stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Resume after this `seq` (or send `Last-Event-ID`): first a `resumed` frame, then every
    /// frame missed, in order.
    pub since: Option<i64>,
}

/// Topics and resume position of the firehose.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FirehoseQuery {
    /// Comma-separated: agents, messages, handoffs, sessions, workflows, coordinations, memory
    /// (default: all).
    pub topics: Option<String>,
    pub since: Option<i64>,
}

/// Open streams per agent token.
#[derive(Default)]
pub struct StreamSlots {
    open: Mutex<HashMap<String, u32>>,
}

/// One held slot; released when the connection ends.
pub struct Slot {
    slots: Arc<StreamSlots>,
    agent_id: String,
}

impl StreamSlots {
    fn acquire(self: &Arc<Self>, agent_id: &str, max: u32) -> Option<Slot> {
        let mut open = self.open.lock().expect("slots lock");
        let count = open.entry(agent_id.to_owned()).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            agent_id: agent_id.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("slots lock");
        if let Some(count) = open.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.agent_id);
            }
        }
    }
}

/// An agent's notifications: `new_message`, `message.dead_lettered`, … as JSON text frames with
/// `type`, `seq` and `at`. Token by `Authorization` or the `bearer.<token>` subprotocol.
#[utoipa::path(get, path = "/v1/agents/{agent_id}/stream", tag = "streams",
    params(("agent_id" = String, Path), StreamQuery),
    responses((status = 101, description = "WebSocket: one JSON notification per text frame"),
              (status = 422, body = crate::error::Problem), (status = 429, body = crate::error::Problem)))]
pub async fn agent_stream(
    State(state): State<AppState>,
    Path(agent_id): Path<String>,
    Query(query): Query<StreamQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    validate_agent_id("agent_id", &agent_id)?;
    let since = resume_point(query.since, &headers)?;
    let ws = ws.map_err(not_a_websocket)?;
    let who = match state.authenticate(&headers).await {
        Ok(who) => who,
        Err(e) => return refuse(ws, &headers, &e, &state.metrics),
    };
    if let Err(e) = who.require_read_of(&agent_id) {
        return refuse(ws, &headers, &e, &state.metrics);
    }
    let slot = match &who {
        Principal::Agent(me) => Some(
            state
                .stream_slots
                .acquire(me, state.config.limits.max_streams_per_token)
                .ok_or_else(|| {
                    Error::TooManyRequests("too many open streams for this token".into())
                })?,
        ),
        _ => None,
    };
    let interest = Interest::Agent(agent_id);
    let (subscription, start) = open(&state, &interest, since).await?;
    Ok(upgrade(ws, &headers)
        .on_upgrade(move |socket| serve(state, socket, interest, subscription, start, slot)))
}

/// The dashboard firehose: `{topic, type, seq, at, data}` for every event of the chosen topics.
#[utoipa::path(get, path = "/v1/events/stream", tag = "streams", params(FirehoseQuery),
    responses((status = 101, description = "WebSocket: one JSON event per text frame"),
              (status = 422, body = crate::error::Problem)))]
pub async fn firehose(
    State(state): State<AppState>,
    Query(query): Query<FirehoseQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let topics: HashSet<String> = match query.topics.as_deref() {
        None | Some("") => TOPICS.iter().map(|t| (*t).to_owned()).collect(),
        Some(list) => list
            .split(',')
            .map(|t| {
                let t = t.trim();
                if TOPICS.contains(&t) {
                    Ok(t.to_owned())
                } else {
                    Err(Error::invalid(
                        "topics",
                        format!("unknown topic {t:?}; known: {}", TOPICS.join(", ")),
                    ))
                }
            })
            .collect::<Result<_>>()?,
    };
    let since = resume_point(query.since, &headers)?;
    let ws = ws.map_err(not_a_websocket)?;
    let who = match state.authenticate(&headers).await {
        Ok(who) => who,
        Err(e) => return refuse(ws, &headers, &e, &state.metrics),
    };
    if let Err(e) = who.require_reader() {
        return refuse(ws, &headers, &e, &state.metrics);
    }
    let interest = Interest::Topics(topics);
    let (subscription, start) = open(&state, &interest, since).await?;
    Ok(upgrade(ws, &headers)
        .on_upgrade(move |socket| serve(state, socket, interest, subscription, start, None)))
}

/// A request that is not a WebSocket handshake (a plain `GET`, say) gets a problem document.
fn not_a_websocket(rejection: WebSocketUpgradeRejection) -> Error {
    Error::BadRequest(format!(
        "not a WebSocket handshake: {}",
        rejection.body_text()
    ))
}

/// `?since=` wins over `Last-Event-ID`.
fn resume_point(since: Option<i64>, headers: &HeaderMap) -> Result<Option<i64>> {
    let since = match since {
        Some(since) => Some(since),
        None => match headers.get("last-event-id") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| Error::invalid("Last-Event-ID", "must be an event seq"))?,
            ),
        },
    };
    match since {
        Some(s) if s < 0 => Err(Error::invalid("since", "must be 0 or more")),
        other => Ok(other),
    }
}

/// Limits and the subprotocol echo (a browser that offered `bearer.<token>` requires it back).
fn upgrade(ws: WebSocketUpgrade, headers: &HeaderMap) -> WebSocketUpgrade {
    let mut ws = ws
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        // Idle streams dominate memory at 10 000 connections: tungstenite's default read
        // buffer is 128 KiB per socket; clients send next to nothing.
        .read_buffer_size(4 << 10)
        .write_buffer_size(8 << 10)
        .max_write_buffer_size(1 << 20);
    if let Some(protocol) = bearer_subprotocol(headers).and_then(|p| HeaderValue::from_str(&p).ok())
    {
        ws.set_selected_protocol(protocol);
    }
    ws
}

/// Completes the handshake only to close with 4401/4403: browsers cannot read an HTTP status.
fn refuse(
    ws: WebSocketUpgrade,
    headers: &HeaderMap,
    error: &Error,
    metrics: &crate::ops::metrics::Metrics,
) -> Result<Response> {
    let code = match error {
        Error::Unauthorized(_) => 4401,
        Error::Forbidden(_) => 4403,
        _ => return Err(Error::Unavailable(error.to_string())),
    };
    let reason = error.to_string();
    metrics
        .stream_closes
        .with_label_values(&[close_reason(code)])
        .inc();
    Ok(upgrade(ws, headers)
        .on_upgrade(move |mut socket| async move {
            let _ = socket.send(close_frame(code, &reason)).await;
        })
        .into_response())
}

fn close_frame(code: u16, reason: &str) -> Message {
    let mut reason = reason.to_owned();
    reason.truncate(120); // a close reason must fit in a control frame (125 bytes)
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// Where a connection starts.
enum Start {
    /// Live: frames after this `seq` (the log's end when the client connected).
    Live(i64),
    /// Resume: a `resumed` frame, then what was logged after `from`.
    Resume {
        since: i64,
        recovered: bool,
        from: i64,
    },
}

/// Subscribes to the hub, then fixes where the connection starts; called before the handshake
/// is answered, so nothing committed after the client's `101` is missed.
async fn open(
    state: &AppState,
    interest: &Interest,
    since: Option<i64>,
) -> Result<(Subscription, Start)> {
    let subscription = state
        .hub
        .subscribe(interest.clone(), state.config.limits.stream_buffer as usize);
    // Live from now: a later resync must not replay history this client never asked for.
    let latest = db::latest_seq(state.store.reader()).await?;
    let start = match since {
        None => Start::Live(latest),
        // A position the log never reached (the database was replaced): not recoverable; carry
        // on from the end rather than wait for seqs to catch up with it.
        Some(since) if since > latest => Start::Resume {
            since,
            recovered: false,
            from: latest,
        },
        Some(since) => {
            let recovered = since >= db::pruned_through(state.store.reader()).await?;
            Start::Resume {
                since,
                recovered,
                from: since,
            }
        }
    };
    Ok((subscription, start))
}

/// Why a connection ended.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The peer went away (or the socket failed): nothing left to say.
    Gone,
}

/// Runs one connection until it ends.
async fn serve(
    state: AppState,
    mut socket: WebSocket,
    interest: Interest,
    mut subscription: Subscription,
    start: Start,
    _slot: Option<Slot>,
) {
    let _tracked = state.tracker.token();
    state.metrics.streams_open.inc();
    let end: Result<std::convert::Infallible, End> = async {
        let mut last_seq = match start {
            Start::Live(seq) => seq,
            Start::Resume { since, recovered, from } => {
                send(&mut socket, json!({"type": "resumed", "recovered": recovered, "since": since}).to_string()).await?;
                catch_up(&state, &mut socket, &interest, from).await?
            }
        };
        let period = Duration::from_secs(state.config.limits.ping_interval_s.into());
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut awaiting_pong = false;
        // Frames sent since the last ping: unanswered by the next tick, they mean a client that
        // stopped reading (4008, told while its buffers still have room), not a dead one (1008).
        let mut sent_since_ping = false;
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => return Err(End::Close(1012, "server restarting; reconnect with since")),
                delivery = subscription.rx.recv() => match delivery {
                    Some(Delivery::Frame(dispatched)) => {
                        let seq = dispatched.event.seq;
                        if seq > last_seq {
                            let frame = match &interest {
                                Interest::Agent(_) => dispatched.agent_frame(),
                                Interest::Topics(_) => dispatched.firehose_frame(),
                            };
                            send(&mut socket, frame.to_owned()).await?;
                            last_seq = seq;
                            sent_since_ping = true;
                        }
                    }
                    Some(Delivery::Resync) => {
                        let caught_up = catch_up(&state, &mut socket, &interest, last_seq).await?;
                        sent_since_ping |= caught_up > last_seq;
                        last_seq = caught_up;
                    }
                    None if subscription.overflowed() => return Err(End::Close(4008, SLOW_CONSUMER)),
                    None => return Err(End::Close(1011, "stream ended")),
                },
                _ = ping.tick() => {
                    if awaiting_pong && sent_since_ping {
                        return Err(End::Close(4008, SLOW_CONSUMER));
                    }
                    if awaiting_pong {
                        return Err(End::Close(1008, "no pong"));
                    }
                    awaiting_pong = true;
                    sent_since_ping = false;
                    timed_send(&mut socket, Message::Ping(Default::default())).await?;
                },
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                    Some(Err(e)) => return Err(read_failed(e)),
                    // Any frame proves the peer is alive; client frames carry no commands yet.
                    Some(Ok(_)) => awaiting_pong = false,
                },
            }
        }
    }
    .await;
    state.metrics.streams_open.dec();
    let why = match &end {
        Err(End::Close(code, _)) => close_reason(*code),
        _ => "client_gone",
    };
    state.metrics.stream_closes.with_label_values(&[why]).inc();
    if let Err(End::Close(code, reason)) = end {
        // A bounded write: a slow consumer's close frame waits behind what it has not read yet,
        // so it gets as long as one frame may take; at shutdown, a second.
        let bound = if code == 4008 {
            SEND_TIMEOUT
        } else {
            Duration::from_secs(1)
        };
        let close = tokio::time::timeout(bound, socket.send(close_frame(code, reason)));
        tokio::select! {
            _ = close => {}
            _ = state.shutdown.cancelled(), if code == 4008 => {}
        }
    }
}

/// The metrics' name of a close code.
fn close_reason(code: u16) -> &'static str {
    match code {
        4401 => "unauthorized",
        4403 => "forbidden",
        4008 => "slow_consumer",
        1012 => "server_restart",
        1008 => "no_pong",
        1009 => "frame_too_big",
        _ => "other",
    }
}

/// A failed read ends the connection; a client frame over the limit is told so (1009).
fn read_failed(error: axum::Error) -> End {
    let error = error.into_inner();
    match error.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
            End::Close(1009, "message too big: client frames are limited to 64 KiB")
        }
        _ => End::Gone,
    }
}

async fn timed_send(socket: &mut WebSocket, message: Message) -> Result<(), End> {
    match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Gone),
        Err(_) => Err(End::Close(4008, SLOW_CONSUMER)),
    }
}

async fn send(socket: &mut WebSocket, text: String) -> Result<(), End> {
    timed_send(socket, Message::Text(text.into())).await
}

/// Sends every logged event of `interest` after `after`, in order; returns the last `seq` sent.
async fn catch_up(
    state: &AppState,
    socket: &mut WebSocket,
    interest: &Interest,
    after: i64,
) -> Result<i64, End> {
    let mut last = after;
    loop {
        let page = match interest {
            Interest::Agent(agent) => {
                db::after_for_agent(state.store.reader(), agent, last, CATCH_UP_PAGE).await
            }
            Interest::Topics(topics) => {
                let topics: Vec<String> = topics.iter().cloned().collect();
                db::after_for_topics(state.store.reader(), &topics, last, CATCH_UP_PAGE).await
            }
        }
        .map_err(|_| End::Close(1011, "store unavailable"))?;
        let full = page.len() as i64 == CATCH_UP_PAGE;
        for event in page {
            let frame = match interest {
                Interest::Agent(_) => event.agent_frame(),
                Interest::Topics(_) => event.firehose_frame(),
            };
            send(socket, frame).await?;
            last = event.seq;
        }
        if !full {
            return Ok(last);
        }
    }
}
