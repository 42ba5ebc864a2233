/** Exponential backoff with full jitter: the pure arithmetic, apart from any clock. */

/** Options of {@link backoffDelay}. */
export interface BackoffOptions {
  /** Delay scale of the first retry, in ms. @default 200 */
  baseMs?: number;
  /** No delay is longer than this, in ms. @default 10000 */
  capMs?: number;
  /** A number in [0, 1): Math.random in production, a constant in tests. */
  random: () => number;
}

/**
 * The delay before retry number `attempt` (0 for the first retry): a uniformly random
 * time between 0 and min(cap, base * 2^attempt), so that a fleet of agents that failed
 * together does not retry together ("full jitter").
 */
export function backoffDelay(attempt: number, options: BackoffOptions): number {
  const base = options.baseMs ?? 200;
  const cap = options.capMs ?? 10_000;
  const ceiling = Math.min(cap, base * 2 ** Math.max(0, attempt));
  return Math.floor(options.random() * ceiling);
}
