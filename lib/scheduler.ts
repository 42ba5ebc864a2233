/**
 * Scheduled mode without the side effects: ticks come from an interval loop or from cron
 * (main.ts registers Deno.cron); the agent runs at most one cycle at a time, delays each by
 * a random jitter and, after failures, waits with a capped, jittered backoff.
 */
import type { Clock } from "./commands/context.ts";

export type CycleOutcome = "ok" | "failed";

/** What the scheduler tells the log. */
export interface ScheduleEvents {
  /** A tick came while a cycle was still running: skipped, never run twice at once. */
  skippedBusy?(info: { runningForMs: number }): void;
  /** A tick came before the backoff after a failed cycle ended: skipped. */
  skippedBackoff?(info: { failures: number; resumesInMs: number }): void;
  /** A cycle failed; the next one runs no earlier than `waitMs` from now. */
  backingOff?(info: { failures: number; waitMs: number }): void;
}

/** Options of {@link Agent}. */
export interface AgentOptions {
  clock: Clock;
  random: () => number;
  /** Aborted on SIGINT/SIGTERM: no new cycle starts. */
  signal: AbortSignal;
  /** Upper bound of the random delay before each cycle. */
  jitterMs: number;
  /** The first backoff's scale: the interval (or a minute under cron). */
  baseBackoffMs: number;
  /** The longest backoff. */
  maxBackoffMs: number;
  /** One cycle; it must not throw (a failure is an outcome). */
  cycle: () => Promise<CycleOutcome>;
  events?: ScheduleEvents;
}

/**
 * The wait after `failures` failed cycles in a row: doubling from twice the base, capped,
 * with "equal jitter" (half fixed, half random) so that a fleet that lost the central
 * database at the same moment comes back spread out, not as a stampede.
 */
export function backoffAfter(
  failures: number,
  baseMs: number,
  capMs: number,
  random: () => number,
): number {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(failures, 30));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** Runs cycles on ticks, one at a time. */
export class Agent {
  #options: AgentOptions;
  #running: Promise<void> | null = null;
  #runningSince = 0;
  #failures = 0;
  #notBefore = 0;
  /** Ticks skipped so far, for tests and the log. */
  skipped = 0;
  /** Cycles started so far. */
  cycles = 0;

  constructor(options: AgentOptions) {
    this.#options = options;
  }

  /** Whether a cycle (or its jitter wait) is under way. */
  get busy(): boolean {
    return this.#running !== null;
  }

  /** Failed cycles in a row. */
  get failures(): number {
    return this.#failures;
  }

  /** Called on every tick of the schedule; never waits. */
  tick(): void {
    const { clock, signal, events } = this.#options;
    if (signal.aborted) return;
    const now = clock.now();
    if (this.#running) {
      this.skipped++;
      events?.skippedBusy?.({ runningForMs: now - this.#runningSince });
      return;
    }
    if (now < this.#notBefore) {
      this.skipped++;
      events?.skippedBackoff?.({ failures: this.#failures, resumesInMs: this.#notBefore - now });
      return;
    }
    this.#runningSince = now;
    this.#running = this.#run().finally(() => {
      this.#running = null;
    });
  }

  /** Resolves once no cycle is running (after a stop signal: the last one has finished). */
  async idle(): Promise<void> {
    while (this.#running) await this.#running;
  }

  async #run(): Promise<void> {
    const o = this.#options;
    if (o.jitterMs > 0) {
      try {
        await o.clock.sleep(Math.round(o.random() * o.jitterMs), o.signal);
      } catch {
        return; // stopped while waiting: no cycle
      }
    }
    if (o.signal.aborted) return;
    this.cycles++;
    const outcome = await o.cycle();
    if (outcome === "ok") {
      this.#failures = 0;
      this.#notBefore = 0;
      return;
    }
    this.#failures++;
    const waitMs = backoffAfter(this.#failures, o.baseBackoffMs, o.maxBackoffMs, o.random);
    this.#notBefore = o.clock.now() + waitMs;
    o.events?.backingOff?.({ failures: this.#failures, waitMs });
  }
}

/**
 * `--every`: a tick at start and then every `everyMs`, on a fixed grid (a slow cycle does
 * not shift the schedule; its ticks are skipped). Returns when the signal aborts.
 */
export async function tickEvery(
  clock: Clock,
  everyMs: number,
  signal: AbortSignal,
  tick: () => void,
): Promise<void> {
  let due = clock.now();
  while (!signal.aborted) {
    tick();
    due += everyMs;
    const now = clock.now();
    // The process was suspended or starved past whole ticks: skip to the grid ahead.
    if (due < now) due += Math.ceil((now - due) / everyMs) * everyMs;
    try {
      await clock.sleep(due - now, signal);
    } catch {
      return;
    }
  }
}
