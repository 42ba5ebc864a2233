/** The fleet table: after each cycle the agent upserts its row in the remote sync_agents. */
import { quoteLiteral } from "./columns.ts";
import type { Sql } from "./db.ts";

/** One cycle as the central side sees it. */
export interface Heartbeat {
  agentId: string;
  version: string;
  startedAt: Date;
  finishedAt: Date;
  outcome: "ok" | "failed";
  uploaded: number;
  downloaded: number;
  /** Null when the local database could not be read after the cycle. */
  queueSize: number | null;
  quarantined: number | null;
  error: string | null;
}

/**
 * Upserts the agent's row. Totals accumulate; the last success survives a failed cycle,
 * so `ORDER BY last_success_at NULLS FIRST` lists the gateways that are behind.
 */
export async function recordHeartbeat(sql: Sql, beat: Heartbeat): Promise<void> {
  const ok = beat.outcome === "ok";
  // Values in the text, not as parameters: postgres.js describes a new statement with
  // parameters before running it, and this one runs once per connection, often through a
  // slow link at the end of a cycle: one round trip instead of two.
  const v = (x: string | number | null) =>
    x === null ? "NULL" : typeof x === "number" ? String(Math.trunc(x)) : quoteLiteral(x);
  const at = (d: Date | null) => `${v(d && d.toISOString())}::timestamptz`;
  const values = [
    v(beat.agentId),
    v(beat.version),
    at(beat.startedAt),
    at(beat.finishedAt),
    v(beat.outcome),
    at(ok ? beat.finishedAt : null),
    v(beat.uploaded),
    v(beat.uploaded),
    v(beat.downloaded),
    v(beat.queueSize),
    v(beat.quarantined),
    v(beat.error),
  ];
  await sql.unsafe(`
    INSERT INTO sync_agents AS a (agent_id, version, last_cycle_started_at, last_cycle_finished_at,
                                  last_outcome, last_success_at, rows_uploaded, rows_uploaded_total,
                                  rows_downloaded, queue_size, quarantined, last_error, updated_at)
    VALUES (${values.join(", ")}, now())
    ON CONFLICT (agent_id) DO UPDATE SET
      version = EXCLUDED.version,
      last_cycle_started_at = EXCLUDED.last_cycle_started_at,
      last_cycle_finished_at = EXCLUDED.last_cycle_finished_at,
      last_outcome = EXCLUDED.last_outcome,
      last_success_at = coalesce(EXCLUDED.last_success_at, a.last_success_at),
      rows_uploaded = EXCLUDED.rows_uploaded,
      rows_uploaded_total = a.rows_uploaded_total + EXCLUDED.rows_uploaded,
      rows_downloaded = EXCLUDED.rows_downloaded,
      queue_size = coalesce(EXCLUDED.queue_size, a.queue_size),
      quarantined = coalesce(EXCLUDED.quarantined, a.quarantined),
      last_error = EXCLUDED.last_error,
      updated_at = now()`);
}
