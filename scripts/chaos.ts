/**
 * `deno task chaos` (issue 6, point 4): the agent against two embedded servers while faults
 * land at random, then a drain and a check that every reading ever inserted is on the
 * remote exactly once or quarantined locally.
 *
 *   deno task chaos [--duration 60s] [--seed N] [--rate 200] [--gap 4s] [--burst 5000]
 *                   [--faults LIST] [--agent-mode run|sync] [--log FILE] [--keep] [--verbose]
 *
 * Prints one summary line; exits 0 iff nothing was lost or duplicated and the drain finished.
 */
import { parseArgs } from "node:util";
import { quoteIdent, readTable } from "../lib/columns.ts";
import { connect, openPool, type Pool, type Sql } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { parseDuration } from "../lib/duration.ts";
import { type EmbeddedServer, startEmbeddedServer } from "../lib/embedded.ts";
import { describeError, sqlState } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { pgArray } from "../lib/quarantine.ts";
import { seedReadings } from "../lib/seed.ts";
import { SYNC_FLAG } from "../lib/schema.ts";
import { systemClock } from "../lib/commands/context.ts";
import { seededRandom } from "./seeded_random.ts";
import { childEnv, shippedFlags } from "./shipped_flags.ts";

/**
 * How the agent runs. "sync": one cycle per process, restarted by the supervisor (a
 * systemd timer, or Restart=always); "run": one long-lived `run --every 500ms` process,
 * restarted by the supervisor only after it exits (kill -9, SIGTERM, a crash).
 */
export type AgentMode = "sync" | "run";
const DEFAULT_AGENT_MODE: AgentMode = "run";

/** The faults, in the order the summary line shows them. */
export const FAULT_KINDS = [
  "kill9",
  "sigterm",
  "terminate",
  "remote_restart",
  "local_restart",
  "poison",
  "burst",
] as const;
export type FaultKind = typeof FAULT_KINDS[number];

/** Relative frequencies: server restarts are heavy, so they come half as often. */
const FAULT_WEIGHTS: Record<FaultKind, number> = {
  kill9: 2,
  sigterm: 2,
  terminate: 2,
  remote_restart: 1,
  local_restart: 1,
  poison: 1.5,
  burst: 1,
};

/** The agent's application_name (lib/db_url.ts default): how its backends are found. */
const AGENT_APP = "meter-sync";
/** The harness's own connections, never mistaken for the agent's. */
const HARNESS_APP = "meter-sync-chaos";
/** The value the remote's CHECK constraint rejects: a poison reading carries it. */
const POISON_VOLTAGE = -1;
/** Rows of the template the inserter copies its readings' values from. */
const TEMPLATE_ROWS = 2000;
/** Like systemd's RestartSec: the pause before the supervisor starts the agent again. */
const RESTART_DELAY_MS = 500;

/** Options of {@link runChaos}. */
export interface ChaosOptions {
  /** How long faults are injected, in ms. @default 60000 */
  durationMs?: number;
  /** Seed of the PRNG that picks faults, their timing and their sizes. @default random */
  seed?: number;
  /** Readings per second of the steady inserter (the gateway's poller). @default 200 */
  rate?: number;
  /** Mean pause between two faults, in ms (each pause is 0.5x to 1.5x of it). @default 4000 */
  meanGapMs?: number;
  /** Readings of one burst fault. @default 5000 */
  burstRows?: number;
  /** The fault kinds to inject (to chase one bug). @default all of {@link FAULT_KINDS} */
  faults?: readonly FaultKind[];
  /** How the agent runs: see {@link AgentMode}. @default "run" */
  agentMode?: AgentMode;
  /** Longest wait for the drain after the faults stop, in ms. @default 180000 */
  drainTimeoutMs?: number;
  /** Where the agent's JSON log and the harness's events go. @default a new temp file */
  logPath?: string;
  /** Progress lines on stderr. @default false */
  verbose?: boolean;
  /** Ends the run early (Ctrl-C): everything is stopped and the promise rejects. */
  signal?: AbortSignal;
}

/**
 * Something wrong that is neither loss nor duplication: an agent that died of an unhandled
 * error, did not exit 0 on SIGTERM, or a reading quarantined without cause.
 */
export interface Finding {
  what: string;
  run?: number;
  detail: string;
}

/** What a chaos run did and found. */
export interface ChaosSummary {
  seed: number;
  durationMs: number;
  agentMode: AgentMode;
  faults: Record<FaultKind, number>;
  /** Readings whose insert committed (the ledger): every one must be accounted for. */
  inserted: number;
  /** On the remote exactly once and gone locally. */
  delivered: number;
  /** In meter_sync_quarantine and still in the local table. */
  quarantined: number;
  /** Poison readings inserted; each must end quarantined. */
  poisonInserted: number;
  /** Quarantined readings that were not poison (the remote had no reason to reject them). */
  unexpectedQuarantined: number;
  /** Neither on the remote, nor quarantined, nor still queued. */
  lost: number;
  /** Extra copies on the remote: sum over ids of (copies - 1). */
  duplicated: number;
  /** Still in the local queue after the drain. */
  stillQueued: number;
  /** Ids on the remote that the harness never inserted. */
  unknownOnRemote: number;
  /** Whether the remote table has a primary key (then duplicates are impossible there). */
  remotePrimaryKey: boolean;
  drained: boolean;
  drainMs: number;
  /** Agent processes started (the drain's included). */
  agentRuns: number;
  /** Agent exits by outcome: "0", "1", "SIGKILL", ... */
  exits: Record<string, number>;
  /** The agent's error lines (failed cycles), normalised, with their counts. */
  agentErrors: Record<string, number>;
  /** Inserts whose commit status was unknown (a server restart), checked in the ledger. */
  uncertainInserts: { committed: number; rolledBack: number };
  findings: Finding[];
  logPath: string;
  /** lost = 0, duplicated = 0 and the drain finished. */
  ok: boolean;
}

