//! The workflows' SQL. Every step transition is a compare-and-set on the step's `status` (and,
//! for an attempt, on `attempts`), so a result, a timeout and another instance's timer cannot
//! both win; the run's barrier (`steps_done`) moves in the same transaction.

use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use crate::error::{Error, Result};

/// Appends ` AND idx IN (?, …)` binding `idxs` (at most SQLite's variable limit; callers chunk).
fn and_idx_in(query: &mut QueryBuilder<Sqlite>, idxs: &[i64]) {
    query.push(" AND idx IN (");
    let mut list = query.separated(", ");
    for idx in idxs {
        list.push_bind(*idx);
    }
    query.push(")");
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub seq: i64,
    pub workflow_id: String,
    pub name: String,
    pub description: Option<String>,
    pub pattern: String,
    pub metadata: String,
    pub status: String,
    pub steps_total: i64,
    pub steps_done: i64,
    pub steps_failed: i64,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

/// A step as stored.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub workflow_id: String,
    pub idx: i64,
    pub step_id: String,
    pub name: Option<String>,
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub input: String,
    /// Indexes of the steps this one depends on (JSON array).
    pub depends_on: String,
    /// Indexes of the steps that depend on this one (JSON array).
    pub dependants: String,
    pub trigger_name: Option<String>,
    pub timeout_ms: i64,
    pub max_retries: i64,
    pub deps_left: i64,
    pub status: String,
    pub agent_id: Option<String>,
    pub attempts: i64,
    pub attempt_at: Option<i64>,
    pub due_at: Option<i64>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub handoff_id: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl StepRow {
    pub fn indexes(json: &str) -> Result<Vec<i64>> {
        serde_json::from_str(json).map_err(|e| Error::Internal(format!("step indexes: {e}")))
    }
}

const RUN_COLUMNS: &str = "seq, workflow_id, name, description, pattern, metadata, status,
    steps_total, steps_done, steps_failed, created_at, finished_at";

const STEP_COLUMNS: &str = "workflow_id, idx, step_id, name, agent, capability, input, depends_on,
    dependants, trigger_name, timeout_ms, max_retries, deps_left, status, agent_id, attempts,
    attempt_at, due_at, output, error, handoff_id, started_at, finished_at";

/// The step columns as `s.<column>`, for joins with `workflow w`.
fn qualified_step_columns() -> String {
    STEP_COLUMNS
        .split(',')
        .map(|c| format!("s.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn run_from_row(row: &SqliteRow) -> Result<RunRow> {
    Ok(RunRow {
        seq: row.try_get("seq")?,
        workflow_id: row.try_get("workflow_id")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        pattern: row.try_get("pattern")?,
        metadata: row.try_get("metadata")?,
        status: row.try_get("status")?,
        steps_total: row.try_get("steps_total")?,
        steps_done: row.try_get("steps_done")?,
        steps_failed: row.try_get("steps_failed")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn step_from_row(row: &SqliteRow) -> Result<StepRow> {
    Ok(StepRow {
        workflow_id: row.try_get("workflow_id")?,
        idx: row.try_get("idx")?,
        step_id: row.try_get("step_id")?,
        name: row.try_get("name")?,
        agent: row.try_get("agent")?,
        capability: row.try_get("capability")?,
        input: row.try_get("input")?,
        depends_on: row.try_get("depends_on")?,
        dependants: row.try_get("dependants")?,
        trigger_name: row.try_get("trigger_name")?,
        timeout_ms: row.try_get("timeout_ms")?,
        max_retries: row.try_get("max_retries")?,
        deps_left: row.try_get("deps_left")?,
        status: row.try_get("status")?,
        agent_id: row.try_get("agent_id")?,
        attempts: row.try_get("attempts")?,
        attempt_at: row.try_get("attempt_at")?,
        due_at: row.try_get("due_at")?,
        output: row.try_get("output")?,
        error: row.try_get("error")?,
        handoff_id: row.try_get("handoff_id")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// Inserts new runs, 500 a statement.
pub async fn insert_runs(conn: &mut SqliteConnection, runs: &[&RunRow]) -> Result<()> {
    for chunk in runs.chunks(500) {
        let mut insert = QueryBuilder::new(
            "INSERT INTO workflow (workflow_id, name, description, pattern, metadata, status,
                                   steps_total, created_at) ",
        );
        insert.push_values(chunk, |mut row, run| {
            row.push_bind(&run.workflow_id)
                .push_bind(&run.name)
                .push_bind(&run.description)
                .push_bind(&run.pattern)
                .push_bind(&run.metadata)
                .push_bind("executing")
                .push_bind(run.steps_total)
                .push_bind(run.created_at);
        });
        crate::store::build_rows(&mut insert, chunk.len())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Inserts runs' steps, 500 rows a statement (14 variables a row, inside SQLite's limit).
pub async fn insert_steps(conn: &mut SqliteConnection, steps: &[&StepRow]) -> Result<()> {
    for chunk in steps.chunks(500) {
        let mut insert = QueryBuilder::new(
            "INSERT INTO workflow_step (workflow_id, idx, step_id, name, agent, capability, input,
                 depends_on, dependants, trigger_name, timeout_ms, max_retries, deps_left, status) ",
        );
        insert.push_values(chunk, |mut row, s| {
            row.push_bind(&s.workflow_id)
                .push_bind(s.idx)
                .push_bind(&s.step_id)
                .push_bind(&s.name)
                .push_bind(&s.agent)
                .push_bind(&s.capability)
                .push_bind(&s.input)
                .push_bind(&s.depends_on)
                .push_bind(&s.dependants)
                .push_bind(&s.trigger_name)
                .push_bind(s.timeout_ms)
                .push_bind(s.max_retries)
                .push_bind(s.deps_left)
                .push_bind(&s.status);
        });
        crate::store::build_rows(&mut insert, chunk.len())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

pub async fn get_run(
    conn: impl sqlx::SqliteExecutor<'_>,
    workflow_id: &str,
) -> Result<Option<RunRow>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM workflow WHERE workflow_id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(run_from_row).transpose()
}

/// Runs before `before` (a seq), newest first, optionally with one status.
pub async fn list_runs(
    pool: &SqlitePool,
    status: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<RunRow>> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM workflow WHERE seq < ? AND (? IS NULL OR status = ?)
         ORDER BY seq DESC {BOUND_LIMIT}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(before)
        .bind(status)
        .bind(status)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(run_from_row).collect()
}

pub async fn step_by_idx(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idx: i64,
) -> Result<Option<StepRow>> {
    let sql = format!("SELECT {STEP_COLUMNS} FROM workflow_step WHERE workflow_id = ? AND idx = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(idx)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(step_from_row).transpose()
}

pub async fn step_by_id(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    step_id: &str,
) -> Result<Option<StepRow>> {
    let sql =
        format!("SELECT {STEP_COLUMNS} FROM workflow_step WHERE workflow_id = ? AND step_id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(step_id)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(step_from_row).transpose()
}

/// The run's columns beside a step's, as `run_*` where the names clash.
const JOINED_RUN_COLUMNS: &str = "w.seq AS run_seq, w.name AS run_name, w.description, w.pattern,
    w.metadata, w.status AS run_status, w.steps_total, w.steps_done, w.steps_failed,
    w.created_at, w.finished_at AS run_finished_at";

fn joined_run(row: &SqliteRow) -> Result<RunRow> {
    Ok(RunRow {
        seq: row.try_get("run_seq")?,
        workflow_id: row.try_get("workflow_id")?,
        name: row.try_get("run_name")?,
        description: row.try_get("description")?,
        pattern: row.try_get("pattern")?,
        metadata: row.try_get("metadata")?,
        status: row.try_get("run_status")?,
        steps_total: row.try_get("steps_total")?,
        steps_done: row.try_get("steps_done")?,
        steps_failed: row.try_get("steps_failed")?,
        created_at: row.try_get("created_at")?,
        finished_at: row.try_get("run_finished_at")?,
    })
}

/// A step with its run, in one query (the result path).
pub async fn run_and_step(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    step_id: &str,
) -> Result<Option<(RunRow, StepRow)>> {
    let step_columns = qualified_step_columns();
    let sql = format!(
        "SELECT {step_columns}, {JOINED_RUN_COLUMNS}
         FROM workflow_step s JOIN workflow w ON w.workflow_id = s.workflow_id
         WHERE s.workflow_id = ? AND s.step_id = ?"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(step_id)
        .fetch_optional(conn)
        .await?;
    row.map(|row| Ok((joined_run(&row)?, step_from_row(&row)?)))
        .transpose()
}

/// What a run's view shows of a step: the columns a reader needs, no more (a result's answer
/// reads them for every step of its run).
#[derive(Debug)]
pub struct StepView {
    pub step_id: String,
    pub name: Option<String>,
    pub status: String,
    pub agent_id: Option<String>,
    pub attempts: i64,
    pub output: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

/// [`StepView`]'s columns, in the order [`step_view`] reads them.
const VIEW_COLUMNS: &str = "s.step_id, s.name, s.status, s.agent_id, s.attempts, s.output,
    s.error, s.started_at, s.finished_at, s.workflow_id";

fn step_view(row: &SqliteRow) -> Result<StepView> {
    Ok(StepView {
        step_id: row.try_get(0)?,
        name: row.try_get(1)?,
        status: row.try_get(2)?,
        agent_id: row.try_get(3)?,
        attempts: row.try_get(4)?,
        output: row.try_get(5)?,
        error: row.try_get(6)?,
        started_at: row.try_get(7)?,
        finished_at: row.try_get(8)?,
    })
}

/// A run's steps as its view shows them, in definition order.
pub async fn step_views(pool: &SqlitePool, workflow_id: &str) -> Result<Vec<StepView>> {
    let sql = format!(
        "SELECT {VIEW_COLUMNS} FROM workflow_step s WHERE s.workflow_id = ? ORDER BY s.idx"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .fetch_all(pool)
        .await?;
    rows.iter().map(step_view).collect()
}

/// A run with every step (in definition order) as its view shows them, in one query and one
/// snapshot.
pub async fn run_with_steps(
    pool: &SqlitePool,
    workflow_id: &str,
) -> Result<Option<(RunRow, Vec<StepView>)>> {
    let sql = format!(
        "SELECT {VIEW_COLUMNS}, {JOINED_RUN_COLUMNS}
         FROM workflow_step s JOIN workflow w ON w.workflow_id = s.workflow_id
         WHERE s.workflow_id = ? ORDER BY s.idx"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .fetch_all(pool)
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let run = joined_run(first)?;
    let steps = rows.iter().map(step_view).collect::<Result<_>>()?;
    Ok(Some((run, steps)))
}

/// The steps of a run at the given indexes that are still in `status`.
pub async fn steps_in(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idxs: &[i64],
    status: &str,
) -> Result<Vec<StepRow>> {
    let mut out = Vec::with_capacity(idxs.len());
    for chunk in idxs.chunks(500) {
        let mut query = QueryBuilder::new(format!(
            "SELECT {STEP_COLUMNS} FROM workflow_step WHERE status = "
        ));
        query
            .push_bind(status)
            .push(" AND workflow_id = ")
            .push_bind(workflow_id);
        and_idx_in(&mut query, chunk);
        query.push(" ORDER BY idx");
        let rows = query.build().fetch_all(&mut *conn).await?;
        for row in &rows {
            out.push(step_from_row(row)?);
        }
    }
    Ok(out)
}

/// `{step_id: output, …}` of a run's succeeded steps before `idx` (raw outputs, `null` for none),
/// in definition order, as one JSON object built by SQL: a sequential step's `previous_results`.
const OUTPUTS_BEFORE: &str = "SELECT '{' || COALESCE(group_concat(
        json_quote(p.step_id) || ':' || COALESCE(p.output, 'null'), ',' ORDER BY p.idx), '') || '}'
    FROM workflow_step p WHERE p.workflow_id = ?1 AND p.idx < ?2 AND p.status = 'succeeded'";

/// A sequential step's `previous_results`: every earlier succeeded step's output.
pub async fn outputs_before(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idx: i64,
) -> Result<String> {
    Ok(sqlx::query_scalar(OUTPUTS_BEFORE)
        .bind(workflow_id)
        .bind(idx)
        .fetch_one(conn)
        .await?)
}

/// A step with its sequential `previous_results` (see [`outputs_before`]), in one statement: the
/// next step of a sequential run, read as its predecessor ends.
pub async fn step_with_outputs_before(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idx: i64,
) -> Result<Option<(StepRow, String)>> {
    let sql = format!(
        "SELECT {STEP_COLUMNS}, ({OUTPUTS_BEFORE}) AS previous_results
         FROM workflow_step WHERE workflow_id = ?1 AND idx = ?2"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(idx)
        .fetch_optional(conn)
        .await?;
    row.map(|row| Ok((step_from_row(&row)?, row.try_get("previous_results")?)))
        .transpose()
}

/// `(step_id, output)` of the succeeded steps among `idxs`, in definition order.
pub async fn outputs(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idxs: &[i64],
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::with_capacity(idxs.len());
    for chunk in idxs.chunks(500) {
        let mut query = QueryBuilder::new(
            "SELECT step_id, output FROM workflow_step WHERE status = 'succeeded'
             AND workflow_id = ",
        );
        query.push_bind(workflow_id);
        and_idx_in(&mut query, chunk);
        query.push(" ORDER BY idx");
        let rows: Vec<(String, Option<String>)> =
            query.build_query_as().fetch_all(&mut *conn).await?;
        out.extend(
            rows.into_iter()
                .map(|(id, output)| (id, output.unwrap_or_else(|| "null".into()))),
        );
    }
    Ok(out)
}

/// One step put out by [`dispatch`].
pub struct Dispatch<'a> {
    pub idx: i64,
    /// The attempts it had made before this one.
    pub attempts: i64,
    pub agent_id: &'a str,
    pub handoff_id: Option<&'a str>,
}

/// Puts the next attempt of ready (`pending` or `waiting`) steps out, 250 a statement: status,
/// holder, attempt number, deadline. Returns how many moved.
pub async fn dispatch(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    moves: &[Dispatch<'_>],
    now: i64,
) -> Result<u64> {
    let mut moved = 0;
    for chunk in moves.chunks(250) {
        let mut update = QueryBuilder::new(
            "UPDATE workflow_step SET status = 'dispatched', agent_id = v.column3,
                 attempts = attempts + 1, attempt_at = ",
        );
        update
            .push_bind(now)
            .push(", due_at = ")
            .push_bind(now)
            .push(" + timeout_ms, started_at = COALESCE(started_at, ")
            .push_bind(now)
            .push("), handoff_id = COALESCE(v.column4, handoff_id) FROM (");
        update.push_values(chunk, |mut row, m| {
            row.push_bind(m.idx)
                .push_bind(m.attempts)
                .push_bind(m.agent_id)
                .push_bind(m.handoff_id);
        });
        update
            .push(") AS v WHERE workflow_step.workflow_id = ")
            .push_bind(workflow_id)
            .push(
                " AND workflow_step.idx = v.column1 AND workflow_step.attempts = v.column2
                  AND workflow_step.status IN ('pending', 'waiting')",
            );
        moved += update.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(moved)
}

/// Leaves ready steps `waiting` for an agent, looked at again at `due_at`.
pub async fn set_waiting(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idxs: &[i64],
    due_at: i64,
) -> Result<()> {
    for chunk in idxs.chunks(500) {
        let mut update =
            QueryBuilder::new("UPDATE workflow_step SET status = 'waiting', due_at = ");
        update
            .push_bind(due_at)
            .push(" WHERE status IN ('pending', 'waiting') AND workflow_id = ")
            .push_bind(workflow_id);
        and_idx_in(&mut update, chunk);
        update.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Which step: by position (the timer) or by id (a result).
pub enum StepKey<'a> {
    Idx(i64),
    Id(&'a str),
}

/// One attempt of a step: which step, its number, and who must hold it (any holder when None).
pub struct Attempt<'a> {
    pub workflow_id: &'a str,
    pub key: StepKey<'a>,
    pub number: i64,
    pub holder: Option<&'a str>,
}

/// How an attempt ended, as stored.
pub struct Ending<'a> {
    /// `succeeded`, `failed` or `timed_out`; the last two become `pending` while retries remain.
    pub outcome: &'static str,
    pub output: Option<&'a str>,
    pub error: Option<&'a str>,
    /// 0-1: how much of a fifth to add to a retry's backoff.
    pub jitter: f64,
}

/// The `SET` of an attempt's end, given the SQL of its values: `succeeded`, or on a failure or
/// timeout `pending` again with its backoff (1 s × 2ⁿ⁻¹ plus up to a fifth, at most 60 s) while
/// retries remain, else final.
fn ending_set(outcome: &str, output: &str, error: &str, now: &str, jitter: &str) -> String {
    format!(
        "status = CASE WHEN {outcome} = 'succeeded' THEN 'succeeded'
                       WHEN attempts <= max_retries THEN 'pending' ELSE {outcome} END,
         output = {output}, error = {error},
         due_at = CASE WHEN {outcome} != 'succeeded' AND attempts <= max_retries
                       THEN {now} + MIN(60000, CAST(MIN(60000, 1000 << MIN(attempts - 1, 6))
                                                    * (1 + {jitter} / 5.0) AS INTEGER))
                       END,
         finished_at = CASE WHEN {outcome} = 'succeeded' OR attempts > max_retries THEN {now} END"
    )
}

/// Ends an attempt of a dispatched step in one statement (see [`ending_set`]). Returns the step
/// after it; None when the step is not out under that attempt and holder (nothing written).
pub async fn end_attempt(
    conn: &mut SqliteConnection,
    attempt: &Attempt<'_>,
    ending: &Ending<'_>,
    now: i64,
) -> Result<Option<StepRow>> {
    let by = match attempt.key {
        StepKey::Idx(_) => "idx = ?7",
        StepKey::Id(_) => "step_id = ?7",
    };
    let set = ending_set("?1", "?2", "?3", "?4", "?5");
    let sql = format!(
        "UPDATE workflow_step SET {set}
         WHERE workflow_id = ?6 AND {by} AND status = 'dispatched' AND attempts = ?8
           AND (?9 IS NULL OR agent_id = ?9)
         RETURNING {STEP_COLUMNS}"
    );
    let query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(ending.outcome)
        .bind(ending.output)
        .bind(ending.error)
        .bind(now)
        .bind(ending.jitter)
        .bind(attempt.workflow_id);
    let query = match attempt.key {
        StepKey::Idx(idx) => query.bind(idx),
        StepKey::Id(step_id) => query.bind(step_id),
    };
    let row = query
        .bind(attempt.number)
        .bind(attempt.holder)
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(step_from_row).transpose()
}

/// Ends many attempts, each of a different step and named by step id with its holder, in one
/// statement per 256 (see [`ending_set`]). Returns the steps that moved, in no particular
/// order; the others were not out under that attempt and holder (nothing written for them).
pub async fn end_attempts(
    conn: &mut SqliteConnection,
    ends: &[(Attempt<'_>, Ending<'_>)],
    now: i64,
) -> Result<Vec<StepRow>> {
    let mut moved = Vec::with_capacity(ends.len());
    for chunk in ends.chunks(256) {
        let mut query = QueryBuilder::new(
            "WITH r(r_workflow, r_step, r_attempt, r_holder, r_outcome, r_output, r_error,
                    r_jitter, r_now) AS (",
        );
        query.push_values(chunk, |mut row, (attempt, ending)| {
            let step_id = match attempt.key {
                StepKey::Id(step_id) => step_id,
                StepKey::Idx(_) => unreachable!("batched ends name steps by id"),
            };
            row.push_bind(attempt.workflow_id.to_owned())
                .push_bind(step_id.to_owned())
                .push_bind(attempt.number)
                .push_bind(attempt.holder.map(str::to_owned))
                .push_bind(ending.outcome.to_owned())
                .push_bind(ending.output.map(str::to_owned))
                .push_bind(ending.error.map(str::to_owned))
                .push_bind(ending.jitter)
                .push_bind(now);
        });
        let set = ending_set("r_outcome", "r_output", "r_error", "r_now", "r_jitter");
        query.push(format!(") UPDATE workflow_step SET {set}"));
        query.push(format!(
            " FROM r WHERE workflow_id = r_workflow AND step_id = r_step
               AND status = 'dispatched' AND attempts = r_attempt
               AND (r_holder IS NULL OR agent_id = r_holder)
             RETURNING {STEP_COLUMNS}"
        ));
        for row in crate::store::build_rows(&mut query, chunk.len())
            .fetch_all(&mut *conn)
            .await?
        {
            moved.push(step_from_row(&row)?);
        }
    }
    Ok(moved)
}

/// Marks the not-yet-final steps among `idxs` (all of the run's when None) with a final `to`
/// (`skipped`, `cancelled`), 500 a statement; returns `(idx, step_id)` of each.
pub async fn finish_open(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idxs: Option<&[i64]>,
    to: &str,
    now: i64,
) -> Result<Vec<(i64, String)>> {
    let chunks: Vec<Option<&[i64]>> = match idxs {
        None => vec![None],
        Some(idxs) => idxs.chunks(500).map(Some).collect(),
    };
    let mut finished = Vec::new();
    for chunk in chunks {
        let mut query = QueryBuilder::new("UPDATE workflow_step SET status = ");
        query
            .push_bind(to)
            .push(", due_at = NULL, finished_at = ")
            .push_bind(now)
            .push(" WHERE status IN ('pending', 'waiting', 'dispatched') AND workflow_id = ")
            .push_bind(workflow_id);
        if let Some(idxs) = chunk {
            and_idx_in(&mut query, idxs);
        }
        query.push(" RETURNING idx, step_id");
        let rows: Vec<(i64, String)> = query.build_query_as().fetch_all(&mut *conn).await?;
        finished.extend(rows);
    }
    Ok(finished)
}

/// `(step_id, agent_id)` of a run's dispatched steps.
pub async fn holders(
    conn: &mut SqliteConnection,
    workflow_id: &str,
) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT step_id, agent_id FROM workflow_step
         WHERE workflow_id = ? AND status = 'dispatched' AND agent_id IS NOT NULL",
    )
    .bind(workflow_id)
    .fetch_all(conn)
    .await?)
}

/// Counts steps that reached a final status (the run's barrier): `(workflow_id, done, failed)`
/// for distinct runs, one statement per 500. Returns the runs after it, in no particular order.
pub async fn count_done(
    conn: &mut SqliteConnection,
    counts: &[(&str, i64, i64)],
) -> Result<Vec<RunRow>> {
    let mut runs = Vec::with_capacity(counts.len());
    for chunk in counts.chunks(500) {
        let mut query = QueryBuilder::new("WITH c(c_workflow, c_done, c_failed) AS (");
        query.push_values(chunk, |mut row, (workflow_id, done, failed)| {
            row.push_bind(workflow_id.to_string())
                .push_bind(*done)
                .push_bind(*failed);
        });
        query.push(format!(
            ") UPDATE workflow SET steps_done = steps_done + c_done,
                                   steps_failed = steps_failed + c_failed
             FROM c WHERE workflow_id = c_workflow RETURNING {RUN_COLUMNS}"
        ));
        for row in crate::store::build_rows(&mut query, chunk.len())
            .fetch_all(&mut *conn)
            .await?
        {
            runs.push(run_from_row(&row)?);
        }
    }
    Ok(runs)
}

/// What a run's end records of its steps.
pub struct RunEnd {
    /// Σ (finished_at − started_at) of the steps that ran.
    pub worked_ms: i64,
    /// Every agent that held a step, sorted.
    pub agents: Vec<String>,
}

/// Ends an executing run and sums up its steps, in one statement; None when it had already
/// ended.
pub async fn finish_run(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    status: &str,
    now: i64,
) -> Result<Option<RunEnd>> {
    let row: Option<(i64, String)> = sqlx::query_as(
        "UPDATE workflow SET status = ?1, finished_at = ?2
         WHERE workflow_id = ?3 AND status = 'executing'
         RETURNING
           (SELECT COALESCE(SUM(finished_at - started_at), 0) FROM workflow_step
            WHERE workflow_id = ?3 AND finished_at IS NOT NULL AND started_at IS NOT NULL),
           (SELECT json_group_array(agent_id) FROM
              (SELECT DISTINCT agent_id FROM workflow_step
               WHERE workflow_id = ?3 AND agent_id IS NOT NULL ORDER BY agent_id))",
    )
    .bind(status)
    .bind(now)
    .bind(workflow_id)
    .fetch_optional(conn)
    .await?;
    row.map(|(worked_ms, agents)| {
        Ok(RunEnd {
            worked_ms,
            agents: serde_json::from_str(&agents)
                .map_err(|e| Error::Internal(format!("run agents: {e}")))?,
        })
    })
    .transpose()
}

/// Lowers the dependency count of `idxs`; returns those that reached zero (and are pending).
pub async fn satisfy(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    idxs: &[i64],
) -> Result<Vec<i64>> {
    let mut ready = Vec::new();
    for chunk in idxs.chunks(500) {
        let mut query = QueryBuilder::new(
            "UPDATE workflow_step SET deps_left = deps_left - 1 WHERE workflow_id = ",
        );
        query.push_bind(workflow_id);
        and_idx_in(&mut query, chunk);
        query.push(" RETURNING idx, deps_left, status");
        let rows: Vec<(i64, i64, String)> = query.build_query_as().fetch_all(&mut *conn).await?;
        ready.extend(
            rows.into_iter()
                .filter(|(_, left, status)| *left == 0 && status == "pending")
                .map(|(idx, _, _)| idx),
        );
    }
    ready.sort_unstable();
    Ok(ready)
}

/// Pending steps of every executing run waiting for the trigger `name`, by run.
pub async fn triggered(conn: &mut SqliteConnection, name: &str) -> Result<Vec<StepRow>> {
    let step_columns = qualified_step_columns();
    let sql = format!(
        "SELECT {step_columns} FROM workflow_step s JOIN workflow w ON w.workflow_id = s.workflow_id
         WHERE s.trigger_name = ? AND s.status = 'pending' AND s.attempts = 0
           AND s.due_at IS NULL AND w.status = 'executing'
         ORDER BY s.workflow_id, s.idx"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .fetch_all(conn)
        .await?;
    rows.iter().map(step_from_row).collect()
}

/// Pending steps of one run (if it is executing) waiting for the trigger `name`.
pub async fn triggered_in_run(
    conn: &mut SqliteConnection,
    workflow_id: &str,
    name: &str,
) -> Result<Vec<StepRow>> {
    let step_columns = qualified_step_columns();
    let sql = format!(
        "SELECT {step_columns} FROM workflow_step s JOIN workflow w ON w.workflow_id = s.workflow_id
         WHERE s.workflow_id = ? AND s.trigger_name = ? AND s.status = 'pending'
           AND s.attempts = 0 AND s.due_at IS NULL AND w.status = 'executing'
         ORDER BY s.idx"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(workflow_id)
        .bind(name)
        .fetch_all(conn)
        .await?;
    rows.iter().map(step_from_row).collect()
}

pub async fn insert_trigger(
    conn: &mut SqliteConnection,
    name: &str,
    workflow_id: Option<&str>,
    payload: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("INSERT INTO trigger_event (name, workflow_id, payload, at) VALUES (?, ?, ?, ?)")
        .bind(name)
        .bind(workflow_id)
        .bind(payload)
        .bind(now)
        .execute(conn)
        .await?;
    Ok(())
}

/// The newest payload of an event `name` posted since `since` for `workflow_id` (or for all).
pub async fn recent_trigger(
    conn: &mut SqliteConnection,
    name: &str,
    workflow_id: &str,
    since: i64,
) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT payload FROM trigger_event
         WHERE name = ? AND at >= ? AND (workflow_id IS NULL OR workflow_id = ?)
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(name)
    .bind(since)
    .bind(workflow_id)
    .fetch_optional(conn)
    .await?)
}

/// Forgets trigger events older than `before`.
pub async fn prune_triggers(conn: &mut SqliteConnection, before: i64) -> Result<u64> {
    Ok(sqlx::query("DELETE FROM trigger_event WHERE at < ?")
        .bind(before)
        .execute(conn)
        .await?
        .rows_affected())
}

/// Dispatched steps past their deadline since before `before` (the timer should have timed them
/// out), for diagnostics.
pub async fn overdue_steps(pool: &SqlitePool, before: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM workflow_step WHERE status = 'dispatched' AND due_at < ?",
    )
    .bind(before)
    .fetch_one(pool)
    .await?)
}

/// Runs ever submitted, by pattern, for the metrics report.
pub async fn count_by_pattern(pool: &SqlitePool) -> Result<Vec<(String, i64)>> {
    Ok(
        sqlx::query_as("SELECT pattern, COUNT(*) FROM workflow GROUP BY pattern")
            .fetch_all(pool)
            .await?,
    )
}

/// Runs executing now by pattern, for the metrics.
pub async fn count_executing(pool: &SqlitePool) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT pattern, COUNT(*) FROM workflow WHERE status = 'executing' GROUP BY pattern",
    )
    .fetch_all(pool)
    .await?)
}

/// Whether a timer has anything to do (for `Store::any_due`).
pub const ANY_DUE: &str = "SELECT EXISTS (SELECT 1 FROM workflow_step
    WHERE status IN ('dispatched', 'pending', 'waiting') AND due_at <= ?)";

/// A LIMIT bound to a parameter, written so the statement stays prepared: SQLite (since 3.49)
/// reads a bare `LIMIT ?`'s value for its row estimate, so every run with a newly bound value
/// re-prepares the whole statement (a parse and a plan per run); behind a CAST it does not.
const BOUND_LIMIT: &str = "LIMIT CAST(? AS INTEGER)";

/// Steps whose `due_at` has come: dispatched attempts past their deadline, retries whose backoff
/// is over and waiting steps due for another look for an agent.
pub async fn due(conn: &mut SqliteConnection, now: i64, limit: u32) -> Result<Vec<StepRow>> {
    let sql = format!(
        "SELECT {STEP_COLUMNS} FROM workflow_step
         WHERE status IN ('dispatched', 'pending', 'waiting') AND due_at <= ?
         ORDER BY due_at {BOUND_LIMIT}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(step_from_row).collect()
}

/// Waiting steps of the oldest runs first (held steps just ended: they may now find an agent),
/// by run.
pub async fn waiting(conn: &mut SqliteConnection, limit: u32) -> Result<Vec<StepRow>> {
    let sql = format!(
        "SELECT {STEP_COLUMNS} FROM workflow_step WHERE status = 'waiting'
         ORDER BY workflow_id, idx {BOUND_LIMIT}"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(limit)
        .fetch_all(conn)
        .await?;
    rows.iter().map(step_from_row).collect()
}

/// Agents with `capability` and the steps each holds now: (agent_id, max_concurrent_tasks,
/// held).
pub async fn capable(
    conn: &mut SqliteConnection,
    capability: &str,
) -> Result<Vec<(String, i64, i64)>> {
    Ok(sqlx::query_as(
        "SELECT a.agent_id, a.max_concurrent_tasks,
                (SELECT COUNT(*) FROM workflow_step s
                 WHERE s.agent_id = a.agent_id AND s.status = 'dispatched') AS held
         FROM agent_capability c JOIN agent a ON a.agent_id = c.agent_id
         WHERE c.capability = ? ORDER BY a.agent_id",
    )
    .bind(capability)
    .fetch_all(conn)
    .await?)
}

/// Steps each of `agent_ids` holds now.
pub async fn held(pool: &SqlitePool, agent_ids: &[&str]) -> Result<Vec<(String, i64)>> {
    if agent_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut query = QueryBuilder::new(
        "SELECT agent_id, COUNT(*) FROM workflow_step WHERE status = 'dispatched' AND agent_id IN (",
    );
    let mut list = query.separated(", ");
    for id in agent_ids {
        list.push_bind(*id);
    }
    query.push(") GROUP BY agent_id");
    Ok(query.build_query_as().fetch_all(pool).await?)
}
