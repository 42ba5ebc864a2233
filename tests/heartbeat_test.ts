/** The fleet row in sync_agents: what the central side reads about each gateway. */
import assert from "node:assert/strict";
import { recordHeartbeat } from "../lib/heartbeat.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { freshDb } from "./_harness.ts";

Deno.test("a heartbeat stores every value as given, and a failed cycle keeps the last success", async () => {
  await using remote = await freshDb();
  await migrate(remote.sql, await loadMigrations(migrationsDir("remote")));
  const agentId = `gw-'7' \\ "nord" ü`;
  const first = {
    agentId,
    version: "1.2.3",
    startedAt: new Date("2026-11-26T01:02:03.456Z"),
    finishedAt: new Date("2026-11-26T01:02:09.789Z"),
    outcome: "ok" as const,
    uploaded: 4_000_000_123,
    downloaded: 7,
    queueSize: 0,
    quarantined: null,
    error: null,
  };
  await recordHeartbeat(remote.sql, first);
  const error =
    `remote: relation "meter_readings" doesn't exist\nhint: it's C:\\path; 'quoted' \\' --`;
  await recordHeartbeat(remote.sql, {
    ...first,
    startedAt: new Date("2026-11-26T01:05:00.001Z"),
    finishedAt: new Date("2026-11-26T01:05:01.002Z"),
    outcome: "failed",
    uploaded: 5,
    queueSize: null,
    quarantined: 2,
    error,
  });
  const rows = await remote.sql`SELECT * FROM sync_agents`;
  assert.equal(rows.length, 1);
  const [beat] = rows;
  assert.equal(beat.agent_id, agentId);
  assert.equal(beat.version, "1.2.3");
  assert.equal(beat.last_outcome, "failed");
  assert.equal(beat.last_error, error);
  assert.equal(beat.last_cycle_started_at.toISOString(), "2026-11-26T01:05:00.001Z");
  assert.equal(beat.last_cycle_finished_at.toISOString(), "2026-11-26T01:05:01.002Z");
  assert.equal(beat.last_success_at.toISOString(), "2026-11-26T01:02:09.789Z");
  assert.equal(String(beat.rows_uploaded), "5");
  assert.equal(String(beat.rows_uploaded_total), "4000000128");
  assert.equal(String(beat.rows_downloaded), "7");
  assert.equal(Number(beat.queue_size), 0, "an unknown queue size keeps the last one known");
  assert.equal(Number(beat.quarantined), 2);
});
