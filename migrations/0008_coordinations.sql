-- Coordination rounds (scatter–gather): one question to N agents, their answers gathered until
-- all have answered (completed) or the deadline passes (timed_out).
CREATE TABLE coordination (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    coordination_id TEXT NOT NULL UNIQUE,
    topic           TEXT NOT NULL,
    payload         TEXT NOT NULL,       -- JSON object
    agents          TEXT NOT NULL,       -- JSON array of agent ids
    status          TEXT NOT NULL,       -- collecting | completed | timed_out
    created_at      INTEGER NOT NULL,
    deadline        INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX coordination_due ON coordination (status, deadline);

CREATE TABLE coordination_response (
    coordination_id TEXT NOT NULL REFERENCES coordination (coordination_id) ON DELETE CASCADE,
    agent_id        TEXT NOT NULL,
    success         INTEGER NOT NULL,
    result          TEXT NOT NULL,       -- JSON object
    at              INTEGER NOT NULL,
    PRIMARY KEY (coordination_id, agent_id)   -- one answer per agent
);
