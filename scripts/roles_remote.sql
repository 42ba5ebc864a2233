-- The least-privilege login role of meter-sync on the REMOTE (central) database.
--
-- Run it connected to the central database as the owner of the tables (the role that ran
-- `meter-sync migrate --target remote`; it needs CREATEROLE) or as a superuser:
--
--   psql "postgres://OWNER@central.example.net/central" -X -v agent_role=gw_0017 \
--        -f scripts/roles_remote.sql
--   psql "postgres://OWNER@central.example.net/central" -X -c '\password gw_0017'
--
-- \password hashes the password in psql, so it never reaches a log or the process list.
-- To set it from the script instead (visible in `ps` while psql runs):
--   psql ... -X -v agent_role=gw_0017 -v agent_password='...' -f scripts/roles_remote.sql
--
-- Variables (psql -v NAME=VALUE), all optional:
--   agent_role       the agent's login role                          default meter_sync_agent
--   agent_password   its password; empty keeps the current one         default (empty)
--   readings_table   the agent's --table                               default meter_readings
--   download_tables  the agent's --download-tables, comma-separated    default meters
--   schema           the schema the migrations created the tables in   default public
--
-- Idempotent, and it converges: it creates the role if it is missing, takes back every table
-- and sequence privilege the role holds in the schema, and grants exactly the list below. Run
-- it again after every migration and every change of the variables. The tables must exist:
-- migrations run as the owner, never as the agent, which can create nothing.
--
-- What the agent does centrally, and the privilege each step needs (verified against
-- PostgreSQL 18 by tests/privileges_test.ts):
--   CONNECT on the database       to log in (PUBLIC has it by default; revoking that is fine)
--   TEMPORARY on the database     the replay after a crash copies the batch into a temporary
--                                 staging table (CREATE TEMP TABLE ... ON COMMIT DROP)
--   USAGE on the schema           to reach the tables
--   INSERT on readings_table      COPY ... FROM STDIN and INSERT ... SELECT (table level, so a
--                                 column added by a later migration needs no new grant)
--   SELECT (id) on readings_table the replay's INSERT ... ON CONFLICT (id) DO NOTHING: the
--                                 conflict target needs SELECT on its column. Also, a
--                                 duplicate-key error names the key (how the agent tells a
--                                 replay from a poison row) only to a user who may read it.
--                                 No other column is readable: a gateway sees ids, not readings
--   SELECT on each download table `download` copies them to the gateway
--   SELECT, INSERT, UPDATE on sync_agents
--                                 the heartbeat: INSERT ... ON CONFLICT (agent_id) DO UPDATE,
--                                 whose SET reads the old row (totals, last success); `status`
--                                 reads the gateway's row
--   nothing on the catalogs       the schema check reads pg_class, pg_namespace, pg_attribute,
--                                 pg_type and pg_index, readable by every role by default;
--                                 the script stops if that was revoked
-- Nothing else: no UPDATE, DELETE or TRUNCATE of readings, no CREATE anywhere.

\set ON_ERROR_STOP on
\if :{?agent_role}
\else
\set agent_role meter_sync_agent
\endif
\if :{?agent_password}
\else
\set agent_password ''
\endif
\if :{?readings_table}
\else
\set readings_table meter_readings
\endif
\if :{?download_tables}
\else
\set download_tables meters
\endif
\if :{?schema}
\else
\set schema public
\endif

-- psql does not expand variables inside the DO blocks' dollar quotes: they travel as settings.
SELECT set_config('meter_sync.agent_role', :'agent_role', false),
       set_config('meter_sync.agent_password', :'agent_password', false),
       set_config('meter_sync.readings_table', :'readings_table', false),
       set_config('meter_sync.download_tables', :'download_tables', false),
       set_config('meter_sync.schema', :'schema', false);

BEGIN;

