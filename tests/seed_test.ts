/** Tests of lib/seed.ts against a real, migrated local database. */
import assert from "node:assert/strict";
import { freshDb, type Sql, type TestDb } from "./_harness.ts";
import { quoteIdent, readTable } from "../lib/columns.ts";
import { SchemaError } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { seedReadings } from "../lib/seed.ts";

/**
 * Columns the seed leaves NULL in every row on purpose. None today: every column of the
 * production table gets values; a type the seed cannot invent would be listed here.
 */
const LEFT_OUT: string[] = [];

async function migratedDb(): Promise<TestDb & AsyncDisposable> {
  const db = await freshDb();
  await migrate(db.sql, await loadMigrations(migrationsDir("local")));
  return db;
}

async function one<T>(sql: Sql, query: string): Promise<T> {
  const [row] = await sql.unsafe(query);
  return row as T;
}

Deno.test("seedReadings() inserts exactly N readings over meters 1..M, spread over the requested days", async () => {
  await using db = await migratedDb();
  const inserted = await seedReadings(db.sql, { count: 1000, meters: 7, days: 3 });
  assert.equal(inserted, 1000);
  const stats = await one<{ n: number; ids: number; meters: number; lo: number; hi: number }>(
    db.sql,
    `SELECT count(*)::int AS n, count(DISTINCT id)::int AS ids,
            count(DISTINCT meter_id)::int AS meters,
            extract(epoch FROM now() - min(createdat))::float8 AS lo,
            extract(epoch FROM now() - max(createdat))::float8 AS hi
       FROM meter_readings`,
  );
  assert.equal(stats.n, 1000);
  assert.equal(stats.ids, 1000, "ids are unique");
  assert.equal(stats.meters, 7, "every meter has readings");
  const window = 3 * 86400;
  assert.ok(stats.lo <= window + 5, `oldest ${stats.lo} s ago, within ${window} s`);
  assert.ok(stats.hi >= -5, `newest ${stats.hi} s ago, not in the future`);
  assert.ok(stats.lo - stats.hi >= 0.97 * window, `span ${stats.lo - stats.hi} s of ${window} s`);

  const meters = await db.sql`SELECT id::int AS id FROM meters ORDER BY id`;
  assert.deepEqual(meters.map((m) => m.id), [1, 2, 3, 4, 5, 6, 7]);
  const orphans = await one<{ n: number }>(
    db.sql,
    `SELECT count(*)::int AS n FROM meter_readings r
      WHERE NOT EXISTS (SELECT 1 FROM meters m WHERE m.id = r.meter_id)`,
  );
  assert.equal(orphans.n, 0);
  const pending = await one<{ n: number }>(
    db.sql,
    "SELECT count(*)::int AS n FROM meter_readings WHERE NOT is_synchronized",
  );
  assert.equal(pending.n, 1000, "every seeded reading waits in the queue");
});

Deno.test("seeded readings are realistic: NULLs, valid jsonb, bigints past 2^53, NULL array elements", async () => {
  await using db = await migratedDb();
  await seedReadings(db.sql, { count: 2000, meters: 10, days: 2 });
  const info = await readTable(db.sql, "meter_readings");
  assert.ok(info);

  const counts = await one<Record<string, string>>(
    db.sql,
    `SELECT ${
      info.columns.map((c) => `count(${quoteIdent(c.name)})::text AS ${quoteIdent(c.name)}`).join(
        ", ",
      )
    } FROM meter_readings`,
  );
  const allNull = info.columns.filter((c) => counts[c.name] === "0").map((c) => c.name);
  assert.deepEqual(allNull, LEFT_OUT, "columns NULL in every row");
  const nullable = info.columns.filter((c) => !c.notNull);
  const withNulls = nullable.filter((c) => Number(counts[c.name]) < 2000).map((c) => c.name);
  assert.ok(
    withNulls.length >= 0.9 * nullable.length,
    `NULLs in ${withNulls.length} of ${nullable.length} nullable columns`,
  );
  for (const c of info.columns.filter((c) => c.notNull)) {
    assert.equal(counts[c.name], "2000", `NOT NULL column ${c.name}`);
  }

  const json = await one<{ objects: number; nonnull: number; modbus: number; note: string }>(
    db.sql,
    `SELECT count(*) FILTER (WHERE jsonb_typeof(extra) = 'object')::int AS objects,
            count(extra)::int AS nonnull,
            count(*) FILTER (WHERE extra->>'source' = 'modbus'
                               AND jsonb_typeof(extra->'register') = 'number'
                               AND jsonb_typeof(extra->'ok') = 'boolean')::int AS modbus,
            min(extra->>'note') AS note
       FROM meter_readings`,
  );
  assert.ok(json.nonnull > 0);
  assert.equal(json.objects, json.nonnull);
  assert.equal(json.modbus, json.nonnull);
  assert.equal(json.note, 'Zähler "A"');

  const big = await one<{ n: number; max: string }>(
    db.sql,
    `SELECT count(*) FILTER (WHERE register_raw > 9007199254740992)::int AS n,
            max(register_raw)::text AS max
       FROM meter_readings`,
  );
  assert.ok(big.n > 0, "register_raw past 2^53");
  assert.ok(BigInt(big.max) > 2n ** 53n);

  const arrays = await one<{ with_null: number; plain: number }>(
    db.sql,
    `SELECT count(*) FILTER (WHERE array_position(quality_flags, NULL) IS NOT NULL)::int AS with_null,
            count(*) FILTER (WHERE array_position(quality_flags, NULL) IS NULL)::int AS plain
       FROM meter_readings WHERE quality_flags IS NOT NULL`,
  );
  assert.ok(arrays.with_null > 0, "text[] values with NULL elements");
  assert.ok(arrays.plain > 0, "text[] values without NULL elements");

  // Text that a COPY line must escape: a tab and a newline inside error_text.
  const escaped = await one<{ n: number }>(
    db.sql,
    `SELECT count(*)::int AS n FROM meter_readings
      WHERE error_text LIKE E'%\\t%' AND error_text LIKE E'%\\n%'`,
  );
  assert.ok(escaped.n > 0, "error_text with tabs and newlines");
});

