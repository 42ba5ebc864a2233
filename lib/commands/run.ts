/**
 * `run`: the agent. Cycles on a schedule (--every or --cron), never two at once, each
 * delayed by a random jitter; after failures a capped backoff; a stop signal ends it
 * cleanly with exit 0 once the cycle in flight has finished its batch.
 */
import { getLogger } from "@logtape/logtape";
import type { Config } from "../config.ts";
import { formatDuration } from "../duration.ts";
import { ConfigError, describeError } from "../errors.ts";
import { Agent, tickEvery } from "../scheduler.ts";
import type { CommandContext } from "./context.ts";
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
      else {
        log.error("cycle failed: {error}", {
          error: describeError(report.error),
          failures: agent.failures + 1,
        });
      }
      hooks.onCycle?.(report, state);
      return report.outcome;
    },
    events: {
      skippedBusy: ({ runningForMs }) =>
        log.warn(
          "tick skipped: the previous cycle is still running ({running}); cycles never overlap",
          { running: formatDuration(runningForMs), runningMs: runningForMs },
        ),
      skippedBackoff: ({ failures, resumesInMs }) =>
        log.debug("tick skipped: backing off after {failures} failed cycles for {wait} more", {
          failures,
          wait: formatDuration(resumesInMs),
        }),
      backingOff: ({ failures, waitMs }) =>
        log.warn(
          "{failures} failed cycles in a row; the next one in {wait} at the earliest (backoff, capped at {cap}); nothing is lost meanwhile",
          {
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
  log.info("agent {agent} started: {schedule}{jitter}", {
    agent: config.agentId ?? null,
    schedule,
    jitter: config.jitterMs ? `, jitter up to ${formatDuration(config.jitterMs)}` : "",
  });
  if (config.everyMs !== undefined) {
    await tickEvery(ctx.clock, config.everyMs, ctx.signal, () => agent.tick());
  } else {
    if (!ctx.cron) throw new ConfigError("--cron is not available in this build");
    ctx.cron(config.cron!, ctx.signal, () => agent.tick());
    await new Promise<void>((resolve) => {
      if (ctx.signal.aborted) resolve();
      ctx.signal.addEventListener("abort", () => resolve(), { once: true });
    });
  }
  if (agent.cycles > 0) log.info("stopping: letting the cycle in flight finish its batch");
  await agent.idle();
  log.info("agent stopped after {cycles} cycles ({skipped} ticks skipped)", {
    cycles: agent.cycles,
    skipped: agent.skipped,
  });
  return state;
}

/** `run`: the agent until SIGINT/SIGTERM; exit 0 when it stopped cleanly. */
export async function runCommand(config: Config, ctx: CommandContext): Promise<number> {
  await runAgent(config, ctx);
  return 0;
}
