/** Tests of lib/retry.ts and lib/backoff.ts on a fake clock and a fake random: nothing sleeps. */
import assert from "node:assert/strict";
import { backoffDelay } from "../lib/backoff.ts";
import type { Clock } from "../lib/commands/context.ts";
import { retry, RetryError } from "../lib/retry.ts";

/**
 * A clock that records every sleep and returns at once, advancing its own time. With
 * `hold`, a sleep stays pending until release() (or until its signal aborts), so that a
 * test can act while the retry loop is asleep. Like systemClock it rejects with the
 * signal's reason, at once when the signal is already aborted.
 */
function fakeClock(options: { hold?: boolean } = {}) {
  let time = 1_000_000;
  const sleeps: number[] = [];
  const pending: (() => void)[] = [];
  const clock: Clock = {
    now: () => time,
    sleep(ms, signal) {
      return new Promise<void>((resolve, reject) => {
        if (signal?.aborted) return reject(signal.reason);
        sleeps.push(ms);
        const done = () => {
          signal?.removeEventListener("abort", onAbort);
          time += ms;
          resolve();
        };
        const onAbort = () => reject(signal?.reason);
        signal?.addEventListener("abort", onAbort, { once: true });
        if (options.hold) pending.push(done);
        else done();
      });
    },
  };
  return {
    clock,
    sleeps,
    /** Sleeps started and not yet over. */
    get waiting() {
      return pending.length;
    },
    release: () => pending.shift()?.(),
  };
}

/** A random source that plays back the given values, then repeats the last. */
function fakeRandom(...values: number[]): () => number {
  let i = 0;
  return () => values[Math.min(i++, values.length - 1)];
}

class Transient extends Error {
  override name = "Transient";
}
class Permanent extends Error {
  override name = "Permanent";
}
const isTransient = (err: unknown) => err instanceof Transient;

/** An operation that fails with the given errors in turn, then returns "done". */
function failing(...errors: Error[]) {
  const attempts: number[] = [];
  const fn = (attempt: number) => {
    attempts.push(attempt);
    const err = errors[attempts.length - 1];
    return err ? Promise.reject(err) : Promise.resolve("done");
  };
  return { fn, attempts };
}

Deno.test("backoffDelay() stays within 0 and min(cap, base * 2^n) for every attempt", () => {
  const randoms = [0, 1e-9, 0.25, 0.5, 0.75, 0.999, 0.999999999];
  for (const [baseMs, capMs] of [[200, 10_000], [1, 50], [1000, 1000], [3, 1_000_000]]) {
    for (let n = 0; n <= 40; n++) {
      const ceiling = Math.min(capMs, baseMs * 2 ** n);
      for (const r of randoms) {
        const d = backoffDelay(n, { baseMs, capMs, random: () => r });
        assert.ok(Number.isInteger(d), `integer ms: ${d}`);
        assert.ok(d >= 0 && d < ceiling, `n=${n} base=${baseMs} cap=${capMs} r=${r}: ${d}`);
      }
    }
  }
});

Deno.test("backoffDelay() scales the random number to the ceiling (full jitter)", () => {
  assert.equal(backoffDelay(0, { baseMs: 200, capMs: 10_000, random: () => 0 }), 0);
  assert.equal(backoffDelay(5, { baseMs: 200, capMs: 10_000, random: () => 0 }), 0);
  // 0.999 lands just below the ceiling: 200, 400, 800, 1600 ms ...
  assert.equal(backoffDelay(0, { baseMs: 200, capMs: 10_000, random: () => 0.999 }), 199);
  assert.equal(backoffDelay(1, { baseMs: 200, capMs: 10_000, random: () => 0.999 }), 399);
  assert.equal(backoffDelay(3, { baseMs: 200, capMs: 10_000, random: () => 0.999 }), 1598);
  assert.equal(backoffDelay(2, { baseMs: 200, capMs: 10_000, random: () => 0.5 }), 400);
});

