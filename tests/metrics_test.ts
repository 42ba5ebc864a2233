/** Tests of lib/metrics.ts: what a Prometheus scrape reads, checked with an independent parser. */
import assert from "node:assert/strict";
import parsePrometheusTextFormatUntyped from "parse-prometheus-text-format";
import { BATCH_BUCKETS_S, escapeLabelValue, Metrics } from "../lib/metrics.ts";

/** One metric family as parse-prometheus-text-format returns it (prom2json's shape). */
interface Family {
  name: string;
  help: string;
  type: string;
  metrics: {
    value?: string;
    labels?: Record<string, string>;
    buckets?: Record<string, string>;
    count?: string;
    sum?: string;
  }[];
}

// The package is CommonJS without type declarations.
const parse = parsePrometheusTextFormatUntyped as unknown as (text: string) => Family[];

const EXPECTED_TYPES: Record<string, string> = {
  meter_sync_build_info: "GAUGE",
  meter_sync_queue_size: "GAUGE",
  meter_sync_oldest_pending_age_seconds: "GAUGE",
  meter_sync_quarantined: "GAUGE",
  meter_sync_rows_uploaded_total: "COUNTER",
  meter_sync_rows_downloaded_total: "COUNTER",
  meter_sync_cycles_total: "COUNTER",
  meter_sync_last_success_timestamp_seconds: "GAUGE",
  meter_sync_last_cycle_duration_seconds: "GAUGE",
  meter_sync_batch_duration_seconds: "HISTOGRAM",
  meter_sync_retries_total: "COUNTER",
};

function scrape(metrics: Metrics): Map<string, Family> {
  const text = metrics.render();
  assert.ok(text.endsWith("\n"), "the exposition ends with a newline");
  const families = parse(text);
  const byName = new Map(families.map((f) => [f.name, f]));
  assert.equal(byName.size, families.length, "each family appears once");
  return byName;
}

/** The single value of an unlabelled family, or of the series with these labels. */
function value(families: Map<string, Family>, name: string, labels?: Record<string, string>) {
  const family = families.get(name);
  assert.ok(family, `${name} is exposed`);
  const series = family.metrics.filter((m) =>
    labels ? Object.entries(labels).every(([k, v]) => m.labels?.[k] === v) : m.labels === undefined
  );
  assert.equal(series.length, 1, `${name} ${JSON.stringify(labels ?? {})} is one series`);
  return Number(series[0].value);
}

Deno.test("render() exposes every metric with its type and help before the first cycle", () => {
  const families = scrape(new Metrics({ version: "0.1.0" }));
  assert.deepEqual([...families.keys()].sort(), Object.keys(EXPECTED_TYPES).sort());
  for (const [name, type] of Object.entries(EXPECTED_TYPES)) {
    const family = families.get(name)!;
    assert.equal(family.type, type, name);
    assert.ok(family.help.length > 10, `${name} has help`);
    if (type === "COUNTER") assert.match(name, /_total$/);
  }
  for (
    const name of [
      "meter_sync_queue_size",
      "meter_sync_oldest_pending_age_seconds",
      "meter_sync_quarantined",
      "meter_sync_rows_uploaded_total",
      "meter_sync_rows_downloaded_total",
      "meter_sync_last_success_timestamp_seconds",
      "meter_sync_last_cycle_duration_seconds",
    ]
  ) {
    assert.equal(value(families, name), 0, name);
  }
  assert.equal(value(families, "meter_sync_cycles_total", { outcome: "ok" }), 0);
  assert.equal(value(families, "meter_sync_cycles_total", { outcome: "failed" }), 0);
  for (const cls of ["08", "40", "53", "55", "57", "none"]) {
    assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: cls }), 0, cls);
  }
  assert.equal(value(families, "meter_sync_build_info", { version: "0.1.0" }), 1);
  const [histogram] = families.get("meter_sync_batch_duration_seconds")!.metrics;
  assert.equal(histogram.count, "0");
  assert.equal(histogram.sum, "0");
  assert.equal(Object.keys(histogram.buckets!).length, BATCH_BUCKETS_S.length + 1);
  assert.ok(Object.values(histogram.buckets!).every((n) => n === "0"));
});

