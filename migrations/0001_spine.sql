-- The spine: agents, their message queues and the event log.
-- Times are integer milliseconds since the Unix epoch (UTC); JSON documents are stored as TEXT.

-- An agent's durable record. Presence (status, last heartbeat, TTL) lives in the broker only:
-- heartbeats never write here. `token_hash` is the SHA-256 (hex) of the agent token issued at
-- first registration; the token itself is never stored.
CREATE TABLE agent (
    agent_id             TEXT PRIMARY KEY NOT NULL,
    capabilities         TEXT NOT NULL,          -- JSON array of strings
    max_concurrent_tasks INTEGER NOT NULL,
    ttl_s                INTEGER NOT NULL,
    metadata             TEXT NOT NULL,          -- JSON object
    registered_at        INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    last_seen_at         INTEGER NOT NULL,       -- written at registration and on expiry only
    token_hash           TEXT UNIQUE             -- NULL when the agent registered with auth off
);

-- One row per (agent, capability) so `?capability=` is an index lookup, not a JSON scan.
CREATE TABLE agent_capability (
    agent_id   TEXT NOT NULL REFERENCES agent (agent_id) ON DELETE CASCADE,
    capability TEXT NOT NULL,
    PRIMARY KEY (capability, agent_id)
);

-- The queues. `seq` is the send order; a redelivered message keeps its seq, so it goes back to
-- its old place. state: queued | claimed | acked | dead.
CREATE TABLE message (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id       TEXT NOT NULL UNIQUE,
    sender           TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    message_type     TEXT NOT NULL,
    content          TEXT NOT NULL,              -- raw JSON, stored as sent
    priority         INTEGER NOT NULL,
    correlation_id   TEXT,
    created_at       INTEGER NOT NULL,
    state            TEXT NOT NULL DEFAULT 'queued',
    visible_at       INTEGER NOT NULL,           -- a nack with delay_s hides a queued message until then
    delivery_count   INTEGER NOT NULL DEFAULT 0,
    lease_id         TEXT,                       -- the current (or last) claim's lease
    lease_expires_at INTEGER,
    finished_at      INTEGER                     -- when it was acked or dead-lettered
);

-- Claim order: the recipient's queued messages, highest priority first, then FIFO.
CREATE INDEX message_queue ON message (recipient, state, priority DESC, seq);
-- The lease reaper's scan, and pruning of acked messages.
CREATE INDEX message_lease ON message (state, lease_expires_at);
CREATE INDEX message_finished ON message (state, finished_at);

-- The event log: every state change, written in the same transaction as the change, so a stream
-- can resume from `seq` with no gap. `agent_id` is set when the event is also a notification for
-- that agent's stream.
CREATE TABLE event (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    topic    TEXT NOT NULL,
    type     TEXT NOT NULL,
    agent_id TEXT,
    at       INTEGER NOT NULL,
    data     TEXT NOT NULL                       -- JSON object
);
CREATE INDEX event_agent ON event (agent_id, seq) WHERE agent_id IS NOT NULL;
CREATE INDEX event_topic ON event (topic, seq);

-- Small named values the service keeps about itself (e.g. how far the event log was pruned).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('event_pruned_through', 0);

-- Idempotency-Key: the first answer to a retried write, replayed for the same key.
CREATE TABLE idempotency (
    scope       TEXT NOT NULL,                   -- who asked and what (method + path)
    key         TEXT NOT NULL,
    status      INTEGER NOT NULL,
    body        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at);
