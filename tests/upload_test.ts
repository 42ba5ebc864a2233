/** The upload engine against real PostgreSQL: the guarantees G1-G7 of SPEC §2, with faults injected. */
import assert from "node:assert/strict";
import { CycleError, SchemaError } from "../lib/errors.ts";
import { pgArray, requeue } from "../lib/quarantine.ts";
import { readStatus } from "../lib/status.ts";
import { CLAIM_PLANS, upload } from "../lib/upload.ts";
import { LOCAL_CONNECTIONS } from "../lib/connections.ts";
import { openPool } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { startDelayProxy, viaProxy } from "../scripts/delay_proxy.ts";
import { freePort } from "../lib/embedded.ts";
import { server, type Sql } from "./_harness.ts";
import { waitFor, within } from "./_agent.ts";
import { count, countDistinct, type Pair, pair } from "./_sync_fixture.ts";

Deno.test("upload() drains the queue in batches of --batch-size and leaves the local table empty", async () => {
  await using p = await pair(250);
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.batches, 3);
  assert.equal(result.uploaded, 250);
  assert.equal(result.deleted, 250);
  assert.equal(result.skipped, 0);
  assert.equal(await count(p.local.sql), 0);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 250, ids: 250 });
});

Deno.test("upload() with an empty queue is a quiet success with no batch", async () => {
  await using p = await pair(0);
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.batches, 0);
  assert.equal(result.uploaded, 0);
  assert.equal(await count(p.remote.sql), 0);
});

Deno.test("upload() stops after --max-batches and leaves the rest queued", async () => {
  await using p = await pair(250);
  const result = await upload(p.deps(), { batchSize: 100, maxBatches: 2 });
  assert.equal(result.uploaded, 200);
  assert.equal(await count(p.local.sql), 50);
  assert.equal(await count(p.remote.sql), 200);
});

Deno.test("a cycle marks its delivered batches' queue-index entries dead as it goes", async () => {
  // Deleted readings keep their entries in the queue's index until a scan finds them dead.
  // Unswept, the scan from the start that ends each cycle met them all at once (0.35 s after
  // 200,000 readings); each claim now sweeps the batches committed before it.
  await using p = await pair(1000);
  const result = await upload(p.deps(), { batchSize: 100, maxBatches: 8 });
  assert.equal(result.deleted, 800);
  // Nothing has visited the queue from its start: --max-batches stops before that scan.
  const heapFetches = await p.local.sql.begin(async (tx) => {
    await tx.unsafe(CLAIM_PLANS); // the claim's own: an index scan, as a sweep's
    const [row] = await tx.unsafe(`EXPLAIN (ANALYZE, FORMAT JSON)
      SELECT count(*) FROM meter_readings WHERE NOT is_synchronized`);
    const plan = JSON.stringify(row["QUERY PLAN"]);
    assert.match(plan, /Index Only Scan/);
    return Number(/"Heap Fetches":(\d+)/.exec(plan)![1]);
  });
  // 200 readings still queued, plus the dead entries no claim had swept yet: batches 7 and 8
  // (and 6, if its commit came after the last claim began), never the first five.
  assert.ok(heapFetches >= 200 && heapFetches <= 500, `${heapFetches} heap fetches`);
});

Deno.test("a cycle reads and deletes the queue through its own index, never the meters' one", async () => {
  // The range delete once went through the (meter_id, createdat) index, a skip scan meter by
  // meter that visited each page of the batch once per meter on it; then through the queue
  // index row by row, where a bitmap of it visits each page once (DELETE_PLANS).
  await using p = await pair(1000);
  const stats = async () => {
    const rows = await p.local.sql<{ name: string; scans: string; fetched: string }[]>`
      SELECT indexrelname AS name, idx_scan::text AS scans, idx_tup_fetch::text AS fetched
        FROM pg_stat_user_indexes WHERE relname = 'meter_readings'`;
    return Object.fromEntries(
      rows.map((r) => [r.name, { scans: Number(r.scans), fetched: Number(r.fetched) }]),
    );
  };
  const before = await stats();
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.deleted, 1000);
  // The cycle's backends report their statistics as they exit, before their sockets close.
  await p.agentLocal.end();
  let after = before;
  await waitFor("the cycle's index statistics", async () => {
    after = await stats();
    return after.meter_readings_sync_queue_idx.scans -
        before.meter_readings_sync_queue_idx.scans >= 20;
  }, 10_000);
  const meters = "meter_readings_meter_id_createdat_idx";
  assert.equal(after[meters].scans, before[meters].scans);
  // Row by row through the queue index: what the claims read (1,100 for 1,000 readings when
  // this was written), not the deletes too (2,100 when they did).
  const byRow = after.meter_readings_sync_queue_idx.fetched -
    before.meter_readings_sync_queue_idx.fetched;
  assert.ok(byRow >= 1000 && byRow < 1500, `${byRow} readings fetched row by row`);
});