Deno.test("render() after a realistic run shows counters, gauges and a cumulative histogram", () => {
  const t0 = Date.UTC(2025, 5, 1, 12, 0, 0);
  const metrics = new Metrics({ version: "0.1.0" });
  // Cycle 1: three batches of 100, then the remote goes away for good.
  metrics.batchDone(42, 100);
  metrics.batchDone(38, 100);
  metrics.batchDone(1_250, 100);
  metrics.retried("57P01");
  metrics.retried(null);
  metrics.retried(null);
  metrics.retried("08006");
  metrics.cycleFinished("failed", {
    uploaded: 300,
    downloaded: 0,
    startedAtMs: t0,
    finishedAtMs: t0 + 9_000,
  });
  // Cycle 2: the rest of the backlog without per-batch reports of rows, plus the download.
  metrics.batchDone(3, 0);
  metrics.batchDone(75_000, 0);
  metrics.retried("40001");
  metrics.cycleFinished("ok", {
    uploaded: 57,
    downloaded: 12,
    startedAtMs: t0 + 30_000,
    finishedAtMs: t0 + 105_500,
  });
  metrics.setQueue({ queueSize: 4, oldestPendingAgeS: 31, quarantined: 2 });

  const families = scrape(metrics);
  assert.equal(value(families, "meter_sync_rows_uploaded_total"), 357);
  assert.equal(value(families, "meter_sync_rows_downloaded_total"), 12);
  assert.equal(value(families, "meter_sync_cycles_total", { outcome: "ok" }), 1);
  assert.equal(value(families, "meter_sync_cycles_total", { outcome: "failed" }), 1);
  assert.equal(value(families, "meter_sync_last_success_timestamp_seconds"), (t0 + 105_500) / 1000);
  assert.equal(value(families, "meter_sync_last_cycle_duration_seconds"), 75.5);
  assert.equal(value(families, "meter_sync_queue_size"), 4);
  assert.equal(value(families, "meter_sync_oldest_pending_age_seconds"), 31);
  assert.equal(value(families, "meter_sync_quarantined"), 2);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "57" }), 1);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "none" }), 2);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "08" }), 1);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "40" }), 1);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "53" }), 0);

  const [histogram] = families.get("meter_sync_batch_duration_seconds")!.metrics;
  assert.equal(histogram.count, "5");
  assert.ok(Math.abs(Number(histogram.sum) - 76.333) < 1e-9, histogram.sum);
  const buckets = histogram.buckets!;
  assert.equal(buckets["0.005"], "1"); // 3 ms
  assert.equal(buckets["0.025"], "1");
  assert.equal(buckets["0.05"], "3"); // + 42 ms, 38 ms
  assert.equal(buckets["1"], "3");
  assert.equal(buckets["2.5"], "4"); // + 1.25 s
  assert.equal(buckets["60"], "4");
  assert.equal(buckets["+Inf"], "5"); // + 75 s
  // Cumulative: never decreasing, in the order of the bounds.
  const counts = [...BATCH_BUCKETS_S.map(String), "+Inf"].map((le) => Number(buckets[le]));
  assert.deepEqual(counts, [...counts].sort((a, b) => a - b));
});

Deno.test("batchDone() moves the upload counter during a cycle and cycleFinished() adds only the rest", () => {
  const metrics = new Metrics({ version: "0.1.0" });
  metrics.batchDone(10, 100);
  metrics.batchDone(10, 100);
  assert.equal(value(scrape(metrics), "meter_sync_rows_uploaded_total"), 200);
  metrics.cycleFinished("ok", { uploaded: 250, downloaded: 0, finishedAtMs: 1_000 });
  assert.equal(value(scrape(metrics), "meter_sync_rows_uploaded_total"), 250);
  // A caller that over-reported batches: the counter does not go back.
  metrics.batchDone(10, 100);
  metrics.cycleFinished("ok", { uploaded: 90, downloaded: 0, finishedAtMs: 2_000 });
  metrics.cycleFinished("ok", { uploaded: 5, downloaded: 0, finishedAtMs: 3_000 });
  assert.equal(value(scrape(metrics), "meter_sync_rows_uploaded_total"), 355);
});

