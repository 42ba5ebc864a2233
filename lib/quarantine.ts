/** Readings the remote rejected for their data: kept locally, out of the queue, until requeued. */
import type { Sql } from "./db.ts";

/** One rejected reading and why. */
export interface Rejection {
  id: string;
  sqlstate: string;
  error: string;
}

type Tx = Sql | postgres.TransactionSql;
import type postgres from "postgres";

/**
 * Records rejections (in the caller's transaction, so that they commit with the batch);
 * a reading rejected again keeps its first attempt time and gets a new last one.
 */
export async function quarantineRows(tx: Tx, rows: Rejection[]): Promise<void> {
  if (rows.length === 0) return;
  await tx`
    INSERT INTO meter_sync_quarantine (id, sqlstate, error)
    SELECT * FROM unnest(${pgArray(rows.map((r) => r.id))}::uuid[],
                         ${pgArray(rows.map((r) => r.sqlstate))}::text[],
                         ${pgArray(rows.map((r) => r.error))}::text[])
    ON CONFLICT (id) DO UPDATE
       SET sqlstate = excluded.sqlstate, error = excluded.error,
           last_attempt_at = now(), attempts = meter_sync_quarantine.attempts + 1`;
}

/** Puts quarantined readings back in the queue: all of them, or the given ids. */
export async function requeue(sql: Sql, ids: "all" | string[]): Promise<number> {
  const result = ids === "all"
    ? await sql`DELETE FROM meter_sync_quarantine`
    : await sql`DELETE FROM meter_sync_quarantine WHERE id = ANY (${pgArray(ids)}::uuid[])`;
  return result.count;
}

/**
 * A uuid in PostgreSQL's text form: it can go into SQL text or an array literal as it is,
 * with nothing to quote.
 */
export const UUID_TEXT = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * A PostgreSQL array literal of text values, for one parameter (no per-value round trip).
 * Uuids go in as they are (a batch's delete carries thousands), anything else quoted.
 */
export function pgArray(values: string[]): string {
  return `{${
    values.map((v) =>
      UUID_TEXT.test(v) ? v : `"${v.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"`
    )
      .join(",")
  }}`;
}