Deno.test("backoffDelay() never exceeds the cap, however many attempts", () => {
  for (const n of [6, 10, 52, 1023, 1024, 5000]) {
    const d = backoffDelay(n, { baseMs: 200, capMs: 10_000, random: () => 0.999 });
    assert.equal(d, 9990, `attempt ${n}`);
  }
});

Deno.test("backoffDelay() defaults to a 200 ms base and a 10 s cap", () => {
  assert.equal(backoffDelay(0, { random: () => 0.5 }), 100);
  assert.equal(backoffDelay(20, { random: () => 0.5 }), 5000);
});

Deno.test("retry() returns the value after transient failures, sleeping the jittered backoff", async () => {
  const fake = fakeClock();
  const op = failing(new Transient("one"), new Transient("two"));
  const value = await retry(op.fn, {
    isRetriable: isTransient,
    clock: fake.clock,
    random: fakeRandom(0.5, 0.25),
    baseMs: 100,
    capMs: 10_000,
  });
  assert.equal(value, "done");
  assert.deepEqual(op.attempts, [0, 1, 2]);
  assert.deepEqual(fake.sleeps, [50, 50]); // 0.5 * 100, then 0.25 * 200
});

Deno.test("retry() returns at once, without sleeping, when the first attempt succeeds", async () => {
  const fake = fakeClock();
  const op = failing();
  assert.equal(
    await retry(op.fn, { isRetriable: () => true, clock: fake.clock, random: Math.random }),
    "done",
  );
  assert.deepEqual(op.attempts, [0]);
  assert.deepEqual(fake.sleeps, []);
});

Deno.test("retry() throws a non-retriable error at once, without sleeping", async () => {
  const fake = fakeClock();
  const permanent = new Permanent("syntax error");
  const op = failing(permanent, new Transient("never reached"));
  await assert.rejects(
    retry(op.fn, { isRetriable: isTransient, clock: fake.clock, random: () => 0.5 }),
    (err) => err === permanent,
  );
  assert.deepEqual(op.attempts, [0]);
  assert.deepEqual(fake.sleeps, []);
});

Deno.test("retry() throws a non-retriable error that follows transient ones as it is", async () => {
  const fake = fakeClock();
  const permanent = new Permanent("constraint");
  const op = failing(new Transient("reset"), permanent);
  await assert.rejects(
    retry(op.fn, { isRetriable: isTransient, clock: fake.clock, random: () => 0.5 }),
    (err) => err === permanent,
  );
  assert.deepEqual(op.attempts, [0, 1]);
  assert.equal(fake.sleeps.length, 1);
});

Deno.test("retry() gives up after maxRetries with a RetryError carrying the attempts and the last error", async () => {
  const fake = fakeClock();
  const errors = [1, 2, 3, 4, 5, 6].map((i) => new Transient(`failure ${i}`));
  const op = failing(...errors);
  const err = await retry(op.fn, {
    maxRetries: 4,
    isRetriable: isTransient,
    clock: fake.clock,
    random: () => 0.999,
    baseMs: 10,
    capMs: 100,
  }).then(() => assert.fail("should have thrown"), (e) => e);
  assert.ok(err instanceof RetryError);
  assert.equal(err.attempts, 5);
  assert.equal(err.cause, errors[4]);
  assert.match(err.message, /5 attempts/);
  assert.deepEqual(op.attempts, [0, 1, 2, 3, 4]);
  assert.deepEqual(fake.sleeps, [9, 19, 39, 79]); // the 80 ms ceiling of attempt 3 is under the cap
});

Deno.test("retry() retries 3 times by default", async () => {
  const fake = fakeClock();
  const op = failing(...Array.from({ length: 10 }, () => new Transient("down")));
  const err = await retry(op.fn, { isRetriable: isTransient, clock: fake.clock, random: () => 0 })
    .then(() => assert.fail("should have thrown"), (e) => e);
  assert.ok(err instanceof RetryError);
  assert.equal(err.attempts, 4);
  assert.equal(op.attempts.length, 4);
  assert.deepEqual(fake.sleeps, [0, 0, 0]);
});

