//! The background loop: a thin timer around step functions that tests call directly.
//! Each tick reaps expired leases, checkpoints the WAL, expires handoff offers, idle sessions and
//! overdue coordination rounds, moves workflow steps whose time has come (attempt timeouts,
//! retries, steps waiting for an agent) and marks silent agents offline; about once a minute it
//! also prunes the event log, acked messages, idempotency answers and old workflow events, purges
//! finished records past their retention and gives the freed space back ([`crate::retention`]).
//! Every step is a compare-and-set in the store or an atomic take in the broker, so with several
//! instances each change happens once.

use std::time::{Duration, Instant};

use crate::app::AppState;
use crate::common::now_ms;
use crate::error::Error;
use crate::{agents, coordinations, events, handoffs, messages, retention, sessions, workflows};

const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

/// Runs until shutdown; a tick in progress finishes first (a safe point).
pub async fn run(state: AppState) {
    let mut interval = tokio::time::interval(state.config.tick());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_housekeeping = Instant::now();
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        tick(&state, now_ms()).await;
        if last_housekeeping.elapsed() >= HOUSEKEEPING_EVERY {
            last_housekeeping = Instant::now();
            housekeeping(&state, now_ms()).await;
        }
    }
}

/// One tick: lease reaper, WAL checkpoint, handoff, session, round and presence expiry. Failures
/// are logged ([`failed`]); the next tick retries.
pub async fn tick(state: &AppState, now: i64) {
    match messages::reap_tick(state, now).await {
        Ok(r) if r.redelivered + r.dead_lettered > 0 => {
            tracing::debug!(
                redelivered = r.redelivered,
                dead_lettered = r.dead_lettered,
                "leases reaped"
            );
        }
        Ok(_) => {}
        Err(e) => failed(&e, "lease reaper failed"),
    }
    state.broker.purge_cache(now);
    if let Err(e) = state.store.checkpoint().await {
        failed(&e, "WAL checkpoint failed");
    }
    match handoffs::expire_tick(state, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(expired = n, "handoff offers expired"),
        Err(e) => failed(&e, "handoff expiry failed"),
    }
    match sessions::expire_tick(state, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(expired = n, "idle sessions expired"),
        Err(e) => failed(&e, "session expiry failed"),
    }
    match coordinations::expire_tick(state, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(timed_out = n, "coordination rounds timed out"),
        Err(e) => failed(&e, "coordination deadlines failed"),
    }
    match workflows::tick(state, now).await {
        Ok(0) => {}
        Ok(n) => tracing::debug!(moved = n, "workflow steps moved by the timer"),
        Err(e) => failed(&e, "workflow timers failed"),
    }
    match agents::expire_tick(state, now).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(expired = n, "agents went offline"),
        Err(e) => failed(&e, "presence expiry failed"),
    }
}

/// Pruning by retention, then giving the space back.
pub async fn housekeeping(state: &AppState, now: i64) {
    if let Err(e) = events::prune_tick(state, now).await {
        failed(&e, "event log pruning failed");
    }
    if let Err(e) = messages::prune_tick(state, now).await {
        failed(&e, "message pruning failed");
    }
    if let Err(e) = workflows::prune_tick(state, now).await {
        failed(&e, "trigger event pruning failed");
    }
    match retention::purge_tick(state, now).await {
        Ok(purged) if purged.is_empty() => {}
        Ok(purged) => tracing::info!(?purged, "finished records purged past their retention"),
        Err(e) => failed(&e, "retention purge failed"),
    }
    if let Err(e) = retention::reclaim_tick(state).await {
        failed(&e, "giving free pages back failed");
    }
}

/// Logs a failed step. A broker outage fails every tick until it ends: the broker logs the
/// outage itself (once, then in summaries), so each tick's failure is only a debug line.
fn failed(error: &Error, what: &str) {
    match error {
        Error::Unavailable(_) => tracing::debug!(error = %error, "{what}"),
        _ => tracing::warn!(error = %error, "{what}"),
    }
}
