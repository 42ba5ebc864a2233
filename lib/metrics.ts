/** The agent's Prometheus metrics: a small registry rendered in the text exposition format 0.0.4. */

/** Upper bounds (seconds) of the batch duration histogram: a fast LAN batch to a stalled remote. */
export const BATCH_BUCKETS_S: readonly number[] = [
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
  30,
  60,
];

/**
 * SQLSTATE classes of the faults the agent retries (lib/errors.ts classifyError), shown at 0
 * from the start so that `rate()` works before the first retry. "none": a connection-level
 * error without SQLSTATE (refused, reset, timed out).
 */
const RETRY_CLASSES = ["08", "40", "53", "55", "57", "none"] as const;

/** Options of {@link Metrics}. */
export interface MetricsOptions {
  /** The release, shown as meter_sync_build_info{version="..."}. */
  version: string;
  /**
   * The last successful cycle before this process started (status' last_success_at), so that
   * meter_sync_last_success_timestamp_seconds survives a restart. @default 0 (never)
   */
  lastSuccessAtMs?: number | null;
  /** Histogram upper bounds in seconds, ascending; +Inf is added. @default BATCH_BUCKETS_S */
  buckets?: readonly number[];
}

/** What a cycle did, for {@link Metrics.cycleFinished}. */
export interface CycleFigures {
  /** Readings newly inserted on the remote in this cycle (UploadResult.uploaded). */
  uploaded: number;
  /** Reference rows written locally by the download in this cycle. */
  downloaded: number;
  /** When the cycle started; sets meter_sync_last_cycle_duration_seconds. */
  startedAtMs?: number;
  finishedAtMs: number;
}

/** The queue as read from the local database, for {@link Metrics.setQueue}. */
export interface QueueFigures {
  queueSize: number;
  /** Age of the oldest pending reading; null (empty queue) is shown as 0. */
  oldestPendingAgeS: number | null;
  quarantined: number;
}

/** A count that only grows: negative, NaN and infinite increments are ignored. */
function increment(value: number, by: number): number {
  return Number.isFinite(by) && by > 0 ? value + by : value;
}

/** A gauge value: anything not a finite number is shown as 0 rather than breaking a scrape. */
function finite(value: number | null | undefined): number {
  return typeof value === "number" && Number.isFinite(value) ? value : 0;
}

/** A sample value as Prometheus' Go parser reads it. */
function formatValue(n: number): string {
  if (Number.isNaN(n)) return "NaN";
  if (n === Infinity) return "+Inf";
  if (n === -Infinity) return "-Inf";
  return String(n);
}

