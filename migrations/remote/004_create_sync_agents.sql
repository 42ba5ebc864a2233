-- The fleet at a glance: one row per gateway, upserted by the agent after every cycle.
--   SELECT agent_id, last_cycle_finished_at, last_outcome, queue_size, quarantined, last_error
--     FROM sync_agents ORDER BY last_success_at NULLS FIRST;
CREATE TABLE IF NOT EXISTS sync_agents (
  agent_id text PRIMARY KEY,
  version text NOT NULL,
  last_cycle_started_at timestamptz NOT NULL,
  last_cycle_finished_at timestamptz NOT NULL,
  last_outcome text NOT NULL CHECK (last_outcome IN ('ok', 'failed')),
  last_success_at timestamptz,
  rows_uploaded bigint NOT NULL DEFAULT 0,
  rows_uploaded_total bigint NOT NULL DEFAULT 0,
  rows_downloaded bigint NOT NULL DEFAULT 0,
  queue_size bigint,
  quarantined bigint,
  last_error text,
  updated_at timestamptz NOT NULL DEFAULT now()
);
