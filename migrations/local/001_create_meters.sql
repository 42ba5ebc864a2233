-- Meters known to this gateway; mirrored from the central database by `download`.
CREATE TABLE IF NOT EXISTS meters (
  id bigint PRIMARY KEY,
  serial_number text NOT NULL UNIQUE,
  name text NOT NULL,
  location text,
  model text,
  phases smallint NOT NULL DEFAULT 3,
  installed_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now(),
  active boolean NOT NULL DEFAULT true
);