Deno.test("upload() sends the oldest readings first, by createdat then id (G3)", async () => {
  await using p = await pair(0);
  await p.local.sql`INSERT INTO meters (id, serial_number, name) VALUES (1, 'SN-1', 'one')`;
  // Same timestamp for three rows: the id decides among them.
  await p.local.sql`
    INSERT INTO meter_readings (id, meter_id, createdat, status) VALUES
      ('00000000-0000-0000-0000-000000000003', 1, '2026-01-01 00:00:00+00', 'ok'),
      ('00000000-0000-0000-0000-000000000001', 1, '2026-01-01 00:00:00+00', 'ok'),
      ('00000000-0000-0000-0000-000000000002', 1, '2026-01-01 00:00:00+00', 'ok'),
      ('00000000-0000-0000-0000-000000000000', 1, '2026-01-02 00:00:00+00', 'ok'),
      ('00000000-0000-0000-0000-000000000009', 1, '2025-12-31 00:00:00+00', 'ok')`;
  const order: string[] = [];
  for (let i = 0; i < 5; i++) {
    await upload(p.deps(), { batchSize: 1, maxBatches: 1 });
    const rows = await p.remote.sql<{ id: string }[]>`SELECT id::text FROM meter_readings`;
    order.push(rows.map((r) => r.id).find((id) => !order.includes(id))!);
  }
  assert.deepEqual(order.map((id) => id.slice(-1)), ["9", "1", "2", "3", "0"]);
});

Deno.test("a reading that arrives mid-cycle with an old createdat still goes in the same cycle", async () => {
  // Each claim starts past the batch in flight; the queue counts as empty only when a claim
  // from the start finds nothing, so a late reading older than that point is not left behind.
  await using p = await pair(300);
  const late = "00000000-0000-0000-0000-00000000abcd";
  // The gateway writes it while the first batch commits (a trigger on that batch's delete,
  // once), so it is in the queue from the second batch on, older than everything there.
  await p.local.sql.unsafe(`
    CREATE TABLE late_once (done boolean NOT NULL);
    INSERT INTO late_once VALUES (false);
    CREATE FUNCTION add_late() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NOT (SELECT done FROM late_once) THEN
        UPDATE late_once SET done = true;
        INSERT INTO meter_readings (id, meter_id, createdat, status)
        SELECT '${late}', id, '2020-01-01 00:00:00+00', 'late' FROM meters LIMIT 1;
      END IF;
      RETURN NULL;
    END $$;
    CREATE TRIGGER add_late AFTER DELETE ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION add_late();`);
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.uploaded, 301);
  assert.equal(await count(p.local.sql), 0);
  const [row] = await p.remote.sql`SELECT status FROM meter_readings WHERE id = ${late}`;
  assert.equal(row?.status, "late");
});

Deno.test("upload() leaves readings marked is_synchronized alone", async () => {
  await using p = await pair(20);
  await p.local.sql`
    UPDATE meter_readings SET is_synchronized = true
     WHERE id IN (SELECT id FROM meter_readings ORDER BY id LIMIT 5)`;
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.uploaded, 15);
  assert.equal(await count(p.local.sql), 5);
});