Deno.test("a failed cycle keeps the last success and an empty queue shows age 0", () => {
  const metrics = new Metrics({ version: "0.1.0", lastSuccessAtMs: 1_700_000_000_000 });
  assert.equal(value(scrape(metrics), "meter_sync_last_success_timestamp_seconds"), 1_700_000_000);
  metrics.cycleFinished("failed", { uploaded: 0, downloaded: 0, finishedAtMs: 1_700_000_060_000 });
  metrics.setQueue({ queueSize: 0, oldestPendingAgeS: null, quarantined: 0 });
  const families = scrape(metrics);
  assert.equal(value(families, "meter_sync_last_success_timestamp_seconds"), 1_700_000_000);
  assert.equal(value(families, "meter_sync_oldest_pending_age_seconds"), 0);
});

Deno.test("counters ignore negative and non-finite figures instead of going back or breaking", () => {
  const metrics = new Metrics({ version: "0.1.0" });
  metrics.cycleFinished("ok", { uploaded: 10, downloaded: 3, finishedAtMs: 1_000 });
  metrics.cycleFinished("ok", { uploaded: -5, downloaded: NaN, finishedAtMs: 2_000 });
  metrics.batchDone(NaN, Infinity);
  metrics.setQueue({ queueSize: NaN, oldestPendingAgeS: Infinity, quarantined: 1 });
  const text = metrics.render();
  assert.doesNotMatch(text, /NaN|Inf[^"]/);
  const families = scrape(metrics);
  assert.equal(value(families, "meter_sync_rows_uploaded_total"), 10);
  assert.equal(value(families, "meter_sync_rows_downloaded_total"), 3);
  assert.equal(families.get("meter_sync_batch_duration_seconds")!.metrics[0].count, "0");
});

Deno.test("retried() files unexpected SQLSTATE classes under their own label and junk under none", () => {
  const metrics = new Metrics({ version: "0.1.0" });
  metrics.retried("55P03");
  metrics.retried("XX000");
  metrics.retried("");
  metrics.retried("ECONNRESET".toLowerCase());
  const families = scrape(metrics);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "55" }), 1);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "XX" }), 1);
  assert.equal(value(families, "meter_sync_retries_total", { sqlstate_class: "none" }), 2);
});

Deno.test("label values escape backslash, double quote and newline", () => {
  const version = 'v1 "edge"\\build\nnext';
  assert.equal(escapeLabelValue(version), 'v1 \\"edge\\"\\\\build\\nnext');
  const metrics = new Metrics({ version });
  const text = metrics.render();
  assert.ok(
    text.includes(`meter_sync_build_info{version="v1 \\"edge\\"\\\\build\\nnext"} 1\n`),
    text,
  );
  // Every sample stays on one line, and the parser reads the value back unchanged.
  assert.equal(value(scrape(metrics), "meter_sync_build_info", { version }), 1);
});

Deno.test("render() has exactly one HELP and one TYPE line per family, before its samples", () => {
  const lines = new Metrics({ version: "0.1.0" }).render().trimEnd().split("\n");
  const seen = new Set<string>();
  let current = "";
  for (const line of lines) {
    const meta = /^# (HELP|TYPE) (\S+) /.exec(line);
    if (meta) {
      if (meta[1] === "HELP") {
        assert.ok(!seen.has(meta[2]), `${meta[2]} declared once`);
        seen.add(meta[2]);
        current = meta[2];
      } else assert.equal(meta[2], current);
      continue;
    }
    assert.match(line, /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? \S+$/);
    assert.ok(line.startsWith(current), `${line} under ${current}`);
  }
  assert.equal(seen.size, Object.keys(EXPECTED_TYPES).length);
});

Deno.test("the constructor refuses buckets that are not ascending", () => {
  assert.throws(() => new Metrics({ version: "x", buckets: [1, 0.5] }), RangeError);
  assert.throws(() => new Metrics({ version: "x", buckets: [1, Infinity] }), RangeError);
});
