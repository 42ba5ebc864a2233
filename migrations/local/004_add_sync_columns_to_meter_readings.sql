-- The sync flag of the original design, and the index that serves the queue query:
-- unsynchronized readings, oldest first (createdat, id), without touching synced rows.
ALTER TABLE meter_readings
  ADD COLUMN IF NOT EXISTS is_synchronized boolean NOT NULL DEFAULT false;

CREATE INDEX IF NOT EXISTS meter_readings_sync_queue_idx
  ON meter_readings (createdat, id)
  WHERE NOT is_synchronized;
