/**
 * One cycle (`sync`, `upload`, and each cycle of `run`): the upload, the download for sync
 * and run, then the bookkeeping: the local run history, the queue figures, the heartbeat
 * in the remote sync_agents table, one log line.
 */
import { getLogger } from "@logtape/logtape";
import type { Config } from "../config.ts";
import { withDatabases, withPools } from "../connections.ts";
import { laneBatches, sumResults } from "../lanes.ts";
import { CycleError, describeError, SchemaError } from "../errors.ts";
import { download } from "../download.ts";
import type { Pool, Sql } from "../db.ts";
import { recordHeartbeat } from "../heartbeat.ts";
import { beforeLogLine } from "../log.ts";
import { createProgress, type Progress, shouldShowProgress } from "../progress.ts";
import { recordRun } from "../runs.ts";
import { queueSize, readStatus, type StatusReport } from "../status.ts";
import { emptyResult, upload, type UploadOptions, type UploadResult } from "../upload.ts";
import { VERSION } from "../version.ts";
import type { CommandContext } from "./context.ts";

const log = getLogger(["meter-sync", "cycle"]);

type Pools = { local: Pool; remote: Pool };

/** What a caller may observe during a cycle (metrics in run mode, progress on a terminal). */
export interface CycleHooks {
  onBatch?: UploadOptions["onBatch"];
  onRetry?: UploadOptions["onRetry"];
  /** Called once the upload knows it has work, with the size of the queue before it. */
  onBacklog?: (rows: number) => void;
  /** Whether onBacklog is wanted (it costs a count of the queue). */
  wantsBacklog?: boolean;
  /** Called when the upload ends, done or not, before anything else is logged. */
  onUploadEnd?: () => void;
}

/** What one cycle did. */
export interface CycleReport {
  outcome: "ok" | "failed";
  startedAt: Date;
  finishedAt: Date;
  upload: UploadResult | null;
  /** Rows the download inserted, updated or deleted. */
  downloaded: number;
  /** The queue after the cycle; null when the local database could not be read. */
  status: StatusReport | null;
  /** Why the cycle failed. */
  error?: unknown;
}

const EMPTY: UploadResult = emptyResult();

/** The download half: every --download-tables table; a failure fails the cycle (exit 1 or 3). */
export async function downloadTables(config: Config, local: Sql, remote: Sql): Promise<number> {
  try {
    const results = await download({ local, remote }, config.downloadTables);
    return results.reduce((n, r) => n + r.inserted + r.updated + r.deleted, 0);
  } catch (err) {
    if (err instanceof SchemaError) throw err;
    throw new CycleError(`download failed: ${describeError(err)}; nothing was changed locally`, {
      cause: err,
    });
  }
}

/**
 * Runs one cycle and never throws: a failure is reported in the result, with the
 * history, heartbeat and queue figures written as far as the databases allow.
 */
