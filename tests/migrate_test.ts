/** Tests of lib/migrate.ts against real PostgreSQL: order, history, checksums, rollback, the lock. */
import assert from "node:assert/strict";
import postgres from "postgres";
import { connectTo, freshDb, type Sql } from "./_harness.ts";
import { ConfigError } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A temporary folder of migration files; removed when the test ends. */
async function migrationFolder(
  files: Record<string, string>,
): Promise<{ url: URL; write(name: string, sql: string): Promise<void> } & AsyncDisposable> {
  const dir = await Deno.makeTempDir({ prefix: "meter-sync-migrations-" });
  const url = new URL(`file://${dir}/`);
  const write = (name: string, sql: string) => Deno.writeTextFile(new URL(name, url), sql);
  for (const [name, sql] of Object.entries(files)) await write(name, sql);
  return {
    url,
    write,
    async [Symbol.asyncDispose]() {
      await Deno.remove(dir, { recursive: true });
    },
  };
}

async function history(sql: Sql): Promise<{ name: string; checksum: string }[]> {
  const rows = await sql<{ name: string; checksum: string }[]>`
    SELECT name, checksum FROM meter_sync_migrations ORDER BY applied_at, name`;
  return [...rows];
}

async function tableExists(sql: Sql, name: string): Promise<boolean> {
  const [row] = await sql<{ ok: boolean }[]>`SELECT to_regclass(${name}) IS NOT NULL AS ok`;
  return row.ok;
}

async function columnsOf(sql: Sql, table: string): Promise<{ name: string; type: string }[]> {
  const rows = await sql<{ name: string; type: string }[]>`
    SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type
      FROM pg_attribute a
     WHERE a.attrelid = ${table}::regclass AND a.attnum > 0 AND NOT a.attisdropped
     ORDER BY a.attnum`;
  return [...rows];
}

Deno.test("loadMigrations() reads only NNN_name.sql files, sorted by name, with their sha-256", async () => {
  await using folder = await migrationFolder({
    "010_last.sql": "SELECT 10;",
    "002_second.sql": "SELECT 2;",
    "001_first.sql": "SELECT 1;",
    "README.md": "not a migration",
    "draft.sql": "SELECT 'no number';",
    "003_backup.sql~": "SELECT 'editor backup';",
  });
  const loaded = await loadMigrations(folder.url);
  assert.deepEqual(loaded.map((m) => m.name), ["001_first.sql", "002_second.sql", "010_last.sql"]);
  assert.equal(loaded[1].sql, "SELECT 2;");
  assert.equal(loaded[1].checksum, await sha256("SELECT 2;"));
});

Deno.test("migrate() applies the local migrations in order and records each with its checksum", async () => {
  await using db = await freshDb();
  const files = await loadMigrations(migrationsDir("local"));
  assert.deepEqual(files.map((m) => m.name), [
    "001_create_meters.sql",
    "002_create_meter_readings.sql",
    "003_add_meter_readings_indexes.sql",
    "004_add_sync_columns_to_meter_readings.sql",
    "005_create_sync_state.sql",
    "006_add_rows_downloaded_to_runs.sql",
  ]);
  const result = await migrate(db.sql, files);
  assert.deepEqual(result.applied, files.map((m) => m.name));
  assert.equal(result.alreadyApplied, 0);
  const recorded = await history(db.sql);
  assert.deepEqual(recorded.map((r) => r.name), files.map((m) => m.name));
  for (const [k, m] of files.entries()) {
    const onDisk = await Deno.readTextFile(new URL(m.name, migrationsDir("local")));
    assert.equal(recorded[k].checksum, await sha256(onDisk), m.name);
  }
  for (const table of ["meters", "meter_readings", "meter_sync_quarantine", "meter_sync_runs"]) {
    assert.ok(await tableExists(db.sql, table), table);
  }
});

Deno.test("migrate() applies the remote migrations: the same readings columns minus is_synchronized", async () => {
  await using local = await freshDb();
  await using remote = await freshDb();
  await migrate(local.sql, await loadMigrations(migrationsDir("local")));
  const files = await loadMigrations(migrationsDir("remote"));
  const result = await migrate(remote.sql, files);
  assert.deepEqual(result.applied, [
    "001_create_meters.sql",
    "002_create_meter_readings.sql",
    "003_add_meter_readings_indexes.sql",
    "004_create_sync_agents.sql",
  ]);
  assert.deepEqual((await history(remote.sql)).map((r) => r.name), result.applied);
  const localCols = await columnsOf(local.sql, "meter_readings");
  const remoteCols = await columnsOf(remote.sql, "meter_readings");
  assert.deepEqual(remoteCols, localCols.filter((c) => c.name !== "is_synchronized"));
  // The sync bookkeeping lives on the gateway only.
  assert.equal(await tableExists(remote.sql, "meter_sync_quarantine"), false);
  // The fleet table lives centrally only.
  assert.ok(await tableExists(remote.sql, "sync_agents"));
  assert.equal(await tableExists(local.sql, "sync_agents"), false);
});