Deno.test("seedReadings() in small chunks inserts exactly N readings with no id or position twice", async () => {
  await using db = await migratedDb();
  const progress: number[] = [];
  const inserted = await seedReadings(db.sql, {
    count: 50,
    meters: 50,
    days: 1,
    chunk: 7,
    onProgress: (done) => progress.push(done),
  });
  assert.equal(inserted, 50);
  // 7 chunks of 7 and one of 1.
  assert.equal(progress.length, 8);
  assert.equal(progress.at(-1), 50);
  assert.deepEqual([...progress].sort((a, b) => a - b), progress, "progress only grows");
  const stats = await one<{ n: number; ids: number; times: number }>(
    db.sql,
    `SELECT count(*)::int AS n, count(DISTINCT id)::int AS ids,
            count(DISTINCT date_trunc('minute', createdat))::int AS times
       FROM meter_readings`,
  );
  assert.deepEqual({ ...stats }, { n: 50, ids: 50, times: 50 });
  // With as many meters as readings, each row position maps to its own meter: a chunk
  // offset counted twice or skipped would leave a meter with two readings or none.
  const perMeter = await db.sql`
    SELECT m.id::int AS id, count(r.id)::int AS n
      FROM meters m LEFT JOIN meter_readings r ON r.meter_id = m.id
     GROUP BY m.id HAVING count(r.id) <> 1`;
  assert.deepEqual([...perMeter], []);
});

Deno.test("seedReadings() with a chunk that divides N evenly inserts exactly N", async () => {
  await using db = await migratedDb();
  assert.equal(await seedReadings(db.sql, { count: 40, meters: 40, chunk: 10 }), 40);
  const [row] = await db.sql`SELECT count(*)::int AS n, count(DISTINCT meter_id)::int AS m
                               FROM meter_readings`;
  assert.deepEqual({ ...row }, { n: 40, m: 40 });
});

Deno.test("seedReadings() keeps meters that already exist and adds only the missing ones", async () => {
  await using db = await migratedDb();
  await db.sql`INSERT INTO meters (id, serial_number, name) VALUES (2, 'KEEP-2', 'Kept')`;
  await seedReadings(db.sql, { count: 10, meters: 3 });
  const meters = await db.sql`SELECT id::int AS id, serial_number FROM meters ORDER BY id`;
  assert.deepEqual(meters.map((m) => [m.id, m.serial_number]), [
    [1, "SN-00000001"],
    [2, "KEEP-2"],
    [3, "SN-00000003"],
  ]);
});

Deno.test("seedReadings() on a database without the table names the migrate command", async () => {
  await using db = await freshDb();
  await assert.rejects(
    () => seedReadings(db.sql, { count: 10 }),
    (err: unknown) => {
      assert.ok(err instanceof SchemaError, String(err));
      assert.match(err.message, /meter-sync migrate --target local/);
      return true;
    },
  );
});

Deno.test("seedReadings() inserts 200,000 readings correctly (rows/s printed, not asserted)", async () => {
  await using db = await migratedDb();
  const started = performance.now();
  const inserted = await seedReadings(db.sql, { count: 200_000 });
  const seconds = (performance.now() - started) / 1000;
  console.log(
    `seeded 200,000 readings in ${seconds.toFixed(1)} s: ${Math.round(200_000 / seconds)} rows/s`,
  );
  assert.equal(inserted, 200_000);
  const stats = await one<{ n: number; ids: number; meters: number }>(
    db.sql,
    `SELECT count(*)::int AS n, count(DISTINCT id)::int AS ids,
            count(DISTINCT meter_id)::int AS meters FROM meter_readings`,
  );
  assert.deepEqual({ ...stats }, { n: 200_000, ids: 200_000, meters: 50 });
});
