/** The history of cycles in the local database, which `status` reads. */
import type { Sql } from "./db.ts";

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
  error?: string;
}

/** Records a cycle and prunes history older than `keepDays` (default 30). */
export async function recordRun(sql: Sql, run: RunRecord, keepDays = 30): Promise<void> {
  await sql`
    INSERT INTO meter_sync_runs (command, started_at, finished_at, outcome, rows_uploaded,
                                 rows_deleted, rows_skipped, batches, quarantined, error)
    VALUES (${run.command}, ${run.startedAt.toISOString()}, ${run.finishedAt.toISOString()},
            ${run.outcome}, ${run.uploaded}, ${run.deleted}, ${run.skipped}, ${run.batches},
            ${run.quarantined}, ${run.error ?? null})`;
  await sql`DELETE FROM meter_sync_runs WHERE finished_at < now() - make_interval(days => ${keepDays})`;
}
