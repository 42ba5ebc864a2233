/** The agent's state: the queue, quarantine and run history in the local database, and a remote probe. */
import { quoteIdent, readTable } from "./columns.ts";
import { connect, type ConnectOptions, type Sql } from "./db.ts";
import type { DbTarget } from "./db_url.ts";
import { describeError, SchemaError } from "./errors.ts";
import { redactText } from "./redact.ts";
import { SYNC_FLAG } from "./schema.ts";

/** What `status --json` prints (SPEC §3); the first keys are the ones SPEC promises. */
export interface StatusReport {
  queue_size: number;
  oldest_pending_at: string | null;
  /** Seconds, by the local database's clock. */
  oldest_pending_age_s: number | null;
  quarantined: number;
  /** The most common quarantine errors, at most three. */
  top_errors: { sqlstate: string; error: string; rows: number }[];
  last_success_at: string | null;
  /** Seconds since the last successful cycle; null when there never was one. */
  last_success_age_s: number | null;
  last_failure_at: string | null;
  /** The error of the newest failed cycle. */
  last_error: string | null;
  /** No successful cycle within stale_after_s (or never one): `status` exits 1. */
  stale: boolean;
  stale_after_s: number;
  /** Readings uploaded by the cycles that finished in the last hour / day. */
  rows_synced_last_hour: number;
  rows_synced_last_day: number;
  last_run: {
    command: string;
    outcome: string;
    started_at: string;
    finished_at: string;
    rows_uploaded: number;
    rows_downloaded: number;
    batches: number;
  } | null;
  /** Set by the status command: null when no remote URL is configured. */
  remote?: RemoteStatus | null;
}

/** Options of {@link readStatus}. */
export interface ReadStatusOptions {
  /** The last success older than this makes the agent stale. @default 900000 (15 min) */
  staleAfterMs?: number;
  /** Now, in ms since the epoch, for staleness and the synced windows. @default Date.now() */
  now?: number;
  /**
   * The queue was drained a moment ago (the figures at the end of a cycle): count it without
   * parallel workers, whose start costs more than a nearly empty queue (65 against 19 ms after
   * 200,000 readings). A real backlog is counted with them. @default false
   */
  drained?: boolean;
}

/** The default of `--stale-after`. */
export const DEFAULT_STALE_AFTER_MS = 15 * 60_000;

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;

async function tableExists(sql: Sql, name: string): Promise<boolean> {
  const [row] = await sql<{ ok: boolean }[]>`SELECT to_regclass(${name}) IS NOT NULL AS ok`;
  return row.ok;
}

async function columnExists(sql: Sql, table: string, column: string): Promise<boolean> {
  const [row] = await sql<{ ok: boolean }[]>`
    SELECT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = to_regclass(${table}) AND attname = ${column}
                      AND attnum > 0 AND NOT attisdropped) AS ok`;
  return row.ok;
}

/** The reading `alias` is in the quarantine. */
function quarantined(alias: string): string {
  return `EXISTS (SELECT 1 FROM meter_sync_quarantine q WHERE q.id = ${alias}.id)`;
}

/** The rows still to upload: unsynchronized and not quarantined. */
export function queueCondition(alias = "m"): string {
  return `NOT ${alias}.${quoteIdent(SYNC_FLAG)} AND NOT ${quarantined(alias)}`;
}

/**
 * {@link queueCondition} as a claim reads it, row by row in queue order: whether the quarantine
 * holds any reading is asked once per statement (in the statement's snapshot, like the rest),
 * and each reading is looked up in it only then. The quarantine is empty most of the time, and
 * the lookup was an index probe per reading (a claim of 20,000 readings, alone on the local
 * server: 175 ms instead of 190, medians of six, 2026-11-26); when it is not, PostgreSQL 18
 * looks the readings up in a hash of its keys.
 */
export function claimCondition(alias = "m"): string {
  return `NOT ${alias}.${quoteIdent(SYNC_FLAG)} AND (
    NOT (SELECT EXISTS (SELECT 1 FROM meter_sync_quarantine)) OR NOT ${quarantined(alias)})`;
}

/**
 * The number of readings waiting (unsynchronized, not quarantined): the backlog a
 * progress bar starts from. Cheaper than {@link readStatus}.
 */
export async function queueSize(sql: Sql, table = "meter_readings"): Promise<number> {
  const hasState = await tableExists(sql, "meter_sync_quarantine");
  const where = hasState ? queueCondition() : `NOT m.${quoteIdent(SYNC_FLAG)}`;
  const [row] = await sql.unsafe<{ n: string }[]>(
    `SELECT count(*)::text AS n FROM ${quoteIdent(table)} m WHERE ${where}`,
  );
  return Number(row.n);
}