DO $$
DECLARE
  agent text := current_setting('meter_sync.agent_role');
  password text := current_setting('meter_sync.agent_password');
  s text := current_setting('meter_sync.schema');
  readings text := current_setting('meter_sync.readings_table');
  downloads text[] := ARRAY(
    SELECT btrim(t) FROM unnest(string_to_array(current_setting('meter_sync.download_tables'), ',')) t
     WHERE btrim(t) <> '');
  t text;
  catalog text;
  r record;
BEGIN
  IF agent = '' THEN
    RAISE EXCEPTION 'agent_role is empty; run: psql -v agent_role=NAME -f scripts/roles_remote.sql';
  END IF;
  IF agent = current_user THEN
    RAISE EXCEPTION 'role "%" is the one running this script: the agent needs a role of its own', agent;
  END IF;
  FOREACH t IN ARRAY readings || downloads || 'sync_agents'::text LOOP
    IF to_regclass(format('%I.%I', s, t)) IS NULL THEN
      RAISE EXCEPTION 'table %.% does not exist; run as the owner first: meter-sync migrate --target remote', s, t;
    END IF;
  END LOOP;
  IF NOT EXISTS (SELECT FROM pg_attribute
                  WHERE attrelid = format('%I.%I', s, readings)::regclass
                    AND attname = 'id' AND NOT attisdropped) THEN
    RAISE EXCEPTION 'table %.% has no id column: it is not a meter-sync readings table', s, readings;
  END IF;

  SELECT * INTO r FROM pg_roles WHERE rolname = agent;
  IF NOT FOUND THEN
    EXECUTE format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS',
                   agent);
    RAISE NOTICE 'created role %', agent;
  ELSIF r.rolsuper OR r.rolbypassrls THEN
    RAISE EXCEPTION 'role "%" is a superuser or bypasses row security: every privilege below would be moot; use a role of its own', agent;
  ELSE
    EXECUTE format('ALTER ROLE %I LOGIN', agent);
  END IF;
  IF password <> '' THEN
    EXECUTE format('ALTER ROLE %I PASSWORD %L', agent, password);
  END IF;

  -- Converge: whatever was granted before, by hand or by an older version of this script.
  EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM %I', s, agent);
  EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM %I', s, agent);
  EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM %I', s, agent);
  EXECUTE format('REVOKE CREATE ON DATABASE %I FROM %I', current_database(), agent);

  EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), agent);
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', s, agent);
  EXECUTE format('GRANT INSERT ON %I.%I TO %I', s, readings, agent);
  EXECUTE format('GRANT SELECT (id) ON %I.%I TO %I', s, readings, agent);
  FOREACH t IN ARRAY downloads LOOP
    EXECUTE format('GRANT SELECT ON %I.%I TO %I', s, t, agent);
  END LOOP;
  EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.sync_agents TO %I', s, agent);

  FOREACH catalog IN ARRAY ARRAY['pg_class', 'pg_namespace', 'pg_attribute', 'pg_type', 'pg_index'] LOOP
    IF NOT has_table_privilege(agent, 'pg_catalog.' || catalog, 'SELECT') THEN
      RAISE EXCEPTION 'role "%" cannot read pg_catalog.%, which the schema check needs; as a superuser: GRANT SELECT ON pg_catalog.% TO %',
        agent, catalog, catalog, quote_ident(agent);
    END IF;
  END LOOP;
  -- Privileges of PUBLIC (or of a group the role is in) apply too: say so, not silently.
  IF has_table_privilege(agent, format('%I.%I', s, readings), 'SELECT') THEN
    RAISE WARNING 'role "%" can still read every column of %.% (through PUBLIC or a group); revoke that grant', agent, s, readings;
  END IF;
  IF has_schema_privilege(agent, s, 'CREATE') THEN
    RAISE WARNING 'role "%" can still create objects in schema % (through PUBLIC or a group): REVOKE CREATE ON SCHEMA % FROM PUBLIC', agent, s, quote_ident(s);
  END IF;
END
$$;

COMMIT;

SELECT set_config('meter_sync.agent_password', '', false);
