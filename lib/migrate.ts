/** Applies the numbered SQL files of migrations/local or migrations/remote, once each, in order. */
import { getLogger } from "@logtape/logtape";
import type { Sql } from "./db.ts";
import { quoteIdent } from "./columns.ts";
import { ConfigError, describeError, sqlState } from "./errors.ts";

const log = getLogger(["meter-sync", "migrate"]);

/** One numbered SQL file. */
export interface Migration {
  name: string;
  sql: string;
  checksum: string;
}

/** What a run did. */
export interface MigrateResult {
  applied: string[];
  alreadyApplied: number;
}

/** Records which files ran, with the checksum they had then. */
const HISTORY = "meter_sync_migrations";

/** Two runners on the same database wait for each other instead of interleaving. */
const LOCK_KEY = 0x6d657465; // "mete"

/** The folder shipped with the program (and included in the compiled binary). */
export function migrationsDir(side: "local" | "remote"): URL {
  return new URL(`../migrations/${side}/`, import.meta.url);
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Reads NNN_name.sql files from a folder, sorted by name. */
export async function loadMigrations(dir: URL): Promise<Migration[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && /^\d{3,}_[\w-]+\.sql$/.test(entry.name)) names.push(entry.name);
  }
  names.sort();
  const out: Migration[] = [];
  for (const name of names) {
    const sql = await Deno.readTextFile(new URL(name, dir));
    out.push({ name, sql, checksum: await sha256(sql) });
  }
  return out;
}

/** Refuses, saying how to fix it, a database that takes no writes: nothing can be applied. */
async function assertWritable(conn: Sql): Promise<void> {
  const [s] = await conn<
    { database: string; user: string; read_only: boolean; standby: boolean }[]
  >`
    SELECT current_database() AS database, current_user AS "user",
           current_setting('default_transaction_read_only') = 'on' AS read_only,
           pg_is_in_recovery() AS standby`;
  const db = `database "${s.database}"`;
  if (s.standby) {
    throw new ConfigError(
      `cannot migrate: ${db} is a read-only standby (in recovery); point the URL at the primary`,
    );
  }
  if (s.read_only) {
    throw new ConfigError(
      `cannot migrate: ${db} is read-only (default_transaction_read_only is on); run ALTER DATABASE ${
        quoteIdent(s.database)
      } SET default_transaction_read_only = off (or reset it for user "${s.user}"), or point the URL at a writable database`,
    );
  }
}

/** A failure a setting causes, as a ConfigError that says which; any other error as it is. */
function migrationError(err: unknown, what: string): unknown {
  const state = sqlState(err);
  if (state === "42501") {
    return new ConfigError(
      `${what}: ${
        describeError(err)
      }; migrations create and alter tables: run migrate as the owner of the tables (or a superuser), not as the agent's role`,
      { cause: err },
    );
  }
  if (state === "25006") {
    return new ConfigError(
      `${what}: ${
        describeError(err)
      }; the database turned read-only (default_transaction_read_only, or a standby): make it writable or point the URL at the primary`,
      { cause: err },
    );
  }
  return err;
}

/**
 * Applies the pending migrations, each in its own transaction, under an advisory lock.
 * Refuses to go on if a file that was applied has changed since, and refuses a database
 * that takes no writes or a user that may not create tables, saying how to fix it.
 */
export async function migrate(sql: Sql, migrations: Migration[]): Promise<MigrateResult> {
  const conn = await sql.reserve();
  try {
    await assertWritable(conn);
    await conn`SELECT pg_advisory_lock(${LOCK_KEY})`;
    try {
      await conn.unsafe(
        `CREATE TABLE IF NOT EXISTS ${HISTORY} (
           name text PRIMARY KEY,
           checksum text NOT NULL,
           applied_at timestamptz NOT NULL DEFAULT now()
         )`,
      ).catch((err) => {
        throw migrationError(err, `cannot create ${HISTORY}`);
      });
      const rows = await conn<{ name: string; checksum: string }[]>`
        SELECT name, checksum FROM ${conn(HISTORY)}`;
      const done = new Map(rows.map((r) => [r.name, r.checksum]));
      for (const m of migrations) {
        const old = done.get(m.name);
        if (old !== undefined && old !== m.checksum) {
          throw new ConfigError(
            `migration ${m.name} changed after it was applied (checksum differs); restore the file and put the change in a new migration`,
          );
        }
      }
      const applied: string[] = [];
      for (const m of migrations) {
        if (done.has(m.name)) continue;
        const started = performance.now();
        await conn.unsafe("BEGIN");
        try {
          await conn.unsafe(m.sql).simple();
          await conn`INSERT INTO ${
            conn(HISTORY)
          } (name, checksum) VALUES (${m.name}, ${m.checksum})`;
          await conn.unsafe("COMMIT");
        } catch (err) {
          await conn.unsafe("ROLLBACK").catch(() => {});
          throw migrationError(err, `migration ${m.name} failed, nothing of it applied`);
        }
        applied.push(m.name);
        log.info("applied {name} in {ms} ms", {
          name: m.name,
          ms: Math.round(performance.now() - started),
        });
      }
      return { applied, alreadyApplied: migrations.length - applied.length };
    } finally {
      await conn`SELECT pg_advisory_unlock(${LOCK_KEY})`.catch(() => {});
    }
  } finally {
    conn.release();
  }
}
