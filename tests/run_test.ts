/** `run`, the agent, as an operator runs it: main.ts with the compile flags against real PostgreSQL. */
import assert from "node:assert/strict";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { freePort } from "../lib/embedded.ts";
import { seedReadings } from "../lib/seed.ts";
import {
  agentCopying,
  assertConnectionsClosed,
  finish,
  slowRemoteCopies,
  spawnCli,
  waitFor,
} from "./_agent.ts";
import { runCli, type Sql } from "./_harness.ts";
import { count, countDistinct, pair } from "./_sync_fixture.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Cycles recorded by the agent, in order: [start, end] in ms. */
async function cycles(sql: Sql): Promise<[number, number, string][]> {
  const rows = await sql<{ s: Date; f: Date; outcome: string }[]>`
    SELECT started_at AS s, finished_at AS f, outcome FROM meter_sync_runs
     WHERE command = 'run' ORDER BY started_at`;
  return rows.map((r) => [r.s.getTime(), r.f.getTime(), r.outcome]);
}

function assertNoOverlap(runs: [number, number, string][]): void {
  for (let i = 1; i < runs.length; i++) {
    assert.ok(runs[i][0] >= runs[i - 1][1], `cycle ${i} started before cycle ${i - 1} ended`);
  }
}

async function get(port: number, path: string): Promise<{ status: number; body: string }> {
  const res = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: res.status, body: await res.text() };
}

Deno.test("run --every 1s delivers every reading a steady poller inserts, exactly once; SIGTERM exits 0", async () => {
  await using p = await pair(0);
  const port = freePort();
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  // The meters come from the central side, as in production, and the gateway has them already
  // when the agent starts. Otherwise the first download (central still empty) deleted the meters
  // the poller below had just created, while the poller's readings referenced them: PostgreSQL
  // then broke the deadlock by failing one side, once here the test's own insert.
  for (const sql of [p.remote.sql, p.local.sql]) {
    await sql`INSERT INTO meters (id, serial_number, name)
              SELECT g, 'M-' || g, 'meter ' || g FROM generate_series(1, 5) g`;
  }
  const agent = await spawnCli([
    "run",
    "--every",
    "1s",
    "--batch-size",
    "40",
    "--agent-id",
    "gw-0042",
    "--http",
    `127.0.0.1:${port}`,
  ], env);
  // The gateway's poller: 25 readings every 100 ms for 5 s, while the agent runs.
  let inserted = 0;
  const until = Date.now() + 5000;
  while (Date.now() < until) {
    inserted += await seedReadings(p.local.sql, { count: 25, meters: 5, days: 1 });
    await sleep(100);
  }
  await waitFor("the queue drained", async () => (await count(p.local.sql)) === 0, 20_000);
  // The meters list comes down on the next cycles: a rename and a new meter.
  await p.remote.sql`UPDATE meters SET name = 'renamed centrally' WHERE id = 1`;
  await p.remote.sql`INSERT INTO meters (id, serial_number, name) VALUES (6, 'M-6', 'new')`;
  await waitFor("the meters mirrored", async () => {
    const rows = await p.local.sql`SELECT id::int, name FROM meters WHERE id IN (1, 6) ORDER BY id`;
    return rows.length === 2 && rows[0].name === "renamed centrally";
  }, 20_000);
  const health = await get(port, "/healthz");
  assert.equal(health.status, 200, health.body);
  const status = JSON.parse((await get(port, "/status")).body);
  assert.equal(status.queue_size, 0);
  assert.equal(status.stale, false);
  assert.equal(status.remote.reachable, true);
  assert.equal(status.remote.agent.agent_id, "gw-0042");
  // The live scrape, read by an independent parser (the package is CommonJS, untyped).
  const parse = parsePrometheusTextFormat as unknown as (text: string) => {
    name: string;
    type: string;
    metrics: { value?: string; labels?: Record<string, string>; count?: string }[];
  }[];
  const families = new Map(parse((await get(port, "/metrics")).body).map((f) => [f.name, f]));
  const value = (name: string) => Number(families.get(name)?.metrics[0].value);
  assert.equal(
    value("meter_sync_rows_uploaded_total"),
    inserted,
    "the counter matches the rows moved",
  );
  assert.equal(families.get("meter_sync_rows_uploaded_total")?.type, "COUNTER");
  assert.equal(value("meter_sync_queue_size"), 0);
  assert.ok(value("meter_sync_rows_downloaded_total") >= 1, "the meters came down");
  const ok = families.get("meter_sync_cycles_total")?.metrics.find((m) =>
    m.labels?.outcome === "ok"
  );
  assert.ok(Number(ok?.value) >= 3);
  const batches = families.get("meter_sync_batch_duration_seconds");
  assert.equal(batches?.type, "HISTOGRAM");
  assert.ok(Number(batches?.metrics[0].count) >= Math.ceil(inserted / 40));
  assert.ok(value("meter_sync_last_success_timestamp_seconds") > Date.now() / 1000 - 60);
  agent.kill("SIGTERM");
  const r = await finish(agent);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /agent stopped after \d+ cycles/);

  assert.ok(inserted >= 250, `the poller inserted ${inserted}`);
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: inserted, ids: inserted });
  const runs = await cycles(p.local.sql);
  assert.ok(runs.length >= 3, `${runs.length} cycles: ${r.stderr}`);
  assertNoOverlap(runs);
  // The fleet row: one SELECT on the central side shows this gateway.
  const [beat] = await p.remote.sql`SELECT * FROM sync_agents`;
  assert.equal(beat.agent_id, "gw-0042");
  assert.equal(beat.last_outcome, "ok");
  assert.equal(Number(beat.rows_uploaded_total), inserted);
  assert.equal(Number(beat.queue_size), 0);
  assert.equal(Number(beat.quarantined), 0);
  assert.equal(beat.last_error, null);
  assert.ok(beat.last_success_at instanceof Date);
  assert.match(beat.version, /^\d+\.\d+\.\d+/);
});

