/** The agent's state as read from the local database: queue, quarantine, last runs. */
import { quoteIdent, readTable } from "./columns.ts";
import type { Sql } from "./db.ts";
import { SchemaError } from "./errors.ts";
import { SYNC_FLAG } from "./schema.ts";

/** What `status --json` prints (SPEC §3). */
export interface StatusReport {
  queue_size: number;
  oldest_pending_at: string | null;
  oldest_pending_age_s: number | null;
  quarantined: number;
  top_errors: { sqlstate: string; error: string; rows: number }[];
  last_success_at: string | null;
  last_failure_at: string | null;
  last_error: string | null;
  last_run: {
    command: string;
    outcome: string;
    started_at: string;
    finished_at: string;
    rows_uploaded: number;
    batches: number;
  } | null;
}

async function tableExists(sql: Sql, name: string): Promise<boolean> {
  const [row] = await sql<{ ok: boolean }[]>`SELECT to_regclass(${name}) IS NOT NULL AS ok`;
  return row.ok;
}

/** The rows still to upload: unsynchronized and not quarantined. */
export function queueCondition(alias = "m"): string {
  return `NOT ${alias}.${quoteIdent(SYNC_FLAG)} AND NOT EXISTS (
    SELECT 1 FROM meter_sync_quarantine q WHERE q.id = ${alias}.id)`;
}

/** Reads the status from the local database. */
export async function readStatus(sql: Sql, table = "meter_readings"): Promise<StatusReport> {
  const info = await readTable(sql, table);
  if (!info) {
    throw new SchemaError(
      `table "${table}" does not exist in the local database; run: meter-sync migrate --target local`,
    );
  }
  const hasState = await tableExists(sql, "meter_sync_quarantine") &&
    await tableExists(sql, "meter_sync_runs");
  const hasFlag = info.columns.some((c) => c.name === SYNC_FLAG);
  const where = !hasFlag ? "true" : hasState ? queueCondition() : `NOT m.${quoteIdent(SYNC_FLAG)}`;
  const [queue] = await sql.unsafe<{ n: string; oldest: string | null; age: string | null }[]>(
    `SELECT count(*)::text AS n,
            to_char(min(m.createdat) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS oldest,
            extract(epoch FROM now() - min(m.createdat))::text AS age
       FROM ${quoteIdent(table)} m WHERE ${where}`,
  );
  const report: StatusReport = {
    queue_size: Number(queue.n),
    oldest_pending_at: queue.oldest,
    oldest_pending_age_s: queue.age === null ? null : Math.max(0, Math.round(Number(queue.age))),
    quarantined: 0,
    top_errors: [],
    last_success_at: null,
    last_failure_at: null,
    last_error: null,
    last_run: null,
  };
  if (!hasState) return report;
  const iso = (col: string) =>
    `to_char(${col} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`;
  const [q] = await sql<{ n: string }[]>`SELECT count(*)::text AS n FROM meter_sync_quarantine`;
  report.quarantined = Number(q.n);
  const top = await sql<{ sqlstate: string; error: string; rows: string }[]>`
    SELECT sqlstate, error, count(*)::text AS rows FROM meter_sync_quarantine
     GROUP BY sqlstate, error ORDER BY count(*) DESC, sqlstate LIMIT 3`;
  report.top_errors = top.map((t) => ({ ...t, rows: Number(t.rows) }));
  const [runs] = await sql.unsafe<
    { ok: string | null; failed: string | null; error: string | null }[]
  >(
    `SELECT (SELECT ${iso("max(finished_at)")} FROM meter_sync_runs WHERE outcome = 'ok') AS ok,
            (SELECT ${
      iso("max(finished_at)")
    } FROM meter_sync_runs WHERE outcome = 'failed') AS failed,
            (SELECT error FROM meter_sync_runs WHERE outcome = 'failed'
              ORDER BY finished_at DESC LIMIT 1) AS error`,
  );
  report.last_success_at = runs.ok;
  report.last_failure_at = runs.failed;
  report.last_error = runs.error;
  const [last] = await sql.unsafe<
    {
      command: string;
      outcome: string;
      started_at: string;
      finished_at: string;
      rows_uploaded: string;
      batches: number;
    }[]
  >(
    `SELECT command, outcome, ${iso("started_at")} AS started_at, ${
      iso("finished_at")
    } AS finished_at,
            rows_uploaded::text AS rows_uploaded, batches
       FROM meter_sync_runs ORDER BY finished_at DESC, id DESC LIMIT 1`,
  );
  if (last) report.last_run = { ...last, rows_uploaded: Number(last.rows_uploaded) };
  return report;
}

function age(seconds: number | null): string {
  if (seconds === null) return "-";
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

/** The short human block of `status`. */
export function formatStatus(r: StatusReport): string {
  const lines = [
    `queue          ${r.queue_size} readings waiting${
      r.queue_size ? `, oldest ${age(r.oldest_pending_age_s)} old (${r.oldest_pending_at})` : ""
    }`,
    `quarantined    ${r.quarantined}${
      r.quarantined ? " (meter-sync requeue --all once the cause is fixed)" : ""
    }`,
    ...r.top_errors.map((e) => `               ${e.rows} x ${e.sqlstate} ${e.error}`),
    `last success   ${r.last_success_at ?? "never"}`,
    `last failure   ${r.last_failure_at ?? "never"}${r.last_error ? `: ${r.last_error}` : ""}`,
  ];
  if (r.last_run) {
    lines.push(
      `last run       ${r.last_run.command} ${r.last_run.outcome} at ${r.last_run.finished_at}, ${r.last_run.rows_uploaded} rows in ${r.last_run.batches} batches`,
    );
  }
  return lines.join("\n");
}
