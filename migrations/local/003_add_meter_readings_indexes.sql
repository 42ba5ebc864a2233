-- Readings of one meter over time, for the gateway's own queries.
CREATE INDEX IF NOT EXISTS meter_readings_meter_id_createdat_idx
  ON meter_readings (meter_id, createdat);
