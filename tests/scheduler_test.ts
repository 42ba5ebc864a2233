/** The run mode's scheduling on a virtual clock: grid ticks, no overlap, jitter, capped backoff. */
import assert from "node:assert/strict";
import type { Clock } from "../lib/commands/context.ts";
import {
  Agent,
  type AgentOptions,
  backoffAfter,
  type CycleOutcome,
  tickEvery,
} from "../lib/scheduler.ts";

/** Time that moves only when the test says; sleeps wake in order of their due time. */
class VirtualClock implements Clock {
  t = 0;
  #timers: { due: number; wake: () => void }[] = [];
  now = () => this.t;
  sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
    new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      const timer = { due: this.t + Math.max(0, ms), wake: resolve };
      this.#timers.push(timer);
      signal?.addEventListener("abort", () => {
        this.#timers = this.#timers.filter((x) => x !== timer);
        reject(signal.reason);
      }, { once: true });
    });
  /** Moves time forward by ms, waking every sleep that falls due on the way. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    for (;;) {
      await settle();
      this.#timers.sort((a, b) => a.due - b.due);
      const next = this.#timers[0];
      if (!next || next.due > end) break;
      this.#timers.shift();
      this.t = next.due;
      next.wake();
    }
    this.t = end;
    await settle();
  }
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 0));

interface Harness {
  clock: VirtualClock;
  agent: Agent;
  stop: AbortController;
  /** Start times (virtual ms) of each cycle. */
  starts: number[];
  maxConcurrent: number;
  events: string[];
  loop: Promise<void>;
}

function harness(
  options: Partial<AgentOptions> & { everyMs: number; cycleMs?: (n: number) => number },
  outcomes: (n: number) => CycleOutcome = () => "ok",
): Harness {
  const clock = new VirtualClock();
  const stop = new AbortController();
  const h = { clock, stop, starts: [] as number[], maxConcurrent: 0, events: [] as string[] } as
    & Harness
    & { running: number };
  h.running = 0;
  h.agent = new Agent({
    clock,
    random: () => 0.5,
    signal: stop.signal,
    jitterMs: 0,
    baseBackoffMs: options.everyMs,
    maxBackoffMs: 60_000,
    cycle: async () => {
      const n = h.starts.push(clock.now());
      h.running++;
      h.maxConcurrent = Math.max(h.maxConcurrent, h.running);
      await clock.sleep(options.cycleMs?.(n) ?? 100);
      h.running--;
      return outcomes(n);
    },
    events: {
      skippedBusy: ({ runningForMs }) => h.events.push(`busy ${runningForMs}`),
      skippedBackoff: ({ failures }) => h.events.push(`backoff-skip ${failures}`),
      backingOff: ({ failures, waitMs }) => h.events.push(`backoff ${failures} ${waitMs}`),
    },
    ...options,
  });
  h.loop = tickEvery(clock, options.everyMs, stop.signal, () => h.agent.tick());
  return h;
}

/** Stops the loop and lets the cycle in flight (if any) finish in virtual time. */
async function finish(h: Harness): Promise<void> {
  h.stop.abort();
  await h.loop;
  const idle = h.agent.idle();
  await h.clock.advance(60_000);
  await idle;
}

Deno.test("--every starts a cycle at once and then on a fixed grid", async () => {
  const h = harness({ everyMs: 1000 });
  await h.clock.advance(3500);
  await finish(h);
  assert.deepEqual(h.starts, [0, 1000, 2000, 3000]);
  assert.deepEqual(h.events, []);
});

Deno.test("a cycle slower than the interval never overlaps: its ticks are skipped and reported", async () => {
  const h = harness({ everyMs: 1000, cycleMs: (n) => (n === 1 ? 2500 : 100) });
  await h.clock.advance(4500);
  await finish(h);
  assert.equal(h.maxConcurrent, 1);
  // Ticks at 1000 and 2000 came while the first cycle ran (until 2500); 3000 and 4000 ran.
  assert.deepEqual(h.starts, [0, 3000, 4000]);
  assert.deepEqual(h.events, ["busy 1000", "busy 2000"]);
  assert.equal(h.agent.skipped, 2);
});

Deno.test("--jitter delays each cycle by random() x jitter after its tick", async () => {
  const h = harness({ everyMs: 10_000, jitterMs: 4000, random: () => 0.25 });
  await h.clock.advance(25_000);
  await finish(h);
  assert.deepEqual(h.starts, [1000, 11_000, 21_000]);
});

Deno.test("failed cycles back off, doubling and capped; one success resets the backoff", async () => {
  // Cycles 1-4 fail, then all succeed.
  const h = harness(
    { everyMs: 1000, maxBackoffMs: 8000, random: () => 1 },
    (n) => (n <= 4 ? "failed" : "ok"),
  );
  await h.clock.advance(40_000);
  await finish(h);
  const backoffs = h.events.filter((e) => e.startsWith("backoff "));
  // random() = 1: the full ceiling, 2 s, 4 s, 8 s, then the 8 s cap.
  assert.deepEqual(backoffs, [
    "backoff 1 2000",
    "backoff 2 4000",
    "backoff 3 8000",
    "backoff 4 8000",
  ]);
  // Each cycle ends 100 ms after its start; the next starts on the first tick after the wait.
  assert.deepEqual(h.starts.slice(0, 6), [0, 3000, 8000, 17_000, 26_000, 27_000]);
  assert.equal(h.agent.failures, 0);
  assert.ok(h.events.includes("backoff-skip 1"));
});

Deno.test("backoffAfter() spreads a fleet between half and all of the capped ceiling", () => {
  assert.equal(backoffAfter(1, 30_000, 600_000, () => 0), 30_000);
  assert.equal(backoffAfter(1, 30_000, 600_000, () => 1), 60_000);
  assert.equal(backoffAfter(5, 30_000, 600_000, () => 0), 300_000);
  // Hours of outage: never more than the cap, never less than half of it.
  for (const r of [0, 0.3, 0.999]) {
    const ms = backoffAfter(500, 30_000, 600_000, () => r);
    assert.ok(ms >= 300_000 && ms <= 600_000, String(ms));
  }
});

Deno.test("a stop signal starts no new cycle and idle() waits for the one in flight", async () => {
  const h = harness({ everyMs: 1000, cycleMs: () => 5000 });
  await h.clock.advance(2000);
  h.stop.abort();
  await h.loop;
  let idle = false;
  const waiting = h.agent.idle().then(() => (idle = true));
  await h.clock.advance(1000);
  assert.equal(idle, false, "the cycle in flight is still finishing");
  await h.clock.advance(3000);
  await waiting;
  assert.deepEqual(h.starts, [0]);
  h.agent.tick();
  await h.clock.advance(1000);
  assert.deepEqual(h.starts, [0], "no tick is honoured after the stop");
});

Deno.test("a stop during the jitter wait runs no cycle", async () => {
  const h = harness({ everyMs: 10_000, jitterMs: 5000, random: () => 1 });
  await h.clock.advance(2000);
  await finish(h);
  assert.deepEqual(h.starts, []);
});
