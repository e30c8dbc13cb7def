-- What the ticket says (its subject and the start of its description) and the trace the triage
-- belongs to, for the triage console's ticket view. Nullable: rows written before, and results
-- from workers that do not carry them, have none.
ALTER TABLE triage_results
    ADD COLUMN subject  text,
    ADD COLUMN excerpt  text,
    ADD COLUMN trace_id text;
