//! The SQL of memories, graph edges and patterns. Lists are newest first, paged by `seq`. A
//! memory's tags and full-text row are kept by triggers (migrations 0003 and 0009).

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};

use crate::error::{Error, Result};

pub struct MemoryRow {
    pub memory_id: String,
    pub content: String,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub created_at: i64,
    pub updated_at: i64,
}

pub struct EdgeRow {
    pub edge_id: String,
    pub source: String,
    pub target: String,
    pub relationship: String,
    pub properties: Value,
    pub created_at: i64,
}

pub struct PatternRow {
    pub pattern_id: String,
    pub pattern_type: String,
    pub context: String,
    pub solution: String,
    pub metadata: Value,
    pub success: Option<bool>,
    pub created_at: i64,
}

fn json<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: &str) -> Result<T> {
    serde_json::from_str(row.try_get(column)?)
        .map_err(|e| Error::Internal(format!("{column}: {e}")))
}

fn memory_from_row(row: &SqliteRow) -> Result<(i64, MemoryRow)> {
    Ok((
        row.try_get("seq")?,
        MemoryRow {
            memory_id: row.try_get("memory_id")?,
            content: row.try_get("content")?,
            tags: json(row, "tags")?,
            metadata: json(row, "metadata")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        },
    ))
}

pub async fn insert_memory(conn: &mut SqliteConnection, m: &MemoryRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO memory (memory_id, content, tags, metadata, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&m.memory_id)
    .bind(&m.content)
    .bind(Value::from(m.tags.clone()).to_string())
    .bind(m.metadata.to_string())
    .bind(m.created_at)
    .bind(m.updated_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get_memory(
    conn: impl sqlx::SqliteExecutor<'_>,
    memory_id: &str,
) -> Result<Option<MemoryRow>> {
    let row = sqlx::query(
        "SELECT seq, memory_id, content, tags, metadata, created_at, updated_at
         FROM memory WHERE memory_id = ?",
    )
    .bind(memory_id)
    .fetch_optional(conn)
    .await?;
    row.as_ref()
        .map(|r| memory_from_row(r).map(|(_, m)| m))
        .transpose()
}

pub async fn update_memory(conn: &mut SqliteConnection, m: &MemoryRow) -> Result<()> {
    sqlx::query(
        "UPDATE memory SET content = ?, tags = ?, metadata = ?, updated_at = ?
         WHERE memory_id = ?",
    )
    .bind(&m.content)
    .bind(Value::from(m.tags.clone()).to_string())
    .bind(m.metadata.to_string())
    .bind(m.updated_at)
    .bind(&m.memory_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Memories before `before` (a seq), newest first, optionally with a tag and matching an FTS5
/// query.
pub async fn list_memories(
    pool: &SqlitePool,
    tag: Option<&str>,
    fts: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, MemoryRow)>> {
    let rows = sqlx::query(
        "SELECT seq, memory_id, content, tags, metadata, created_at, updated_at FROM memory
         WHERE seq < ?
           AND (? IS NULL OR seq IN (SELECT seq FROM memory_tag WHERE tag = ?))
           AND (? IS NULL OR seq IN (SELECT rowid FROM memory_fts WHERE memory_fts MATCH ?))
         ORDER BY seq DESC LIMIT ?",
    )
    .bind(before)
    .bind(tag)
    .bind(tag)
    .bind(fts)
    .bind(fts)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(memory_from_row).collect()
}

/// Inserts edges, 1000 rows a statement.
pub async fn insert_edges(conn: &mut SqliteConnection, edges: &[EdgeRow]) -> Result<()> {
    for chunk in edges.chunks(1000) {
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO graph_edge (edge_id, source, target, relationship, properties, created_at) ",
        );
        insert.push_values(chunk, |mut row, e| {
            row.push_bind(&e.edge_id)
                .push_bind(&e.source)
                .push_bind(&e.target)
                .push_bind(&e.relationship)
                .push_bind(e.properties.to_string())
                .push_bind(e.created_at);
        });
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Edges before `before`, newest first, from or to `node` and of `relationship` when given.
pub async fn list_edges(
    pool: &SqlitePool,
    node: Option<&str>,
    relationship: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, EdgeRow)>> {
    let rows = sqlx::query(
        "SELECT seq, edge_id, source, target, relationship, properties, created_at FROM graph_edge
         WHERE seq < ?
           AND (? IS NULL OR source = ? OR target = ?)
           AND (? IS NULL OR relationship = ?)
         ORDER BY seq DESC LIMIT ?",
    )
    .bind(before)
    .bind(node)
    .bind(node)
    .bind(node)
    .bind(relationship)
    .bind(relationship)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("seq")?,
                EdgeRow {
                    edge_id: row.try_get("edge_id")?,
                    source: row.try_get("source")?,
                    target: row.try_get("target")?,
                    relationship: row.try_get("relationship")?,
                    properties: json(row, "properties")?,
                    created_at: row.try_get("created_at")?,
                },
            ))
        })
        .collect()
}

pub async fn insert_pattern(conn: &mut SqliteConnection, p: &PatternRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO pattern (pattern_id, pattern_type, context, solution, metadata, success, created_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&p.pattern_id)
    .bind(&p.pattern_type)
    .bind(&p.context)
    .bind(&p.solution)
    .bind(p.metadata.to_string())
    .bind(p.success)
    .bind(p.created_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Patterns before `before`, newest first, of `pattern_type` when given.
pub async fn list_patterns(
    pool: &SqlitePool,
    pattern_type: Option<&str>,
    before: i64,
    limit: u32,
) -> Result<Vec<(i64, PatternRow)>> {
    let rows = sqlx::query(
        "SELECT seq, pattern_id, pattern_type, context, solution, metadata, success, created_at
         FROM pattern WHERE seq < ? AND (? IS NULL OR pattern_type = ?)
         ORDER BY seq DESC LIMIT ?",
    )
    .bind(before)
    .bind(pattern_type)
    .bind(pattern_type)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("seq")?,
                PatternRow {
                    pattern_id: row.try_get("pattern_id")?,
                    pattern_type: row.try_get("pattern_type")?,
                    context: row.try_get("context")?,
                    solution: row.try_get("solution")?,
                    metadata: json(row, "metadata")?,
                    success: row.try_get("success")?,
                    created_at: row.try_get("created_at")?,
                },
            ))
        })
        .collect()
}

