/** Tests of lib/status.ts readStatus/formatStatus against a real local database, and `status --json`. */
import assert from "node:assert/strict";
import { freshDb, runCli, SPEC_STATUS_KEYS, type TestDb } from "./_harness.ts";
import { SchemaError } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { recordRun, type RunRecord } from "../lib/runs.ts";
import { seedReadings } from "../lib/seed.ts";
import { formatStatus, readStatus } from "../lib/status.ts";

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
    last_failure_at: null,
    last_error: null,
    last_run: null,
  });
  const text = formatStatus(r);
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
    run({ command: "upload", finishedAt: lastAt, outcome: "ok", uploaded: 1234, batches: 13 }),
  );
  const r = await readStatus(db.sql);
  assert.equal(r.last_success_at, lastAt.toISOString());
  assert.equal(r.last_failure_at, newestFailAt.toISOString());
  assert.equal(r.last_error, "connection refused (remote)");
  assert.deepEqual(r.last_run, {
    command: "upload",
    outcome: "ok",
    started_at: new Date(lastAt.getTime() - 1500).toISOString(),
    finished_at: lastAt.toISOString(),
    rows_uploaded: 1234,
    batches: 13,
  });
  const text = formatStatus(r);
  assert.match(
    text,
    new RegExp(`^last failure\\s+${newestFailAt.toISOString()}: connection refused`, "m"),
  );
  assert.match(text, /^last run\s+upload ok at .*, 1234 rows in 13 batches$/m);
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
  await migrate(db.sql, files.filter((m) => !m.name.startsWith("005_")));
  await seedReadings(db.sql, { count: 30, meters: 3 });
  await db.sql`UPDATE meter_readings SET is_synchronized = true
                WHERE id IN (SELECT id FROM meter_readings LIMIT 4)`;
  const r = await readStatus(db.sql);
  assert.equal(r.queue_size, 26);
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
  assert.equal(result.code, 0, result.stderr);
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
  assert.ok(
    !result.stdout.includes(db.server.password) && !result.stderr.includes(db.server.password),
  );
});
