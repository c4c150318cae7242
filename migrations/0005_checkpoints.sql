-- Coordination checkpoints: a coordination's state saved so it can be restored in milliseconds
-- (the broker caches each one; this table is the truth). The newest N per coordination are kept.
CREATE TABLE checkpoint (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    checkpoint_id   TEXT NOT NULL UNIQUE,
    coordination_id TEXT NOT NULL,
    state           TEXT NOT NULL,     -- JSON object
    agents          TEXT NOT NULL,     -- JSON array of agent ids
    status          TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX checkpoint_coordination ON checkpoint (coordination_id, seq);
