-- Rows the download half wrote (inserted, updated or deleted), for status and the cycle log.
ALTER TABLE meter_sync_runs ADD COLUMN IF NOT EXISTS rows_downloaded bigint NOT NULL DEFAULT 0;