// ---------------------------------------------------------------------------------------
// Small tools

function between(random: () => number, lo: number, hi: number): number {
  return Math.floor(lo + random() * (hi - lo + 1));
}

/** The agent's own clock's sleep: rejects with the signal's reason when it aborts. */
const sleep = systemClock.sleep;

/** Resolves to the promise's value, or to undefined after ms. */
async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms))),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** The log: agent lines as they come, harness events as JSON objects with a "chaos" key. */
interface EventLog {
  path: string;
  line(text: string): void;
  event(kind: string, fields?: Record<string, unknown>): void;
  close(): void;
}

function openLog(path: string): EventLog {
  const file = Deno.openSync(path, { write: true, create: true, truncate: true });
  const encoder = new TextEncoder();
  let open = true;
  const line = (text: string) => {
    if (open) file.writeSync(encoder.encode(text + "\n"));
  };
  return {
    path,
    line,
    event: (kind, fields = {}) =>
      line(JSON.stringify({ time: new Date().toISOString(), chaos: kind, ...fields })),
    close: () => {
      if (!open) return;
      open = false;
      file.close();
    },
  };
}

/** A URL with the harness's application_name, so that its backends are never terminated. */
function harnessUrl(url: string): string {
  return `${url}?application_name=${HARNESS_APP}`;
}

/** A short-lived connection for one harness query. */
async function withSql<T>(url: string, fn: (sql: Sql) => Promise<T>): Promise<T> {
  const sql = await connect(parseDatabaseUrl(harnessUrl(url), "chaos"), { max: 1 });
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 1 }).catch(() => {});
  }
}

/** Retries fn until it works (a server restarting), or the signal aborts. */
async function untilItWorks<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await fn();
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      if (attempt >= 600) throw err; // two minutes: the server is not coming back
      await sleep(200, signal);
    }
  }
}

/** Connection-level codes: Node's socket errors, postgres.js's own, SQLSTATE classes 08 and 57. */
const CONNECTION_CODES = /^(ECONNRESET|EPIPE|ECONNREFUSED|CONNECTION_\w+|08\w{3}|57\w{3})$/;

/**
 * postgres.js 3.4.9 runs the array-types query of every fresh connection (fetch_types)
 * from a promise nobody handles: a connection lost during it (a server restarting) is an
 * unhandled rejection, which ends a Deno process. Every query of the harness is awaited,
 * so a connection-level rejection that nobody handled can only be that one.
 */
function ignoreLostTypeFetch(event: PromiseRejectionEvent): void {
  const code = String((event.reason as { code?: unknown } | undefined)?.code ?? "");
  if (CONNECTION_CODES.test(code)) event.preventDefault();
}

// ---------------------------------------------------------------------------------------
// Servers and databases

interface World {
  local: EmbeddedServer;
  remote: EmbeddedServer;
  localUrl: string;
  remoteUrl: string;
}

/** fsync off for speed, synchronous_commit on: a server stop never loses a commit. */
const SERVER_SETTINGS = { fsync: "off", full_page_writes: "off" };

async function startWorld(servers: EmbeddedServer[]): Promise<World> {
  const started = await Promise.allSettled([
    startEmbeddedServer({ name: "chaos-local", settings: SERVER_SETTINGS }),
    startEmbeddedServer({ name: "chaos-remote", settings: SERVER_SETTINGS }),
  ]);
  for (const s of started) if (s.status === "fulfilled") servers.push(s.value);
  const failed = started.find((s) => s.status === "rejected");
  if (failed) throw new Error(`an embedded server did not start: ${failed.reason}`);
  const [local, remote] = servers;
  await Promise.all([local.createDatabase("gateway"), remote.createDatabase("central")]);
  const world = { local, remote, localUrl: local.url("gateway"), remoteUrl: remote.url("central") };
  await withSql(world.localUrl, async (sql) => {
    await migrate(sql, await loadMigrations(migrationsDir("local")));
    // The values the inserter copies, made once by the seeder (meters 1..50 come with it).
    await sql.unsafe(`CREATE TABLE chaos_seed (LIKE meter_readings INCLUDING DEFAULTS)`);
    await seedReadings(sql, { count: TEMPLATE_ROWS, table: "chaos_seed", meters: 50, days: 1 });
    await sql.unsafe(`CREATE TABLE chaos_template AS
                        SELECT row_number() OVER () AS chaos_n, * FROM chaos_seed;
                      CREATE UNIQUE INDEX ON chaos_template (chaos_n);
                      DROP TABLE chaos_seed`).simple();
    // The ledger: written in the same transaction as the readings, so it holds exactly the
    // readings that were ever committed, whatever the agent has drained since.
    await sql.unsafe(`CREATE TABLE chaos_ledger (
                        id uuid PRIMARY KEY,
                        kind text NOT NULL,
                        at timestamptz NOT NULL DEFAULT now())`);
  });
  const meters = await withSql(
    world.localUrl,
    (sql) => sql.unsafe(`SELECT json_agg(m)::text AS rows FROM meters m`),
  );
  await withSql(world.remoteUrl, async (sql) => {
    await migrate(sql, await loadMigrations(migrationsDir("remote")));
    // The same meters on both sides: the download half then has nothing to change.
    await sql.unsafe(
      `INSERT INTO meters SELECT * FROM json_populate_recordset(NULL::meters, $1::text::json)`,
      [meters[0].rows],
    );
    // A reading the central side rejects for its data (SQLSTATE 23514): the poison row.
    await sql.unsafe(`ALTER TABLE meter_readings ADD CONSTRAINT chaos_poison
                        CHECK (voltage_l1_v <> ${POISON_VOLTAGE})`);
  });
  return world;
}