Deno.test("values arrive byte for byte: microseconds, numeric, floats, bigint past 2^53, arrays with NULL, jsonb, awkward text", async () => {
  await using p = await pair(0);
  await p.local
    .sql`INSERT INTO meters (id, serial_number, name) VALUES (9007199254740993, 'SN-X', 'x')`;
  const texts = [
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash \\N \\\\",
    `quotes ' and " and ""`,
    "non-ASCII: Zähler ⚡ 電表 🙂",
    "",
  ];
  for (const [i, t] of texts.entries()) {
    await p.local.sql`
      INSERT INTO meter_readings (meter_id, createdat, status, error_text, firmware_version,
        voltage_l1_v, active_power_l1_w, energy_import_kwh, power_factor_l1, register_raw,
        pulse_count, quality_flags, extra, tags, read_at, signal_rssi_dbm, is_estimated)
      VALUES (9007199254740993, ${`2026-11-25 10:00:00.${String(123456 + i).padStart(6, "0")}+00`},
        ${t}, ${t}, NULL,
        ${["3.4028235e38", "-0", "NaN", "1.17549435e-38", "0.1", "Infinity", "-Infinity"][i]}::real,
        ${
      [
        "0.1",
        "1.7976931348623157e308",
        "-0",
        "5e-324",
        "NaN",
        "123456789.123456789",
        "2.2250738585072014e-308",
      ][i]
    }::float8,
        ${["123456789012345.123", "0.001", "-999999999999999.999", "0", "1", "2", "3"][i]}::numeric,
        ${["0.9999", "-1.0000", "0.0001", "1", "0", "0.5", "0.25"][i]}::numeric,
        ${
      [
        "9223372036854775807",
        "-9223372036854775808",
        "9007199254740993",
        "9007199254740995",
        "0",
        "1",
        "-1",
      ][i]
    }::bigint,
        ${String(2 ** 53 + 1 + i)}::bigint,
        ${
      [
        "{a,NULL,c}",
        "{NULL,NULL}",
        '{"with,comma","with \\"quote\\"","back\\\\slash"}',
        "{}",
        '{"",NULL}',
        "{x}",
        null,
      ][i]
    }::text[],
        ${
      [
        '{"k": "v\\ttab", "n": 1.000000000000000000001, "big": 9007199254740993}',
        '{"unicode": "Zähler ⚡", "nested": {"a": [1, null, "b"]}}',
        '"just a string"',
        "[]",
        "null",
        '{"esc": "\\\\ \\" \\n"}',
        null,
      ][i]
    }::jsonb,
        NULL,
        ${"2026-11-25 10:00:00.000001+00"}::timestamptz,
        ${[-32768, 32767, 0, -1, 1, null, 5][i]}::smallint,
        ${[true, false, null, true, false, true, false][i]})`;
  }
  const snapshot = `SELECT id::text AS id, (r.*)::text AS row FROM (
      SELECT id, meter_id, createdat, status, error_text, firmware_version, voltage_l1_v,
             active_power_l1_w, energy_import_kwh, power_factor_l1, register_raw, pulse_count,
             quality_flags, extra, tags, read_at, signal_rssi_dbm, is_estimated
        FROM meter_readings) r ORDER BY id`;
  const before = await p.local.sql.unsafe(snapshot);
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.uploaded, texts.length);
  const after = await p.remote.sql.unsafe(snapshot);
  assert.deepEqual([...after], [...before]);
});

Deno.test("twelve batches in a row arrive row for row as they left, batch memory reused along the way", async () => {
  await using p = await pair(3000);
  const snapshot = `SELECT id::text AS id, md5((r.*)::text) AS row FROM (
      SELECT id, meter_id, createdat, status, error_text, voltage_l1_v, active_power_l1_w,
             energy_import_kwh, register_raw, pulse_count, extra, tags, read_at
        FROM meter_readings) r ORDER BY id`;
  const before = await p.local.sql.unsafe(snapshot);
  const result = await upload(p.deps(), { batchSize: 250 });
  assert.equal(result.batches, 12);
  const after = await p.remote.sql.unsafe(snapshot);
  assert.equal(after.length, 3000);
  assert.deepEqual([...after], [...before]);
});

Deno.test("values arrive byte for byte through text COPY when a column type widens", async () => {
  await using p = await pair(0);
  // real -> double precision: binary COPY cannot carry it, text COPY must.
  await p.remote.sql`ALTER TABLE meter_readings ALTER COLUMN voltage_l1_v TYPE double precision`;
  await p.local.sql`INSERT INTO meters (id, serial_number, name) VALUES (1, 'SN-1', 'one')`;
  await p.local.sql`
    INSERT INTO meter_readings (meter_id, createdat, status, voltage_l1_v, error_text)
    VALUES (1, '2026-11-25 10:00:00.654321+00', 'ok', 229.71, E'a\\tb\\nc\\\\d')`;
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.uploaded, 1);
  const [row] = await p.remote.sql`
    SELECT voltage_l1_v::real::text AS v, error_text, createdat::text AS t FROM meter_readings`;
  assert.equal(row.v, "229.71");
  assert.equal(row.error_text, "a\tb\nc\\d");
  assert.equal(row.t, "2026-11-25 10:00:00.654321+00");
});

