/** What main.ts hands every command: where output goes, the clock, the stop signal. */

/** A source of time, injected so that retries and schedules are testable without sleeping. */
export interface Clock {
  now(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

/** The real clock. */
export const systemClock: Clock = {
  now: () => Date.now(),
  sleep: (ms, signal) =>
    new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(signal.reason);
      const timer = setTimeout(() => {
        signal?.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      const onAbort = () => {
        clearTimeout(timer);
        reject(signal?.reason);
      };
      signal?.addEventListener("abort", onAbort, { once: true });
    }),
};

/** The side effects a command may use, all owned by main.ts. */
export interface CommandContext {
  /** Writes one line of the command's result to stdout. */
  out(line: string): void;
  /** Aborted on SIGINT/SIGTERM: finish the batch in flight, then stop. */
  signal: AbortSignal;
  clock: Clock;
  random: () => number;
  /** Whether stdout is a terminal (progress bars, colours). */
  isTerminal: boolean;
  /** Raw text to stderr when it is a terminal (a progress bar) and its width; absent otherwise. */
  progress?: { write(text: string): void; columns?: number };
  /**
   * Calls handler on a five-field cron schedule until signal aborts (Deno.cron in main.ts);
   * throws a ConfigError for a schedule cron does not accept.
   */
  cron?: (schedule: string, signal: AbortSignal, handler: () => void) => void;
}
