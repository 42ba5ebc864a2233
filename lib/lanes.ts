/**
 * --parallel N: N upload lanes, each the whole engine (claim, remote write, delete) on its own
 * connections. FOR UPDATE SKIP LOCKED keeps them apart as it keeps two agents apart (G4); on a
 * slow link N batches travel at once instead of one.
 */
import { emptyResult, type UploadResult } from "./upload.ts";

/** Each lane's share of --max-batches (undefined: until the queue is empty); 0 means skip it. */
export function laneBatches(maxBatches: number | undefined, lanes: number): (number | undefined)[] {
  return Array.from(
    { length: lanes },
    (_, i) =>
      maxBatches === undefined
        ? undefined
        : Math.floor(maxBatches / lanes) + (i < maxBatches % lanes ? 1 : 0),
  );
}

/** The cycle's totals from its lanes' results: counts add up, the time is the longest lane's. */
export function sumResults(results: UploadResult[]): UploadResult {
  const total = emptyResult();
  for (const r of results) {
    total.uploaded += r.uploaded;
    total.skipped += r.skipped;
    total.deleted += r.deleted;
    total.quarantined += r.quarantined;
    total.batches += r.batches;
    total.retries += r.retries;
    total.seconds = Math.max(total.seconds, r.seconds);
    total.stopped ||= r.stopped;
  }
  return total;
}
