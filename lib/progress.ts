/** A one-line progress bar for a long drain on a terminal: rows done and left, rows/s, ETA. */

/** Options of {@link createProgress}. */
export interface ProgressOptions {
  /** Rows expected; grows when more than this get done (new readings arrived meanwhile). */
  total: number;
  /** Receives the text to print as is (it holds "\r", "\x1b[K" and the final "\n"). */
  write: (text: string) => void;
  /** Milliseconds, monotonic enough: the clock of the rate and the ETA. */
  now: () => number;
  /** Terminal width; the line always stays shorter, the bar goes first. @default 80 (also for 0) */
  columns?: number;
  /** Updates closer together than this are not drawn (finish() always is). @default 100 */
  minIntervalMs?: number;
  /** The rate is measured over this much recent history. @default 5000 */
  rateWindowMs?: number;
}

/** A progress line being drawn. */
export interface Progress {
  /** Rows done so far (cumulative); redraws unless the last draw is too recent. */
  update(done: number): void;
  /**
   * Erases the line, so that a log record can be written in its place; the next
   * update() draws again at once.
   */
  clear(): void;
  /** Draws the final state with the average rate and the time taken, then a newline. */
  finish(): void;
}

/** Options of {@link shouldShowProgress}. */
export interface ShowProgressOptions {
  /** Whether the stream the bar goes to is a terminal. */
  isTerminal: boolean;
  logFormat: "pretty" | "json";
  /** Rows in the queue when the cycle starts. */
  backlog: number;
  /** Smaller backlogs drain too fast for a bar to help. @default 2000 */
  threshold?: number;
}

/** A bar only for people watching a long drain: never in JSON logs nor into a pipe or file. */
export function shouldShowProgress(options: ShowProgressOptions): boolean {
  return options.isTerminal && options.logFormat === "pretty" &&
    options.backlog >= (options.threshold ?? 2000);
}

const CLEAR_TO_END = "\x1b[K";
const MIN_BAR = 10;
const MAX_BAR = 30;

/** 12,300 */
export function formatCount(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

/** m:ss, or h:mm:ss from one hour on. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** The line, without "\r": the parts by priority, the bar only when there is room. */
export function renderProgressLine(
  state: { done: number; total: number; rate: number | null; tail: string },
  columns: number,
): string {
  const { done, total, rate } = state;
  // In display order; `drop` says which go first when the terminal is narrow.
  const parts = [
    { text: `${formatCount(done)} / ${formatCount(total)} rows`, drop: 3 },
    { text: `${formatCount(Math.max(0, total - done))} left`, drop: 0 },
    { text: `${rate === null ? "-" : formatCount(rate)} rows/s`, drop: 1 },
    { text: state.tail, drop: 2 },
  ];
  // One column spare: writing into the last column wraps on some terminals.
  const width = Math.max(1, columns - 1);
  let text = "";
  for (let level = 0; level <= 3; level++) {
    text = parts.filter((p) => p.drop >= level).map((p) => p.text).join("  ");
    if (text.length <= width) break;
  }
  if (text.length > width) return text.slice(0, width);
  const room = width - text.length - 3; // "[", "]" and a space
  if (room < MIN_BAR) return text;
  const barWidth = Math.min(MAX_BAR, room);
  const fraction = total > 0 ? Math.min(1, done / total) : 1;
  const filled = Math.round(fraction * barWidth);
  return `[${"#".repeat(filled)}${".".repeat(barWidth - filled)}] ${text}`;
}

/** Starts a progress line at `now()`; nothing is drawn before the first update(). */
export function createProgress(options: ProgressOptions): Progress {
  // A pseudo-terminal without a size reports 0 columns: take the classic 80 then.
  const columns = options.columns && options.columns > 0 ? options.columns : 80;
  const minInterval = options.minIntervalMs ?? 100;
  const window = options.rateWindowMs ?? 5000;
  const started = options.now();
  let total = Math.max(0, options.total);
  let done = 0;
  let lastDraw: number | undefined;
  let finished = false;
  // Recent (time, done) samples for the current rate; the first one is the window's start.
  const samples: { t: number; done: number }[] = [{ t: started, done: 0 }];

  const currentRate = (t: number): number | null => {
    const first = samples[0];
    if (t - first.t <= 0) return null;
    return ((done - first.done) * 1000) / (t - first.t);
  };
  const draw = (line: string, end = "") => {
    options.write(`\r${line}${CLEAR_TO_END}${end}`);
  };

  return {
    update(value) {
      if (finished) return;
      const t = options.now();
      done = Math.max(done, value);
      if (done > total) total = done;
      samples.push({ t, done });
      while (samples.length > 1 && t - samples[1].t >= window) samples.shift();
      if (lastDraw !== undefined && t - lastDraw < minInterval) return;
      lastDraw = t;
      const rate = currentRate(t);
      const eta = rate === null || rate <= 0
        ? (total === done ? "ETA 0:00" : "ETA -:--")
        : `ETA ${formatDuration((total - done) / rate)}`;
      draw(renderProgressLine({ done, total, rate, tail: eta }, columns));
    },
    clear() {
      if (finished || lastDraw === undefined) return;
      options.write(`\r${CLEAR_TO_END}`);
      lastDraw = undefined;
    },
    finish() {
      if (finished) return;
      finished = true;
      const t = options.now();
      const seconds = (t - started) / 1000;
      const rate = seconds > 0 ? done / seconds : null;
      const tail = `took ${formatDuration(seconds)}`;
      draw(renderProgressLine({ done, total, rate, tail }, columns), "\n");
    },
  };
}

/** The width of the terminal, or undefined when there is none (a pipe, a pty without a size). */
export function terminalColumns(): number | undefined {
  try {
    return Deno.consoleSize().columns || undefined;
  } catch {
    return undefined;
  }
}