/** Stops a server and brings it back on the same port and data folder after downMs. */
async function restartServer(
  server: EmbeddedServer,
  downMs: number,
  signal?: AbortSignal,
): Promise<void> {
  await server.stop();
  try {
    await sleep(downMs, signal);
  } finally {
    // Even when aborted: the cleanup's dispose() expects a server it can stop.
    for (let attempt = 1;; attempt++) {
      try {
        await server.start();
        break;
      } catch (err) {
        if (attempt >= 5) {
          // deno-lint-ignore no-unsafe-finally
          throw new Error(`${server.name} did not start again on port ${server.port}: ${err}`);
        }
        await sleep(500);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The gateway: a steady inserter, plus bursts and poison rows on demand

interface Inserter {
  /** Inserts n readings at once (a burst, poison rows) and resolves once they committed. */
  insert(kind: "burst" | "poison", n: number): Promise<void>;
  /** Stops the steady stream and waits for every write in flight to be settled. */
  stop(): Promise<void>;
  counts: Record<string, number>;
  uncertain: { committed: number; rolledBack: number };
}

async function startInserter(
  url: string,
  options: { rate: number; log: EventLog; signal: AbortSignal },
): Promise<Inserter> {
  const { log, signal } = options;
  const target = parseDatabaseUrl(harnessUrl(url), "chaos inserter");
  const pool: Pool = await openPool(target, { max: 1 });
  const info = await withSql(url, (sql) => readTable(sql, "meter_readings"));
  const copied = info!.columns
    .filter((c) => !c.generated && !["id", "createdat", SYNC_FLAG].includes(c.name))
    .map((c) => c.name);
  const insertSql = `
    INSERT INTO meter_readings (id, createdat, ${copied.map(quoteIdent).join(", ")})
    SELECT u.id, clock_timestamp(), ${
    copied.map((c) =>
      c === "voltage_l1_v"
        ? `CASE WHEN $3::boolean THEN ${POISON_VOLTAGE} ELSE t.voltage_l1_v END`
        : `t.${quoteIdent(c)}`
    ).join(", ")
  }
      FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n)
      JOIN chaos_template t ON t.chaos_n = 1 + (u.n + $2::bigint) % ${TEMPLATE_ROWS}`;
  const ledgerSql = `INSERT INTO chaos_ledger (id, kind) SELECT unnest($1::uuid[]), $2::text`;

  const counts: Record<string, number> = { steady: 0, burst: 0, poison: 0 };
  const uncertain = { committed: 0, rolledBack: 0 };
  let offset = 0;
  /** One write at a time, on one connection. */
  let chain: Promise<unknown> = Promise.resolve();
  const exclusive = <T>(fn: () => Promise<T>): Promise<T> => {
    const p = chain.then(fn);
    chain = p.catch(() => {});
    return p;
  };

  const committed = async (firstId: string): Promise<boolean> =>
    await untilItWorks(async () => {
      const [row] = await pool.sql.unsafe(
        `SELECT EXISTS (SELECT 1 FROM chaos_ledger WHERE id = $1::uuid) AS found`,
        [firstId],
      ).catch(async (err) => {
        // A connection that died is not reusable (see lib/db.ts Pool).
        await pool.renew();
        throw err;
      });
      return row.found as boolean;
    }, signal);

  /**
   * Inserts n readings and their ledger rows in one transaction. When the commit's fate
   * is unknown (the server went away), the ledger says whether it happened; if not, the
   * same ids go again (the ledger's primary key stops a second copy).
   */
  const write = (kind: string, n: number) =>
    exclusive(async () => {
      const ids = Array.from({ length: n }, () => crypto.randomUUID());
      const idArray = pgArray(ids);
      offset = (offset + n) % TEMPLATE_ROWS;
      const at = offset;
      for (let failures = 0;;) {
        if (signal.aborted) throw signal.reason;
        try {
          await pool.sql.begin(async (tx) => {
            await tx.unsafe(insertSql, [idArray, at, kind === "poison"]);
            await tx.unsafe(ledgerSql, [idArray, kind]);
          });
          counts[kind] += n;
          return;
        } catch (err) {
          await pool.renew();
          const done = await committed(ids[0]);
          log.event("insert-uncertain", {
            kind,
            rows: n,
            error: describeError(err),
            committed: done,
          });
          if (done) {
            uncertain.committed++;
            counts[kind] += n;
            return;
          }
          uncertain.rolledBack++;
          // Syntax or a missing object: a harness bug, not a fault.
          if (sqlState(err)?.startsWith("42")) throw err;
          if (++failures >= 600) throw err; // two minutes: the server is not coming back
          await sleep(200, signal);
        }
      }
    });

  let stopped = false;
  const started = performance.now();
  const steady = (async () => {
    while (!stopped) {
      await sleep(100, signal);
      const due = Math.floor((options.rate * (performance.now() - started)) / 1000) -
        counts.steady;
      // Behind after a local restart: catch up in chunks, like a poller's buffer.
      if (due > 0) await write("steady", Math.min(due, 2000));
    }
  })();
  steady.catch(() => {});

  return {
    insert: (kind, n) => write(kind, n),
    async stop() {
      stopped = true;
      const [ended] = await Promise.allSettled([steady, chain]);
      await pool.end().catch(() => {});
      if (ended.status === "rejected") throw ended.reason;
    },
    counts,
    uncertain,
  };
}

// ---------------------------------------------------------------------------------------
// The agent, kept running by a supervisor

interface AgentProcess {
  run: number;
  child: Deno.ChildProcess;
  /** Set once the agent has logged its first line: logging and signal handlers are up. */
  ready: boolean;
  readyP: Promise<void>;
  /** Resolves at the agent's next "batch N: ..." line. */
  nextBatch(): Promise<void>;
  exited: Promise<Deno.CommandStatus>;
  /** The last error line's message. */
  lastError?: string;
  /** Deno's "error: Uncaught ..." line, when the process died of an unhandled error. */
  uncaught?: string;
  /** The signal the harness sent, if it sent one. */
  signalled?: Deno.Signal;
  /** Sends a signal and remembers it; false when the process is gone already. */
  kill(sig: Deno.Signal): boolean;
}

interface AgentSettings {
  localUrl: string;
  remoteUrl: string;
  flags: string[];
  log: EventLog;
  exits: Record<string, number>;
  agentErrors: Record<string, number>;
  findings: Finding[];
}

let runCounter = 0;

/** Ids, numbers and durations out, so that the same failure counts once. */
function normaliseError(message: string): string {
  return message
    .replace(/[0-9a-f]{8}-[0-9a-f-]{27}/g, "<id>")
    .replace(/\d+(\.\d+)?/g, "N")
    .slice(0, 160);
}

function exitKey(status: Deno.CommandStatus): string {
  return status.signal ?? String(status.code);
}

/** main.ts as the binary runs it: the compile task's flags, JSON logs to the chaos log. */
function spawnAgent(settings: AgentSettings, args: string[]): AgentProcess {
  const run = ++runCounter;
  const main = new URL("../main.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", ...settings.flags, main, ...args],
    env: {
      ...childEnv(),
      LOCAL_DATABASE_URL: settings.localUrl,
      REMOTE_DATABASE_URL: settings.remoteUrl,
    },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  settings.log.event("spawn", { run, pid: child.pid, args });
  let markReady!: () => void;
  const readyP = new Promise<void>((r) => (markReady = r));
  let batchWaiters: (() => void)[] = [];
  const proc: AgentProcess = {
    run,
    child,
    ready: false,
    readyP,
    nextBatch: () => new Promise((r) => batchWaiters.push(r)),
    exited: undefined as unknown as Promise<Deno.CommandStatus>,
    kill(sig) {
      try {
        child.kill(sig);
      } catch {
        return false; // exited in between
      }
      proc.signalled ??= sig;
      return true;
    },
  };
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    let rest = "";
    const take = (line: string) => {
      if (!line) return;
      settings.log.line(line);
      if (!proc.ready) {
        proc.ready = true;
        markReady();
      }
      let record: { level?: string; message?: string; properties?: { error?: unknown } };
      try {
        record = JSON.parse(line);
      } catch {
        if (line.startsWith("error: Uncaught")) proc.uncaught ??= line;
        return;
      }
      if (record.message?.startsWith("batch ")) {
        const waiters = batchWaiters;
        batchWaiters = [];
        for (const w of waiters) w();
      }
      if (record.level === "error" || record.level === "fatal") {
        proc.lastError = String(record.properties?.error ?? record.message);
        const e = normaliseError(proc.lastError);
        settings.agentErrors[e] = (settings.agentErrors[e] ?? 0) + 1;
      }
    };
    for await (const chunk of stream) {
      rest += decoder.decode(chunk, { stream: true });
      const lines = rest.split("\n");
      rest = lines.pop()!;
      for (const line of lines) take(line);
    }
    take(rest);
  };
  proc.exited = (async () => {
    const [status] = await Promise.all([child.status, pump(child.stdout), pump(child.stderr)]);
    const key = exitKey(status);
    settings.exits[key] = (settings.exits[key] ?? 0) + 1;
    if (proc.uncaught) {
      settings.findings.push({
        what: `the agent died of an unhandled error (exit ${exitKey(status)})`,
        run,
        detail: proc.uncaught,
      });
    }
    settings.log.event("exit", { run, code: status.code, signal: status.signal });
    for (const w of batchWaiters) w();
    markReady();
    return status;
  })();
  return proc;
}

interface Supervisor {
  /** The agent running now, once it is ready, or undefined after timeoutMs. */
  running(timeoutMs: number): Promise<AgentProcess | undefined>;
  /** Stops the agent with SIGTERM, waits for it, and restarts it no more. */
  stop(): Promise<Deno.CommandStatus | undefined>;
  /** Kills the agent at once (cleanup). */
  kill(): void;
}

function superviseAgent(
  settings: AgentSettings,
  options: { mode: AgentMode; random: () => number; signal: AbortSignal },
): Supervisor {
  let current: AgentProcess | undefined;
  let stopping = false;
  let changed: () => void = () => {};
  let wakeUp = new Promise<void>((r) => (changed = r));
  const notify = () => {
    changed();
    wakeUp = new Promise<void>((r) => (changed = r));
  };
  const modeArgs = options.mode === "run"
    ? ["run", "--every", "500ms", "--max-backoff", "2s"]
    : ["sync"];
  const loop = (async () => {
    while (!stopping && !options.signal.aborted) {
      const proc = spawnAgent(settings, [
        ...modeArgs,
        "--batch-size",
        String(between(options.random, 50, 500)),
        "--max-retries",
        String(between(options.random, 1, 3)),
        "--log-format",
        "json",
        "--log-level",
        "debug",
      ]);
      current = proc;
      proc.readyP.then(notify);
      const status = await proc.exited;
      current = undefined;
      // A scheduled agent only ends when told to; a one-shot `sync` fails with 1 (logged).
      const expected = options.mode === "run" ? [0] : [0, 1];
      if (!proc.signalled && !proc.uncaught && !expected.includes(status.code)) {
        settings.findings.push({
          what: `the agent exited ${exitKey(status)} without being signalled`,
          run: proc.run,
          detail: proc.lastError ?? "",
        });
      }
      notify();
      if (!stopping) await sleep(RESTART_DELAY_MS, options.signal).catch(() => {});
    }
  })();
  loop.catch(() => {});
  return {
    async running(timeoutMs) {
      const until = performance.now() + timeoutMs;
      while (performance.now() < until) {
        if (current?.ready) return current;
        await within(wakeUp, until - performance.now());
      }
      return undefined;
    },
    async stop() {
      stopping = true;
      const proc = current;
      let status: Deno.CommandStatus | undefined;
      if (proc) {
        // A signal before main.ts has its handlers would kill it outright, as for any program.
        await within(proc.readyP, 30_000);
        proc.kill("SIGTERM");
        status = await within(proc.exited, 60_000);
        if (!status) {
          proc.kill("SIGKILL");
          status = await proc.exited;
        }
      }
      await loop;
      return status;
    },
    kill() {
      stopping = true;
      current?.kill("SIGKILL");
    },
  };
}

// ---------------------------------------------------------------------------------------
// Faults

interface FaultContext {
  world: World;
  supervisor: Supervisor;
  inserter: Inserter;
  random: () => number;
  log: EventLog;
  burstRows: number;
  findings: Finding[];
  signal: AbortSignal;
}

/**
 * Signals the running agent; half the time at its next batch line, so that the signal
 * lands between a remote commit and the local delete or inside the next claim.
 * Returns the process signalled, or undefined when none was running long enough.
 */
async function signalAgent(
  ctx: FaultContext,
  sig: Deno.Signal,
): Promise<AgentProcess | undefined> {
  const onBatch = ctx.random() < 0.5;
  for (let attempt = 0; attempt < 20; attempt++) {
    const proc = await ctx.supervisor.running(10_000);
    if (!proc) continue;
    if (onBatch) await within(proc.nextBatch(), 3000);
    if (proc.kill(sig)) {
      ctx.log.event("signal", { run: proc.run, signal: sig, onBatch });
      return proc;
    }
  }
  return undefined;
}

/** Injects one fault; false when it could not be (no agent to hit). */
async function injectFault(kind: FaultKind, ctx: FaultContext): Promise<boolean> {
  const { world, log } = ctx;
  switch (kind) {
    case "kill9": {
      const proc = await signalAgent(ctx, "SIGKILL");
      if (!proc) return false;
      await proc.exited;
      return true;
    }
    case "sigterm": {
      const proc = await signalAgent(ctx, "SIGTERM");
      if (!proc) return false;
      const status = await within(proc.exited, 60_000);
      if (!status) {
        ctx.findings.push({
          what: "SIGTERM did not stop the agent within 60 s",
          run: proc.run,
          detail: proc.lastError ?? "",
        });
        proc.kill("SIGKILL");
        await proc.exited;
      } else if (status.code !== 0) {
        ctx.findings.push({
          what: `SIGTERM: the agent exited ${exitKey(status)}, not 0`,
          run: proc.run,
          detail: proc.lastError ?? "",
        });
      }
      return true;
    }
    case "terminate": {
      const onBatch = ctx.random() < 0.5;
      for (let attempt = 0; attempt < 20; attempt++) {
        const proc = await ctx.supervisor.running(10_000);
        if (proc && onBatch) await within(proc.nextBatch(), 3000);
        const rows = await withSql(
          world.remoteUrl,
          (sql) =>
            sql`SELECT pid, pg_terminate_backend(pid) AS ok FROM pg_stat_activity
                 WHERE datname = 'central' AND application_name = ${AGENT_APP}
                   AND pid <> pg_backend_pid()`,
        ).catch(() => []);
        if (rows.length > 0) {
          log.event("terminated", { backends: rows.map((r) => r.pid), onBatch });
          return true;
        }
        await sleep(100, ctx.signal);
      }
      return false;
    }
    case "remote_restart":
    case "local_restart": {
      const server = kind === "remote_restart" ? world.remote : world.local;
      const downMs = between(ctx.random, 300, 2500);
      log.event("server-stop", { server: server.name, downMs });
      await restartServer(server, downMs, ctx.signal);
      log.event("server-start", { server: server.name });
      return true;
    }
    case "poison":
      await ctx.inserter.insert("poison", between(ctx.random, 1, 3));
      return true;
    case "burst":
      await ctx.inserter.insert("burst", ctx.burstRows);
      return true;
  }
}

function pickFault(random: () => number, kinds: readonly FaultKind[]): FaultKind {
  const total = kinds.reduce((s, k) => s + FAULT_WEIGHTS[k], 0);
  let x = random() * total;
  for (const kind of kinds) {
    x -= FAULT_WEIGHTS[kind];
    if (x < 0) return kind;
  }
  return kinds[kinds.length - 1];
}

/**
 * Faults at random gaps until the duration is over; every kind once first (in a seeded
 * order), then at random by weight. Signals and terminations are awaited; server
 * restarts, poison rows and bursts run on in the background, so that the next faults
 * can land while a server is down. The loop runs past the duration only to finish the
 * first round, and returns once every fault is over (both servers up).
 */
async function injectFaults(
  ctx: FaultContext,
  options: { durationMs: number; meanGapMs: number; kinds: readonly FaultKind[]; verbose: boolean },
): Promise<Record<FaultKind, number>> {
  const counts = Object.fromEntries(FAULT_KINDS.map((k) => [k, 0])) as Record<FaultKind, number>;
  const firstRound = [...options.kinds];
  for (let i = firstRound.length - 1; i > 0; i--) {
    const j = Math.floor(ctx.random() * (i + 1));
    [firstRound[i], firstRound[j]] = [firstRound[j], firstRound[i]];
  }
  const background = new Map<string, Promise<void>>();
  const started = performance.now();
  for (;;) {
    const gap = options.meanGapMs * (0.5 + ctx.random());
    const left = options.durationMs - (performance.now() - started);
    if (firstRound.length === 0 && left <= gap) {
      await sleep(Math.max(0, left), ctx.signal);
      break;
    }
    await sleep(gap, ctx.signal);
    const kind = firstRound.shift() ?? pickFault(ctx.random, options.kinds);
    const t0 = performance.now();
    const report = (done: boolean) => {
      ctx.log.event("fault-done", { kind, done, ms: Math.round(performance.now() - t0) });
      if (options.verbose) {
        const s = Math.round((performance.now() - started) / 1000);
        console.error(`chaos: ${s} s ${kind}${done ? "" : " (missed)"}`);
      }
    };
    ctx.log.event("fault", { kind });
    const lane = BACKGROUND_LANES[kind];
    if (lane) {
      // Runs on while the next faults land: a SIGTERM or a kill -9 while a server is down.
      // One at a time per lane: a server is not stopped twice.
      await background.get(lane);
      counts[kind]++;
      const p = injectFault(kind, ctx).then(report);
      p.catch(() => {}); // awaited with its lane, or at the end
      background.set(lane, p);
      continue;
    }
    const done = await injectFault(kind, ctx);
    if (done) counts[kind]++;
    else firstRound.unshift(kind); // the first round must hit every kind
    report(done);
  }
  await Promise.all(background.values());
  return counts;
}

/** Faults that take a while and need not be over before the next one: which lane they use. */
const BACKGROUND_LANES: Partial<Record<FaultKind, string>> = {
  remote_restart: "remote",
  local_restart: "local",
  poison: "inserts",
  burst: "inserts",
};

// ---------------------------------------------------------------------------------------
// Drain and check

async function queueSize(localUrl: string): Promise<number> {
  const [row] = await withSql(localUrl, (sql) =>
    sql`SELECT count(*)::int AS n FROM meter_readings m
         WHERE NOT m.is_synchronized
           AND NOT EXISTS (SELECT 1 FROM meter_sync_quarantine q WHERE q.id = m.id)`);
  return row.n;
}

/** `sync` until the queue is empty (each cycle drains; a failed one is run again). */
async function drain(
  settings: AgentSettings,
  options: { timeoutMs: number; signal: AbortSignal },
): Promise<boolean> {
  const until = performance.now() + options.timeoutMs;
  while (performance.now() < until) {
    const proc = spawnAgent(settings, [
      "sync",
      "--batch-size",
      "500",
      "--max-retries",
      "5",
      "--log-format",
      "json",
      "--log-level",
      "debug",
    ]);
    const status = await within(proc.exited, Math.max(1000, until - performance.now()));
    if (!status) {
      proc.kill("SIGKILL");
      await proc.exited;
      return false;
    }
    if (status.code === 0 && (await untilItWorks(() => queueSize(settings.localUrl))) === 0) {
      return true;
    }
    await sleep(500, options.signal);
  }
  return false;
}

/** The reading counts of the summary, and what the findings need besides. */
type Check =
  & Pick<
    ChaosSummary,
    | "inserted"
    | "delivered"
    | "quarantined"
    | "poisonInserted"
    | "unexpectedQuarantined"
    | "lost"
    | "duplicated"
    | "stillQueued"
    | "unknownOnRemote"
    | "remotePrimaryKey"
  >
  & { byKind: Record<string, number>; lostIds: string[] };

/**
 * Every reading of the ledger: on the remote exactly once (and gone locally), or
 * quarantined (and still local); anything else is lost, still queued or duplicated.
 */
async function checkReadings(world: World): Promise<Check> {
  const onRemote = new Map<string, number>();
  let remotePrimaryKey = false;
  await withSql(world.remoteUrl, async (sql) => {
    const [pk] = await sql`
      SELECT EXISTS (SELECT 1 FROM pg_constraint
                      WHERE conrelid = 'meter_readings'::regclass AND contype = 'p') AS pk`;
    remotePrimaryKey = pk.pk;
    const cursor = sql`SELECT id::text AS id, count(*)::int AS n
                         FROM meter_readings GROUP BY id`.cursor(20_000);
    for await (const rows of cursor) for (const r of rows) onRemote.set(r.id, r.n);
  });
  const check: Check = {
    inserted: 0,
    delivered: 0,
    quarantined: 0,
    poisonInserted: 0,
    unexpectedQuarantined: 0,
    lost: 0,
    duplicated: 0,
    stillQueued: 0,
    unknownOnRemote: 0,
    remotePrimaryKey,
    byKind: {},
    lostIds: [],
  };
  const seen = new Set<string>();
  await withSql(world.localUrl, async (sql) => {
    const cursor = sql`
      SELECT l.id::text AS id, l.kind, (m.id IS NOT NULL) AS local, (q.id IS NOT NULL) AS quarantined
        FROM chaos_ledger l
        LEFT JOIN meter_readings m ON m.id = l.id
        LEFT JOIN meter_sync_quarantine q ON q.id = l.id`.cursor(20_000);
    for await (const rows of cursor) {
      for (const r of rows) {
        check.inserted++;
        check.byKind[r.kind] = (check.byKind[r.kind] ?? 0) + 1;
        if (r.kind === "poison") check.poisonInserted++;
        const copies = onRemote.get(r.id) ?? 0;
        if (copies > 0) seen.add(r.id);
        if (copies > 1) check.duplicated += copies - 1;
        if (copies > 0 && r.quarantined) {
          check.duplicated++; // delivered and kept as rejected: two versions of the truth
        } else if (copies > 0 && !r.local) {
          check.delivered++;
        } else if (r.quarantined && r.local) {
          check.quarantined++;
          if (r.kind !== "poison") check.unexpectedQuarantined++;
        } else if (r.local) {
          check.stillQueued++; // queued, or on the remote but not yet deleted locally
        } else {
          check.lost++;
          if (check.lostIds.length < 20) check.lostIds.push(r.id);
        }
      }
    }
  });
  for (const id of onRemote.keys()) if (!seen.has(id)) check.unknownOnRemote++;
  return check;
}

// ---------------------------------------------------------------------------------------

/** Runs the chaos: servers, inserter, supervised agent, faults, drain, check. */
export async function runChaos(options: ChaosOptions = {}): Promise<ChaosSummary> {
  const durationMs = options.durationMs ?? 60_000;
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 31);
  const agentMode = options.agentMode ?? DEFAULT_AGENT_MODE;
  // Two streams: the faults replay from the seed however many times the agent restarts.
  const random = seededRandom(seed);
  const agentRandom = seededRandom(seed ^ 0x5bd1e995);
  const abort = new AbortController();
  const onOuterAbort = () => abort.abort(options.signal!.reason);
  options.signal?.addEventListener("abort", onOuterAbort, { once: true });
  if (options.signal?.aborted) abort.abort(options.signal.reason);
  const signal = abort.signal;
  const logPath = options.logPath ??
    await Deno.makeTempFile({ prefix: "meter-sync-chaos-", suffix: ".log" });
  const log = openLog(logPath);
  log.event("start", { seed, durationMs, agentMode, rate: options.rate ?? 200 });
  globalThis.addEventListener("unhandledrejection", ignoreLostTypeFetch);
  const servers: EmbeddedServer[] = [];
  let supervisor: Supervisor | undefined;
  let inserter: Inserter | undefined;
  try {
    const world = await startWorld(servers);
    const findings: Finding[] = [];
    const settings: AgentSettings = {
      localUrl: world.localUrl,
      remoteUrl: world.remoteUrl,
      flags: await shippedFlags(),
      log,
      exits: {},
      agentErrors: {},
      findings,
    };
    inserter = await startInserter(world.localUrl, {
      rate: options.rate ?? 200,
      log,
      signal,
    });
    supervisor = superviseAgent(settings, { mode: agentMode, random: agentRandom, signal });
    const faults = await injectFaults({
      world,
      supervisor,
      inserter,
      random,
      log,
      burstRows: options.burstRows ?? 5000,
      findings,
      signal,
    }, {
      durationMs,
      meanGapMs: options.meanGapMs ?? 4000,
      kinds: options.faults ?? FAULT_KINDS,
      verbose: options.verbose ?? false,
    });
    log.event("faults-over", { faults });
    await inserter.stop();
    const last = await supervisor.stop();
    log.event("agent-stopped", { code: last?.code, signal: last?.signal });
    if (last && last.code !== 0) {
      findings.push({
        what: `the final SIGTERM: the agent exited ${exitKey(last)}, not 0`,
        detail: "",
      });
    }
    const drainStarted = performance.now();
    const drained = await drain(settings, {
      timeoutMs: options.drainTimeoutMs ?? 180_000,
      signal,
    });
    const drainMs = Math.round(performance.now() - drainStarted);
    log.event("drained", { drained, ms: drainMs });
    const check = await checkReadings(world);
    const expected = inserter.counts.steady + inserter.counts.burst + inserter.counts.poison;
    if (expected !== check.inserted) {
      findings.push({
        what: "the harness's count of committed inserts differs from its ledger",
        detail: `${expected} counted, ${check.inserted} in the ledger`,
      });
    }
    if (check.unexpectedQuarantined > 0) {
      findings.push({
        what: `${check.unexpectedQuarantined} readings quarantined that were not poison`,
        detail: "",
      });
    }
    if (check.poisonInserted !== check.quarantined - check.unexpectedQuarantined) {
      findings.push({
        what: "not every poison reading ended quarantined",
        detail: `${check.poisonInserted} poison, ${
          check.quarantined - check.unexpectedQuarantined
        } quarantined`,
      });
    }
    if (check.unknownOnRemote > 0) {
      findings.push({
        what: `${check.unknownOnRemote} readings on the remote were never inserted`,
        detail: "",
      });
    }
    if (check.lost > 0) {
      findings.push({ what: `${check.lost} readings lost`, detail: check.lostIds.join(" ") });
    }
    for (const f of findings) log.event("finding", { ...f });
    const summary: ChaosSummary = {
      seed,
      durationMs,
      agentMode,
      faults,
      inserted: check.inserted,
      delivered: check.delivered,
      quarantined: check.quarantined,
      poisonInserted: check.poisonInserted,
      unexpectedQuarantined: check.unexpectedQuarantined,
      lost: check.lost,
      duplicated: check.duplicated,
      stillQueued: check.stillQueued,
      unknownOnRemote: check.unknownOnRemote,
      remotePrimaryKey: check.remotePrimaryKey,
      drained,
      drainMs,
      agentRuns: Object.values(settings.exits).reduce((a, b) => a + b, 0),
      exits: settings.exits,
      agentErrors: settings.agentErrors,
      uncertainInserts: { ...inserter.uncertain },
      findings,
      logPath,
      ok: check.lost === 0 && check.duplicated === 0 && drained,
    };
    log.event("summary", { ...summary, line: formatSummary(summary) });
    return summary;
  } finally {
    options.signal?.removeEventListener("abort", onOuterAbort);
    supervisor?.kill();
    if (!abort.signal.aborted) abort.abort(new DOMException("chaos over", "AbortError"));
    await inserter?.stop().catch(() => {});
    for (const s of servers) await s.dispose().catch(() => {});
    log.close();
    globalThis.removeEventListener("unhandledrejection", ignoreLostTypeFetch);
  }
}

/** The one line: faults of each kind, then what became of every reading. */
export function formatSummary(s: ChaosSummary): string {
  const faults = FAULT_KINDS.map((k) => `${k}=${s.faults[k]}`).join(" ");
  const exits = Object.entries(s.exits).sort().map(([k, n]) => `${k}:${n}`).join(" ");
  const extra = [
    s.stillQueued ? `still queued ${s.stillQueued}` : "",
    s.unknownOnRemote ? `unknown on remote ${s.unknownOnRemote}` : "",
    s.drained ? "" : "DRAIN UNFINISHED",
    s.findings.length ? `findings ${s.findings.length}` : "",
  ].filter(Boolean);
  return `chaos ${Math.round(s.durationMs / 1000)} s seed ${s.seed} (${s.agentMode}): ` +
    `faults ${faults}; inserted ${s.inserted} delivered ${s.delivered} ` +
    `quarantined ${s.quarantined} lost ${s.lost} duplicated ${s.duplicated}; ` +
    `agent runs ${s.agentRuns} (exits ${exits}), drain ${(s.drainMs / 1000).toFixed(1)} s` +
    (extra.length ? `; ${extra.join(", ")}` : "");
}

// ---------------------------------------------------------------------------------------

const HELP = `deno task chaos [flags]
  --duration DURATION   how long faults are injected (default 60s; e.g. 600s, 10m)
  --seed N              replay the fault sequence of a run (printed in its summary)
  --rate N              readings per second of the steady inserter (default 200)
  --gap DURATION        mean pause between faults (default 4s)
  --burst N             readings of one burst fault (default 5000)
  --faults LIST         only these kinds, e.g. remote_restart,terminate (default all:
                        ${FAULT_KINDS.join(",")})
  --agent-mode MODE     run (one long-lived \`run --every 500ms\`, restarted when it dies)
                        or sync (one \`sync\` process per cycle) (default ${DEFAULT_AGENT_MODE})
  --log FILE            the agent's JSON log and the harness's events (default: a temp file,
                        removed after a clean run unless --keep)
  --keep                keep the log after a clean run
  --verbose             one stderr line per fault`;

function fail(message: string): never {
  console.error(`chaos: ${message}`);
  Deno.exit(2);
}

function parseOptions(args: string[]): ChaosOptions & { keep: boolean } {
  const { values } = parseArgs({
    args,
    options: {
      duration: { type: "string", default: "60s" },
      seed: { type: "string" },
      rate: { type: "string" },
      gap: { type: "string" },
      burst: { type: "string" },
      faults: { type: "string" },
      "agent-mode": { type: "string", default: DEFAULT_AGENT_MODE },
      log: { type: "string" },
      keep: { type: "boolean", default: false },
      verbose: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(HELP);
    Deno.exit(0);
  }
  const duration = (flag: string, text: string) => {
    const ms = parseDuration(text);
    if (ms === undefined || ms <= 0) fail(`${flag} needs a duration such as 60s or 10m`);
    return ms;
  };
  const whole = (flag: string, text: string | undefined, min: number) => {
    if (text === undefined) return undefined;
    const n = Number(text);
    if (!Number.isInteger(n) || n < min) fail(`${flag} needs a whole number >= ${min}`);
    return n;
  };
  const mode = values["agent-mode"];
  if (mode !== "run" && mode !== "sync") fail(`--agent-mode takes run or sync, got "${mode}"`);
  const faults = values.faults?.split(",").map((k) => k.trim());
  for (const k of faults ?? []) {
    if (!(FAULT_KINDS as readonly string[]).includes(k)) {
      fail(`--faults takes ${FAULT_KINDS.join(", ")}; got "${k}"`);
    }
  }
  return {
    durationMs: duration("--duration", values.duration),
    faults: faults as FaultKind[] | undefined,
    seed: whole("--seed", values.seed, 0),
    rate: whole("--rate", values.rate, 1),
    meanGapMs: values.gap === undefined ? undefined : duration("--gap", values.gap),
    burstRows: whole("--burst", values.burst, 1),
    agentMode: mode,
    logPath: values.log,
    verbose: values.verbose,
    keep: values.keep || values.log !== undefined,
  };
}

async function main(): Promise<number> {
  const options = parseOptions(Deno.args);
  const stop = new AbortController();
  const onSignal = () => {
    if (stop.signal.aborted) Deno.exit(130);
    console.error("chaos: interrupted, stopping the agent and the servers");
    stop.abort(new DOMException("interrupted", "AbortError"));
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    const summary = await runChaos({ ...options, signal: stop.signal });
    console.log(formatSummary(summary));
    for (const f of summary.findings) {
      console.error(
        `chaos: finding: ${f.what}${f.run ? ` (agent run ${f.run})` : ""}${
          f.detail ? `: ${f.detail}` : ""
        }`,
      );
    }
    if (options.verbose) {
      for (const [e, n] of Object.entries(summary.agentErrors).sort((a, b) => b[1] - a[1])) {
        console.error(`chaos: agent error x${n}: ${e}`);
      }
    }
    if (!summary.ok || summary.findings.length > 0 || options.keep) {
      console.error(`chaos: log ${summary.logPath}`);
    } else {
      await Deno.remove(summary.logPath).catch(() => {});
    }
    return summary.ok ? 0 : 1;
  } catch (err) {
    if (stop.signal.aborted) return 130;
    console.error(`chaos: ${err instanceof Error ? err.stack : err}`);
    return 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
}

if (import.meta.main) Deno.exit(await main());