export async function runCycle(
  config: Config,
  ctx: CommandContext,
  hooks: CycleHooks = {},
): Promise<CycleReport> {
  const startedAt = new Date(ctx.clock.now());
  let result: UploadResult | null = null;
  // What committed before a failure still counts in the history.
  let partial: UploadResult = EMPTY;
  let downloaded = 0;
  let error: unknown;
  /** Set when the cycle went through and its bookkeeping is done. */
  let booked: { finishedAt: Date; status: StatusReport | null } | undefined;
  try {
    // No ping first: a database that does not answer yet is a transient fault, retried.
    await withPools(config, async (pools) => {
      if (hooks.wantsBacklog && hooks.onBacklog) {
        hooks.onBacklog(await queueSize(pools.local.sql, config.table));
      }
      // One lane per --parallel: lane 0 on these pools, the others on pools of their own.
      const shares = laneBatches(config.maxBatches, config.parallel);
      const sofar: UploadResult[] = shares.map(() => EMPTY);
      const lane = (i: number, lanePools: Pools) =>
        upload({
          ...lanePools,
          clock: ctx.clock,
          random: ctx.random,
          signal: ctx.signal,
        }, {
          table: config.table,
          batchSize: config.batchSize,
          maxBatches: shares[i],
          maxRetries: config.maxRetries,
          onBatch: (progress, batch) => {
            sofar[i] = progress;
            partial = sumResults(sofar);
            hooks.onBatch?.(partial, batch);
          },
          onRetry: hooks.onRetry,
        });
      try {
        const settled = await Promise.allSettled(
          shares.map((share, i) =>
            share === 0
              ? Promise.resolve(EMPTY)
              : i === 0
              ? lane(0, pools)
              : withPools(config, (own) => lane(i, own))
          ),
        );
        const failure = settled.find((s) => s.status === "rejected");
        if (failure) throw failure.reason;
        result = sumResults(
          settled.map((s) => (s as PromiseFulfilledResult<UploadResult>).value),
        );
      } finally {
        hooks.onUploadEnd?.();
      }
      // The reference data down after the upload; not after a stop signal.
      if (config.command !== "upload" && !result.stopped && !ctx.signal.aborted) {
        downloaded = await downloadTables(config, pools.local.sql, pools.remote.sql);
      }
      // The cycle went through: its bookkeeping uses the open pools (a fresh connection to
      // the remote costs several round trips on a slow link). Best effort, never a failure.
      const finishedAt = new Date(ctx.clock.now());
      const entry: CycleEntry = { outcome: "ok", startedAt, finishedAt, up: result, downloaded };
      const status = await recordLocally(config, pools.local.sql, entry)
        .catch((err) => localNotRecorded(err, "ok"));
      if (config.agentId) {
        await recordHeartbeatOf(config, pools.remote.sql, entry, status)
          .catch(heartbeatNotRecorded);
      }
      booked = { finishedAt, status };
    });
  } catch (err) {
    error = err;
  }
  const outcome = error === undefined ? "ok" : "failed";
  const up: UploadResult = result ?? partial;
  const { finishedAt, status: queue } = booked ??
    await recordFailedCycle(config, {
      outcome,
      startedAt,
      finishedAt: new Date(ctx.clock.now()),
      up,
      downloaded,
      error,
    });

  if (outcome === "ok") {
    const seconds = (finishedAt.getTime() - startedAt.getTime()) / 1000;
    log.info(
      "{command}: {rows} rows up, {down} rows down, {batches} batches in {seconds} s ({rate} rows/s); {left} left in the queue, {quarantined} quarantined{extra}",
      {
        command: config.command,
        rows: up.uploaded,
        down: downloaded,
        batches: up.batches,
        seconds: Number(seconds.toFixed(2)),
        rate: up.seconds > 0 ? Math.round(up.deleted / up.seconds) : 0,
        left: queue?.queue_size ?? null,
        quarantined: up.quarantined,
        skipped: up.skipped,
        retries: up.retries,
        stopped: up.stopped,
        extra: [
          up.skipped ? `; ${up.skipped} already on the remote` : "",
          up.stopped ? "; stopped by signal" : "",
        ].join(""),
      },
    );
  }
  return {
    outcome,
    startedAt,
    finishedAt,
    upload: result,
    downloaded,
    status: queue,
    ...(error === undefined ? {} : { error }),
  };
}

/** What the bookkeeping writes about one cycle. */
interface CycleEntry {
  outcome: "ok" | "failed";
  startedAt: Date;
  finishedAt: Date;
  up: UploadResult;
  downloaded: number;
  error?: unknown;
}

/**
 * The bookkeeping of a failed cycle: when a database is what failed, there is nowhere to
 * write, and a fresh connection with a short timeout finds out sooner than the cycle's pool.
 */
async function recordFailedCycle(
  config: Config,
  entry: CycleEntry,
): Promise<{ finishedAt: Date; status: StatusReport | null }> {
  const status = await withDatabases(
    { ...config, remote: undefined },
    (dbs) => recordLocally(config, dbs.local!, entry),
  ).catch((err) => localNotRecorded(err, entry.outcome));
  if (config.agentId && config.remote) {
    const remote = { ...config.remote, connectTimeout: Math.min(config.remote.connectTimeout, 5) };
    await withDatabases(
      { ...config, local: undefined, remote },
      (dbs) => recordHeartbeatOf(config, dbs.remote!, entry, status),
    ).catch(heartbeatNotRecorded);
  }
  return { finishedAt: entry.finishedAt, status };
}

