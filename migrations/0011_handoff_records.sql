-- What every handoff leaves behind, written by the handoff's own INSERT (one statement, where the
-- service used to send three): a memory of it, whose id is the handoff's `memory_ref` (chosen by
-- the service), and the graph edge `agent:{from} —hands_off_to→ agent:{to}`, whose id is the
-- memory's with the prefix `edg_` (one edge per handoff, time-sortable like every id). The memory's
-- own triggers index its content and tags. The service emits their `memory.stored` and
-- `graph.linked` events (handoffs::recorded).
CREATE TRIGGER handoff_records AFTER INSERT ON handoff BEGIN
    INSERT INTO memory (memory_id, content, tags, metadata, created_at, updated_at)
    VALUES (NEW.memory_ref, 'Agent handoff: ' || NEW.from_agent || ' → ' || NEW.to_agent,
            json_array('handoff', 'coordination', NEW.from_agent, NEW.to_agent),
            json_object('context_digest', NEW.context_digest, 'handoff_id', NEW.handoff_id,
                        'reason', NEW.reason),
            NEW.created_at, NEW.created_at);
    INSERT INTO graph_edge (edge_id, source, target, relationship, properties, created_at)
    VALUES ('edg_' || substr(NEW.memory_ref, 5), 'agent:' || NEW.from_agent,
            'agent:' || NEW.to_agent, 'hands_off_to',
            json_object('handoff_id', NEW.handoff_id, 'memory_ref', NEW.memory_ref),
            NEW.created_at);
END;