Deno.test("a poison row in the middle of a 1,000-row batch is quarantined and the other 999 go through (G5)", async () => {
  await using p = await pair(1000);
  const [poison] = await p.local.sql<{ id: string }[]>`
    SELECT id::text FROM meter_readings ORDER BY createdat, id OFFSET 500 LIMIT 1`;
  await p.local.sql`UPDATE meter_readings SET voltage_l1_v = 9999 WHERE id = ${poison.id}`;
  await p.remote.sql`
    ALTER TABLE meter_readings ADD CONSTRAINT plausible_voltage CHECK (voltage_l1_v < 1000)`;
  const result = await upload(p.deps(), { batchSize: 1000 });
  assert.equal(result.batches, 1);
  assert.equal(result.uploaded, 999);
  assert.equal(result.quarantined, 1);
  assert.equal(await count(p.remote.sql), 999);
  const [q] = await p.local.sql`SELECT id::text, sqlstate, error FROM meter_sync_quarantine`;
  assert.equal(q.id, poison.id);
  assert.equal(q.sqlstate, "23514");
  assert.match(q.error, /plausible_voltage/);
  // The reading itself is still there, out of the queue.
  assert.equal(await count(p.local.sql), 1);
  const status = await readStatus(p.local.sql);
  assert.equal(status.quarantined, 1);
  assert.equal(status.queue_size, 0);
  // A second cycle does not try it again.
  const again = await upload(p.deps(), { batchSize: 1000 });
  assert.equal(again.batches, 0);
  // Once the cause is fixed, requeue puts it back and it is delivered.
  await p.remote.sql`ALTER TABLE meter_readings DROP CONSTRAINT plausible_voltage`;
  assert.equal(await requeue(p.local.sql, [poison.id]), 1);
  const last = await upload(p.deps(), { batchSize: 1000 });
  assert.equal(last.uploaded, 1);
  assert.equal(await count(p.local.sql), 0);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 1000, ids: 1000 });
});

Deno.test("pgArray() passes uuids as they are and quotes other text; the server reads back every value", async () => {
  await using p = await pair(0);
  const values = [
    "0f8fad5b-d9cb-469f-a165-70867728950e",
    'quote " and backslash \\ and comma , and {braces}',
    "NULL",
    "",
    " leading space",
    "0F8FAD5B-D9CB-469F-A165-70867728950E",
  ];
  const literal = pgArray(values);
  assert.ok(literal.startsWith("{0f8fad5b-d9cb-469f-a165-70867728950e,"));
  const [{ back }] = await p.local.sql`SELECT ${literal}::text[] AS back`;
  assert.deepEqual(back, values);
  const ids = ["0f8fad5b-d9cb-469f-a165-70867728950e", "7c9e6679-7425-40de-944b-e07fc1f90ae7"];
  const [{ uuids }] = await p.local.sql`SELECT ${pgArray(ids)}::uuid[]::text[] AS uuids`;
  assert.deepEqual(uuids, ids);
});

Deno.test("several poison rows of class 22 are isolated without a line hint (bisection)", async () => {
  await using p = await pair(64);
  const bad = await p.local.sql<{ id: string }[]>`
    SELECT id::text FROM meter_readings ORDER BY createdat, id OFFSET 7 LIMIT 3`;
  const ids = bad.map((b) => b.id);
  // A remote trigger rejects these readings with a class 22 error and no COPY line.
  await p.remote.sql.unsafe(`
    CREATE FUNCTION reject_some() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.id = ANY ('{${ids.join(",")}}'::uuid[]) THEN
        RAISE EXCEPTION 'value out of range for meter' USING ERRCODE = '22003';
      END IF;
      RETURN NEW;
    END $$;
    CREATE CONSTRAINT TRIGGER reject_some AFTER INSERT ON meter_readings
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION reject_some();`);
  const result = await upload(p.deps(), { batchSize: 64 });
  assert.equal(result.quarantined, 3);
  assert.equal(result.uploaded, 61);
  const q = await p.local.sql<{ id: string; sqlstate: string }[]>`
    SELECT id::text, sqlstate FROM meter_sync_quarantine ORDER BY id`;
  assert.deepEqual(q.map((r) => r.id), [...ids].sort());
  assert.ok(q.every((r) => r.sqlstate === "22003"));
});

Deno.test("two agents at once never upload the same reading and neither fails (G4)", async () => {
  await using p = await pair(3000);
  await using q = await pair(0);
  // A second agent with its own connections to the same two databases.
  const { openPool } = await import("../lib/db.ts");
  const { parseDatabaseUrl } = await import("../lib/db_url.ts");
  const otherLocal = await openPool(parseDatabaseUrl(p.local.url, "l"), { max: 2 });
  const otherRemote = await openPool(parseDatabaseUrl(p.remote.url, "r"));
  try {
    const [a, b] = await Promise.all([
      upload(p.deps(), { batchSize: 50 }),
      upload(p.deps({ local: otherLocal, remote: otherRemote }), { batchSize: 50 }),
    ]);
    assert.equal(a.uploaded + b.uploaded, 3000);
    assert.equal(a.skipped + b.skipped, 0, "no batch was written twice");
    assert.ok(a.batches > 0 && b.batches > 0, "both agents did work");
    assert.deepEqual(await countDistinct(p.remote.sql), { rows: 3000, ids: 3000 });
    assert.equal(await count(p.local.sql), 0);
  } finally {
    await otherLocal.end();
    await otherRemote.end();
  }
  void q;
});

