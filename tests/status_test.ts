/** Tests of lib/status.ts readStatus/formatStatus against a real local database, and `status --json`. */
import assert from "node:assert/strict";
import {
  freshDb,
  runCli,
  silentServer,
  SPEC_STATUS_KEYS,
  type Sql,
  type TestDb,
} from "./_harness.ts";
import { count, pair } from "./_sync_fixture.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { freePort } from "../lib/embedded.ts";
import { SchemaError } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { recordRun, type RunRecord } from "../lib/runs.ts";
import { seedReadings } from "../lib/seed.ts";
import {
  formatStatus,
  queueSize,
  readRemoteStatus,
  readStatus,
  type StatusReport,
} from "../lib/status.ts";

async function migratedDb(): Promise<TestDb & AsyncDisposable> {
  const db = await freshDb();
  await migrate(db.sql, await loadMigrations(migrationsDir("local")));
  return db;
}

function run(over: Partial<RunRecord> & { finishedAt: Date }): RunRecord {
  return {
    command: "sync",
    startedAt: new Date(over.finishedAt.getTime() - 1500),
    outcome: "ok",
    uploaded: 0,
    deleted: 0,
    skipped: 0,
    batches: 0,
    quarantined: 0,
    ...over,
  };
}

Deno.test("readStatus() on an empty queue: size 0, no ages, nothing quarantined, no runs", async () => {
  await using db = await migratedDb();
  const r = await readStatus(db.sql);
  assert.deepEqual(r, {
    queue_size: 0,
    oldest_pending_at: null,
    oldest_pending_age_s: null,
    quarantined: 0,
    top_errors: [],
    last_success_at: null,
    last_success_age_s: null,
    last_failure_at: null,
    last_error: null,
    stale: true,
    stale_after_s: 900,
    rows_synced_last_hour: 0,
    rows_synced_last_day: 0,
    last_run: null,
  });
  const text = formatStatus(r);
  assert.match(text, /^state\s+STALE \(no successful cycle yet, threshold 15 min\)$/m);
  assert.ok(text.startsWith("state "), "the verdict comes first");
  assert.match(text, /^queue\s+0 readings waiting$/m);
  assert.match(text, /^last success\s+never$/m);
  assert.match(text, /^last failure\s+never$/m);
});

