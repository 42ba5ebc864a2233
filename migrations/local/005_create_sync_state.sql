-- meter-sync's own bookkeeping on the gateway.
-- Quarantine: readings the central side rejected for their data. The reading itself
-- stays in meter_readings, untouched; a row here takes it out of the queue until
-- `meter-sync requeue` deletes the row.
CREATE TABLE IF NOT EXISTS meter_sync_quarantine (
  id uuid PRIMARY KEY,
  sqlstate text NOT NULL,
  error text NOT NULL,
  first_attempt_at timestamptz NOT NULL DEFAULT now(),
  last_attempt_at timestamptz NOT NULL DEFAULT now(),
  attempts integer NOT NULL DEFAULT 1
);

-- One row per cycle, for `status`; pruned by age.
CREATE TABLE IF NOT EXISTS meter_sync_runs (
  id bigserial PRIMARY KEY,
  command text NOT NULL,
  started_at timestamptz NOT NULL,
  finished_at timestamptz NOT NULL,
  outcome text NOT NULL CHECK (outcome IN ('ok', 'failed')),
  rows_uploaded bigint NOT NULL DEFAULT 0,
  rows_deleted bigint NOT NULL DEFAULT 0,
  rows_skipped bigint NOT NULL DEFAULT 0,
  batches integer NOT NULL DEFAULT 0,
  quarantined integer NOT NULL DEFAULT 0,
  error text
);

CREATE INDEX IF NOT EXISTS meter_sync_runs_finished_idx ON meter_sync_runs (finished_at);
