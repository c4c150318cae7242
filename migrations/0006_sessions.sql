-- Sessions: a unit of collaborative work with an activity log. Each activity extends the
-- session's life by its ttl_s; one idle past it expires. The newest 100 activities are kept.
CREATE TABLE session (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id       TEXT NOT NULL UNIQUE,       -- sess_<unix seconds>_<16 hex>
    session_type     TEXT NOT NULL,
    context          TEXT NOT NULL,              -- JSON object
    status           TEXT NOT NULL,              -- active | ended | expired
    ttl_s            INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    last_activity_at INTEGER NOT NULL,
    activity_count   INTEGER NOT NULL DEFAULT 0, -- every activity ever, also those trimmed
    expires_at       INTEGER NOT NULL
);
CREATE INDEX session_status ON session (status, seq);
CREATE INDEX session_type ON session (session_type, seq);
CREATE INDEX session_due ON session (status, expires_at);

CREATE TABLE session_activity (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id    TEXT NOT NULL REFERENCES session (session_id) ON DELETE CASCADE,
    activity_type TEXT NOT NULL,
    details       TEXT NOT NULL,                 -- JSON object
    agent_id      TEXT,
    at            INTEGER NOT NULL
);
CREATE INDEX session_activity_by_session ON session_activity (session_id, seq);