Deno.test("readStatus() after seeding: queue size N and the oldest age close to the seeded window", async () => {
  await using db = await migratedDb();
  await seedReadings(db.sql, { count: 300, meters: 5, days: 2 });
  const r = await readStatus(db.sql);
  assert.equal(r.queue_size, 300);
  const window = 2 * 86400;
  assert.ok(r.oldest_pending_age_s !== null);
  // The oldest seeded reading is one step (window / N) younger than the window.
  assert.ok(
    r.oldest_pending_age_s >= 0.98 * window && r.oldest_pending_age_s <= window + 5,
    `oldest pending ${r.oldest_pending_age_s} s for a ${window} s window`,
  );
  const [min] = await db.sql`SELECT min(createdat) AS t FROM meter_readings`;
  assert.ok(r.oldest_pending_at);
  assert.match(r.oldest_pending_at, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$/);
  assert.equal(new Date(r.oldest_pending_at).getTime(), Math.floor((min.t as Date).getTime()));
  assert.match(formatStatus(r), /^queue\s+300 readings waiting, oldest 47\.\d h old \(\d{4}-/m);
});

Deno.test("readStatus() does not count synchronized readings, nor their age", async () => {
  await using db = await migratedDb();
  await seedReadings(db.sql, { count: 200, meters: 5, days: 4 });
  // The older half is synchronized (waiting for deletion): it is not in the queue.
  await db.sql`
    UPDATE meter_readings SET is_synchronized = true
     WHERE id IN (SELECT id FROM meter_readings ORDER BY createdat, id LIMIT 100)`;
  const r = await readStatus(db.sql);
  assert.equal(r.queue_size, 100);
  const [expected] = await db.sql`
    SELECT round(extract(epoch FROM now() - min(createdat)))::int AS age
      FROM meter_readings WHERE NOT is_synchronized`;
  assert.ok(
    Math.abs(r.oldest_pending_age_s! - expected.age) <= 2,
    `${r.oldest_pending_age_s} vs ${expected.age}`,
  );
  assert.ok(r.oldest_pending_age_s! < 2.1 * 86400, "the synchronized older half is not counted");
});

Deno.test("a quarantined reading leaves the queue and counts in quarantined with its SQLSTATE", async () => {
  await using db = await migratedDb();
  await seedReadings(db.sql, { count: 20, meters: 2, days: 1 });
  const ids = (await db.sql`SELECT id FROM meter_readings ORDER BY createdat, id`).map((r) => r.id);
  await db.sql`
    INSERT INTO meter_sync_quarantine (id, sqlstate, error) VALUES
      (${ids[0]}, '22003', 'numeric field overflow'),
      (${ids[5]}, '23502', 'null value in column "status" violates not-null constraint'),
      (${ids[6]}, '23502', 'null value in column "status" violates not-null constraint')`;
  const r = await readStatus(db.sql);
  assert.equal(r.queue_size, 17);
  assert.equal(await queueSize(db.sql), 17);
  assert.equal(r.quarantined, 3);
  assert.deepEqual(r.top_errors, [
    {
      sqlstate: "23502",
      error: 'null value in column "status" violates not-null constraint',
      rows: 2,
    },
    { sqlstate: "22003", error: "numeric field overflow", rows: 1 },
  ]);
  // The oldest reading is quarantined: the oldest pending one is the second.
  const [second] = await db.sql`
    SELECT round(extract(epoch FROM now() - createdat))::int AS age
      FROM meter_readings WHERE id = ${ids[1]}`;
  assert.ok(Math.abs(r.oldest_pending_age_s! - second.age) <= 2);
  const text = formatStatus(r);
  assert.match(text, /^quarantined\s+3 \(meter-sync requeue/m);
  assert.match(text, /2 x 23502 null value in column "status"/);
  assert.match(text, /1 x 22003 numeric field overflow/);
});

Deno.test("readStatus() reads the last success, the last failure and the error of the newest failed run", async () => {
  await using db = await migratedDb();
  const t = (minutesAgo: number) => new Date(Date.now() - minutesAgo * 60_000);
  const okAt = t(20);
  const newestFailAt = t(10);
  const lastAt = t(5);
  await recordRun(db.sql, run({ finishedAt: t(40), outcome: "ok" }));
  await recordRun(db.sql, run({ finishedAt: t(30), outcome: "failed", error: "older failure" }));
  await recordRun(db.sql, run({ finishedAt: okAt, outcome: "ok", uploaded: 7 }));
  await recordRun(
    db.sql,
    run({ finishedAt: newestFailAt, outcome: "failed", error: "connection refused (remote)" }),
  );
  await recordRun(
    db.sql,
    run({
      command: "sync",
      finishedAt: lastAt,
      outcome: "ok",
      uploaded: 1234,
      batches: 13,
      downloaded: 42,
    }),
  );
  const r = await readStatus(db.sql);
  assert.equal(r.last_success_at, lastAt.toISOString());
  assert.equal(r.last_failure_at, newestFailAt.toISOString());
  assert.equal(r.last_error, "connection refused (remote)");
  assert.deepEqual(r.last_run, {
    command: "sync",
    outcome: "ok",
    started_at: new Date(lastAt.getTime() - 1500).toISOString(),
    finished_at: lastAt.toISOString(),
    rows_uploaded: 1234,
    rows_downloaded: 42,
    batches: 13,
  });
  const text = formatStatus(r);
  assert.match(
    text,
    new RegExp(`^last failure\\s+${newestFailAt.toISOString()}: connection refused`, "m"),
  );
  assert.match(
    text,
    /^last run\s+sync ok at .*, 1234 rows in 13 batches, 42 reference rows down$/m,
  );
});

Deno.test("readStatus() names the migrate command when the table is missing", async () => {
  await using db = await freshDb();
  await assert.rejects(
    () => readStatus(db.sql),
    (err: unknown) => {
      assert.ok(err instanceof SchemaError, String(err));
      assert.match(err.message, /meter-sync migrate --target local/);
      return true;
    },
  );
});

Deno.test("readStatus() works before the sync-state migration: the queue is every unsynchronized row", async () => {
  await using db = await freshDb();
  const files = await loadMigrations(migrationsDir("local"));
  // Every migration before 005 (the sync state), none of the later ones.
  await migrate(db.sql, files.filter((m) => m.name < "005_"));
  await seedReadings(db.sql, { count: 30, meters: 3 });
  await db.sql`UPDATE meter_readings SET is_synchronized = true
                WHERE id IN (SELECT id FROM meter_readings LIMIT 4)`;
  const r = await readStatus(db.sql);
  assert.equal(r.queue_size, 26);
  assert.equal(await queueSize(db.sql), 26);
  assert.equal(r.quarantined, 0);
  assert.equal(r.last_run, null);
});

Deno.test("`status --json` prints one JSON object with the keys of SPEC §3", async () => {
  await using db = await migratedDb();
  await seedReadings(db.sql, { count: 12, meters: 2, days: 1 });
  const [first] = await db.sql`SELECT id FROM meter_readings LIMIT 1`;
  await db.sql`INSERT INTO meter_sync_quarantine (id, sqlstate, error)
               VALUES (${first.id}, '22001', 'value too long')`;
  await recordRun(db.sql, run({ finishedAt: new Date(), outcome: "failed", error: "boom" }));
  const result = await runCli(["status", "--json"], { env: { LOCAL_DATABASE_URL: db.url } });
  // Never a successful cycle: stale, exit 1 (a check command fails).
  assert.equal(result.code, 1, result.stderr);
  const lines = result.stdout.trim().split("\n");
  assert.equal(lines.length, 1, result.stdout);
  const report = JSON.parse(lines[0]);
  for (const key of SPEC_STATUS_KEYS) {
    assert.ok(key in report, `${key} in ${lines[0]}`);
  }
  assert.equal(report.queue_size, 11);
  assert.equal(typeof report.oldest_pending_age_s, "number");
  assert.equal(report.quarantined, 1);
  assert.equal(report.last_success_at, null);
  assert.equal(report.last_error, "boom");
  assert.equal(report.stale, true);
  assert.equal(report.remote, null, "no remote URL: remote is null");
  assert.ok(
    !result.stdout.includes(db.server.password) && !result.stderr.includes(db.server.password),
  );
});

Deno.test("recordRun() writes rows_downloaded, 0 when the cycle did not say", async () => {
  await using db = await migratedDb();
  await recordRun(db.sql, run({ finishedAt: new Date(Date.now() - 2000), downloaded: 17 }));
  await recordRun(db.sql, run({ finishedAt: new Date(Date.now() - 1000) }));
  const rows = await db.sql`
    SELECT rows_downloaded::int AS n FROM meter_sync_runs ORDER BY finished_at`;
  assert.deepEqual(rows.map((r) => r.n), [17, 0]);
});

Deno.test("recordRun() still records the cycle on a gateway without migration 006 (rows_downloaded)", async () => {
  await using db = await freshDb();
  const files = await loadMigrations(migrationsDir("local"));
  await migrate(db.sql, files.filter((m) => m.name < "006_"));
  await recordRun(db.sql, run({ finishedAt: new Date(), downloaded: 3, uploaded: 5 }));
  const r = await readStatus(db.sql);
  assert.equal(r.last_run?.rows_uploaded, 5);
  assert.equal(r.last_run?.rows_downloaded, 0);
  assert.equal(r.stale, false);
});

Deno.test("recordRun() prunes the history older than 30 days, and only that", async () => {
  await using db = await migratedDb();
  const daysAgo = (d: number) => new Date(Date.now() - d * 86_400_000).toISOString();
  await db.sql`
    INSERT INTO meter_sync_runs (command, started_at, finished_at, outcome, rows_uploaded)
    VALUES ('sync', ${daysAgo(31)}, ${daysAgo(31)}, 'ok', 1),
           ('sync', ${daysAgo(29)}, ${daysAgo(29)}, 'ok', 2)`;
  await recordRun(db.sql, run({ finishedAt: new Date(), uploaded: 3 }));
  const left = await db
    .sql`SELECT rows_uploaded::int AS n FROM meter_sync_runs ORDER BY finished_at`;
  assert.deepEqual(left.map((r) => r.n), [2, 3]);
  // A shorter retention, for a gateway with little disk.
  await recordRun(db.sql, run({ finishedAt: new Date(), uploaded: 4 }), 7);
  const after = await db.sql`SELECT rows_uploaded::int AS n FROM meter_sync_runs ORDER BY id`;
  assert.deepEqual(after.map((r) => r.n), [3, 4]);
});

Deno.test("readStatus() is stale when the last success is older than staleAfterMs or there never was one", async () => {
  await using db = await migratedDb();
  const okAt = Date.parse("2026-11-25T12:00:00.000Z");
  // Failures after the success do not make the agent healthy again.
  await recordRun(db.sql, run({ finishedAt: new Date(okAt - 60_000), outcome: "failed" }));
  let r = await readStatus(db.sql, "meter_readings", { now: okAt, staleAfterMs: 60_000 });
  assert.equal(r.stale, true, "only failures: stale");
  assert.equal(r.last_success_age_s, null);
  await recordRun(db.sql, run({ finishedAt: new Date(okAt), outcome: "ok" }));
  await recordRun(db.sql, run({ finishedAt: new Date(okAt + 30_000), outcome: "failed" }));
  const at = (ms: number, staleAfterMs?: number) =>
    readStatus(db.sql, "meter_readings", { now: okAt + ms, staleAfterMs });
  r = await at(60_000, 60_000);
  assert.deepEqual([r.stale, r.stale_after_s, r.last_success_age_s], [false, 60, 60]);
  r = await at(60_001, 60_000);
  assert.deepEqual([r.stale, r.last_success_age_s], [true, 60]);
  // The default threshold is 15 minutes.
  r = await at(15 * 60_000);
  assert.deepEqual([r.stale, r.stale_after_s], [false, 900]);
  r = await at(15 * 60_000 + 1000);
  assert.deepEqual([r.stale, r.last_success_age_s], [true, 901]);
  assert.match(
    formatStatus(r),
    /^state\s+STALE \(last success 15 min ago, threshold 15 min\)$/m,
  );
  r = await at(90_000, 3_600_000);
  assert.match(
    formatStatus(r),
    /^state\s+healthy \(last success 90 s ago, threshold 60 min\)$/m,
  );
});

Deno.test("readStatus() sums the readings uploaded by the cycles of the last hour and the last day", async () => {
  await using db = await migratedDb();
  const now = Date.parse("2026-11-25T12:00:00.000Z");
  const ago = (minutes: number) => new Date(now - minutes * 60_000);
  await recordRun(db.sql, run({ finishedAt: ago(3 * 24 * 60), uploaded: 100_000 }));
  await recordRun(db.sql, run({ finishedAt: ago(25 * 60), uploaded: 10_000 }));
  await recordRun(db.sql, run({ finishedAt: ago(23 * 60), uploaded: 1000 }));
  await recordRun(db.sql, run({ finishedAt: ago(61), uploaded: 200 }));
  await recordRun(db.sql, run({ finishedAt: ago(59), uploaded: 30 }));
  await recordRun(db.sql, run({ finishedAt: ago(5), uploaded: 4, outcome: "failed" }));
  await recordRun(db.sql, run({ finishedAt: ago(1), uploaded: 0 }));
  const r = await readStatus(db.sql, "meter_readings", { now });
  assert.equal(r.rows_synced_last_hour, 34);
  assert.equal(r.rows_synced_last_day, 1234);
  assert.match(
    formatStatus(r),
    /^synced\s+34 readings in the last hour, 1234 in the last day$/m,
  );
});

function report(over: Partial<StatusReport>): StatusReport {
  return {
    queue_size: 0,
    oldest_pending_at: null,
    oldest_pending_age_s: null,
    quarantined: 0,
    top_errors: [],
    last_success_at: "2026-11-25T12:00:00.000Z",
    last_success_age_s: 30,
    last_failure_at: null,
    last_error: null,
    stale: false,
    stale_after_s: 900,
    rows_synced_last_hour: 0,
    rows_synced_last_day: 0,
    last_run: null,
    ...over,
  };
}

Deno.test("formatStatus() says whether the remote was reachable, how fast, and what it knows of the agent", () => {
  assert.ok(!/^remote/m.test(formatStatus(report({}))), "no remote line when it was not probed");
  assert.match(formatStatus(report({ remote: null })), /^remote\s+not configured/m);
  assert.match(
    formatStatus(
      report({ remote: { reachable: false, error: "connect ECONNREFUSED 10.0.0.9:5432" } }),
    ),
    /^remote\s+UNREACHABLE: connect ECONNREFUSED 10\.0\.0\.9:5432$/m,
  );
  assert.match(
    formatStatus(report({ remote: { reachable: true, latency_ms: 1.3 } })),
    /^remote\s+reachable, 1\.3 ms$/m,
  );
  assert.match(
    formatStatus(report({ remote: { reachable: true, latency_ms: 2, agent: null } })),
    /^remote\s+reachable, 2 ms; no sync_agents row for this agent yet$/m,
  );
  const agent = {
    agent_id: "gw-17",
    last_outcome: "ok",
    last_cycle_finished_at: "2026-11-25T11:59:30+00:00",
    queue_size: 0,
  };
  assert.match(
    formatStatus(report({ remote: { reachable: true, latency_ms: 2, agent } })),
    /^remote\s+reachable, 2 ms; agent gw-17: last cycle ok at 2026-11-25T11:59:30\+00:00, queue 0$/m,
  );
});

/** The queue as the database has it: unsynchronized readings that are not quarantined. */
async function queueOf(sql: Sql): Promise<number> {
  const [row] = await sql`
    SELECT count(*)::int AS n FROM meter_readings m
     WHERE NOT is_synchronized AND NOT EXISTS (SELECT 1 FROM meter_sync_quarantine q WHERE q.id = m.id)`;
  return row.n;
}

async function statusJson(env: Record<string, string>, args: string[] = []) {
  const r = await runCli(["status", "--json", ...args], { env });
  assert.ok(r.code === 0 || r.code === 1, `exit ${r.code}: ${r.stderr}`);
  const lines = r.stdout.trim().split("\n");
  assert.equal(lines.length, 1, r.stdout);
  return { code: r.code, stderr: r.stderr, report: JSON.parse(lines[0]) };
}

Deno.test("status --json follows real cycles: syncs, a quarantine, a failed cycle, rows synced in the last hour", async () => {
  await using p = await pair(1500);
  // A poison row: the central side refuses implausible voltages.
  const [poison] = await p.local.sql<{ id: string }[]>`
    SELECT id::text FROM meter_readings ORDER BY createdat, id OFFSET 700 LIMIT 1`;
  await p.local.sql`UPDATE meter_readings SET voltage_l1_v = 9999 WHERE id = ${poison.id}`;
  await p.remote.sql`
    ALTER TABLE meter_readings ADD CONSTRAINT plausible_voltage CHECK (voltage_l1_v < 1000)`;
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const local = { LOCAL_DATABASE_URL: p.local.url };

  // Before any cycle: 1,500 waiting, never a success, stale.
  let s = await statusJson(local);
  assert.equal(s.code, 1);
  assert.equal(s.report.queue_size, 1500);
  assert.equal(s.report.stale, true);
  assert.equal(s.report.last_success_at, null);

  const sync = await runCli(["sync", "--batch-size", "500"], { env });
  assert.equal(sync.code, 0, sync.stderr);
  s = await statusJson(local);
  assert.equal(s.code, 0, "a fresh success: healthy");
  assert.equal(s.report.stale, false);
  assert.equal(s.report.queue_size, await queueOf(p.local.sql));
  assert.equal(s.report.queue_size, 0);
  assert.equal(s.report.oldest_pending_age_s, null);
  assert.equal(s.report.quarantined, 1);
  assert.equal(s.report.top_errors.length, 1);
  assert.equal(s.report.top_errors[0].sqlstate, "23514");
  assert.match(s.report.top_errors[0].error, /plausible_voltage/);
  assert.equal(s.report.top_errors[0].rows, 1);
  assert.equal(s.report.last_error, null);
  assert.ok(Math.abs(Date.parse(s.report.last_success_at) - Date.now()) < 60_000);
  assert.equal(s.report.rows_synced_last_hour, 1499);
  assert.equal(s.report.rows_synced_last_hour, await count(p.remote.sql));
  assert.equal(s.report.rows_synced_last_day, 1499);
  assert.equal(s.report.last_run.rows_uploaded, 1499);
  assert.equal(s.report.last_run.outcome, "ok");
  assert.equal(s.report.remote, null);
  const firstSuccess = s.report.last_success_at;

  // New readings, then a cycle that cannot reach the central side.
  await seedReadings(p.local.sql, { count: 200, meters: 5, days: 1 });
  const down = `postgres://agent:Very%23Secret@127.0.0.1:${freePort()}/central?connect_timeout=1`;
  const failed = await runCli(["sync", "--max-retries", "0"], {
    env: { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: down },
  });
  assert.equal(failed.code, 1, failed.stderr);
  s = await statusJson(local);
  assert.equal(s.code, 0, "a failure right after a success is not stale yet");
  assert.equal(s.report.queue_size, 200);
  assert.equal(s.report.queue_size, await queueOf(p.local.sql));
  assert.equal(typeof s.report.oldest_pending_age_s, "number");
  assert.ok(s.report.oldest_pending_age_s >= 0.9 * 86400, String(s.report.oldest_pending_age_s));
  assert.equal(s.report.quarantined, 1);
  assert.equal(s.report.last_success_at, firstSuccess);
  assert.match(s.report.last_error, /ECONNREFUSED|refused/i);
  assert.ok(!/Very|Secret/.test(s.report.last_error), s.report.last_error);
  assert.ok(Date.parse(s.report.last_failure_at) >= Date.parse(firstSuccess));
  assert.equal(s.report.last_run.outcome, "failed");
  assert.equal(s.report.rows_synced_last_hour, 1499);

  // The central side is back: the 200 go through and count in the last hour.
  const again = await runCli(["sync", "--batch-size", "500"], { env });
  assert.equal(again.code, 0, again.stderr);
  s = await statusJson(env);
  assert.equal(s.code, 0);
  assert.equal(s.report.queue_size, 0);
  assert.equal(s.report.rows_synced_last_hour, 1699);
  assert.equal(s.report.rows_synced_last_hour, await count(p.remote.sql));
  assert.equal(s.report.remote.reachable, true);
  assert.equal(typeof s.report.remote.latency_ms, "number");
  assert.ok(s.report.remote.latency_ms >= 0 && s.report.remote.latency_ms < 3000);
  assert.equal(s.report.remote.error, undefined);
});

Deno.test("status exits 1 when the last success is older than --stale-after, 0 when it is recent enough", async () => {
  await using db = await migratedDb();
  await recordRun(db.sql, run({ finishedAt: new Date(Date.now() - 5000), uploaded: 10 }));
  const env = { LOCAL_DATABASE_URL: db.url };
  const stale = await runCli(["status", "--stale-after", "1s"], { env });
  assert.equal(stale.code, 1, stale.stderr);
  const first = stale.stdout.split("\n")[0];
  assert.match(first, /^state\s+STALE \(last success \d+ s ago, threshold 1 s\)$/);
  assert.equal(stale.stderr, "", "stale is a finding, not an error");
  const healthy = await runCli(["status", "--stale-after", "10m"], { env });
  assert.equal(healthy.code, 0, healthy.stderr);
  assert.match(
    healthy.stdout.split("\n")[0],
    /^state\s+healthy \(last success \d+ s ago, threshold 10 min\)$/,
  );
  assert.match(healthy.stdout, /^synced\s+10 readings in the last hour, 10 in the last day$/m);
  assert.match(healthy.stdout, /^remote\s+not configured/m);
  const json = await statusJson({ ...env, METER_SYNC_STALE_AFTER: "2s" });
  assert.equal(json.code, 1);
  assert.equal(json.report.stale, true);
  assert.equal(json.report.stale_after_s, 2);
  assert.ok(json.report.last_success_age_s >= 5, String(json.report.last_success_age_s));
});

Deno.test("a remote that refuses connections: status reports it in one line without the password and exits by staleness only", async () => {
  await using db = await migratedDb();
  const recordedAt = Date.now();
  await recordRun(db.sql, run({ finishedAt: new Date(recordedAt), uploaded: 1 }));
  const env = {
    LOCAL_DATABASE_URL: db.url,
    REMOTE_DATABASE_URL: `postgres://agent:Very%23Secret@127.0.0.1:${freePort()}/central`,
  };
  const s = await statusJson(env);
  assert.equal(s.code, 0, "healthy by its history: the remote being down is not a status failure");
  assert.equal(s.report.remote.reachable, false);
  assert.match(s.report.remote.error, /ECONNREFUSED|refused/i);
  assert.ok(!s.report.remote.error.includes("\n"));
  assert.equal(s.report.remote.latency_ms, undefined);
  const human = await runCli(["status"], { env });
  assert.equal(human.code, 0, human.stderr);
  assert.match(human.stdout, /^remote\s+UNREACHABLE: .*(ECONNREFUSED|refused)/im);
  for (const out of [s.stderr, JSON.stringify(s.report), human.stdout, human.stderr]) {
    assert.ok(!/Very|Secret/.test(out), out);
  }
  // Once the history is stale, the exit code is 1 whatever the remote.
  await new Promise((r) => setTimeout(r, Math.max(0, recordedAt + 1200 - Date.now())));
  const stale = await statusJson(env, ["--stale-after", "1s"]);
  assert.equal(stale.code, 1);
  assert.equal(stale.report.remote.reachable, false);
});

Deno.test("a remote that accepts the connection but never answers: status gives up after ~3 s and still prints", async () => {
  await using db = await migratedDb();
  await recordRun(db.sql, run({ finishedAt: new Date(), uploaded: 1 }));
  // A TCP server that accepts and then says nothing, like a half-dead firewall path.
  await using silent = silentServer();
  const port = silent.port;
  const started = Date.now();
  const s = await statusJson({
    LOCAL_DATABASE_URL: db.url,
    // Without status's own limit, this would wait a minute.
    REMOTE_DATABASE_URL:
      `postgres://agent:Very%23Secret@127.0.0.1:${port}/central?connect_timeout=60`,
  });
  const elapsed = Date.now() - started;
  assert.equal(s.code, 0);
  assert.equal(s.report.remote.reachable, false);
  assert.match(s.report.remote.error, /time|no answer/i);
  assert.ok(!/Very|Secret/.test(JSON.stringify(s.report)));
  // ~3 s of probe plus the CLI's start-up (slow on a loaded machine), far from a minute.
  assert.ok(elapsed >= 2900, `${elapsed} ms`);
  assert.ok(elapsed < 30_000, `${elapsed} ms`);
});

Deno.test("readRemoteStatus() reads this agent's sync_agents row when the remote has the table", async () => {
  await using p = await pair(0);
  await p.remote.sql`
    INSERT INTO sync_agents (agent_id, version, last_cycle_started_at, last_cycle_finished_at,
                             last_outcome, last_success_at, rows_uploaded_total, queue_size)
    VALUES ('gw-17', '0.1.0', '2026-11-25T11:59:00Z', '2026-11-25T11:59:30Z', 'ok',
            '2026-11-25T11:59:30Z', 1234, 0)`;
  const target = parseDatabaseUrl(p.remote.url, "REMOTE_DATABASE_URL");
  const withAgent = await readRemoteStatus(target, { agentId: "gw-17" });
  assert.equal(withAgent.reachable, true, withAgent.error);
  assert.equal(withAgent.agent?.agent_id, "gw-17");
  assert.equal(withAgent.agent?.last_outcome, "ok");
  assert.equal(withAgent.agent?.rows_uploaded_total, 1234);
  assert.equal(
    Date.parse(String(withAgent.agent?.last_success_at)),
    Date.parse("2026-11-25T11:59:30Z"),
  );
  const unknown = await readRemoteStatus(target, { agentId: "gw-99" });
  assert.equal(unknown.agent, null);
  const anonymous = await readRemoteStatus(target);
  assert.equal(anonymous.reachable, true);
  assert.ok(!("agent" in anonymous), "no agent id: no agent row");
  // A central database without the fleet table: reachable, no agent, no error.
  await using bare = await freshDb("remote");
  const plain = await readRemoteStatus(parseDatabaseUrl(bare.url, "REMOTE_DATABASE_URL"), {
    agentId: "gw-17",
  });
  assert.deepEqual(Object.keys(plain).sort(), ["latency_ms", "reachable"]);
});

Deno.test("readRemoteStatus() masks the password in the error and answers within its time limit", async () => {
  await using silent = silentServer();
  const port = silent.port;
  const target = parseDatabaseUrl(
    `postgres://agent:Very%23Secret@127.0.0.1:${port}/central`,
    "REMOTE_DATABASE_URL",
  );
  const started = performance.now();
  const r = await readRemoteStatus(target, { timeoutMs: 400 });
  const elapsed = performance.now() - started;
  assert.equal(r.reachable, false);
  assert.ok(elapsed < 2000, `${elapsed} ms`);
  assert.ok(r.error && !/Very|Secret/.test(r.error), r.error);
  const refused = await readRemoteStatus(
    parseDatabaseUrl(
      `postgres://agent:Very%23Secret@127.0.0.1:${freePort()}/central`,
      "REMOTE_DATABASE_URL",
    ),
  );
  assert.equal(refused.reachable, false);
  assert.ok(refused.error && !/Very|Secret/.test(refused.error), refused.error);
});
