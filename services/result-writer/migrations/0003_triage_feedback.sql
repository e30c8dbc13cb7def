-- An agent's correction of one triage: accepted as it was, or category and priority changed, and
-- what became of the suggested reply. One row per triage (tenant, ticket, prompt version); a
-- later correction replaces an earlier one. The predicted values are copied from the triage at
-- the time of the correction, so that agreement stays what it was even if the triage is replaced.
CREATE TABLE triage_feedback (
    tenant_id           text        NOT NULL,
    ticket_id           text        NOT NULL,
    prompt_version      text        NOT NULL,
    predicted_category  text        NOT NULL,
    predicted_priority  text        NOT NULL,
    category            text        NOT NULL,
    priority            text        NOT NULL,
    reply               text        NOT NULL CHECK (reply IN ('unset', 'used', 'edited', 'rejected')),
    corrected_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, ticket_id, prompt_version)
);

-- Agreement over a time window, per tenant.
CREATE INDEX triage_feedback_by_tenant_time ON triage_feedback (tenant_id, corrected_at);

-- The live stream's resume point (Last-Event-ID) is a row's written_at: rows written after it.
CREATE INDEX triage_results_by_tenant_written
    ON triage_results (tenant_id, written_at, ticket_id, prompt_version);