Deno.test("migrate() a second time applies nothing and leaves the history as it was", async () => {
  await using db = await freshDb();
  const files = await loadMigrations(migrationsDir("local"));
  await migrate(db.sql, files);
  const before = await db
    .sql`SELECT name, checksum, applied_at FROM meter_sync_migrations ORDER BY name`;
  const again = await migrate(db.sql, files);
  assert.deepEqual(again.applied, []);
  assert.equal(again.alreadyApplied, files.length);
  const after = await db
    .sql`SELECT name, checksum, applied_at FROM meter_sync_migrations ORDER BY name`;
  assert.deepEqual([...after], [...before]);
});

Deno.test("migrate() refuses with a ConfigError naming a file changed after it was applied, and applies nothing after it", async () => {
  await using db = await freshDb();
  await using folder = await migrationFolder({
    "001_create_a.sql": "CREATE TABLE a (x int);",
    "002_create_b.sql": "CREATE TABLE b (x int);",
  });
  await migrate(db.sql, await loadMigrations(folder.url));
  await folder.write("001_create_a.sql", "CREATE TABLE a (x int, y int);");
  await folder.write("003_create_c.sql", "CREATE TABLE c (x int);");
  await assert.rejects(
    () => loadMigrations(folder.url).then((ms) => migrate(db.sql, ms)),
    (err: unknown) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.match(err.message, /001_create_a\.sql/);
      assert.doesNotMatch(err.message, /002_create_b\.sql/);
      return true;
    },
  );
  assert.equal(await tableExists(db.sql, "c"), false);
  assert.deepEqual((await history(db.sql)).map((r) => r.name), [
    "001_create_a.sql",
    "002_create_b.sql",
  ]);
  // The recorded checksum is still the one of the file as it was applied.
  const [a] = await history(db.sql);
  assert.equal(a.checksum, await sha256("CREATE TABLE a (x int);"));
});

Deno.test("migrate() rolls back only the failing migration: earlier ones stay, its partial effects go", async () => {
  await using db = await freshDb();
  await using folder = await migrationFolder({
    "001_create_a.sql": "CREATE TABLE a (x int); INSERT INTO a VALUES (1);",
    // Two statements that succeed, then one that fails: the first two must not survive.
    "002_create_b.sql":
      "CREATE TABLE b (x int);\nINSERT INTO b VALUES (1);\nINSERT INTO a VALUES (2);\nSELECT 1 / 0;",
    "003_create_c.sql": "CREATE TABLE c (x int);",
  });
  await assert.rejects(
    () => loadMigrations(folder.url).then((ms) => migrate(db.sql, ms)),
    (err: unknown) => {
      assert.equal((err as { code?: string }).code, "22012", String(err));
      return true;
    },
  );
  assert.deepEqual((await history(db.sql)).map((r) => r.name), ["001_create_a.sql"]);
  assert.equal(await tableExists(db.sql, "b"), false);
  assert.equal(await tableExists(db.sql, "c"), false);
  assert.deepEqual((await db.sql`SELECT x FROM a ORDER BY x`).map((r) => r.x), [1]);

  // Fixed, the file applies on the next run (the lock was released, the history is sound);
  // a fresh connection with a lock timeout turns a leaked advisory lock into a failure.
  await folder.write("002_create_b.sql", "CREATE TABLE b (x int);\nINSERT INTO b VALUES (1);");
  const other = postgres(db.url, {
    max: 1,
    onnotice: () => {},
    connection: { lock_timeout: 5000 },
  });
  try {
    const result = await migrate(other, await loadMigrations(folder.url));
    assert.deepEqual(result.applied, ["002_create_b.sql", "003_create_c.sql"]);
  } finally {
    await other.end({ timeout: 1 });
  }
  assert.ok(await tableExists(db.sql, "c"));
});

Deno.test("two migrate() runs started at once both succeed and apply each file exactly once", async () => {
  await using db = await freshDb();
  await using folder = await migrationFolder({
    // Slow enough that the second runner arrives while the first is still at work.
    "001_create_log.sql": "CREATE TABLE applied_log (name text NOT NULL); SELECT pg_sleep(0.3);",
    "002_one.sql": "INSERT INTO applied_log VALUES ('002'); SELECT pg_sleep(0.1);",
    "003_two.sql": "INSERT INTO applied_log VALUES ('003');",
  });
  const files = await loadMigrations(folder.url);
  const a = connectTo(db.url);
  const b = connectTo(db.url);
  try {
    const results = await Promise.allSettled([migrate(a, files), migrate(b, files)]);
    for (const r of results) {
      assert.equal(r.status, "fulfilled", r.status === "rejected" ? String(r.reason) : "");
    }
    const applied = results.flatMap((r) => r.status === "fulfilled" ? r.value.applied : []);
    assert.deepEqual(applied.sort(), files.map((m) => m.name));
  } finally {
    await a.end({ timeout: 1 });
    await b.end({ timeout: 1 });
  }
  assert.deepEqual((await db.sql`SELECT name FROM applied_log ORDER BY name`).map((r) => r.name), [
    "002",
    "003",
  ]);
  const [count] = await db.sql`SELECT count(*)::int AS n FROM meter_sync_migrations`;
  assert.equal(count.n, 3);
});