/// Per pattern type: (type, uses, successes, failures).
pub async fn pattern_stats(pool: &SqlitePool) -> Result<Vec<(String, i64, i64, i64)>> {
    stats_by(pool, "pattern_type", "1").await
}

/// (workflow pattern, runs, successes, failures) from the engine's orchestration records.
pub async fn workflow_pattern_stats(pool: &SqlitePool) -> Result<Vec<(String, i64, i64, i64)>> {
    stats_by(
        pool,
        "json_extract(metadata, '$.pattern')",
        "pattern_type IN ('successful_orchestration', 'orchestration_failure')
         AND json_extract(metadata, '$.pattern') IS NOT NULL",
    )
    .await
}

/// Uses and outcomes of patterns matching `filter`, grouped by `key` (both fixed SQL).
async fn stats_by(
    pool: &SqlitePool,
    key: &'static str,
    filter: &'static str,
) -> Result<Vec<(String, i64, i64, i64)>> {
    let sql = format!(
        "SELECT {key} AS pattern_type, COUNT(*) AS uses,
                COALESCE(SUM(success = 1), 0) AS successes, COALESCE(SUM(success = 0), 0) AS failures
         FROM pattern WHERE {filter} GROUP BY 1 ORDER BY 1"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("pattern_type")?,
                r.try_get("uses")?,
                r.try_get("successes")?,
                r.try_get("failures")?,
            ))
        })
        .collect()
}
