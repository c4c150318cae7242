-- Memory, graph and patterns: what the service (and its operators) record about the work, so one
-- can later ask what happened and why. The service writes them itself as it works (handoffs,
-- sessions, workflows, …); operators may add their own.

-- Memories: free text with tags and metadata, searchable in full text.
CREATE TABLE memory (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,   -- stable rowid for the full-text index
    memory_id  TEXT NOT NULL UNIQUE,
    content    TEXT NOT NULL,
    tags       TEXT NOT NULL,                       -- JSON array of strings
    metadata   TEXT NOT NULL,                       -- JSON object
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- One row per (tag, memory) so `?tag=` is an index lookup.
CREATE TABLE memory_tag (
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL REFERENCES memory (seq) ON DELETE CASCADE,
    PRIMARY KEY (tag, seq)
);

-- Full-text index over the content (an external-content FTS5 table kept by triggers).
CREATE VIRTUAL TABLE memory_fts USING fts5 (content, content = 'memory', content_rowid = 'seq');

CREATE TRIGGER memory_fts_insert AFTER INSERT ON memory BEGIN
    INSERT INTO memory_fts (rowid, content) VALUES (NEW.seq, NEW.content);
END;
CREATE TRIGGER memory_fts_update AFTER UPDATE OF content ON memory BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, content) VALUES ('delete', OLD.seq, OLD.content);
    INSERT INTO memory_fts (rowid, content) VALUES (NEW.seq, NEW.content);
END;
CREATE TRIGGER memory_fts_delete AFTER DELETE ON memory BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, content) VALUES ('delete', OLD.seq, OLD.content);
END;

-- Graph edges: `source —relationship→ target`, e.g. `agent:planner —hands_off_to→ agent:coder`.
CREATE TABLE graph_edge (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    edge_id      TEXT NOT NULL UNIQUE,
    source       TEXT NOT NULL,
    target       TEXT NOT NULL,
    relationship TEXT NOT NULL,
    properties   TEXT NOT NULL,                     -- JSON object
    created_at   INTEGER NOT NULL
);
CREATE INDEX graph_edge_source ON graph_edge (source, relationship, seq);
CREATE INDEX graph_edge_target ON graph_edge (target, relationship, seq);
CREATE INDEX graph_edge_relationship ON graph_edge (relationship, seq);

-- Patterns: a situation and what was done about it, with its outcome when known.
CREATE TABLE pattern (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    pattern_id   TEXT NOT NULL UNIQUE,
    pattern_type TEXT NOT NULL,
    context      TEXT NOT NULL,
    solution     TEXT NOT NULL,
    metadata     TEXT NOT NULL,                     -- JSON object
    success      INTEGER,                           -- 1 / 0, NULL when no outcome was recorded
    created_at   INTEGER NOT NULL
);
CREATE INDEX pattern_type ON pattern (pattern_type, seq);
