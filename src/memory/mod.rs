//! Memory, graph and patterns: the record of what happened and why. Memories are tagged free text
//! with full-text search (SQLite FTS5), graph edges link nodes (`agent:planner —hands_off_to→
//! agent:coder`), patterns pair a situation with what was done and, when known, whether it worked
//! (`GET /v1/patterns/stats`). The service writes them itself as it works, through
//! [`store_memory`], [`link`] and [`record_pattern`] inside the transaction of the change they
//! describe (a handoff's memory and edge are written by the handoff's own INSERT, a trigger,
//! with the events of [`stored`] and [`linked`]); each write is an event on the `memory` topic. All three are purged after
//! `LTMC_MEMORY_RETENTION_DAYS` (0 keeps them for good; [`crate::retention`]).

pub mod db;
pub mod routes;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};

use crate::common::{new_id, now_ms, rfc3339, validate_name, validate_printable, validate_text};
use crate::error::{Error, Result};
use crate::events::NewEvent;
use crate::store::Writer;

/// Largest memory content, pattern context or solution, in bytes.
const MAX_TEXT: usize = 64 << 10;
/// Largest metadata or properties object, serialized.
const MAX_OBJECT: usize = 64 << 10;
/// Longest full-text query `?q=`, in bytes.
const MAX_QUERY: usize = 1024;

/// A memory to store.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMemory {
    /// Free text, 1 byte to 64 KiB; searchable with `?q=`.
    #[schema(min_length = 1, max_length = 65_536)]
    pub content: String,
    /// At most 32 tags of 1-128 bytes.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
}

/// Changes to a memory: `content` and `tags` are replaced, `metadata` keys are merged (a key set
/// to null is removed).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryPatch {
    pub content: Option<String>,
    pub tags: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// A stored memory.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Memory {
    pub memory_id: String,
    pub content: String,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: String,
    pub updated_at: String,
}

/// `GET /v1/memories` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct MemoryQuery {
    /// Only memories with this tag.
    pub tag: Option<String>,
    /// Full-text search: memories whose content has every word (in any order).
    pub q: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// A graph edge to add.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEdge {
    /// A node name, e.g. `agent:planner` (1-256 bytes).
    #[schema(min_length = 1, max_length = 256)]
    pub source: String,
    #[schema(min_length = 1, max_length = 256)]
    pub target: String,
    /// What links them, e.g. `hands_off_to` (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub relationship: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub properties: Map<String, Value>,
}

/// A graph edge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Edge {
    pub edge_id: String,
    pub source: String,
    pub target: String,
    pub relationship: String,
    #[schema(value_type = Object)]
    pub properties: Value,
    pub created_at: String,
}

/// `GET /v1/graph/edges` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EdgeQuery {
    /// Edges from or to this node.
    pub node: Option<String>,
    pub relationship: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// A pattern to record.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPattern {
    /// The kind of pattern, e.g. `successful_orchestration` (1-128 bytes).
    #[schema(min_length = 1, max_length = 128)]
    pub pattern_type: String,
    /// The situation (1 byte to 64 KiB).
    #[schema(min_length = 1, max_length = 65_536)]
    pub context: String,
    /// What was done (1 byte to 64 KiB).
    #[schema(min_length = 1, max_length = 65_536)]
    pub solution: String,
    #[serde(default, deserialize_with = "crate::common::bounded")]
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// Whether it worked, when known: counted by `GET /v1/patterns/stats`.
    pub success: Option<bool>,
}

/// A recorded pattern.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pattern {
    pub pattern_id: String,
    pub pattern_type: String,
    pub context: String,
    pub solution: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub success: Option<bool>,
    pub created_at: String,
}

/// `GET /v1/patterns` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PatternQuery {
    pub pattern_type: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Uses and outcomes of one pattern type.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PatternTypeStats {
    pub pattern_type: String,
    /// How many patterns of this type were recorded.
    pub uses: u64,
    pub successes: u64,
    pub failures: u64,
    /// successes / (successes + failures); null while no outcome was recorded.
    pub success_rate: Option<f64>,
}

