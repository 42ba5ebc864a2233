/** Closing the agent's pools: a query still running may finish, a dead connection holds nothing up. */
import assert from "node:assert/strict";
import { openPool } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { freshDb } from "./_harness.ts";

Deno.test("a pool whose connection died under a query closes at once, not after the grace period", async () => {
  await using db = await freshDb();
  const pool = await openPool(parseDatabaseUrl(db.url, "REMOTE_DATABASE_URL"));
  const [{ pid }] = await pool.sql`SELECT pg_backend_pid() AS pid`;
  const running = pool.sql`SELECT pg_sleep(5)`.then(() => "finished", (err) => err.code);
  await db.sql`SELECT pg_sleep(0.2)`;
  await db.sql`SELECT pg_terminate_backend(${pid})`;
  assert.notEqual(await running, "finished");
  // postgres.js keeps the lost query as its connection's current one; its own end()
  // waits for it until the 5 s timeout (as every cycle that lost the remote did).
  const started = performance.now();
  await pool.end();
  const ms = performance.now() - started;
  assert.ok(ms < 2_500, `the pool took ${Math.round(ms)} ms to close`);
});

Deno.test("a pool closed while a query runs lets it finish", async () => {
  await using db = await freshDb();
  const pool = await openPool(parseDatabaseUrl(db.url, "REMOTE_DATABASE_URL"));
  await pool.sql`SELECT 1`;
  // A postgres.js query starts when it is awaited: then() sends it now.
  const running = pool.sql`SELECT pg_sleep(0.3), 42 AS answer`.then((rows) => rows);
  await new Promise((r) => setTimeout(r, 50));
  await pool.end();
  const [row] = await running;
  assert.equal(row.answer, 42);
});
