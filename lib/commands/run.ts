/**
 * `run`: the agent. Cycles on a schedule (--every or --cron), never two at once, each
 * delayed by a random jitter; after failures a capped backoff; a stop signal ends it
 * cleanly with exit 0 once the cycle in flight has finished its batch.
 */
import { getLogger } from "@logtape/logtape";
import type { Config } from "../config.ts";
import { withDatabases } from "../connections.ts";
import type { DbTarget } from "../db_url.ts";
import { formatDuration } from "../duration.ts";
import { ConfigError, describeError } from "../errors.ts";
import { healthOf } from "../health.ts";
import { startHttpServer } from "../http.ts";
import { Metrics } from "../metrics.ts";
import { Agent, tickEvery } from "../scheduler.ts";
import { readStatus } from "../status.ts";
import { VERSION } from "../version.ts";
import type { CommandContext } from "./context.ts";
import { collectStatus } from "./status.ts";
import { type CycleReport, runCycle } from "./sync.ts";

const log = getLogger(["meter-sync", "run"]);

/** What the agent knows about itself between cycles (for /healthz, /metrics and the log). */
export interface AgentState {
  startedAtMs: number;
  lastSuccessAtMs: number | null;
  lastReport: CycleReport | null;
}

/** Options of {@link runAgent} beyond the config: observers of each cycle. */
export interface RunHooks {
  /** Called after every cycle (metrics, health). */
  onCycle?: (report: CycleReport, state: AgentState) => void;
  /** Extra hooks handed to every cycle. */
  cycle?: Parameters<typeof runCycle>[2];
}

/** Runs cycles until ctx.signal aborts; resolves once the last cycle has finished. */
export async function runAgent(
  config: Config,
  ctx: CommandContext,
  hooks: RunHooks = {},
): Promise<AgentState> {
  const state: AgentState = {
    startedAtMs: ctx.clock.now(),
    lastSuccessAtMs: null,
    lastReport: null,
  };
  const agent = new Agent({
    clock: ctx.clock,
    random: ctx.random,
    signal: ctx.signal,
    jitterMs: config.jitterMs,
    baseBackoffMs: config.everyMs ?? 60_000,
    maxBackoffMs: config.maxBackoffMs,
    cycle: async () => {
      const report = await runCycle(config, ctx, hooks.cycle);
      state.lastReport = report;
      if (report.outcome === "ok") state.lastSuccessAtMs = report.finishedAt.getTime();
      hooks.onCycle?.(report, state);
      return report.outcome;
    },
    events: {
      skippedBusy: ({ runningForMs }) =>
        log.info(
          "tick skipped: the previous cycle is still running ({running}); cycles never overlap",
          { running: formatDuration(runningForMs), runningMs: runningForMs },
        ),
      skippedBackoff: ({ failures, resumesInMs }) =>
        log.debug("tick skipped: backing off after {failures} failed cycles for {wait} more", {
          failures,
          wait: formatDuration(resumesInMs),
        }),
      backingOff: ({ failures, waitMs }) =>
        log.error(
          "cycle failed: {error}; {failures} failed cycles in a row; the next one in {wait} at the earliest (backoff, capped at {cap}); the readings wait in the local queue",
          {
            error: describeError(state.lastReport?.error),
            failures,
            wait: formatDuration(waitMs),
            waitMs,
            cap: formatDuration(config.maxBackoffMs),
          },
        ),
    },
  });

  const schedule = config.everyMs !== undefined
    ? `every ${formatDuration(config.everyMs)}`
    : `cron "${config.cron}" (UTC)`;
  const started = () =>
    log.info("agent {agent} started: {schedule}{jitter}", {
      agent: config.agentId ?? null,
      schedule,
      jitter: config.jitterMs ? `, jitter up to ${formatDuration(config.jitterMs)}` : "",
    });
  if (config.everyMs !== undefined) {
    started();
    await tickEvery(ctx.clock, config.everyMs, ctx.signal, () => agent.tick());
  } else {
    if (!ctx.cron) throw new ConfigError("--cron is not available in this build");
    ctx.cron(config.cron!, ctx.signal, () => agent.tick());
    started();
    await new Promise<void>((resolve) => {
      if (ctx.signal.aborted) resolve();
      ctx.signal.addEventListener("abort", () => resolve(), { once: true });
    });
  }
  if (agent.busy) log.info("stopping: letting the cycle in flight finish its batch");
  await agent.idle();
  log.info("agent stopped after {cycles} cycles ({skipped} ticks skipped)", {
    cycles: agent.cycles,
    skipped: agent.skipped,
  });
  return state;
}