/// `GET /v1/patterns/stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PatternStats {
    pub types: Vec<PatternTypeStats>,
    /// Workflow runs by workflow pattern (`pattern_type` here is `sequential`, `parallel`, …),
    /// from the `successful_orchestration` / `orchestration_failure` records the engine writes.
    pub workflow_patterns: Vec<PatternTypeStats>,
}

fn validate_tags(tags: &[String]) -> Result<()> {
    if tags.len() > 32 {
        return Err(Error::invalid("tags", "at most 32 tags"));
    }
    for (i, tag) in tags.iter().enumerate() {
        validate_name(&format!("tags[{i}]"), tag, 128)?;
    }
    Ok(())
}

fn validate_object(field: &str, object: &Map<String, Value>) -> Result<()> {
    if Value::Object(object.clone()).to_string().len() > MAX_OBJECT {
        return Err(Error::PayloadTooLarge(format!(
            "{field} is larger than {MAX_OBJECT} bytes"
        )));
    }
    Ok(())
}

/// Stores a memory in the caller's transaction (the service's own records use this too).
pub async fn store_memory(tx: &mut Writer, new: NewMemory) -> Result<Memory> {
    validate_text("content", &new.content, MAX_TEXT)?;
    validate_tags(&new.tags)?;
    validate_object("metadata", &new.metadata)?;
    let now = now_ms();
    let memory = db::MemoryRow {
        memory_id: new_id("mem"),
        content: new.content,
        tags: new.tags,
        metadata: Value::Object(new.metadata),
        created_at: now,
        updated_at: now,
    };
    db::insert_memory(tx.conn(), &memory).await?;
    tx.emit(stored(&memory.memory_id, &memory.tags));
    Ok(memory.into())
}

/// The event of a memory stored: `memory.stored`.
pub fn stored(memory_id: &str, tags: &[String]) -> NewEvent {
    NewEvent::new(
        "memory",
        "memory.stored",
        json!({"memory_id": memory_id, "tags": tags}),
    )
}

/// The event of a graph edge added: `graph.linked`.
pub fn linked(edge_id: &str, source: &str, target: &str, relationship: &str) -> NewEvent {
    NewEvent::new(
        "memory",
        "graph.linked",
        json!({"edge_id": edge_id, "source": source, "target": target,
               "relationship": relationship}),
    )
}

/// Applies a patch to a memory.
pub async fn update_memory(tx: &mut Writer, memory_id: &str, patch: MemoryPatch) -> Result<Memory> {
    let mut memory = db::get_memory(tx.conn(), memory_id)
        .await?
        .ok_or_else(|| Error::NotFound(format!("no memory {memory_id:?}")))?;
    if let Some(content) = patch.content {
        validate_text("content", &content, MAX_TEXT)?;
        memory.content = content;
    }
    if let Some(tags) = patch.tags {
        validate_tags(&tags)?;
        memory.tags = tags;
    }
    if let Some(changes) = patch.metadata {
        let Value::Object(metadata) = &mut memory.metadata else {
            return Err(Error::Internal("stored metadata is not an object".into()));
        };
        for (key, value) in changes {
            if value.is_null() {
                metadata.remove(&key);
            } else {
                metadata.insert(key, value);
            }
        }
        validate_object("metadata", metadata)?;
    }
    memory.updated_at = now_ms();
    db::update_memory(tx.conn(), &memory).await?;
    tx.emit(NewEvent::new(
        "memory",
        "memory.updated",
        json!({"memory_id": memory.memory_id}),
    ));
    Ok(memory.into())
}

/// Adds a graph edge in the caller's transaction.
pub async fn link(tx: &mut Writer, new: NewEdge) -> Result<Edge> {
    let mut linked = link_many(tx, vec![new]).await?;
    linked
        .pop()
        .ok_or_else(|| Error::Internal("an edge was not linked".into()))
}

