/** Running the agent as a user does (main.ts with the compile task's flags), for end-to-end tests. */
import assert from "node:assert/strict";
import { compileFlags, type Sql } from "./_harness.ts";

export const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** Starts main.ts with the compile flags, without waiting for it. */
export async function spawnCli(
  args: string[],
  env: Record<string, string>,
): Promise<Deno.ChildProcess> {
  return new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", ...(await compileFlags()), MAIN, ...args],
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).spawn();
}

export async function waitFor(
  what: string,
  ok: () => Promise<boolean>,
  ms = 30_000,
): Promise<void> {
  const until = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * The promise's value, or a failed assertion saying `waited` once `ms` have passed: for work that
 * must not wait for a lock another transaction holds.
 */
export async function within<T>(work: Promise<T>, ms: number, waited: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      work,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new assert.AssertionError({ message: waited })), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export async function finish(child: Deno.ChildProcess, ms = 30_000) {
  const timer = setTimeout(() => child.kill("SIGKILL"), ms);
  const out = await child.output();
  clearTimeout(timer);
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Makes every remote COPY take `seconds` longer, so that a signal lands inside a batch. */
export async function slowRemoteCopies(sql: Sql, seconds: number): Promise<void> {
  await sql.unsafe(`
    CREATE FUNCTION slow_copy() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_sleep(${seconds}); RETURN NULL; END $$;
    CREATE TRIGGER slow_copy AFTER INSERT ON meter_readings
      FOR EACH STATEMENT EXECUTE FUNCTION slow_copy();`);
}

/** Waits until the agent's remote backend is running a COPY. */
export async function agentCopying(sql: Sql): Promise<boolean> {
  const [row] = await sql`
    SELECT count(*)::int AS n FROM pg_stat_activity
     WHERE application_name = 'meter-sync' AND state = 'active' AND query ILIKE 'copy%'`;
  return row.n > 0;
}

/** G9: after the agent exits, neither side has a session of it left. */
export async function assertConnectionsClosed(...dbs: Sql[]): Promise<void> {
  for (const db of dbs) {
    const [row] = await db`
      SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'meter-sync'`;
    assert.equal(row.n, 0, "the agent closed its connections");
  }
}
