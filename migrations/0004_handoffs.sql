-- Handoffs: one agent passes work, with its context, to another.
-- status: initiated → accepted → completed | failed; initiated → rejected | cancelled | expired.
CREATE TABLE handoff (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    handoff_id     TEXT NOT NULL UNIQUE,
    from_agent     TEXT NOT NULL,
    to_agent       TEXT NOT NULL,
    status         TEXT NOT NULL,
    context        TEXT NOT NULL,          -- JSON object, as sent
    context_digest TEXT NOT NULL,          -- SHA-256 (hex) of the context's canonical JSON
    reason         TEXT,
    session_id     TEXT,
    workflow_id    TEXT,
    memory_ref     TEXT NOT NULL,          -- the memory recorded at initiation
    result         TEXT,                   -- JSON given at completion, or the rejection reason
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,       -- an initiated handoff not accepted by then expires
    accepted_at    INTEGER,
    completed_at   INTEGER                 -- when it reached its final state
);
CREATE INDEX handoff_from ON handoff (from_agent, seq);
CREATE INDEX handoff_to ON handoff (to_agent, seq);
CREATE INDEX handoff_status ON handoff (status, seq);
-- The expiry step's scan.
CREATE INDEX handoff_pending ON handoff (status, expires_at);
-- Hop budget: the chain of handoffs carrying one session or workflow.
CREATE INDEX handoff_session ON handoff (session_id, seq) WHERE session_id IS NOT NULL;
CREATE INDEX handoff_workflow ON handoff (workflow_id, seq) WHERE workflow_id IS NOT NULL;