/** The local run history, then the queue figures after the cycle. */
async function recordLocally(config: Config, local: Sql, e: CycleEntry): Promise<StatusReport> {
  await recordRun(local, {
    command: config.command,
    startedAt: e.startedAt,
    finishedAt: e.finishedAt,
    outcome: e.outcome,
    uploaded: e.up.uploaded,
    deleted: e.up.deleted,
    skipped: e.up.skipped,
    batches: e.up.batches,
    quarantined: e.up.quarantined,
    downloaded: e.downloaded,
    ...(e.error === undefined ? {} : { error: describeError(e.error) }),
  });
  // A cycle that went through without a stop or --max-batches ending it found the queue empty.
  const drained = e.outcome === "ok" && !e.up.stopped &&
    (config.maxBatches === undefined || e.up.batches < config.maxBatches);
  return await readStatus(local, config.table, { drained });
}

function localNotRecorded(err: unknown, outcome: "ok" | "failed"): null {
  // After a failed cycle the cause is reported once, by the caller; a local database
  // that is missing its tables or read-only fails here too, and saying so again would
  // make a second line for one fault.
  const said = { error: describeError(err) };
  if (outcome === "failed") {
    log.debug("could not record the cycle in the local history: {error}", said);
  } else log.warn("could not record the cycle in the local history: {error}", said);
  return null;
}

async function recordHeartbeatOf(
  config: Config,
  remote: Sql,
  e: CycleEntry,
  queue: StatusReport | null,
): Promise<void> {
  await recordHeartbeat(remote, {
    agentId: config.agentId!,
    version: VERSION,
    startedAt: e.startedAt,
    finishedAt: e.finishedAt,
    outcome: e.outcome,
    uploaded: e.up.uploaded,
    downloaded: e.downloaded,
    queueSize: queue?.queue_size ?? null,
    quarantined: queue?.quarantined ?? null,
    error: e.error === undefined ? null : describeError(e.error),
  });
}

function heartbeatNotRecorded(err: unknown): void {
  // Expected while the remote is down; a missing table means migrations are pending.
  const hint = /sync_agents/.test(describeError(err))
    ? " (run: meter-sync migrate --target remote)"
    : "";
  log.debug("heartbeat not recorded in sync_agents: {error}{hint}", {
    error: describeError(err),
    hint,
  });
}

/** `sync` and `upload`: one cycle; a failure becomes the exit code (main.ts reports it). */
export async function syncCommand(config: Config, ctx: CommandContext): Promise<number> {
  // On a terminal, a long drain shows a progress bar on stderr (ctx.progress is set only then).
  let bar: Progress | undefined;
  const terminal = ctx.progress;
  const hooks: CycleHooks = terminal
    ? {
      wantsBacklog: true,
      onBacklog: (backlog) => {
        if (shouldShowProgress({ isTerminal: true, logFormat: config.logFormat, backlog })) {
          bar = createProgress({
            total: backlog,
            write: terminal.write,
            now: () => ctx.clock.now(),
            columns: terminal.columns,
          });
          bar.update(0);
          // A warning during the drain erases the bar first; the next batch redraws it.
          const drawn = bar;
          beforeLogLine(() => drawn.clear());
        }
      },
      onBatch: (progress) => bar?.update(progress.deleted + progress.quarantined),
      onUploadEnd: () => {
        beforeLogLine(null);
        bar?.finish();
      },
    }
    : {};
  const report = await runCycle(config, ctx, hooks);
  if (report.error !== undefined) throw report.error;
  return 0;
}

export async function downloadCommand(config: Config, _ctx: CommandContext): Promise<number> {
  return await withPools(config, async ({ local, remote }) => {
    const rows = await downloadTables(config, local.sql, remote.sql);
    log.info("download: {rows} rows changed locally", { rows });
    return 0;
  });
}