/** The 50th queued reading, locked FOR UPDATE by a transaction of the test's own. */
async function holdFiftieth(sql: Sql) {
  const conn = await sql.reserve();
  await conn`BEGIN`;
  // Locked by id: FOR UPDATE under OFFSET would lock the 49 rows it skips too.
  const [row] = await conn<{ id: string }[]>`
    SELECT id::text FROM meter_readings
     WHERE id = (SELECT id FROM meter_readings WHERE NOT is_synchronized
                  ORDER BY createdat, id OFFSET 49 LIMIT 1)
       FOR UPDATE`;
  return {
    id: row.id,
    async release() {
      await conn`COMMIT`;
      conn.release();
    },
  };
}

/** How many rows with this id each side has. */
async function copiesOf(p: Pair, id: string): Promise<{ local: number; remote: number }> {
  const query = (sql: Sql) =>
    sql<{ n: number }[]>`
    SELECT count(*)::int AS n FROM meter_readings WHERE id = ${id}`;
  const [[local], [remote]] = await Promise.all([query(p.local.sql), query(p.remote.sql)]);
  return { local: local.n, remote: remote.n };
}

Deno.test("a reading another agent holds inside the batch is neither uploaded nor deleted, and nothing waits for it (G4)", async () => {
  await using p = await pair(300);
  const held = await holdFiftieth(p.local.sql);
  try {
    // The batch runs from the 1st reading to the 101st, around the held one; the delete of
    // the whole batch must leave it alone instead of waiting for its lock (or taking it).
    const result = await within(
      upload(p.deps(), { batchSize: 100, maxBatches: 1 }),
      20_000,
      "the upload waited for the held row",
    );
    assert.equal(result.uploaded, 100);
    assert.equal(result.deleted, 100);
    assert.deepEqual(await copiesOf(p, held.id), { local: 1, remote: 0 });
    assert.equal(await count(p.local.sql), 200);
  } finally {
    await held.release();
  }
  await upload(p.deps(), { batchSize: 100 });
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 300, ids: 300 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("a reading let go inside the batch while the batch travels stays queued, not deleted unsent (G1, G4)", async () => {
  await using p = await pair(300);
  const held = await holdFiftieth(p.local.sql);
  // The remote write waits for a lock of the test's, so that the held reading is let go
  // after the claim passed over it and before the batch's delete runs.
  const remoteLock = await p.remote.sql.reserve();
  await remoteLock`BEGIN`;
  await remoteLock`LOCK TABLE meter_readings IN SHARE MODE`;
  let result;
  try {
    const cycle = upload(p.deps(), { batchSize: 100, maxBatches: 1 });
    await waitFor("the batch's remote write to wait", async () => {
      const [row] = await p.remote.sql`
        SELECT count(*)::int AS n FROM pg_stat_activity
         WHERE application_name = 'meter-sync' AND wait_event_type = 'Lock'`;
      return row.n > 0;
    });
    await held.release();
    await remoteLock`COMMIT`;
    result = await cycle;
  } finally {
    await remoteLock`ROLLBACK`.catch(() => {});
    remoteLock.release();
  }
  assert.equal(result.uploaded, 100);
  assert.equal(result.deleted, 100);
  assert.deepEqual(await copiesOf(p, held.id), { local: 1, remote: 0 });
  await upload(p.deps(), { batchSize: 100 });
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 300, ids: 300 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("readings without a createdat leave the gateway too: outside any key range, they are deleted by id", async () => {
  // A gateway's own table may allow a NULL createdat (the queue puts those last); a batch
  // that ends in one has no upper bound to delete by, so its rows go by their ids.
  await using p = await pair(120);
  for (const sql of [p.local.sql, p.remote.sql]) {
    await sql`ALTER TABLE meter_readings ALTER COLUMN createdat DROP NOT NULL`;
  }
  await p.local.sql`
    UPDATE meter_readings SET createdat = NULL
     WHERE id IN (SELECT id FROM meter_readings ORDER BY createdat, id LIMIT 30 OFFSET 40)`;
  const result = await upload(p.deps(), { batchSize: 50 });
  assert.equal(result.uploaded, 120);
  assert.equal(result.deleted, 120);
  assert.equal(await count(p.local.sql), 0);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 120, ids: 120 });
  const [nulls] = await p.remote.sql`
    SELECT count(*)::int AS n FROM meter_readings WHERE createdat IS NULL`;
  assert.equal(nulls.n, 30);
});

Deno.test("a batch uploaded again after the remote committed adds nothing (G2)", async () => {
  await using p = await pair(300);
  // The crash between remote commit and local delete, reproduced: the remote already
  // holds the first 100 readings, the gateway still has them queued.
  const first = await p.local.sql`
    SELECT * FROM meter_readings ORDER BY createdat, id LIMIT 100`;
  const cols = Object.keys(first[0]).filter((c) => c !== "is_synchronized");
  await p.remote.sql`INSERT INTO meter_readings ${p.remote.sql(first as never, cols)}`;
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.skipped, 100);
  assert.equal(result.uploaded, 200);
  assert.equal(result.deleted, 300);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 300, ids: 300 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("the local delete failing rolls back without retry, and the next cycle delivers with no duplicate", async () => {
  await using p = await pair(150);
  await p.local.sql.unsafe(`
    CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'disk full (simulated)'; END $$;
    CREATE TRIGGER refuse_delete BEFORE DELETE ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();`);
  const deps = p.deps();
  await assert.rejects(upload(deps, { batchSize: 100 }), (err: unknown) => {
    assert.ok(err instanceof CycleError);
    assert.match((err as Error).message, /local delete failed.*disk full/);
    return true;
  });
  assert.equal(deps.clock.sleeps.length, 0, "no retry of a failed local delete");
  assert.equal(await count(p.local.sql), 150, "every reading still queued locally");
  // The first batch is on the remote; the second may be too, sent while the first
  // batch's local commit was failing (batches overlap): either way it stays queued here.
  const onRemote = await count(p.remote.sql);
  assert.ok(onRemote === 100 || onRemote === 150, `${onRemote} on the remote`);
  await p.local.sql`DROP TRIGGER refuse_delete ON meter_readings`;
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.skipped, onRemote);
  assert.equal(result.uploaded, 150 - onRemote);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 150, ids: 150 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("the remote backend terminated mid-batch is retried with backoff and nothing is lost (G6)", async () => {
  await using p = await pair(500);
  // Terminate the agent's remote backend from outside while a slow trigger holds the
  // batch open, as an operator or a failover would.
  await p.remote.sql.unsafe(`
    CREATE OR REPLACE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
    CREATE TRIGGER slow_insert AFTER INSERT ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION slow_insert();`);
  const deps = p.deps();
  const killer = (async () => {
    for (let i = 0; i < 100; i++) {
      const killed = await p.remote.sql`
        SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'meter-sync'
           AND query ILIKE 'copy%' AND state = 'active'`;
      if (killed.length > 0) return true;
      await new Promise((r) => setTimeout(r, 20));
    }
    return false;
  })();
  const result = await upload(deps, { batchSize: 100 });
  assert.equal(await killer, true, "the fault was injected");
  assert.ok(result.retries >= 1);
  assert.ok(deps.clock.sleeps.length >= 1);
  assert.ok(deps.clock.sleeps[0] <= 200, "first backoff within base * 2^0");
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 500, ids: 500 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("the remote server stopped and started again: the cycle retries and recovers (G6)", async () => {
  await using p = await pair(200, "remote-restart");
  const remoteServer = await server("remote-restart");
  await upload(p.deps(), { batchSize: 100, maxBatches: 1 }); // connections are warm
  await remoteServer.stop();
  try {
    const deps = p.deps();
    deps.clock.onSleep = async (n) => {
      if (n === 2) await remoteServer.start();
    };
    const result = await upload(deps, { batchSize: 100, maxRetries: 5 });
    assert.ok(deps.clock.sleeps.length >= 2);
    assert.equal(result.uploaded, 100);
  } finally {
    await remoteServer.start();
  }
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 200, ids: 200 });
  assert.equal(await count(p.local.sql), 0);
});

Deno.test("the remote down for good: the cycle fails after --max-retries with every row in place (G1, G6)", async () => {
  await using p = await pair(120, "remote-down");
  const remoteServer = await server("remote-down");
  await remoteServer.stop();
  try {
    const deps = p.deps();
    await assert.rejects(upload(deps, { batchSize: 100, maxRetries: 3 }), (err: unknown) => {
      assert.ok(err instanceof CycleError);
      assert.match((err as Error).message, /after 4 attempts/);
      assert.match((err as Error).message, /still in the local queue/);
      return true;
    });
    // Exponential backoff with full jitter (random fixed at 0.5): 100, 200, 400 ms.
    assert.deepEqual(deps.clock.sleeps, [100, 200, 400]);
  } finally {
    await remoteServer.start();
  }
  assert.equal(await count(p.local.sql), 120);
});

Deno.test("a permanent remote error is not retried and leaves every row in place", async () => {
  await using p = await pair(50);
  await p.remote.sql`REVOKE INSERT ON meter_readings FROM PUBLIC`;
  await p.remote.sql`CREATE ROLE agent_ro LOGIN PASSWORD 'x'`.catch(() => {});
  await p.remote.sql.unsafe(`
    CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'remote misconfigured' USING ERRCODE = '42501'; END $$;
    CREATE TRIGGER boom BEFORE INSERT ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION boom();`);
  const deps = p.deps();
  await assert.rejects(upload(deps, { batchSize: 100 }), /remote misconfigured/);
  assert.equal(deps.clock.sleeps.length, 0);
  assert.equal(await count(p.local.sql), 50);
  assert.equal(await count(p.remote.sql), 0);
});

/** Readings nobody holds a lock on: FOR UPDATE NOWAIT fails on any row still claimed. */
async function unclaimed(sql: Sql): Promise<number> {
  const [row] = await sql`
    SELECT count(*)::int AS n FROM (SELECT 1 FROM meter_readings FOR UPDATE NOWAIT) s`;
  return row.n;
}

Deno.test("a local column absent on the remote stops the upload naming the column (G7)", async () => {
  await using p = await pair(10);
  await p.local.sql`ALTER TABLE meter_readings ADD COLUMN "Neutral Current" real`;
  await assert.rejects(upload(p.deps(), { batchSize: 100 }), (err: unknown) => {
    assert.ok(err instanceof SchemaError);
    assert.match((err as Error).message, /"Neutral Current"/);
    return true;
  });
  assert.equal(await unclaimed(p.local.sql), 10);
  assert.equal(await count(p.remote.sql), 0);
});

Deno.test("a remote NOT NULL column without default that the gateway lacks stops the upload (G7)", async () => {
  await using p = await pair(10);
  await p.remote.sql`ALTER TABLE meter_readings ADD COLUMN tariff_zone text NOT NULL`;
  await assert.rejects(upload(p.deps(), { batchSize: 100 }), /"tariff_zone"/);
  // The first batch was claimed while the remote catalog was read: rolled back, not kept.
  assert.equal(await unclaimed(p.local.sql), 10);
});

Deno.test("a failed schema read leaves no claim behind, even when the local catalog answers after the remote failed", async () => {
  await using p = await pair(50);
  // The gateway behind a slow link, the remote refusing at once: the local catalog comes back
  // after the cycle has already failed on the remote.
  const proxy = startDelayProxy({ hostname: "127.0.0.1", port: p.local.server.port }, {
    oneWayMs: 100,
  });
  const slowLocal = await openPool(
    parseDatabaseUrl(viaProxy(p.local.url, proxy), "local"),
    { max: LOCAL_CONNECTIONS },
  );
  const refusing = await openPool(
    parseDatabaseUrl(`postgres://nobody@127.0.0.1:${freePort()}/none`, "remote"),
  );
  try {
    // (Whatever the error: another test's server could take the free port meanwhile.)
    await assert.rejects(
      upload(p.deps({ local: slowLocal, remote: refusing }), { batchSize: 100, maxRetries: 0 }),
    );
    const ran = async (pattern: string) =>
      (await p.local.sql`
        SELECT count(*)::int AS n FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query LIKE ${pattern}`)[0].n > 0;
    await waitFor("the local catalog read", () => ran("%pg_catalog.pg_class%"), 10_000);
    // A claim would follow within a few round trips (BEGIN, SET LOCAL, COPY: 0.6 s here).
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(await ran("COPY (SELECT%"), false, "a claim started after the cycle failed");
    assert.equal(await unclaimed(p.local.sql), 50);
  } finally {
    await slowLocal.end();
    await refusing.end();
    await proxy.close();
  }
});

Deno.test("behind a slow link the first batch is claimed while the remote's catalog is still on its way", async () => {
  await using p = await pair(200);
  const proxy = startDelayProxy({ hostname: "127.0.0.1", port: p.remote.server.port }, {
    oneWayMs: 250,
  });
  const slow = await openPool(parseDatabaseUrl(viaProxy(p.remote.url, proxy), "remote"));
  try {
    const uploading = upload(p.deps({ remote: slow }), { batchSize: 100 });
    uploading.catch(() => {});
    // The moment the first readings are locked, the remote has not answered the catalog read
    // yet: the agent's remote session has run neither it nor a COPY.
    await waitFor("the first readings locked", async () =>
      (await p.local.sql`
        SELECT count(*)::int AS n FROM (SELECT 1 FROM meter_readings FOR UPDATE SKIP LOCKED) s`)[0]
        .n < 200);
    const seen = await p.remote.sql<{ query: string }[]>`
      SELECT query FROM pg_stat_activity
       WHERE datname = current_database() AND pid <> pg_backend_pid()
         AND (query LIKE '%pg_catalog.pg_class%' OR query LIKE 'COPY%')`;
    assert.deepEqual(seen.map((r) => r.query.slice(0, 40)), []);
    const result = await uploading;
    assert.equal(result.uploaded, 200);
    assert.deepEqual(await countDistinct(p.remote.sql), { rows: 200, ids: 200 });
  } finally {
    await slow.end();
    await proxy.close();
  }
});

Deno.test("quoted mixed-case, spaced, quoted and reserved column names travel (G7)", async () => {
  await using p = await pair(30);
  for (const db of [p.local.sql, p.remote.sql]) {
    await db`ALTER TABLE meter_readings ADD COLUMN "Phase Angle N" real`;
    await db`ALTER TABLE meter_readings ADD COLUMN "select" text`;
    await db`ALTER TABLE meter_readings ADD COLUMN "say ""hi""" integer`;
  }
  await p.local.sql`
    UPDATE meter_readings SET "Phase Angle N" = 12.5, "select" = 'from', "say ""hi""" = 7`;
  // A remote-only nullable column is filled with its default, not an error.
  await p.remote.sql`ALTER TABLE meter_readings ADD COLUMN "Central Note" text DEFAULT 'n/a'`;
  const result = await upload(p.deps(), { batchSize: 100 });
  assert.equal(result.uploaded, 30);
  const rows = await p.remote.sql`
    SELECT DISTINCT "Phase Angle N" AS a, "select" AS s, "say ""hi""" AS h, "Central Note" AS n
      FROM meter_readings`;
  assert.deepEqual([...rows], [{ a: 12.5, s: "from", h: 7, n: "n/a" }]);
});

Deno.test("a table named with capitals and a space works end to end (--table)", async () => {
  await using p = await pair(0);
  for (const db of [p.local.sql, p.remote.sql]) {
    await db`CREATE TABLE "Meter Readings" (LIKE meter_readings INCLUDING ALL)`;
  }
  await p.remote.sql`ALTER TABLE "Meter Readings" DROP COLUMN is_synchronized`.catch(() => {});
  await p.local.sql`INSERT INTO meters (id, serial_number, name) VALUES (1, 'SN-1', 'one')`;
  await p.local.sql`
    INSERT INTO "Meter Readings" (meter_id, status) SELECT 1, 'ok' FROM generate_series(1, 25)`;
  const result = await upload(p.deps(), { batchSize: 10, table: "Meter Readings" });
  assert.equal(result.uploaded, 25);
  assert.equal(await count(p.remote.sql, "Meter Readings"), 25);
  assert.equal(await count(p.local.sql, "Meter Readings"), 0);
});

Deno.test("poison rows spread over many pipelined batches are each quarantined once", async () => {
  await using p = await pair(2000);
  await p.local.sql`
    UPDATE meter_readings SET voltage_l1_v = 9999
     WHERE id IN (SELECT id FROM meter_readings ORDER BY createdat, id OFFSET 25 LIMIT 40)
        OR id IN (SELECT id FROM meter_readings ORDER BY createdat, id OFFSET 900 LIMIT 3)`;
  await p.remote.sql`
    ALTER TABLE meter_readings ADD CONSTRAINT plausible_voltage CHECK (voltage_l1_v < 1000)`;
  // Small batches: many claims overlap commits that bring quarantine rows.
  const result = await upload(p.deps(), { batchSize: 20 });
  assert.equal(result.quarantined, 43);
  assert.equal(result.uploaded, 1957);
  const [q] = await p.local.sql`
    SELECT count(*)::int AS n, max(attempts)::int AS attempts FROM meter_sync_quarantine`;
  assert.deepEqual({ ...q }, { n: 43, attempts: 1 });
  assert.equal(await count(p.remote.sql), 1957);
});

Deno.test("batch after batch, each remote COPY opened while the one before is answered, rolls nothing back", async () => {
  // Each batch's COPY is started behind the one before, on the agent's one remote connection;
  // the last batch opens none. A stray abort message, or a COPY left over to cancel, would
  // show as rolled-back transactions on the remote.
  await using p = await pair(600);
  // Each COPY takes 50 ms to answer: the next batch is claimed by then, so every batch but
  // the first goes through a COPY opened ahead.
  await p.remote.sql.unsafe(`
    CREATE FUNCTION slow_answer() RETURNS trigger LANGUAGE plpgsql
      AS $$ BEGIN PERFORM pg_sleep(0.05); RETURN NULL; END $$;
    CREATE TRIGGER slow_answer AFTER INSERT ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION slow_answer();`);
  const rollbacks = async () => {
    await p.agentRemote.sql`SELECT pg_stat_force_next_flush()`;
    await p.agentRemote.sql`SELECT 1`; // idle in between: the agent's counters are flushed
    const [r] = await p.remote.sql<{ n: number }[]>`
      SELECT xact_rollback::int AS n FROM pg_stat_database WHERE datname = current_database()`;
    return r.n;
  };
  const before = await rollbacks();
  const result = await upload(p.deps(), { batchSize: 50 });
  assert.equal(result.batches, 12);
  assert.equal(result.retries, 0);
  assert.equal(await rollbacks(), before);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 600, ids: 600 });
  assert.equal(await count(p.local.sql), 0);
});