/// Adds graph edges in the caller's transaction, in one statement per thousand (e.g. a
/// workflow's `precedes` edges); each is validated and announced (`graph.linked`).
pub async fn link_many(tx: &mut Writer, new: Vec<NewEdge>) -> Result<Vec<Edge>> {
    let now = now_ms();
    let mut edges = Vec::with_capacity(new.len());
    for edge in new {
        validate_name("source", &edge.source, 256)?;
        validate_name("target", &edge.target, 256)?;
        validate_name("relationship", &edge.relationship, 128)?;
        validate_object("properties", &edge.properties)?;
        edges.push(db::EdgeRow {
            edge_id: new_id("edg"),
            source: edge.source,
            target: edge.target,
            relationship: edge.relationship,
            properties: Value::Object(edge.properties),
            created_at: now,
        });
    }
    db::insert_edges(tx.conn(), &edges).await?;
    for edge in &edges {
        tx.emit(linked(
            &edge.edge_id,
            &edge.source,
            &edge.target,
            &edge.relationship,
        ));
    }
    Ok(edges.into_iter().map(Edge::from).collect())
}

/// Records a pattern in the caller's transaction.
pub async fn record_pattern(tx: &mut Writer, new: NewPattern) -> Result<Pattern> {
    validate_name("pattern_type", &new.pattern_type, 128)?;
    validate_text("context", &new.context, MAX_TEXT)?;
    validate_text("solution", &new.solution, MAX_TEXT)?;
    validate_object("metadata", &new.metadata)?;
    let pattern = db::PatternRow {
        pattern_id: new_id("pat"),
        pattern_type: new.pattern_type,
        context: new.context,
        solution: new.solution,
        metadata: Value::Object(new.metadata),
        success: new.success,
        created_at: now_ms(),
    };
    db::insert_pattern(tx.conn(), &pattern).await?;
    tx.emit(NewEvent::new(
        "memory",
        "pattern.recorded",
        json!({"pattern_id": pattern.pattern_id, "pattern_type": pattern.pattern_type,
               "success": pattern.success}),
    ));
    Ok(pattern.into())
}

impl MemoryQuery {
    /// Checks the filters; the FTS5 query `q` asks for, if any.
    pub fn search(&self) -> Result<Option<String>> {
        if let Some(tag) = &self.tag {
            validate_printable("tag", tag)?;
        }
        let Some(q) = &self.q else {
            return Ok(None);
        };
        validate_printable("q", q)?;
        if q.len() > MAX_QUERY {
            return Err(Error::invalid(
                "q",
                format!("must be at most {MAX_QUERY} bytes"),
            ));
        }
        fts_query(q)
            .map(Some)
            .ok_or_else(|| Error::invalid("q", "give at least one word to search for"))
    }
}

impl EdgeQuery {
    pub fn check(&self) -> Result<()> {
        for (field, value) in [("node", &self.node), ("relationship", &self.relationship)] {
            if let Some(value) = value {
                validate_printable(field, value)?;
            }
        }
        Ok(())
    }
}

impl PatternQuery {
    pub fn check(&self) -> Result<()> {
        match &self.pattern_type {
            Some(pattern_type) => validate_printable("pattern_type", pattern_type),
            None => Ok(()),
        }
    }
}

/// Turns free text into an FTS5 query that cannot be a syntax error: every word becomes a quoted
/// phrase (quotes doubled), and all of them must match.
pub fn fts_query(text: &str) -> Option<String> {
    let terms: Vec<String> = text
        .split_whitespace()
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    (!terms.is_empty()).then(|| terms.join(" "))
}

impl From<db::MemoryRow> for Memory {
    fn from(row: db::MemoryRow) -> Self {
        Memory {
            memory_id: row.memory_id,
            content: row.content,
            tags: row.tags,
            metadata: row.metadata,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
        }
    }
}

impl From<db::EdgeRow> for Edge {
    fn from(row: db::EdgeRow) -> Self {
        Edge {
            edge_id: row.edge_id,
            source: row.source,
            target: row.target,
            relationship: row.relationship,
            properties: row.properties,
            created_at: rfc3339(row.created_at),
        }
    }
}

impl From<db::PatternRow> for Pattern {
    fn from(row: db::PatternRow) -> Self {
        Pattern {
            pattern_id: row.pattern_id,
            pattern_type: row.pattern_type,
            context: row.context,
            solution: row.solution,
            metadata: row.metadata,
            success: row.success,
            created_at: rfc3339(row.created_at),
        }
    }
}
