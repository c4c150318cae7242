//! The retention rules' SQL: for each kind, which rows are finished and old enough to go. Each
//! kind is read on the read pool first (no writer waits for the scan), then deleted by `seq`
//! on the write connection with its rule checked again, so a row that came back to life in
//! between (a session extended, a round still collecting) stays.

use sqlx::{SqliteConnection, SqlitePool};

use crate::error::Result;

/// A kind of finished record and the rule that says when one may go.
pub struct Rule {
    /// The label in `ltmc_purged_rows_total{kind}`.
    pub kind: &'static str,
    table: &'static str,
    /// True for a row that may go; `?` is the cutoff (ms): rows finished before it.
    condition: &'static str,
}

/// Finished records under `LTMC_RETENTION_DAYS`. Deleting a parent row takes its children with
/// it (`ON DELETE CASCADE`: steps, activities, answers).
pub const FINISHED: &[Rule] = &[
    Rule {
        kind: "workflows",
        table: "workflow",
        condition: "status IN ('completed', 'failed', 'cancelled') AND finished_at < ?",
    },
    Rule {
        kind: "handoffs",
        table: "handoff",
        // A session or run still going keeps its chain whole: the chain is its hop budget.
        condition: "status IN ('completed', 'failed', 'rejected', 'cancelled', 'expired')
                    AND COALESCE(completed_at, created_at) < ?
                    AND (session_id IS NULL OR session_id NOT IN
                         (SELECT session_id FROM session WHERE status = 'active'))
                    AND (workflow_id IS NULL OR workflow_id NOT IN
                         (SELECT workflow_id FROM workflow WHERE status = 'executing'))",
    },
    // An ended session records no end time: its last activity stands for it.
    Rule {
        kind: "sessions",
        table: "session",
        condition: "status IN ('ended', 'expired') AND last_activity_at < ?",
    },
    Rule {
        kind: "coordinations",
        table: "coordination",
        condition: "status IN ('completed', 'timed_out') AND finished_at < ?",
    },
    // A checkpoint names any coordination (a workflow, a session, a round, or the caller's own):
    // the coordination counts as finished when it saved nothing for the whole retention and is
    // not a run, session or round still going.
    Rule {
        kind: "checkpoints",
        table: "checkpoint",
        condition: "coordination_id IN (SELECT coordination_id FROM checkpoint
                                        GROUP BY coordination_id HAVING MAX(created_at) < ?)
                    AND coordination_id NOT IN (SELECT workflow_id FROM workflow
                                                WHERE status = 'executing')
                    AND coordination_id NOT IN (SELECT session_id FROM session
                                                WHERE status = 'active')
                    AND coordination_id NOT IN (SELECT coordination_id FROM coordination
                                                WHERE status = 'collecting')",
    },
];

/// The record of what happened, under `LTMC_MEMORY_RETENTION_DAYS`.
pub const KNOWLEDGE: &[Rule] = &[
    Rule {
        kind: "memories",
        table: "memory",
        condition: "updated_at < ?",
    },
    Rule {
        kind: "graph_edges",
        table: "graph_edge",
        condition: "created_at < ?",
    },
    Rule {
        kind: "patterns",
        table: "pattern",
        condition: "created_at < ?",
    },
];

/// Up to `limit` rows of `rule` that may go (oldest first), read without the writer.
pub async fn candidates(
    pool: &SqlitePool,
    rule: &Rule,
    cutoff: i64,
    limit: u32,
) -> Result<Vec<i64>> {
    let sql = format!(
        "SELECT seq FROM {} WHERE {} ORDER BY seq LIMIT ?",
        rule.table, rule.condition
    );
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(cutoff)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

/// Deletes the rows of `seqs` that still may go; returns how many went.
pub async fn delete(
    conn: &mut SqliteConnection,
    rule: &Rule,
    cutoff: i64,
    seqs: &[i64],
) -> Result<u64> {
    let seqs = serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into());
    let sql = format!(
        "DELETE FROM {} WHERE seq IN (SELECT value FROM json_each(?)) AND {}",
        rule.table, rule.condition
    );
    Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(seqs)
        .bind(cutoff)
        .execute(conn)
        .await?
        .rows_affected())
}
