-- The send path, done by triggers inside the INSERT itself.
--
-- Waiting messages (queued or claimed) per recipient, kept by triggers so the per-recipient cap
-- (429 `queue full`) is an indexed read instead of a count over the queue.
CREATE TABLE queue_depth (
    recipient TEXT PRIMARY KEY NOT NULL,
    pending   INTEGER NOT NULL
);

INSERT INTO queue_depth (recipient, pending)
SELECT recipient, COUNT(*) FROM message WHERE state IN ('queued', 'claimed') GROUP BY recipient;

CREATE TRIGGER message_pending_insert AFTER INSERT ON message
WHEN NEW.state IN ('queued', 'claimed')
BEGIN
    INSERT INTO queue_depth (recipient, pending) VALUES (NEW.recipient, 1)
    ON CONFLICT (recipient) DO UPDATE SET pending = pending + 1;
END;

CREATE TRIGGER message_pending_update AFTER UPDATE OF state ON message
WHEN (OLD.state IN ('queued', 'claimed')) <> (NEW.state IN ('queued', 'claimed'))
BEGIN
    INSERT INTO queue_depth (recipient, pending)
    VALUES (NEW.recipient, CASE WHEN NEW.state IN ('queued', 'claimed') THEN 1 ELSE -1 END)
    ON CONFLICT (recipient) DO UPDATE
    SET pending = pending + CASE WHEN NEW.state IN ('queued', 'claimed') THEN 1 ELSE -1 END;
END;

CREATE TRIGGER message_pending_delete AFTER DELETE ON message
WHEN OLD.state IN ('queued', 'claimed')
BEGIN
    UPDATE queue_depth SET pending = pending - 1 WHERE recipient = OLD.recipient;
END;

-- The per-recipient cap, set from configuration at start-up. A send over the cap is skipped
-- (RAISE(IGNORE)): the batch's other rows go in, and the skipped one is answered 429.
INSERT INTO meta (key, value) VALUES ('max_queued_per_agent', 10000);

CREATE TRIGGER message_queue_cap BEFORE INSERT ON message
WHEN COALESCE((SELECT pending FROM queue_depth WHERE recipient = NEW.recipient), 0)
     >= (SELECT value FROM meta WHERE key = 'max_queued_per_agent')
BEGIN
    SELECT RAISE(IGNORE);
END;

-- Each new message is logged as its recipient's `new_message` event in the same statement, so a
-- send batch commits as one autocommit INSERT: no transaction round trips.
CREATE TRIGGER message_new_event AFTER INSERT ON message
BEGIN
    INSERT INTO event (topic, type, agent_id, at, data)
    VALUES ('messages', 'new_message', NEW.recipient, NEW.created_at,
            json_object('message_id', NEW.message_id, 'from', NEW.sender, 'to', NEW.recipient,
                        'priority', NEW.priority, 'message_type', NEW.message_type,
                        'correlation_id', NEW.correlation_id));
END;
