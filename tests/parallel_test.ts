/** --parallel N: several upload lanes at once, still every reading exactly once (G1, G2, G4, G5). */
import assert from "node:assert/strict";
import { laneBatches, sumResults } from "../lib/lanes.ts";
import { runCli } from "./_harness.ts";
import { count, countDistinct, pair } from "./_sync_fixture.ts";

Deno.test("laneBatches() splits --max-batches exactly over the lanes", () => {
  assert.deepEqual(laneBatches(undefined, 3), [undefined, undefined, undefined]);
  assert.deepEqual(laneBatches(10, 4), [3, 3, 2, 2]);
  assert.deepEqual(laneBatches(2, 4), [1, 1, 0, 0]);
  for (let max = 1; max < 40; max++) {
    for (let lanes = 1; lanes <= 16; lanes++) {
      const shares = laneBatches(max, lanes) as number[];
      assert.equal(shares.reduce((a, b) => a + b, 0), max);
      assert.ok(Math.max(...shares) - Math.min(...shares) <= 1);
    }
  }
});

Deno.test("sumResults() adds the lanes' counts and keeps the longest time", () => {
  const lane = (n: number, seconds: number, stopped = false) => ({
    uploaded: n,
    skipped: 1,
    deleted: n + 1,
    quarantined: 2,
    batches: 3,
    retries: 4,
    seconds,
    stopped,
  });
  assert.deepEqual(sumResults([lane(10, 1.5), lane(20, 2.5, true)]), {
    uploaded: 30,
    skipped: 2,
    deleted: 32,
    quarantined: 4,
    batches: 6,
    retries: 8,
    seconds: 2.5,
    stopped: true,
  });
});

Deno.test("sync --parallel 4 delivers every reading once and quarantines the poison rows once", async () => {
  await using p = await pair(6000);
  // Every 500th reading breaks a central constraint.
  const poison = await p.local.sql<{ id: string }[]>`
    UPDATE meter_readings SET voltage_l1_v = 9999 WHERE id IN (
      SELECT id FROM (SELECT id, row_number() OVER (ORDER BY createdat, id) AS n
                        FROM meter_readings) s
       WHERE n % 500 = 250)
    RETURNING id::text`;
  assert.equal(poison.length, 12);
  await p.remote.sql`
    ALTER TABLE meter_readings ADD CONSTRAINT plausible_voltage CHECK (voltage_l1_v < 1000)`;
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const r = await runCli(["sync", "--parallel", "4", "--batch-size", "100"], { env });
  assert.equal(r.code, 0, r.stderr);
  const delivered = 6000 - poison.length;
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: delivered, ids: delivered });
  assert.equal(await count(p.local.sql), poison.length, "only the poison rows stay");
  const q = await p.local.sql`SELECT id::text, attempts FROM meter_sync_quarantine ORDER BY id`;
  assert.deepEqual(q.map((row) => row.id).sort(), poison.map((row) => row.id).sort());
  assert.match(r.stderr, new RegExp(`sync: ${delivered} rows up`));
  // One cycle in the history, with the batches of all four lanes.
  const [run] = await p.local.sql`SELECT batches, rows_uploaded::int FROM meter_sync_runs`;
  assert.equal(run.rows_uploaded, delivered);
  assert.ok(run.batches >= 60, `${run.batches} batches`);
});

Deno.test("upload --parallel 3 --max-batches 7 moves exactly seven batches", async () => {
  await using p = await pair(2000);
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const r = await runCli(
    ["upload", "--parallel", "3", "--max-batches", "7", "--batch-size", "50"],
    {
      env,
    },
  );
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 350, ids: 350 });
  assert.equal(await count(p.local.sql), 1650);
});