/** Label values escape backslash, double quote and newline (exposition format 0.0.4). */
export function escapeLabelValue(value: string): string {
  return value.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/** HELP text escapes backslash and newline. */
function escapeHelp(text: string): string {
  return text.replaceAll("\\", "\\\\").replaceAll("\n", "\\n");
}

function labelSet(labels: Record<string, string>): string {
  const parts = Object.entries(labels).map(([k, v]) => `${k}="${escapeLabelValue(v)}"`);
  return parts.length ? `{${parts.join(",")}}` : "";
}

type Sample = [labels: Record<string, string>, value: number, suffix?: string];

function family(
  name: string,
  type: "counter" | "gauge" | "histogram",
  help: string,
  samples: Sample[],
): string {
  const lines = [`# HELP ${name} ${escapeHelp(help)}`, `# TYPE ${name} ${type}`];
  for (const [labels, value, suffix] of samples) {
    lines.push(`${name}${suffix ?? ""}${labelSet(labels)} ${formatValue(value)}`);
  }
  return lines.join("\n");
}

/**
 * The metrics of one agent process. The run loop calls the recording methods (all cheap and
 * synchronous); the HTTP server calls {@link render} on each scrape. Every series exists from
 * construction, at 0, so a scrape before the first cycle is complete.
 */
export class Metrics {
  readonly #version: string;
  readonly #buckets: readonly number[];
  #uploaded = 0;
  #downloaded = 0;
  /** Rows already added to #uploaded by batchDone() in the cycle under way. */
  #uploadedThisCycle = 0;
  #cycles = { ok: 0, failed: 0 };
  #lastSuccessS: number;
  #lastCycleS = 0;
  #retries = new Map<string, number>(RETRY_CLASSES.map((c) => [c, 0]));
  #queue: QueueFigures = { queueSize: 0, oldestPendingAgeS: null, quarantined: 0 };
  /** Non-cumulative counts per bucket; the last one is +Inf. */
  #bucketCounts: number[];
  #batchCount = 0;
  #batchSumMs = 0;

  constructor(options: MetricsOptions) {
    this.#version = options.version;
    const buckets = options.buckets ?? BATCH_BUCKETS_S;
    if (buckets.some((b, i) => !Number.isFinite(b) || (i > 0 && b <= buckets[i - 1]))) {
      throw new RangeError("histogram buckets must be finite and strictly ascending");
    }
    this.#buckets = [...buckets];
    this.#bucketCounts = new Array(buckets.length + 1).fill(0);
    this.#lastSuccessS = finite(options.lastSuccessAtMs) / 1000;
  }

  /**
   * After each uploaded batch: its duration goes into the histogram, and `rows`, the readings
   * it inserted on the remote, into meter_sync_rows_uploaded_total at once, so that the
   * counter moves while a long backlog drains rather than at the end of the cycle.
   */
  batchDone(ms: number, rows: number): void {
    if (Number.isFinite(ms) && ms >= 0) {
      const s = ms / 1000;
      let i = this.#buckets.findIndex((le) => s <= le);
      if (i === -1) i = this.#buckets.length;
      this.#bucketCounts[i]++;
      this.#batchCount++;
      this.#batchSumMs += ms;
    }
    const before = this.#uploaded;
    this.#uploaded = increment(this.#uploaded, rows);
    this.#uploadedThisCycle += this.#uploaded - before;
  }

  /**
   * At the end of each cycle, ok or failed. `uploaded` is the cycle's total: only the part
   * that batchDone() has not counted yet is added, so the counter is exact whether or not the
   * caller reports batches, and never goes back. For a failed cycle pass what did reach the
   * remote (batches committed before the failure), or 0 if batchDone() counted them.
   */
  cycleFinished(outcome: "ok" | "failed", figures: CycleFigures): void {
    this.#cycles[outcome]++;
    this.#uploaded = increment(this.#uploaded, figures.uploaded - this.#uploadedThisCycle);
    this.#uploadedThisCycle = 0;
    this.#downloaded = increment(this.#downloaded, figures.downloaded);
    if (outcome === "ok") this.#lastSuccessS = finite(figures.finishedAtMs) / 1000;
    if (figures.startedAtMs !== undefined) {
      this.#lastCycleS = Math.max(0, finite(figures.finishedAtMs - figures.startedAtMs)) / 1000;
    }
  }

  /** Before each retry of a transient fault; null is a connection error without SQLSTATE. */
  retried(sqlstate: string | null): void {
    const cls = sqlstate && /^[0-9A-Z]{2}/.test(sqlstate) ? sqlstate.slice(0, 2) : "none";
    this.#retries.set(cls, (this.#retries.get(cls) ?? 0) + 1);
  }

  /** The queue, quarantine and oldest pending age, as read after each cycle. */
  setQueue(figures: QueueFigures): void {
    this.#queue = { ...figures };
  }

  /** The text exposition format 0.0.4, ending with a newline. */
  render(): string {
    let cumulative = 0;
    const buckets: Sample[] = this.#bucketCounts.map((n, i) => {
      cumulative += n;
      const le = i < this.#buckets.length ? formatValue(this.#buckets[i]) : "+Inf";
      return [{ le }, cumulative, "_bucket"];
    });
    const retries: Sample[] = [...this.#retries.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([cls, n]) => [{ sqlstate_class: cls }, n]);
    const families = [
      family("meter_sync_build_info", "gauge", "The running release; always 1.", [
        [{ version: this.#version }, 1],
      ]),
      family(
        "meter_sync_queue_size",
        "gauge",
        "Readings waiting in the local queue (not synchronized, not quarantined).",
        [[{}, finite(this.#queue.queueSize)]],
      ),
      family(
        "meter_sync_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest reading in the local queue; 0 when the queue is empty.",
        [[{}, finite(this.#queue.oldestPendingAgeS)]],
      ),
      family(
        "meter_sync_quarantined",
        "gauge",
        "Readings the remote rejected for their data, held out of the queue until requeued.",
        [[{}, finite(this.#queue.quarantined)]],
      ),
      family(
        "meter_sync_rows_uploaded_total",
        "counter",
        "Readings inserted on the remote database.",
        [[{}, this.#uploaded]],
      ),
      family(
        "meter_sync_rows_downloaded_total",
        "counter",
        "Reference rows written to the local database by the download.",
        [[{}, this.#downloaded]],
      ),
      family("meter_sync_cycles_total", "counter", "Sync cycles finished, by outcome.", [
        [{ outcome: "ok" }, this.#cycles.ok],
        [{ outcome: "failed" }, this.#cycles.failed],
      ]),
      family(
        "meter_sync_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful cycle; 0 if none is known.",
        [[{}, this.#lastSuccessS]],
      ),
      family(
        "meter_sync_last_cycle_duration_seconds",
        "gauge",
        "Duration of the last finished cycle, ok or failed; 0 before the first.",
        [[{}, this.#lastCycleS]],
      ),
      family(
        "meter_sync_batch_duration_seconds",
        "histogram",
        "Time to upload one batch: claim, remote write and local delete, retries included.",
        [...buckets, [{}, this.#batchSumMs / 1000, "_sum"], [{}, this.#batchCount, "_count"]],
      ),
      family(
        "meter_sync_retries_total",
        "counter",
        'Retries of transient faults, by SQLSTATE class ("none": connection error without one).',
        retries,
      ),
    ];
    return families.join("\n") + "\n";
  }
}
