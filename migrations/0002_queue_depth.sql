-- Waiting messages (queued or claimed) per recipient, kept by triggers so the per-recipient cap
-- (429 `queue full`) is one indexed read per send batch instead of a count over the queue.
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
