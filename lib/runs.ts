/** The history of cycles in the local database, which `status` reads. */
import type { Sql } from "./db.ts";
import { sqlState } from "./errors.ts";

/** One finished cycle. */
export interface RunRecord {
  command: string;
  startedAt: Date;
  finishedAt: Date;
  outcome: "ok" | "failed";
  uploaded: number;
  deleted: number;
  skipped: number;
  batches: number;
  quarantined: number;
  /** Rows the download half wrote (inserted, updated or deleted). @default 0 */
  downloaded?: number;
  error?: string;
}

/** History older than this is pruned by {@link recordRun}. */
export const KEEP_RUNS_DAYS = 30;

/** Records a cycle and prunes history older than `keepDays` (default 30). */
export async function recordRun(
  sql: Sql,
  run: RunRecord,
  keepDays = KEEP_RUNS_DAYS,
): Promise<void> {
  try {
    await sql`
      INSERT INTO meter_sync_runs (command, started_at, finished_at, outcome, rows_uploaded,
                                   rows_deleted, rows_skipped, batches, quarantined,
                                   rows_downloaded, error)
      VALUES (${run.command}, ${run.startedAt.toISOString()}, ${run.finishedAt.toISOString()},
              ${run.outcome}, ${run.uploaded}, ${run.deleted}, ${run.skipped}, ${run.batches},
              ${run.quarantined}, ${run.downloaded ?? 0}, ${run.error ?? null})`;
  } catch (err) {
    // A gateway upgraded without `migrate --target local` lacks rows_downloaded (006):
    // the history still matters more than that one figure, since status judges health by it.
    if (sqlState(err) !== "42703") throw err;
    await sql`
      INSERT INTO meter_sync_runs (command, started_at, finished_at, outcome, rows_uploaded,
                                   rows_deleted, rows_skipped, batches, quarantined, error)
      VALUES (${run.command}, ${run.startedAt.toISOString()}, ${run.finishedAt.toISOString()},
              ${run.outcome}, ${run.uploaded}, ${run.deleted}, ${run.skipped}, ${run.batches},
              ${run.quarantined}, ${run.error ?? null})`;
  }
  await sql`DELETE FROM meter_sync_runs WHERE finished_at < now() - make_interval(days => ${keepDays})`;
}
