/** Retries an operation on transient faults, sleeping on an injected clock. */
import { backoffDelay } from "./backoff.ts";
import type { Clock } from "./commands/context.ts";

/** Thrown when the retries are used up; `cause` is the last error. */
export class RetryError extends Error {
  override name = "RetryError";
  constructor(readonly attempts: number, cause: unknown) {
    super(`gave up after ${attempts} attempts`, { cause });
  }
}

/** Options of {@link retry}. */
export interface RetryOptions {
  /** Retries after the first attempt. @default 3 */
  maxRetries?: number;
  /** Only errors for which this is true are retried; others are thrown at once. */
  isRetriable: (err: unknown) => boolean;
  clock: Clock;
  random: () => number;
  /** @default 200 */
  baseMs?: number;
  /** @default 10000 */
  capMs?: number;
  /** Aborting cuts a backoff sleep short and throws the abort reason. */
  signal?: AbortSignal;
  /** Told about each retry before its sleep (for the warning log line). */
  onRetry?: (err: unknown, retry: number, delayMs: number) => unknown;
}

/** Calls fn until it succeeds, a non-retriable error occurs, or the retries are used up. */
export async function retry<T>(
  fn: (attempt: number) => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const maxRetries = options.maxRetries ?? 3;
  for (let attempt = 0;; attempt++) {
    try {
      return await fn(attempt);
    } catch (err) {
      if (!options.isRetriable(err)) throw err;
      if (attempt >= maxRetries) throw new RetryError(attempt + 1, err);
      const delay = backoffDelay(attempt, {
        baseMs: options.baseMs,
        capMs: options.capMs,
        random: options.random,
      });
      await options.onRetry?.(err, attempt + 1, delay);
      await options.clock.sleep(delay, options.signal);
    }
  }
}
