-- One row per ticket and prompt version; a later triage (by triaged_at) replaces an earlier one.
CREATE TABLE triage_results (
    ticket_id          text             NOT NULL,
    tenant_id          text             NOT NULL,
    prompt_version     text             NOT NULL,
    category           text             NOT NULL,
    priority           text             NOT NULL,
    suggested_reply    text             NOT NULL,
    confidence         double precision NOT NULL,
    model              text             NOT NULL,
    prompt_tokens      bigint           NOT NULL,
    completion_tokens  bigint           NOT NULL,
    cost_usd           double precision NOT NULL,
    ticket_created_at  timestamptz,
    accepted_at        timestamptz,
    triaged_at         timestamptz      NOT NULL,
    source_partition   integer          NOT NULL,
    source_offset      bigint           NOT NULL,
    provider_note      text             NOT NULL DEFAULT '',
    written_at         timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (ticket_id, prompt_version)
);

-- GET /v1/triage: a tenant's triages, newest first, in keyset order.
CREATE INDEX triage_results_by_tenant_time
    ON triage_results (tenant_id, triaged_at DESC, ticket_id DESC, prompt_version DESC);
