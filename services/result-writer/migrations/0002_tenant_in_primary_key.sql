-- Ticket ids are the helpdesk's own, so two tenants may share one: the tenant joins the primary
-- key (and with it the upsert's conflict target), and tenant B's ticket 42 no longer overwrites
-- tenant A's. Existing rows are kept as they are: every (ticket_id, prompt_version) was unique,
-- so each (tenant_id, ticket_id, prompt_version) is too.
--
-- Rebuilding the primary key takes an exclusive lock for as long as the index build; on a large
-- table, run it in a maintenance window (readers and the writer wait, nothing is lost: the writer
-- retries its batch and its offsets stay uncommitted meanwhile).
ALTER TABLE triage_results DROP CONSTRAINT triage_results_pkey;
ALTER TABLE triage_results ADD PRIMARY KEY (tenant_id, ticket_id, prompt_version);
