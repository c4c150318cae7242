//! Retention: finished records are purged once they are older than their retention, and the
//! space they took is given back to the file system. Two step functions the background loop
//! drives once a minute (tests call them with the clock they need):
//! - [`purge_tick`]: finished workflows (with steps and attempts), handoffs in a final state,
//!   ended and expired sessions (with activities), finished coordination rounds (with answers)
//!   and the checkpoints of finished coordinations after `LTMC_RETENTION_DAYS`; memories, graph
//!   edges and patterns after `LTMC_MEMORY_RETENTION_DAYS` (0: never). Live records — an
//!   executing workflow, an active session, a handoff in flight, a round still collecting — never
//!   match a rule, whatever their age.
//! - [`reclaim_tick`]: `PRAGMA incremental_vacuum` in small steps until the file holds no more
//!   than one step of free pages.
//!
//! Rows go in batches, each found on the read pool and deleted in one short statement on the
//! write connection, so writers queue behind a purge no longer than behind any other batch. The
//! event log and acked messages have their own, shorter bounds (`events::prune_tick`,
//! `messages::prune_tick`).

pub mod db;

use std::collections::BTreeMap;

use crate::app::AppState;
use crate::error::Result;

const DAY_MS: i64 = 86_400_000;
/// Parent rows deleted per statement (a workflow takes its steps along).
const BATCH: u32 = 200;
/// Batches per kind in one step: a backlog (a first start with retention on an old file) is
/// worked off over several minutes rather than in one long step that holds up the loop.
const MAX_BATCHES: u32 = 50;
/// Pages given back per turn on the write connection (1 MiB at the default 4 KiB page).
const RECLAIM_PAGES: u32 = 256;

/// Rows purged in one step, by kind (kinds with none are left out).
pub type Purged = BTreeMap<&'static str, u64>;

/// Purges every kind past its retention at `now`.
pub async fn purge_tick(state: &AppState, now: i64) -> Result<Purged> {
    let limits = &state.config.limits;
    let mut purged = Purged::new();
    let finished_cutoff = now - i64::from(limits.retention_days) * DAY_MS;
    for rule in db::FINISHED {
        purge(state, rule, finished_cutoff, &mut purged).await?;
    }
    if limits.memory_retention_days > 0 {
        let knowledge_cutoff = now - i64::from(limits.memory_retention_days) * DAY_MS;
        for rule in db::KNOWLEDGE {
            purge(state, rule, knowledge_cutoff, &mut purged).await?;
        }
    }
    Ok(purged)
}

async fn purge(state: &AppState, rule: &db::Rule, cutoff: i64, purged: &mut Purged) -> Result<()> {
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let seqs = db::candidates(state.store.reader(), rule, cutoff, BATCH).await?;
        if seqs.is_empty() {
            break;
        }
        let mut conn = state.store.autocommit().await?;
        total += db::delete(&mut conn, rule, cutoff, &seqs).await?;
        drop(conn);
        if seqs.len() < BATCH as usize {
            break;
        }
    }
    if total > 0 {
        state.metrics.purged(rule.kind, total);
        purged.insert(rule.kind, total);
    }
    Ok(())
}

/// Gives free pages back to the file system, a step at a time; returns how many pages went.
pub async fn reclaim_tick(state: &AppState) -> Result<i64> {
    let mut reclaimed = 0;
    loop {
        let free = state.store.reclaim(RECLAIM_PAGES).await?;
        reclaimed += free.min(i64::from(RECLAIM_PAGES));
        if free <= i64::from(RECLAIM_PAGES) {
            return Ok(reclaimed);
        }
    }
}