Deno.test("two runners of the real local migrations at once both succeed", async () => {
  await using db = await freshDb();
  const files = await loadMigrations(migrationsDir("local"));
  const a = connectTo(db.url);
  const b = connectTo(db.url);
  try {
    const [ra, rb] = await Promise.all([migrate(a, files), migrate(b, files)]);
    assert.deepEqual([...ra.applied, ...rb.applied].sort(), files.map((m) => m.name));
  } finally {
    await a.end({ timeout: 1 });
    await b.end({ timeout: 1 });
  }
});

Deno.test("migrate() upgrades a production database that predates is_synchronized without touching its rows", async () => {
  await using db = await freshDb();
  // The tables as production has them: a subset of the columns, no sync flag, real data.
  await db.sql.unsafe(`
    CREATE TABLE meters (
      id bigint PRIMARY KEY,
      serial_number text NOT NULL UNIQUE,
      name text NOT NULL
    );
    CREATE TABLE meter_readings (
      id uuid PRIMARY KEY,
      meter_id bigint NOT NULL REFERENCES meters (id),
      createdat timestamptz NOT NULL,
      voltage_l1_v real,
      energy_import_kwh numeric(18,3),
      register_raw bigint,
      quality_flags text[],
      status text NOT NULL
    );
    INSERT INTO meters VALUES (1, 'SN-1', 'Meter 1'), (2, 'SN-2', 'Meter 2');
    INSERT INTO meter_readings
    SELECT md5(g::text)::uuid, 1 + g % 2,
           '2024-03-01 12:00:00.123456+00'::timestamptz + g * interval '1 minute',
           230.5 + g, 1234.567 * g, 9007199254740993 + g,
           ARRAY['validated', NULL], CASE WHEN g % 3 = 0 THEN 'alarm' ELSE 'ok' END
      FROM generate_series(1, 50) AS g;
  `).simple();
  const snapshot = () =>
    db.sql`
      SELECT id::text, meter_id::text, createdat::text, voltage_l1_v::text,
             energy_import_kwh::text, register_raw::text, quality_flags::text, status
        FROM meter_readings ORDER BY id`;
  const before = [...await snapshot()];

  const files = await loadMigrations(migrationsDir("local"));
  const result = await migrate(db.sql, files);
  assert.equal(result.applied.length, files.length);

  const cols = await columnsOf(db.sql, "meter_readings");
  assert.deepEqual(cols.map((c) => c.name), [
    "id",
    "meter_id",
    "createdat",
    "voltage_l1_v",
    "energy_import_kwh",
    "register_raw",
    "quality_flags",
    "status",
    "is_synchronized",
  ]);
  const [flag] = await db.sql`
    SELECT is_nullable, column_default FROM information_schema.columns
     WHERE table_name = 'meter_readings' AND column_name = 'is_synchronized'`;
  assert.equal(flag.is_nullable, "NO");
  assert.equal(flag.column_default, "false");
  const [counts] = await db.sql`
    SELECT count(*)::int AS n, count(*) FILTER (WHERE is_synchronized = false)::int AS pending
      FROM meter_readings`;
  assert.deepEqual({ ...counts }, { n: 50, pending: 50 });
  const [idx] = await db.sql`
    SELECT indexdef FROM pg_indexes WHERE indexname = 'meter_readings_sync_queue_idx'`;
  assert.ok(idx, "the queue index exists");
  assert.deepEqual([...await snapshot()], before);
});

Deno.test("the local meter_readings has 100+ data columns of every production type and a partial queue index", async () => {
  await using db = await freshDb();
  await migrate(db.sql, await loadMigrations(migrationsDir("local")));
  const cols = await columnsOf(db.sql, "meter_readings");
  const keys = ["id", "meter_id", "createdat", "is_synchronized"];
  for (const k of keys) assert.ok(cols.some((c) => c.name === k), k);
  const data = cols.filter((c) => !keys.includes(c.name));
  assert.ok(data.length >= 100, `${data.length} data columns`);
  const types = new Set(data.map((c) => c.type.replace(/\(.*\)/, "")));
  for (
    const t of [
      "numeric",
      "real",
      "double precision",
      "integer",
      "bigint",
      "text",
      "jsonb",
      "text[]",
    ]
  ) {
    assert.ok(types.has(t), `a ${t} column among ${[...types].join(", ")}`);
  }
  const nullable = await db.sql`
    SELECT count(*)::int AS n FROM information_schema.columns
     WHERE table_name = 'meter_readings' AND is_nullable = 'YES'`;
  assert.ok(nullable[0].n >= 50, "most data columns are nullable");

  const [idx] = await db.sql<{ indexdef: string }[]>`
    SELECT indexdef FROM pg_indexes
     WHERE tablename = 'meter_readings' AND indexname = 'meter_readings_sync_queue_idx'`;
  assert.ok(idx, "meter_readings_sync_queue_idx exists");
  assert.match(idx.indexdef, /USING btree \(createdat, id\) WHERE \(NOT is_synchronized\)$/);
});
