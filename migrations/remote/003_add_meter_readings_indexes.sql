-- Readings of one meter over time, for billing queries on the central side.
CREATE INDEX IF NOT EXISTS meter_readings_meter_id_createdat_idx
  ON meter_readings (meter_id, createdat);
