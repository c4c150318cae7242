-- Agent contexts: each agent's shared working context, versioned for optimistic concurrency
-- (If-Match) and merged across agents by syncs.
CREATE TABLE agent_context (
    agent_id   TEXT PRIMARY KEY NOT NULL,
    context    TEXT NOT NULL,        -- JSON object
    version    INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
