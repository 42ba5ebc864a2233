/** Shared set-up of the upload tests: a migrated gateway and central database, a fake clock. */
import type { Clock } from "../lib/commands/context.ts";
import { LOCAL_CONNECTIONS } from "../lib/connections.ts";
import { openPool, type Pool, type Sql } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { seedReadings } from "../lib/seed.ts";
import type { UploadDeps } from "../lib/upload.ts";
import { freshDb, type TestDb } from "./_harness.ts";

/** A clock that never sleeps: it records each requested delay and runs an optional hook. */
export interface FakeClock extends Clock {
  sleeps: number[];
  onSleep?: (n: number) => Promise<void> | void;
}

export function fakeClock(): FakeClock {
  let t = Date.parse("2026-11-25T12:00:00Z");
  const clock: FakeClock = {
    sleeps: [],
    now: () => t,
    sleep: async (ms, signal) => {
      if (signal?.aborted) throw signal.reason;
      clock.sleeps.push(ms);
      t += ms;
      await clock.onSleep?.(clock.sleeps.length);
    },
  };
  return clock;
}

/** Both sides, migrated, with agent connections made the way the CLI makes them. */
export interface Pair extends AsyncDisposable {
  local: TestDb;
  remote: TestDb;
  /** Agent-side pools (like main.ts opens them), separate from the test's own. */
  agentLocal: Pool;
  agentRemote: Pool;
  deps(extra?: Partial<UploadDeps>): UploadDeps & { clock: FakeClock };
}

/** A fresh, migrated pair of databases; `seed` readings are inserted locally. */
export async function pair(seed = 0, remoteServer = "remote"): Promise<Pair> {
  const local = await freshDb("local");
  const remote = await freshDb(remoteServer);
  await migrate(local.sql, await loadMigrations(migrationsDir("local")));
  await migrate(remote.sql, await loadMigrations(migrationsDir("remote")));
  if (seed > 0) await seedReadings(local.sql, { count: seed, meters: 5, days: 2, chunk: 10_000 });
  const agentLocal = await openPool(parseDatabaseUrl(local.url, "LOCAL_DATABASE_URL"), {
    max: LOCAL_CONNECTIONS,
  });
  const agentRemote = await openPool(parseDatabaseUrl(remote.url, "REMOTE_DATABASE_URL"));
  return {
    local,
    remote,
    agentLocal,
    agentRemote,
    deps: (extra = {}) =>
      ({
        local: agentLocal,
        remote: agentRemote,
        clock: fakeClock(),
        random: () => 0.5,
        ...extra,
      }) as UploadDeps & { clock: FakeClock },
    async [Symbol.asyncDispose]() {
      await agentLocal.end();
      await agentRemote.end();
      await local[Symbol.asyncDispose]();
      await remote[Symbol.asyncDispose]();
    },
  };
}

/** Number of rows in a table. */
export async function count(sql: Sql, table = "meter_readings"): Promise<number> {
  const [row] = await sql.unsafe(`SELECT count(*)::int AS n FROM "${table}"`);
  return row.n;
}

/** Rows and distinct ids on a side: equal when nothing is duplicated. */
export async function countDistinct(sql: Sql): Promise<{ rows: number; ids: number }> {
  const [row] = await sql`
    SELECT count(*)::int AS rows, count(DISTINCT id)::int AS ids FROM meter_readings`;
  return row as unknown as { rows: number; ids: number };
}
