/** Test harness: one embedded PostgreSQL server per test file, a fresh database per test. */
import postgres from "postgres";
import { type EmbeddedServer, startEmbeddedServer } from "../lib/embedded.ts";
import { childEnv, shippedFlags } from "../scripts/shipped_flags.ts";

export type Sql = postgres.Sql;

const servers = new Map<string, Promise<EmbeddedServer>>();
let counter = 0;

/**
 * The file's server called `name`, started on first use and stopped after the
 * file's last test (Deno.test.afterAll), or by the exit hook if the run is cut short.
 */
export function server(name = "local"): Promise<EmbeddedServer> {
  let s = servers.get(name);
  if (!s) {
    s = startEmbeddedServer({ name, fast: true });
    servers.set(name, s);
  }
  return s;
}

Deno.test.afterAll(async () => {
  for (const s of servers.values()) await (await s).dispose();
  servers.clear();
});

/** A fresh, empty database, with a URL and an open connection to it. */
export interface TestDb {
  url: string;
  name: string;
  sql: Sql;
  server: EmbeddedServer;
}

/** Connects to a URL with settings that keep test output quiet. */
export function connectTo(url: string): Sql {
  return postgres(url, { max: 4, onnotice: () => {}, idle_timeout: 5 });
}

/** Creates a fresh database on the named server; `using` drops it when the test ends. */
export async function freshDb(
  serverName = "local",
): Promise<TestDb & AsyncDisposable> {
  const s = await server(serverName);
  const name = `t_${Deno.pid}_${++counter}_${crypto.randomUUID().slice(0, 8)}`;
  await s.createDatabase(name);
  const url = s.url(name);
  const sql = connectTo(url);
  return {
    url,
    name,
    sql,
    server: s,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 1 });
      // The server may have been stopped by the test itself.
      await s.dropDatabase(name).catch(() => {});
    },
  };
}

/** Permission flags of the compile task: end-to-end tests run main.ts with exactly these. */
export function compileFlags(): Promise<string[]> {
  return shippedFlags();
}

/** Result of running main.ts as a subprocess. */
export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Options of {@link runCli}. */
export interface RunCliOptions {
  env?: Record<string, string>;
  /** Kill the process after this many ms, failing the test instead of hanging. @default 120000 */
  timeoutMs?: number;
}

/** Runs main.ts as a user would: a subprocess with the compile task's permission flags. */
export async function runCli(args: string[], options: RunCliOptions = {}): Promise<CliResult> {
  const main = new URL("../main.ts", import.meta.url).pathname;
  const cmd = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", ...(await compileFlags()), main, ...args],
    // A clean environment: nothing of the developer's own database settings leaks in.
    env: { ...childEnv(), ...options.env },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  });
  const child = cmd.spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }, options.timeoutMs ?? 120_000);
  const out = await child.output();
  clearTimeout(timer);
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** The keys SPEC §3 promises in `status --json`. */
export const SPEC_STATUS_KEYS = [
  "queue_size",
  "oldest_pending_age_s",
  "quarantined",
  "last_success_at",
  "last_error",
] as const;

/** A TCP server on loopback that accepts connections and never says a word (a half-dead path). */
export interface SilentServer extends AsyncDisposable {
  readonly port: number;
  /** Connections accepted so far. */
  readonly accepted: number;
}

export function silentServer(): SilentServer {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    try {
      for await (const conn of listener) held.push(conn);
    } catch {
      // the listener was closed
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get accepted() {
      return held.length;
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      await accepting;
      for (const conn of held) conn.close();
    },
  };
}
