/** Reference data down (SPEC §4) against real PostgreSQL: inserts, updates, deletes, kept references. */
import assert from "node:assert/strict";
import { SchemaError } from "../lib/errors.ts";
import { download, mirrorTable } from "../lib/download.ts";
import { within } from "./_agent.ts";
import { runCli } from "./_harness.ts";
import { count, pair } from "./_sync_fixture.ts";

async function meters(sql: import("./_harness.ts").Sql) {
  const rows = await sql<{ id: string; name: string; location: string | null }[]>`
    SELECT id::text, name, location FROM meters ORDER BY id`;
  return rows.map((r) => ({ ...r }));
}

Deno.test("download mirrors inserted, updated and deleted meters from the remote, remote wins", async () => {
  await using p = await pair(0);
  const at = "2026-01-01 00:00:00+00";
  await p.remote.sql`
    INSERT INTO meters (id, serial_number, name, location, updated_at) VALUES
      (1, 'SN-1', 'one', 'north', ${at}), (2, 'SN-2', 'two', 'south', ${at}),
      (3, 'SN-3', 'three', NULL, ${at})`;
  // The gateway has a stale copy: one changed, one gone centrally, one missing.
  await p.local.sql`
    INSERT INTO meters (id, serial_number, name, location, updated_at) VALUES
      (1, 'SN-1', 'one', 'north', ${at}), (2, 'SN-2', 'old name', 'south', ${at}),
      (9, 'SN-9', 'retired', NULL, ${at})`;
  const [r] = await download({ local: p.agentLocal.sql, remote: p.agentRemote.sql }, ["meters"]);
  assert.deepEqual(
    { ...r },
    { table: "meters", inserted: 1, updated: 1, deleted: 1, kept: 0, unchanged: 1 },
  );
  assert.deepEqual(await meters(p.local.sql), await meters(p.remote.sql));
});

Deno.test("download leaves unchanged rows unwritten (compared by key and content)", async () => {
  await using p = await pair(0);
  for (const db of [p.local.sql, p.remote.sql]) {
    await db`INSERT INTO meters (id, serial_number, name, updated_at)
             VALUES (1, 'SN-1', 'one', '2026-01-01 00:00:00+00')`;
  }
  const [before] = await p.local.sql`SELECT xmin::text AS v FROM meters WHERE id = 1`;
  const [r] = await download({ local: p.agentLocal.sql, remote: p.agentRemote.sql }, ["meters"]);
  assert.equal(r.unchanged, 1);
  assert.equal(r.updated, 0);
  const [after] = await p.local.sql`SELECT xmin::text AS v FROM meters WHERE id = 1`;
  assert.equal(after.v, before.v, "the row was not rewritten");
});

Deno.test("a meter that local readings still reference is kept and reported, not deleted", async () => {
  await using p = await pair(0);
  await p.local
    .sql`INSERT INTO meters (id, serial_number, name) VALUES (7, 'SN-7', 'seven'), (8, 'SN-8', 'eight')`;
  await p.local.sql`INSERT INTO meter_readings (meter_id, status) VALUES (7, 'ok')`;
  // Centrally, both meters are gone.
  const [r] = await download({ local: p.agentLocal.sql, remote: p.agentRemote.sql }, ["meters"]);
  assert.equal(r.deleted, 1);
  assert.equal(r.kept, 1);
  assert.deepEqual((await meters(p.local.sql)).map((m) => m.id), ["7"]);
  assert.equal(await count(p.local.sql), 1, "the reading is still there");
});

Deno.test("a gone meter that a gateway transaction is inserting a reading for is kept, not waited for", async () => {
  await using p = await pair(0);
  await p.local
    .sql`INSERT INTO meters (id, serial_number, name) VALUES (7, 'SN-7', 'seven'), (8, 'SN-8', 'eight')`;
  // The poller's reading for meter 7, not committed yet: its foreign key check holds meter 7,
  // and the reference is invisible to the download. Centrally, both meters are gone.
  const poller = await p.local.sql.reserve();
  let r;
  try {
    await poller`BEGIN`;
    await poller`INSERT INTO meter_readings (meter_id, status) VALUES (7, 'ok')`;
    [r] = await within(
      download({ local: p.agentLocal.sql, remote: p.agentRemote.sql }, ["meters"]),
      10_000,
      "the download waited for the poller's transaction",
    );
    await poller`COMMIT`;
  } finally {
    await poller`ROLLBACK`.catch(() => {}); // after a failure above; a no-op after COMMIT
    poller.release();
  }
  assert.equal(r.deleted, 1, "meter 8, which nothing holds");
  assert.equal(r.kept, 1, "meter 7, held by the insert");
  assert.deepEqual((await meters(p.local.sql)).map((m) => m.id), ["7"]);
  assert.equal(await count(p.local.sql), 1, "the poller's reading went in");
  // Committed, the reading keeps its meter on the next download too.
  const [again] = await download({ local: p.agentLocal.sql, remote: p.agentRemote.sql }, [
    "meters",
  ]);
  assert.deepEqual({ deleted: again.deleted, kept: again.kept }, { deleted: 0, kept: 1 });
});

Deno.test("a table without a primary key is refused with a clear message", async () => {
  await using p = await pair(0);
  for (const db of [p.local.sql, p.remote.sql]) {
    await db`CREATE TABLE tariffs (code text, price numeric)`;
  }
  await assert.rejects(
    mirrorTable(p.agentLocal.sql, p.agentRemote.sql, "tariffs"),
    (err: unknown) => {
      assert.ok(err instanceof SchemaError);
      assert.match((err as Error).message, /"tariffs" has no primary key/);
      return true;
    },
  );
});

Deno.test("a download table missing on either side is exit 3 in one line that says to migrate", async () => {
  await using p = await pair(0);
  await p.remote.sql`CREATE TABLE tariffs (code text PRIMARY KEY, price numeric)`;
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const local = await runCli(["download", "--download-tables", "tariffs"], { env });
  assert.equal(local.code, 3, local.stderr);
  assert.equal(local.stderr.trim().split("\n").length, 1, local.stderr);
  assert.match(
    local.stderr,
    /"tariffs" does not exist in the local database; run: meter-sync migrate --target local/,
  );
  const remote = await runCli(["download", "--download-tables", "rates"], { env });
  assert.equal(remote.code, 3, remote.stderr);
  assert.match(
    remote.stderr,
    /"rates" does not exist in the remote database; run: meter-sync migrate --target remote/,
  );
});

Deno.test("sync uploads the readings, then brings the meters down; download runs alone too", async () => {
  await using p = await pair(120);
  await p.remote.sql`
    INSERT INTO meters (id, serial_number, name) VALUES (1000, 'SN-1000', 'new centrally')`;
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const sync = await runCli(["sync"], { env });
  assert.equal(sync.code, 0, sync.stderr);
  assert.equal(await count(p.remote.sql), 120);
  assert.match(sync.stderr, /meters: 1 inserted/);
  // The seeded meters are referenced by no reading any more (all uploaded): the remote
  // does not have them, so they go; the new one stays.
  assert.deepEqual((await meters(p.local.sql)).map((m) => m.id), ["1000"]);
  await p.remote.sql`UPDATE meters SET name = 'renamed' WHERE id = 1000`;
  const down = await runCli(["download"], { env });
  assert.equal(down.code, 0, down.stderr);
  assert.equal((await meters(p.local.sql))[0].name, "renamed");
  const missing = await runCli(["download", "--download-tables", "no_such_table"], { env });
  assert.equal(missing.code, 3);
  assert.match(missing.stderr, /"no_such_table" does not exist/);
});