Deno.test("the remote stopped for several cycles: backoff, /healthz 503, then recovery with nothing lost", async () => {
  await using p = await pair(500, "outage");
  const port = freePort();
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const agent = await spawnCli([
    "run",
    "--every",
    "300ms",
    "--max-backoff",
    "1500ms",
    "--max-retries",
    "1",
    "--stale-after",
    "2s",
    "--agent-id",
    "gw-outage",
    "--http",
    `127.0.0.1:${port}`,
  ], env);
  try {
    await waitFor("the first drain", async () => (await count(p.remote.sql)) === 500, 20_000);
    await waitFor("a healthy agent", async () => (await get(port, "/healthz")).status === 200);
    await p.remote.server.stop();
    await seedReadings(p.local.sql, { count: 300, meters: 5, days: 1 });
    await waitFor("/healthz to turn 503", async () => (await get(port, "/healthz")).status === 503);
    await sleep(2500); // several failed cycles, and the last success goes stale
    await waitFor("/healthz to name the remote", async () => {
      const sick = await get(port, "/healthz");
      return sick.status === 503 && /remote database unreachable/.test(sick.body) &&
        /stale after 2 s/.test(sick.body);
    });
    assert.equal(
      await count(p.local.sql),
      300,
      "nothing left the gateway while the remote was down",
    );
    await p.remote.server.start();
    await waitFor(
      "the drain after the outage",
      async () => (await count(p.local.sql)) === 0,
      30_000,
    );
    await waitFor("/healthz back to 200", async () => (await get(port, "/healthz")).status === 200);
  } finally {
    agent.kill("SIGTERM");
  }
  const r = await finish(agent);
  assert.equal(r.code, 0, r.stderr);
  assert.match(
    r.stderr,
    /cycle failed: .*; \d+ failed cycles in a row; the next one in .* at the earliest/,
  );
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 800, ids: 800 });
  const runs = await cycles(p.local.sql);
  assert.ok(runs.filter((c) => c[2] === "failed").length >= 2, "several cycles failed");
  assert.equal(runs.at(-1)![2], "ok");
  // Backoff: fewer failed cycles than --every alone would have started in the outage.
  const [beat] = await p.remote.sql`SELECT last_outcome, last_error FROM sync_agents`;
  assert.equal(beat.last_outcome, "ok");
});

Deno.test("a cycle slower than the interval never runs twice at once: late ticks are skipped and logged", async () => {
  await using p = await pair(600);
  await slowRemoteCopies(p.remote.sql, 0.8);
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const agent = await spawnCli(["run", "--every", "300ms", "--batch-size", "200"], env);
  await waitFor("the queue drained", async () => (await count(p.local.sql)) === 0, 30_000);
  agent.kill("SIGTERM");
  const r = await finish(agent);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /tick skipped: the previous cycle is still running/);
  assertNoOverlap(await cycles(p.local.sql));
  assert.deepEqual(await countDistinct(p.remote.sql), { rows: 600, ids: 600 });
});

Deno.test("SIGTERM during a batch in run mode: no half batch, connections closed, exit 0", async () => {
  await using p = await pair(2000);
  await slowRemoteCopies(p.remote.sql, 0.4);
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const agent = await spawnCli(["run", "--every", "1s", "--batch-size", "250"], env);
  await waitFor(
    "the agent inside its second batch",
    async () => (await count(p.remote.sql)) >= 250 && (await agentCopying(p.remote.sql)),
  );
  agent.kill("SIGTERM");
  const r = await finish(agent);
  assert.equal(r.code, 0, r.stderr);
  const remote = await count(p.remote.sql);
  assert.equal(remote % 250, 0, `no half batch: ${remote} rows on the remote`);
  assert.ok(remote < 2000, "it stopped before the queue was empty");
  assert.equal(remote + (await count(p.local.sql)), 2000);
  await assertConnectionsClosed(p.local.sql, p.remote.sql);
});

Deno.test("run --cron: a schedule cron rejects is exit 2 in one line; a valid one runs until SIGTERM", async () => {
  await using p = await pair(0);
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  const bad = await runCli(["run", "--cron", "61 * * * *"], { env });
  assert.equal(bad.code, 2, bad.stderr);
  assert.equal(bad.stderr.trim().split("\n").length, 1, bad.stderr);
  assert.match(bad.stderr, /--cron "61 \* \* \* \*" is not a schedule cron accepts/);

  const agent = await spawnCli(["run", "--cron", "*/5 * * * *"], env);
  await sleep(1500);
  agent.kill("SIGTERM");
  const r = await finish(agent);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /started: cron "\*\/5 \* \* \* \*" \(UTC\)/);
});

Deno.test("run refuses a missing or double schedule and a busy --http port with exit 2 and one line", async () => {
  await using p = await pair(0);
  const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
  for (
    const args of [
      ["run"],
      ["run", "--every", "30s", "--cron", "* * * * *"],
      ["run", "--every", "soon"],
      ["run", "--every", "1s", "--jitter", "-1s"],
      ["run", "--every", "1s", "--http", "127.0.0.1:99999"],
    ]
  ) {
    const r = await runCli(args, { env });
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
  const holder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (holder.addr as Deno.NetAddr).port;
    const r = await runCli(["run", "--every", "1s", "--http", `127.0.0.1:${port}`], { env });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /cannot listen on 127\.0\.0\.1:\d+: address in use/);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  } finally {
    holder.close();
  }
});
