/** `sync` and `upload`: one cycle that drains the queue, recorded in the local run history. */
import { getLogger } from "@logtape/logtape";
import type { Config } from "../config.ts";
import { withPools } from "../connections.ts";
import { CycleError, describeError, SchemaError } from "../errors.ts";
import { download } from "../download.ts";
import type { Sql } from "../db.ts";
import { recordRun } from "../runs.ts";
import { upload, type UploadDeps, type UploadResult } from "../upload.ts";
import type { CommandContext } from "./context.ts";

const log = getLogger(["meter-sync", "cycle"]);

/** Runs one upload cycle with the config's settings; the caller owns the connections. */
export async function uploadCycle(
  config: Config,
  ctx: CommandContext,
  deps: UploadDeps,
): Promise<UploadResult> {
  const startedAt = new Date(ctx.clock.now());
  try {
    const result = await upload(deps, {
      table: config.table,
      batchSize: config.batchSize,
      maxBatches: config.maxBatches,
      maxRetries: config.maxRetries,
    });
    const rate = result.seconds > 0 ? Math.round(result.deleted / result.seconds) : 0;
    log.info(
      "uploaded {rows} readings in {batches} batches in {seconds} s ({rate} rows/s); {skipped} already on the remote, {quarantined} quarantined{stopped}",
      {
        rows: result.uploaded,
        batches: result.batches,
        seconds: Number(result.seconds.toFixed(2)),
        rate,
        skipped: result.skipped,
        quarantined: result.quarantined,
        retries: result.retries,
        stopped: result.stopped ? "; stopped by signal" : "",
      },
    );
    await recordRun(deps.local.sql, {
      command: config.command,
      startedAt,
      finishedAt: new Date(ctx.clock.now()),
      outcome: "ok",
      uploaded: result.uploaded,
      deleted: result.deleted,
      skipped: result.skipped,
      batches: result.batches,
      quarantined: result.quarantined,
    }).catch((err) => log.warn("could not record the run: {error}", { error: describeError(err) }));
    return result;
  } catch (err) {
    const message = describeError(err);
    // main.ts reports the failure once; here it only goes into the history.
    // Best effort: when the local database is what failed, there is nowhere to write.
    await recordRun(deps.local.sql, {
      command: config.command,
      startedAt,
      finishedAt: new Date(ctx.clock.now()),
      outcome: "failed",
      uploaded: 0,
      deleted: 0,
      skipped: 0,
      batches: 0,
      quarantined: 0,
      error: message,
    }).catch(() => {});
    throw err;
  }
}

export async function syncCommand(config: Config, ctx: CommandContext): Promise<number> {
  // No ping first: a database that does not answer yet is a transient fault, retried.
  return await withPools(config, async (pools) => {
    const result = await uploadCycle(config, ctx, {
      ...pools,
      clock: ctx.clock,
      random: ctx.random,
      signal: ctx.signal,
    });
    // sync = upload, then the reference data down; not after a stop signal.
    if (config.command === "sync" && !result.stopped && !ctx.signal.aborted) {
      await downloadTables(config, pools.local.sql, pools.remote.sql);
    }
    return 0;
  });
}

/** The download half: every --download-tables table; a failure fails the cycle (exit 1 or 3). */
export async function downloadTables(config: Config, local: Sql, remote: Sql): Promise<void> {
  try {
    await download({ local, remote }, config.downloadTables);
  } catch (err) {
    if (err instanceof SchemaError) throw err;
    throw new CycleError(`download failed: ${describeError(err)}; nothing was changed locally`, {
      cause: err,
    });
  }
}

export async function downloadCommand(config: Config, _ctx: CommandContext): Promise<number> {
  return await withPools(config, async ({ local, remote }) => {
    await downloadTables(config, local.sql, remote.sql);
    return 0;
  });
}