Deno.test("retry() with maxRetries 0 makes one attempt and never sleeps", async () => {
  const fake = fakeClock();
  const first = new Transient("refused");
  const op = failing(first, new Transient("never reached"));
  const err = await retry(op.fn, {
    maxRetries: 0,
    isRetriable: isTransient,
    clock: fake.clock,
    random: () => 0.5,
  }).then(() => assert.fail("should have thrown"), (e) => e);
  assert.ok(err instanceof RetryError);
  assert.equal(err.attempts, 1);
  assert.equal(err.cause, first);
  assert.deepEqual(op.attempts, [0]);
  assert.deepEqual(fake.sleeps, []);
});

Deno.test("retry() tells onRetry about each retry, numbered from 1, before its sleep", async () => {
  const fake = fakeClock();
  const errors = [new Transient("a"), new Transient("b"), new Transient("c")];
  const op = failing(...errors);
  const calls: { err: unknown; n: number; ms: number; sleptBefore: number }[] = [];
  await retry(op.fn, {
    maxRetries: 3,
    isRetriable: isTransient,
    clock: fake.clock,
    random: () => 0.5,
    baseMs: 100,
    onRetry: (err, n, ms) => calls.push({ err, n, ms, sleptBefore: fake.sleeps.length }),
  });
  assert.deepEqual(calls.map((c) => c.n), [1, 2, 3]);
  assert.deepEqual(calls.map((c) => c.err), errors);
  assert.deepEqual(calls.map((c) => c.ms), fake.sleeps);
  assert.deepEqual(calls.map((c) => c.sleptBefore), [0, 1, 2]);
});

Deno.test("retry() stops with the abort reason when the signal aborts during a backoff sleep", async () => {
  const fake = fakeClock({ hold: true });
  const stop = new AbortController();
  const op = failing(new Transient("a"), new Transient("b"));
  const running = retry(op.fn, {
    maxRetries: 5,
    isRetriable: isTransient,
    clock: fake.clock,
    random: () => 0.5,
    signal: stop.signal,
  });
  for (let i = 0; i < 100 && fake.waiting === 0; i++) await Promise.resolve();
  assert.equal(fake.waiting, 1, "the retry loop should be asleep");
  const reason = new DOMException("SIGTERM received", "AbortError");
  stop.abort(reason);
  await assert.rejects(running, (err) => err === reason);
  assert.deepEqual(op.attempts, [0], "no attempt after the abort");
  assert.equal(fake.sleeps.length, 1);
});

Deno.test("retry() makes no further attempt when the signal was aborted before the backoff", async () => {
  const fake = fakeClock();
  const stop = new AbortController();
  const op = failing(new Transient("a"), new Transient("b"));
  const running = retry(op.fn, {
    isRetriable: isTransient,
    clock: fake.clock,
    random: () => 0.5,
    signal: stop.signal,
    onRetry: () => stop.abort(new DOMException("SIGINT received", "AbortError")),
  });
  await assert.rejects(running, (err) => (err as Error).name === "AbortError");
  assert.deepEqual(op.attempts, [0]);
  assert.deepEqual(fake.sleeps, []);
});

Deno.test("retry() hands the attempt number, from 0, to the operation", async () => {
  const fake = fakeClock();
  const seen: number[] = [];
  const value = await retry((attempt) => {
    seen.push(attempt);
    return attempt < 2 ? Promise.reject(new Transient("x")) : Promise.resolve(attempt * 10);
  }, { isRetriable: isTransient, clock: fake.clock, random: () => 0 });
  assert.equal(value, 20);
  assert.deepEqual(seen, [0, 1, 2]);
});
