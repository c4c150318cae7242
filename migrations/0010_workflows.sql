-- Workflows: a definition's run and its steps. Every transition is a compare-and-set on a step's
-- status (and attempt), so a result, a timeout and a second instance's timer cannot both win.
CREATE TABLE workflow (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id  TEXT NOT NULL UNIQUE,
    name         TEXT NOT NULL,
    description  TEXT,
    pattern      TEXT NOT NULL,              -- sequential | parallel | dependency_based | event_driven
    metadata     TEXT NOT NULL,              -- JSON object
    status       TEXT NOT NULL,              -- executing | completed | failed | cancelled
    steps_total  INTEGER NOT NULL,
    steps_done   INTEGER NOT NULL DEFAULT 0, -- the barrier: steps that reached a final status
    steps_failed INTEGER NOT NULL DEFAULT 0, -- of those, failed or timed out
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER
);
CREATE INDEX workflow_status ON workflow (status, seq);

-- status: pending (not started: earlier steps, dependencies, its trigger or a retry's backoff
-- ahead) | waiting (ready, no agent free) | dispatched (an attempt is out) | succeeded | failed |
-- timed_out | skipped | cancelled. `due_at`: a dispatched attempt's deadline, or when a pending
-- retry (or a waiting step's next look for an agent) is due.
CREATE TABLE workflow_step (
    workflow_id  TEXT NOT NULL REFERENCES workflow (workflow_id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,           -- position in the definition
    step_id      TEXT NOT NULL,
    name         TEXT,
    agent        TEXT,                       -- named in the definition
    capability   TEXT,
    input        TEXT NOT NULL,              -- JSON object
    depends_on   TEXT NOT NULL,              -- JSON array of idx: what this step waits for
    dependants   TEXT NOT NULL,              -- JSON array of idx: what waits for this step
    trigger_name TEXT,
    timeout_ms   INTEGER NOT NULL,
    max_retries  INTEGER NOT NULL,
    deps_left    INTEGER NOT NULL,           -- dependencies not yet succeeded
    status       TEXT NOT NULL,
    agent_id     TEXT,                       -- who holds (or held) the current attempt
    attempts     INTEGER NOT NULL DEFAULT 0,
    attempt_at   INTEGER,                    -- when the current attempt went out
    due_at       INTEGER,
    output       TEXT,                       -- JSON, as the agent sent it
    error        TEXT,
    handoff_id   TEXT,                       -- sequential: the handoff that brought the step here
    started_at   INTEGER,
    finished_at  INTEGER,
    PRIMARY KEY (workflow_id, idx)
) WITHOUT ROWID;
CREATE UNIQUE INDEX workflow_step_id ON workflow_step (workflow_id, step_id);
CREATE INDEX workflow_step_due ON workflow_step (status, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX workflow_step_held ON workflow_step (agent_id, status);
-- Waiting steps get freed places oldest run first (workflow ids sort by time).
CREATE INDEX workflow_step_waiting ON workflow_step (workflow_id, idx) WHERE status = 'waiting';
CREATE INDEX workflow_step_trigger ON workflow_step (trigger_name, status) WHERE trigger_name IS NOT NULL;

-- Events posted for event-driven steps (`POST /v1/events`, and `step:<step_id>` completions),
-- kept a while so a step that begins waiting just after its event still sees it.
CREATE TABLE trigger_event (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL,
    workflow_id TEXT,                        -- NULL: for every workflow
    payload     TEXT NOT NULL,               -- JSON object
    at          INTEGER NOT NULL
);
CREATE INDEX trigger_event_name ON trigger_event (name, at);
