-- How long each triage's task waited for rate limits (the shared budget, the tenant's quota,
-- provider 429s), for the console's health page. Rows written before, and results from workers
-- that do not report it, count as 0: adding a column with a constant default keeps the existing
-- rows without rewriting the table. The health page's per-minute query reads the tenant's rows by
-- triaged_at, which triage_results_by_tenant_time already serves; no index is added.
ALTER TABLE triage_results
    ADD COLUMN rate_limit_wait_ms integer NOT NULL DEFAULT 0;
