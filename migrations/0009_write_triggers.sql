-- Fewer round trips per write: what each write of a memory or a session activity implies is kept
-- by triggers, in the same statement.

-- A memory's tags (its JSON array) mirrored into memory_tag for `?tag=` lookups.
CREATE TRIGGER memory_tag_insert AFTER INSERT ON memory BEGIN
    INSERT OR IGNORE INTO memory_tag (tag, seq) SELECT value, NEW.seq FROM json_each(NEW.tags);
END;
CREATE TRIGGER memory_tag_update AFTER UPDATE OF tags ON memory BEGIN
    DELETE FROM memory_tag WHERE seq = NEW.seq;
    INSERT OR IGNORE INTO memory_tag (tag, seq) SELECT value, NEW.seq FROM json_each(NEW.tags);
END;

-- A session keeps its newest 100 activities (sessions::db::KEEP_ACTIVITIES).
CREATE TRIGGER session_activity_keep AFTER INSERT ON session_activity BEGIN
    DELETE FROM session_activity WHERE session_id = NEW.session_id AND seq <= (
        SELECT seq FROM session_activity WHERE session_id = NEW.session_id
        ORDER BY seq DESC LIMIT 1 OFFSET 100);
END;