/** Reads the status from the local database. */
export async function readStatus(
  sql: Sql,
  table = "meter_readings",
  options: ReadStatusOptions = {},
): Promise<StatusReport> {
  const now = options.now ?? Date.now();
  const staleAfterMs = options.staleAfterMs ?? DEFAULT_STALE_AFTER_MS;
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
  type Queue = { n: string; oldest: string | null; age: string | null }[];
  const counting = `SELECT count(*)::text AS n,
            to_char(min(m.createdat) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS oldest,
            extract(epoch FROM now() - min(m.createdat))::text AS age
       FROM ${quoteIdent(table)} m WHERE ${where}`;
  const [queue] = options.drained
    ? await sql.begin(async (tx) => {
      await tx.unsafe("SELECT set_config('max_parallel_workers_per_gather', '0', true)");
      return await tx.unsafe<Queue>(counting);
    })
    : await sql.unsafe<Queue>(counting);
  const report: StatusReport = {
    queue_size: Number(queue.n),
    oldest_pending_at: queue.oldest,
    oldest_pending_age_s: queue.age === null ? null : Math.max(0, Math.round(Number(queue.age))),
    quarantined: 0,
    top_errors: [],
    last_success_at: null,
    last_success_age_s: null,
    last_failure_at: null,
    last_error: null,
    stale: true,
    stale_after_s: Math.round(staleAfterMs / 1000),
    rows_synced_last_hour: 0,
    rows_synced_last_day: 0,
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
              ORDER BY finished_at DESC, id DESC LIMIT 1) AS error`,
  );
  report.last_success_at = runs.ok;
  report.last_failure_at = runs.failed;
  report.last_error = runs.error;
  if (runs.ok !== null) {
    const ageMs = Math.max(0, now - Date.parse(runs.ok));
    report.last_success_age_s = Math.round(ageMs / 1000);
    report.stale = ageMs > staleAfterMs;
  }
  const [synced] = await sql<{ hour: string; day: string }[]>`
    SELECT coalesce(sum(rows_uploaded) FILTER (WHERE finished_at > ${
    new Date(now - HOUR_MS).toISOString()
  }), 0)::text AS hour,
           coalesce(sum(rows_uploaded), 0)::text AS day
      FROM meter_sync_runs WHERE finished_at > ${new Date(now - DAY_MS).toISOString()}`;
  report.rows_synced_last_hour = Number(synced.hour);
  report.rows_synced_last_day = Number(synced.day);
  // rows_downloaded came with migration 006: a gateway not migrated yet still has a status.
  const downloaded = await columnExists(sql, "meter_sync_runs", "rows_downloaded")
    ? "rows_downloaded::text"
    : "'0'";
  const [last] = await sql.unsafe<
    {
      command: string;
      outcome: string;
      started_at: string;
      finished_at: string;
      rows_uploaded: string;
      rows_downloaded: string;
      batches: number;
    }[]
  >(
    `SELECT command, outcome, ${iso("started_at")} AS started_at, ${
      iso("finished_at")
    } AS finished_at,
            rows_uploaded::text AS rows_uploaded, ${downloaded} AS rows_downloaded, batches
       FROM meter_sync_runs ORDER BY finished_at DESC, id DESC LIMIT 1`,
  );
  if (last) {
    report.last_run = {
      command: last.command,
      outcome: last.outcome,
      started_at: last.started_at,
      finished_at: last.finished_at,
      rows_uploaded: Number(last.rows_uploaded),
      rows_downloaded: Number(last.rows_downloaded),
      batches: last.batches,
    };
  }
  return report;
}

/** What `status` found on the remote side. */
export interface RemoteStatus {
  /** Connected and answered a query within the time limit. */
  reachable: boolean;
  /** Why not (or why the agent row could not be read): one line, passwords masked. */
  error?: string;
  /** Round trip of one query on the open connection. */
  latency_ms?: number;
  /**
   * This agent's row of sync_agents (null: no row yet). Absent when no agent id is
   * known or the remote has no sync_agents table.
   */
  agent?: Record<string, unknown> | null;
}

/** Options of {@link readRemoteStatus}. */
export interface ReadRemoteStatusOptions {
  /** Whose sync_agents row to read. @default none: the row is not read */
  agentId?: string;
  /** Everything (connect, queries) must be done within this. @default 3000 */
  timeoutMs?: number;
  /** How to connect (pgpass file, warnings). */
  connect?: ConnectOptions;
  /** Passwords to mask in the error text, on top of the target's own. */
  secrets?: readonly string[];
}

/** Probes the remote database briefly; never throws: an unreachable remote is a finding. */
export async function readRemoteStatus(
  target: DbTarget,
  options: ReadRemoteStatusOptions = {},
): Promise<RemoteStatus> {
  const timeoutMs = options.timeoutMs ?? 3000;
  const quick: DbTarget = {
    ...target,
    connectTimeout: Math.min(target.connectTimeout, timeoutMs / 1000),
  };
  // Read when the error is written: a password read from a file joins options.secrets late.
  const secrets = () => [...(options.secrets ?? []), ...(target.password ? [target.password] : [])];
  let sql: Sql | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const probe = async (): Promise<RemoteStatus> => {
    sql = await connect(quick, options.connect);
    await sql`SELECT 1`;
    const started = performance.now();
    await sql`SELECT 1`;
    const status: RemoteStatus = {
      reachable: true,
      latency_ms: Math.round((performance.now() - started) * 10) / 10,
    };
    if (options.agentId === undefined) return status;
    try {
      if (await tableExists(sql, "sync_agents")) {
        const [row] = await sql<{ agent: Record<string, unknown> }[]>`
          SELECT row_to_json(a) AS agent FROM sync_agents a WHERE agent_id = ${options.agentId}`;
        status.agent = row?.agent ?? null;
      }
    } catch (err) {
      status.error = `cannot read sync_agents: ${describeError(err)}`;
    }
    return status;
  };
  const work = probe();
  // A slow or stuck remote must not hold the pool open after the deadline either.
  work.catch(() => {}).finally(() => sql?.end({ timeout: 0 }).catch(() => {}));
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`no answer within ${timeoutMs} ms`)),
      timeoutMs,
    );
  });
  try {
    const status = await Promise.race([work, deadline]);
    if (status.error) status.error = oneLine(status.error, secrets());
    return status;
  } catch (err) {
    return { reachable: false, error: oneLine(describeError(err), secrets()) };
  } finally {
    clearTimeout(timer);
    await (sql as Sql | undefined)?.end({ timeout: 0 }).catch(() => {});
  }
}

function oneLine(text: string, secrets: readonly string[]): string {
  return redactText(text.replace(/\s+/g, " ").trim(), secrets);
}

function age(seconds: number | null): string {
  if (seconds === null) return "-";
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

function stateLine(r: StatusReport): string {
  const threshold = `threshold ${age(r.stale_after_s)}`;
  const since = r.last_success_age_s === null
    ? "no successful cycle yet"
    : `last success ${age(r.last_success_age_s)} ago`;
  return `state          ${r.stale ? "STALE" : "healthy"} (${since}, ${threshold})`;
}

function remoteLine(remote: RemoteStatus | null): string {
  if (remote === null) return "remote         not configured (REMOTE_DATABASE_URL or --remote-url)";
  if (!remote.reachable) return `remote         UNREACHABLE: ${remote.error ?? "unknown error"}`;
  const parts = [`reachable, ${remote.latency_ms} ms`];
  const a = remote.agent;
  if (a) {
    parts.push(
      `agent ${a.agent_id}: last cycle ${a.last_outcome} at ${a.last_cycle_finished_at}` +
        (a.queue_size === null || a.queue_size === undefined ? "" : `, queue ${a.queue_size}`),
    );
  } else if (a === null) {
    parts.push("no sync_agents row for this agent yet");
  }
  if (remote.error) parts.push(remote.error);
  return `remote         ${parts.join("; ")}`;
}

/** The short human block of `status`. */
export function formatStatus(r: StatusReport): string {
  const lines = [
    stateLine(r),
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
    const down = r.last_run.rows_downloaded
      ? `, ${r.last_run.rows_downloaded} reference rows down`
      : "";
    lines.push(
      `last run       ${r.last_run.command} ${r.last_run.outcome} at ${r.last_run.finished_at}, ${r.last_run.rows_uploaded} rows in ${r.last_run.batches} batches${down}`,
    );
  }
  lines.push(
    `synced         ${r.rows_synced_last_hour} readings in the last hour, ${r.rows_synced_last_day} in the last day`,
  );
  if (r.remote !== undefined) lines.push(remoteLine(r.remote));
  return lines.join("\n");
}