/** Whether a database answers a query within a few seconds. */
async function answers(config: Config, side: "local" | "remote"): Promise<boolean> {
  const target = config[side] as DbTarget;
  const quick = { ...target, connectTimeout: Math.min(target.connectTimeout, 3) };
  const only = side === "local"
    ? { ...config, local: quick, remote: undefined }
    : { ...config, local: undefined, remote: quick };
  try {
    return await withDatabases(only, async (dbs) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        await Promise.race([
          dbs[side]!`SELECT 1`,
          new Promise((_, reject) => timer = setTimeout(() => reject(new Error("timeout")), 3000)),
        ]);
      } finally {
        clearTimeout(timer);
      }
      return true;
    });
  } catch {
    return false;
  }
}

/** `run`: the agent until SIGINT/SIGTERM; exit 0 when it stopped cleanly. */
export async function runCommand(config: Config, ctx: CommandContext): Promise<number> {
  // The last success survives a restart: it is in the local history.
  const before = await withDatabases(
    { ...config, remote: undefined },
    ({ local }) => readStatus(local!, config.table, { staleAfterMs: config.staleAfterMs }),
  )
    .catch(() => null);
  const lastSuccessAtMs = before?.last_success_at ? Date.parse(before.last_success_at) : null;
  const metrics = new Metrics({ version: VERSION, lastSuccessAtMs });
  if (before) {
    metrics.setQueue({
      queueSize: before.queue_size,
      oldestPendingAgeS: before.oldest_pending_age_s,
      quarantined: before.quarantined,
    });
  }
  const startedAtMs = ctx.clock.now();
  let state: AgentState = { startedAtMs, lastSuccessAtMs, lastReport: null };
  let counted = 0; // rows of the cycle in flight already in the uploaded counter
  const hooks: RunHooks = {
    cycle: {
      onBatch: (progress, batch) => {
        metrics.batchDone(batch.ms, progress.uploaded - counted);
        counted = progress.uploaded;
      },
      onRetry: ({ sqlstate }) => metrics.retried(sqlstate),
    },
    onCycle: (report, now) => {
      counted = 0;
      state = now;
      metrics.cycleFinished(report.outcome, {
        uploaded: report.upload?.uploaded ?? 0,
        downloaded: report.downloaded,
        startedAtMs: report.startedAt.getTime(),
        finishedAtMs: report.finishedAt.getTime(),
      });
      if (report.status) {
        metrics.setQueue({
          queueSize: report.status.queue_size,
          oldestPendingAgeS: report.status.oldest_pending_age_s,
          quarantined: report.status.quarantined,
        });
      }
    },
  };

  let server: ReturnType<typeof startHttpServer> | undefined;
  const stopHttp = new AbortController();
  if (config.http) {
    // Probes are cached briefly: a monitor polling /healthz must not hammer the databases.
    let probed: { at: number; local: boolean; remote: boolean } | null = null;
    server = startHttpServer({
      ...config.http,
      signal: stopHttp.signal,
      secrets: config.secrets,
      metrics: () => metrics.render(),
      health: async () => {
        const nowMs = ctx.clock.now();
        if (!probed || nowMs - probed.at > 2000) {
          const [local, remote] = await Promise.all([
            answers(config, "local"),
            answers(config, "remote"),
          ]);
          probed = { at: ctx.clock.now(), local, remote };
        }
        const last = state.lastReport;
        const health = healthOf({
          nowMs,
          lastSuccessAtMs: state.lastSuccessAtMs ?? lastSuccessAtMs,
          startedAtMs,
          staleAfterMs: config.staleAfterMs,
          localReachable: probed.local,
          remoteReachable: probed.remote,
          lastError: last?.outcome === "failed" ? describeError(last.error) : null,
        });
        return { status: health.status, body: { ok: health.ok, reasons: health.reasons } };
      },
      status: () => collectStatus(config, ctx.clock.now()),
      onListen: (addr) =>
        log.info("serving /metrics, /healthz and /status on http://{host}:{port}", {
          host: addr.hostname.includes(":") ? `[${addr.hostname}]` : addr.hostname,
          port: addr.port,
        }),
    });
  }
  try {
    await runAgent(config, ctx, hooks);
  } finally {
    stopHttp.abort();
    await server?.finished;
  }
  return 0;
}
