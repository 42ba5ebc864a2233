/**
 * `deno task bench` (issue 3, item 8): meter-sync's upload against the plain binary COPY
 * pipe and the original design, on the same backlog, optionally over a slow link.
 *
 *   deno task bench [--rows 200000] [--rtt 50ms] [--batch-sizes 1000,5000,10000,20000]
 *                   [--local-url URL --remote-url URL --allow-truncate] [--memory]
 */
import { parseArgs } from "node:util";
import { quoteIdent, readTable } from "../lib/columns.ts";
import { connect, resumeSockets, type Sql } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { type EmbeddedServer, postmasterPid, startEmbeddedServer } from "../lib/embedded.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { seedReadings } from "../lib/seed.ts";
import { claimCondition, queueCondition } from "../lib/status.ts";
import type { BaselineResult } from "./bench_baseline.ts";
import { parseDuration } from "../lib/duration.ts";
import { type DelayProxy, startDelayProxy, viaProxy } from "./delay_proxy.ts";
import { childEnv, shippedFlags } from "./shipped_flags.ts";
import { peakRssKib, procStat } from "./proc.ts";

const TABLE = "meter_readings";
/** The seeded backlog, kept aside so that every contender starts from the same rows. */
const TEMPLATE = "meter_sync_bench_template";
const DEFAULT_BATCH_SIZES = [1000, 5000, 10000, 20000];
const MEMORY_ROWS = 1_000_000;
const MEMORY_TARGET_MIB = 150;
/** A contender that runs longer than this is killed and reported as failed. */
const RUN_TIMEOUT_MS = 60 * 60 * 1000;

const HELP = `deno task bench [flags]
  --rows N              backlog size (default 200000; 1000000 with --memory)
  --rtt DURATION        simulate a slow link to the remote, e.g. 50ms (a delaying TCP proxy)
  --batch-sizes LIST    batch sizes tried for meter-sync's best (default ${DEFAULT_BATCH_SIZES})
  --only LIST           contenders to run: pipe,locking-pipe,sync,original (default all four);
                        meter-sync runs at batch size 100 too when the original design runs
  --parallel N          meter-sync's --parallel: upload lanes in flight at once (default 1)
  --repeat N            run each contender N times and report the median run (default 1): a
                        shared machine's figures vary by a fifth from one run to the next; the
                        runs go in rounds (every contender once per round, each round starting
                        one contender further on), so that a ratio compares runs from the same
                        minutes and no contender always runs in the same place of a round
  --memory              only meter-sync, with a ${MEMORY_ROWS}-row backlog, at batch sizes 100
                        and ${
  Math.max(...DEFAULT_BATCH_SIZES)
} (or --batch-sizes): peak RSS against the ${MEMORY_TARGET_MIB} MiB target
  --no-psql             use the postgres.js COPY pipe for (a) even when psql is on PATH
  --local-url URL       use these databases instead of two embedded servers; their
  --remote-url URL      meter_readings tables are truncated (needs --allow-truncate)
  --results FILE        where to append the results (default bench/RESULTS.md)
  --no-results          print only`;

/** (a) the pipe, (d) the pipe that also claims and deletes, (b) meter-sync, (c) the original. */
const CONTENDERS = ["pipe", "locking-pipe", "sync", "original"] as const;
type Contender = typeof CONTENDERS[number];

interface Options {
  rows: number;
  rttMs: number;
  batchSizes: number[];
  contenders: Set<Contender>;
  memory: boolean;
  noPsql: boolean;
  localUrl?: string;
  remoteUrl?: string;
  allowTruncate: boolean;
  results?: string;
  parallel: number;
  repeat: number;
}

function fail(message: string): never {
  console.error(`bench: ${message}`);
  Deno.exit(2);
}

function positiveInt(text: string, flag: string): number {
  const n = Number(text.replaceAll("_", ""));
  if (!Number.isInteger(n) || n < 1) fail(`${flag} needs a positive whole number, got "${text}"`);
  return n;
}

function parseOptions(args: string[]): Options {
  const { values } = parseArgs({
    args,
    options: {
      rows: { type: "string" },
      rtt: { type: "string" },
      "batch-sizes": { type: "string" },
      only: { type: "string" },
      parallel: { type: "string", default: "1" },
      repeat: { type: "string", default: "1" },
      memory: { type: "boolean", default: false },
      "no-psql": { type: "boolean", default: false },
      "local-url": { type: "string" },
      "remote-url": { type: "string" },
      "allow-truncate": { type: "boolean", default: false },
      results: { type: "string", default: "bench/RESULTS.md" },
      "no-results": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(HELP);
    Deno.exit(0);
  }
  const rttMs = values.rtt === undefined ? 0 : parseDuration(values.rtt);
  if (rttMs === undefined) {
    fail(`--rtt needs a duration such as 50ms or 0.05s, got "${values.rtt}"`);
  }
  const batchSizes = values["batch-sizes"]
    ? values["batch-sizes"].split(",").map((s) => positiveInt(s.trim(), "--batch-sizes"))
    : values.memory
    ? [100, Math.max(...DEFAULT_BATCH_SIZES)]
    : DEFAULT_BATCH_SIZES;
  const names = (values.only ?? CONTENDERS.join(",")).split(",").map((s) => s.trim());
  for (const n of names) {
    if (!(CONTENDERS as readonly string[]).includes(n)) {
      fail(`--only takes ${CONTENDERS.join(", ")}, got "${n}"`);
    }
  }
  if (Boolean(values["local-url"]) !== Boolean(values["remote-url"])) {
    fail("give both --local-url and --remote-url, or neither (two embedded servers)");
  }
  if (values["local-url"] && !values["allow-truncate"]) {
    fail("the bench truncates meter_readings on both databases: add --allow-truncate");
  }
  return {
    rows: values.rows ? positiveInt(values.rows, "--rows") : values.memory ? MEMORY_ROWS : 200_000,
    rttMs,
    batchSizes,
    contenders: values.memory ? new Set(["sync"]) : new Set(names as Contender[]),
    memory: values.memory,
    noPsql: values["no-psql"],
    localUrl: values["local-url"],
    remoteUrl: values["remote-url"],
    allowTruncate: values["allow-truncate"],
    results: values["no-results"] ? undefined : values.results,
    parallel: positiveInt(values.parallel, "--parallel"),
    repeat: positiveInt(values.repeat, "--repeat"),
  };
}

// ---------------------------------------------------------------------------------------
// Processes: wall time and peak RSS

/**
 * CPU seconds used so far by a PostgreSQL server: the postmaster, its live processes
 * (backends, WAL writer, checkpointer, ...) and the ones it has reaped.
 */
async function serverCpuSeconds(serverDir: string): Promise<number | undefined> {
  const postmaster = postmasterPid(serverDir);
  if (postmaster === undefined) return undefined;
  const main = await procStat(postmaster);
  if (!main) return undefined;
  let total = main.cpu + main.childrenCpu;
  for await (const entry of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    const st = await procStat(Number(entry.name));
    if (st?.ppid === postmaster) total += st.cpu;
  }
  return total;
}

/** Polls VmHWM and CPU time: the last reading before exit holds the peak and the total. */
function watchProcess(pid: number): { stop(): Promise<{ peakKib: number; cpu: number }> } {
  let peak = 0;
  let cpu = 0;
  let running = true;
  const loop = (async () => {
    while (running) {
      const kib = await peakRssKib(pid);
      if (kib !== undefined) peak = Math.max(peak, kib);
      const st = await procStat(pid);
      if (st) cpu = Math.max(cpu, st.cpu);
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { peakKib: peak, cpu };
    },
  };
}

interface ProcessRun {
  code: number;
  seconds: number;
  peakKib: number[];
  /** CPU seconds of the contender's own process(es), sampled every 20 ms. */
  cpu: number;
  stdout: string;
  stderr: string;
}

/** The child processes of the contender running now, so that Ctrl-C can stop them. */
const children = new Set<Deno.ChildProcess>();

function killAll(signal: Deno.Signal = "SIGKILL"): void {
  for (const child of children) {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
  for (const pid of pipePids) {
    try {
      Deno.kill(pid, signal);
    } catch {
      // already gone
    }
  }
}

async function drain(stream: ReadableStream<Uint8Array>): Promise<string> {
  const chunks: string[] = [];
  const decoder = new TextDecoder();
  for await (const chunk of stream) {
    chunks.push(decoder.decode(chunk, { stream: true }));
    // Keep the tail only: a long run's log must not fill the bench's memory.
    if (chunks.length > 2000) chunks.splice(0, 1000);
  }
  return chunks.join("");
}

/** Runs one command, timing it from spawn to exit and watching its peak RSS. */
async function runProcess(
  cmd: string,
  args: string[],
  env: Record<string, string>,
): Promise<ProcessRun> {
  const started = performance.now();
  const child = new Deno.Command(cmd, {
    args,
    env: { ...childEnv(), ...env },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  children.add(child);
  const watch = watchProcess(child.pid);
  const timer = setTimeout(() => killAll(), RUN_TIMEOUT_MS);
  const [stdout, stderr, status] = await Promise.all([
    drain(child.stdout),
    drain(child.stderr),
    child.status,
  ]);
  const seconds = (performance.now() - started) / 1000;
  clearTimeout(timer);
  children.delete(child);
  const seen = await watch.stop();
  return { code: status.code, seconds, peakKib: [seen.peakKib], cpu: seen.cpu, stdout, stderr };
}

/** The line before bash's `times` in the pipe's stderr. */
const PIPE_TIMES = "meter-sync-bench-times";

/**
 * psql LOCAL | psql REMOTE, joined by bash with an OS pipe as a shell user would type it:
 * nothing else touches the bytes between (an earlier version relayed them through this
 * process to count them, which took CPU from the pipe: 3-10 % of its speed on 2 cores).
 * The CPU time of both psql processes comes from bash's `times` once it has reaped them;
 * their peak RSS from watching them. -q keeps the other commands' tags out of the data.
 */
const PIPE_SCRIPT = `set -o pipefail
n=$1; shift
( if [ -n "\${SEND_PGPASSWORD+x}" ]; then export PGPASSWORD="$SEND_PGPASSWORD"; fi
  unset SEND_PGPASSWORD RECV_PGPASSWORD; exec psql "\${@:1:n}" ) |
( if [ -n "\${RECV_PGPASSWORD+x}" ]; then export PGPASSWORD="$RECV_PGPASSWORD"; fi
  unset SEND_PGPASSWORD RECV_PGPASSWORD; exec psql "\${@:n+1}" )
status=$?
echo ${PIPE_TIMES} >&2
times >&2
exit $status`;
/** CPU seconds of the children from bash's `times` ("0m1.234s 0m0.567s" on its second line). */
function childrenCpu(stderr: string): number | undefined {
  const lines = stderr.split("\n");
  const at = lines.lastIndexOf(PIPE_TIMES);
  const m = at < 0 ? null : /^(\d+)m([\d.]+)s (\d+)m([\d.]+)s$/.exec(lines[at + 2]?.trim() ?? "");
  if (!m) return undefined;
  return Number(m[1]) * 60 + Number(m[2]) + Number(m[3]) * 60 + Number(m[4]);
}

/** The pids of a process's children, in the order they were started (none once it is gone). */
async function childPids(pid: number): Promise<number[]> {
  try {
    const text = await Deno.readTextFile(`/proc/${pid}/task/${pid}/children`);
    return text.trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** psql processes of the pipe running now, so that Ctrl-C and the timeout stop them too. */
const pipePids = new Set<number>();

async function runPsqlPipe(
  local: PsqlTarget,
  remote: PsqlTarget,
  senderCommands: string[],
  copyIn: string,
): Promise<ProcessRun> {
  const psqlArgs = (target: PsqlTarget, commands: string[]) => [
    "-X",
    "-q",
    "-v",
    "ON_ERROR_STOP=1",
    "-d",
    target.conninfo,
    ...commands.flatMap((c) => ["-c", c]),
  ];
  const sending = psqlArgs(local, senderCommands);
  const passwords: Record<string, string> = {};
  if (local.env.PGPASSWORD !== undefined) passwords.SEND_PGPASSWORD = local.env.PGPASSWORD;
  if (remote.env.PGPASSWORD !== undefined) passwords.RECV_PGPASSWORD = remote.env.PGPASSWORD;
  const started = performance.now();
  const shell = new Deno.Command("bash", {
    args: [
      "-c",
      PIPE_SCRIPT,
      "bash",
      String(sending.length),
      ...sending,
      ...psqlArgs(remote, [copyIn]),
    ],
    env: { ...childEnv(), ...passwords },
    clearEnv: true,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  children.add(shell);
  const timer = setTimeout(() => killAll(), RUN_TIMEOUT_MS);
  // Both psql processes start at once; each is watched from when it is first seen.
  const watches: ReturnType<typeof watchProcess>[] = [];
  let finding = true;
  const finder = (async () => {
    const seen = new Set<number>();
    while (finding && seen.size < 2) {
      for (const pid of await childPids(shell.pid)) {
        if (seen.has(pid)) continue;
        seen.add(pid);
        pipePids.add(pid);
        watches.push(watchProcess(pid));
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    return seen;
  })();
  const [stderr, status] = await Promise.all([drain(shell.stderr), shell.status]);
  const seconds = (performance.now() - started) / 1000;
  finding = false;
  const pids = await finder;
  clearTimeout(timer);
  children.delete(shell);
  for (const pid of pids) pipePids.delete(pid);
  const seen = await Promise.all(watches.map((w) => w.stop()));
  const cpu = childrenCpu(stderr);
  return {
    code: status.code,
    seconds,
    peakKib: seen.length ? seen.map((s) => s.peakKib) : [0], // none seen: it failed at once
    cpu: cpu ?? seen.reduce((sum, s) => sum + s.cpu, 0),
    stdout: "",
    stderr: stderr.slice(0, Math.max(0, stderr.lastIndexOf(`${PIPE_TIMES}\n`))).trim(),
  };
}

// ---------------------------------------------------------------------------------------
// Databases

interface PsqlTarget {
  /** libpq key=value string, without the password. */
  conninfo: string;
  /** PGPASSWORD, so that the password stays out of the process list. */
  env: Record<string, string>;
}

function conninfoValue(v: string): string {
  return `'${v.replaceAll("\\", "\\\\").replaceAll("'", "\\'")}'`;
}

function psqlTarget(url: string): PsqlTarget {
  const t = parseDatabaseUrl(url, "bench");
  const parts: Record<string, string | undefined> = {
    host: t.host,
    port: String(t.port),
    dbname: t.database,
    user: t.user,
    sslmode: t.sslmode,
    sslrootcert: t.sslrootcert,
    sslcert: t.sslcert,
    sslkey: t.sslkey,
    application_name: "meter-sync-bench-psql",
  };
  const conninfo = Object.entries(parts)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${conninfoValue(v!)}`)
    .join(" ");
  return { conninfo, env: t.password !== undefined ? { PGPASSWORD: t.password } : {} };
}

async function scalar<T>(sql: Sql, query: string): Promise<T> {
  const [row] = await sql.unsafe(query);
  return Object.values(row)[0] as T;
}

/**
 * A fingerprint of the table's values in PostgreSQL's own text form: the row count and
 * an order-independent sum of per-row hashes, so that both sides compare without
 * moving the data.
 */
async function fingerprint(sql: Sql, table: string, columns: string[]): Promise<string> {
  const row = `ROW(${columns.map((c) => quoteIdent(c)).join(", ")})::text`;
  return await scalar<string>(
    sql,
    `SELECT count(*) || ':' || coalesce(sum(('x' || left(md5(${row}), 16))::bit(64)::int8::numeric), 0)
       FROM ${quoteIdent(table)}`,
  );
}

/** The size of a table's binary COPY (the columns given), counted without keeping it. */
async function binaryCopyBytes(sql: Sql, table: string, columns: string[]): Promise<number> {
  const cols = columns.map((c) => quoteIdent(c)).join(", ");
  const query = sql.unsafe(
    `COPY (SELECT ${cols} FROM ${quoteIdent(table)}) TO STDOUT (FORMAT binary)`,
  ) as unknown as { readable(): Promise<NodeJS.ReadableStream> };
  const stream = await query.readable();
  // Flowing mode: postgres.js never pauses the socket (see lib/copy_io.ts copyOut).
  const bytes = await new Promise<number>((resolve, reject) => {
    let n = 0;
    stream.on("data", (chunk: Uint8Array) => (n += chunk.length));
    stream.on("end", () => resolve(n));
    stream.on("error", reject);
  });
  resumeSockets(sql);
  return bytes;
}

interface Bench {
  local: Sql;
  remote: Sql;
  localUrl: string;
  remoteUrl: string;
  /** Remote columns, in remote order: what every contender moves. */
  columns: string[];
  templateFingerprint: string;
  /** Binary COPY size of the backlog (remote columns), measured once before the runs. */
  copyBytes: number;
  /** Folders of the embedded servers, whose CPU time is measured (not with given URLs). */
  serverDirs?: { local: string; remote: string };
}

async function resetDatabases(b: Bench): Promise<number> {
  const started = performance.now();
  await b.local.unsafe(`TRUNCATE ${TABLE}, meter_sync_quarantine`);
  await b.local.unsafe(`INSERT INTO ${TABLE} SELECT * FROM ${TEMPLATE}`);
  await b.remote.unsafe(`TRUNCATE ${TABLE}`);
  // Every contender starts from fresh statistics, a set visibility map and no dirty pages.
  await b.local.unsafe(`VACUUM (ANALYZE) ${TABLE}`);
  await b.remote.unsafe(`VACUUM (ANALYZE) ${TABLE}`);
  await Promise.all([b.local.unsafe("CHECKPOINT"), b.remote.unsafe("CHECKPOINT")]);
  return (performance.now() - started) / 1000;
}

interface Verification {
  ok: boolean;
  detail: string;
  identical: boolean;
}

/** The pipe only copies: it leaves the local rows, the agents must have deleted them. */
async function verify(b: Bench, rows: number, localEmptied: boolean): Promise<Verification> {
  const [r] = await b.remote.unsafe<{ n: string; d: string }[]>(
    `SELECT count(*) AS n, count(DISTINCT id) AS d FROM ${TABLE}`,
  );
  const left = Number(await scalar<string>(b.local, `SELECT count(*) FROM ${TABLE}`));
  const problems: string[] = [];
  if (Number(r.n) !== rows) problems.push(`remote has ${r.n} rows, expected ${rows}`);
  if (Number(r.d) !== Number(r.n)) problems.push(`remote has ${r.d} distinct ids in ${r.n} rows`);
  if (localEmptied && left !== 0) problems.push(`${left} rows left in the local table`);
  const identical = problems.length === 0 &&
    (await fingerprint(b.remote, TABLE, b.columns)) === b.templateFingerprint;
  return { ok: problems.length === 0, detail: problems.join("; "), identical };
}

// ---------------------------------------------------------------------------------------
// Contenders

interface Outcome {
  key: string;
  label: string;
  batchSize?: number;
  seconds: number;
  /** Seconds measured inside the process (without its start-up), when it says. */
  innerSeconds?: number;
  peakKib: number[];
  /** Wall seconds of every run (--repeat); the outcome is the median one. */
  runs: number[];
  /** CPU seconds during the run: each server (embedded only) and the contender's processes. */
  cpu: { local?: number; remote?: number; contender: number };
  ok: boolean;
  failure?: string;
  identical: boolean;
  /** The servers on which an autovacuum worker was at work on the readings table during the run. */
  autovacuum: string[];
  /** Of all runs (--repeat), those during which autovacuum worked on the readings table. */
  disturbed: number;
}

/**
 * Watches both servers for autovacuum workers on the readings table while a contender runs. A
 * contender's own commits start them (meter-sync commits every batch, the pipe at its end), in
 * some runs and not in others, and their work lands in the run's window: one series of runs on one
 * pair of servers spread from 5.3 to 9.2 s, and with autovacuum off on those servers stayed within
 * a few percent. Reported with the results, so that a slow run can be told from a slow contender.
 */
function watchAutovacuum(b: Bench): () => Promise<string[]> {
  const onTable = new RegExp(`\\b${TABLE}\\b`);
  const seen = new Set<string>();
  let looking: Promise<void> | undefined;
  const lookOnce = async () => {
    for (const [side, sql] of [["local", b.local], ["remote", b.remote]] as const) {
      const workers = await sql.unsafe<{ query: string }[]>(
        `SELECT query FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'`,
      ).catch(() => []);
      // "autovacuum: VACUUM ANALYZE public.meter_readings", "autovacuum: ANALYZE ...".
      if (workers.some((w) => onTable.test(w.query))) seen.add(side);
    }
  };
  const look = () => (looking ??= lookOnce().finally(() => (looking = undefined)));
  const timer = setInterval(look, 200);
  return async () => {
    clearInterval(timer);
    await looking;
    await look();
    return [...seen];
  };
}

/** CPU seconds of both embedded servers so far (undefined with given URLs). */
async function serversCpu(b: Bench): Promise<{ local?: number; remote?: number }> {
  if (!b.serverDirs) return {};
  return {
    local: await serverCpuSeconds(b.serverDirs.local),
    remote: await serverCpuSeconds(b.serverDirs.remote),
  };
}

function tail(text: string, lines = 8): string {
  return text.trim().split("\n").slice(-lines).join("\n");
}

async function runPipe(b: Bench, remoteUrl: string, usePsql: boolean): Promise<ProcessRun> {
  const cols = b.columns.map((c) => quoteIdent(c)).join(", ");
  if (usePsql) {
    return await runPsqlPipe(
      psqlTarget(b.localUrl),
      psqlTarget(remoteUrl),
      [`\\copy (SELECT ${cols} FROM ${TABLE}) TO pstdout (FORMAT binary)`],
      `\\copy ${TABLE} (${cols}) FROM pstdin (FORMAT binary)`,
    );
  }
  return await runProcess(Deno.execPath(), [
    "run",
    "--allow-net",
    "--allow-env",
    "--allow-read",
    new URL("./bench_baseline.ts", import.meta.url).pathname,
    "pipe",
  ], { LOCAL_DATABASE_URL: b.localUrl, REMOTE_DATABASE_URL: remoteUrl });
}

/**
 * (d): the pipe of (a), but the sending side claims the queue as meter-sync does (in queue
 * order, FOR UPDATE SKIP LOCKED) and deletes it in the same transaction. One batch, no
 * idempotency, and the local commit does not wait for the remote's: not a design, a yardstick
 * of the work on the local server that any agent which deletes what it delivers adds to the
 * pipe, with no agent process of its own in the way.
 */
async function runLockingPipe(b: Bench, remoteUrl: string): Promise<ProcessRun> {
  const cols = b.columns.map((c) => quoteIdent(c)).join(", ");
  const mCols = b.columns.map((c) => `m.${quoteIdent(c)}`).join(", ");
  // A backslash command ends at its line's end: the conditions go on one line.
  const claimed = claimCondition("m").replace(/\s+/g, " "); // as meter-sync's claim reads
  const queued = queueCondition("m").replace(/\s+/g, " ");
  return await runPsqlPipe(
    psqlTarget(b.localUrl),
    psqlTarget(remoteUrl),
    [
      "SET enable_seqscan = off", // the queue's index order, as meter-sync's claim reads it
      "BEGIN",
      `\\copy (SELECT ${mCols} FROM ${TABLE} m WHERE ${claimed} ORDER BY m.createdat, m.id FOR UPDATE OF m SKIP LOCKED) TO pstdout (FORMAT binary)`,
      `DELETE FROM ${TABLE} m WHERE ${queued}`,
      "COMMIT",
    ],
    `\\copy ${TABLE} (${cols}) FROM pstdin (FORMAT binary)`,
  );
}

function parseBaseline(stdout: string): BaselineResult | undefined {
  try {
    return JSON.parse(stdout.trim().split("\n").at(-1) ?? "");
  } catch {
    return undefined;
  }
}

/** The seconds of the cycle's summary log line (category meter-sync.cycle). */
function cycleSeconds(stderr: string): number | undefined {
  for (const line of stderr.split("\n").reverse()) {
    if (!line.includes('"category":"meter-sync.cycle"')) continue;
    try {
      const record = JSON.parse(line);
      const s = record.properties?.seconds;
      if (typeof s === "number") return s;
    } catch {
      // not a JSON line
    }
  }
  return undefined;
}

async function runSync(
  b: Bench,
  remoteUrl: string,
  batchSize: number,
  parallel: number,
): Promise<ProcessRun> {
  return await runProcess(Deno.execPath(), [
    "run",
    ...(await shippedFlags()),
    new URL("../main.ts", import.meta.url).pathname,
    "upload",
    "--batch-size",
    String(batchSize),
    "--parallel",
    String(parallel),
    "--log-format",
    "json",
  ], { LOCAL_DATABASE_URL: b.localUrl, REMOTE_DATABASE_URL: remoteUrl });
}

function runOriginal(b: Bench, remoteUrl: string, batchSize: number): Promise<ProcessRun> {
  return runProcess(Deno.execPath(), [
    "run",
    "--allow-net",
    "--allow-env",
    "--allow-read",
    new URL("./bench_baseline.ts", import.meta.url).pathname,
    "original",
    "--batch-size",
    String(batchSize),
  ], { LOCAL_DATABASE_URL: b.localUrl, REMOTE_DATABASE_URL: remoteUrl });
}

/** What a contender is: the part of its outcome known before it runs. */
type Spec = Pick<Outcome, "key" | "label" | "batchSize">;

/** A contender as the rounds run it: what it is and how to run it once. */
interface Entry {
  spec: Spec;
  run: () => Promise<ProcessRun>;
}

/**
 * Runs every contender once per round, `repeat` rounds, and reports each one's median run. In
 * rounds rather than one contender after the other, so that the runs behind a ratio come from
 * the same minutes: this machine's speed drifts by a fifth from one stretch of minutes to the
 * next. Each round starts one contender further on: in two runs with a fixed order the
 * contender in third place was slow in all three rounds, whichever it was. A contender that
 * fails is reported by its failed run and not run again.
 */
async function measureRounds(
  b: Bench,
  rows: number,
  entries: Entry[],
  repeat: number,
): Promise<Outcome[]> {
  const done: Outcome[][] = entries.map(() => []);
  const failed: (Outcome | undefined)[] = entries.map(() => undefined);
  for (let round = 1; round <= repeat; round++) {
    if (repeat > 1) console.log(`\nround ${round} of ${repeat}`);
    for (let k = 0; k < entries.length; k++) {
      const i = (k + round - 1) % entries.length;
      if (failed[i]) continue;
      const entry = entries[i];
      const outcome = await measureOnce(b, rows, entry.spec, entry.run);
      if (outcome.ok) done[i].push(outcome);
      else failed[i] = outcome;
    }
  }
  return entries.map((_, i) => {
    if (failed[i]) return failed[i];
    const runs = done[i];
    const median = [...runs].sort((x, y) => x.seconds - y.seconds)[(runs.length - 1) >> 1];
    return {
      ...median,
      runs: runs.map((o) => o.seconds),
      disturbed: runs.filter((o) => o.autovacuum.length).length,
    };
  });
}

async function measureOnce(
  b: Bench,
  rows: number,
  spec: Spec,
  run: () => Promise<ProcessRun>,
): Promise<Outcome> {
  const resetSeconds = await resetDatabases(b);
  console.log(`\n${spec.label}: reset in ${resetSeconds.toFixed(1)} s, running ...`);
  const cpuBefore = await serversCpu(b);
  const stopWatching = watchAutovacuum(b);
  const result = await run();
  const autovacuum = await stopWatching();
  // The contender's backends exit with it; once the postmaster has reaped them their time is in
  // its children's total. A snapshot taken in between would miss them.
  await new Promise((r) => setTimeout(r, 300));
  const cpuAfter = await serversCpu(b);
  const delta = (after?: number, before?: number) =>
    after === undefined || before === undefined ? undefined : after - before;
  const check = await verify(b, rows, spec.key !== "pipe");
  let failure: string | undefined;
  if (result.code !== 0) failure = `exit code ${result.code}: ${tail(result.stderr)}`;
  else if (!check.ok) failure = check.detail;
  let innerSeconds: number | undefined;
  if (spec.key.startsWith("sync")) innerSeconds = cycleSeconds(result.stderr);
  else if (spec.key === "original") innerSeconds = parseBaseline(result.stdout)?.seconds;
  const outcome: Outcome = {
    ...spec,
    seconds: result.seconds,
    runs: [result.seconds],
    innerSeconds,
    peakKib: result.peakKib,
    cpu: {
      local: delta(cpuAfter.local, cpuBefore.local),
      remote: delta(cpuAfter.remote, cpuBefore.remote),
      contender: result.cpu,
    },
    ok: failure === undefined,
    failure,
    identical: check.identical,
    autovacuum,
    disturbed: autovacuum.length ? 1 : 0,
  };
  console.log(
    failure
      ? `  FAILED: ${failure}`
      : `  ${result.seconds.toFixed(2)} s, ${Math.round(rows / result.seconds)} rows/s, peak RSS ${
        rssText(outcome.peakKib)
      }${check.identical ? "" : ", VALUES DIFFER from the seeded rows"}${
        autovacuum.length ? `; autovacuum at work on the table (${autovacuum.join(", ")})` : ""
      }`,
  );
  return outcome;
}

// ---------------------------------------------------------------------------------------
// Report

function cpuText(cpu: Outcome["cpu"]): string {
  const s = (n?: number) => (n === undefined ? "?" : n.toFixed(1));
  return `${s(cpu.local)} + ${s(cpu.remote)} + ${s(cpu.contender)}`;
}

function rssText(kib: number[]): string {
  return kib.map((k) => (k / 1024).toFixed(0)).join(" + ") + " MiB";
}

interface Machine {
  date: string;
  cpus: string;
  memory: string;
  cpu: string;
  deno: string;
  os: string;
  postgres: string;
  psql: string;
}

async function machine(local: Sql): Promise<Machine> {
  const read = (path: string) => Deno.readTextFile(path).catch(() => "");
  const cpuinfo = await read("/proc/cpuinfo");
  const meminfo = await read("/proc/meminfo");
  const memKib = Number(/^MemTotal:\s+(\d+)/m.exec(meminfo)?.[1] ?? 0);
  let nproc = String(navigator.hardwareConcurrency);
  try {
    const out = await new Deno.Command("nproc", { stdout: "piped", stderr: "null" }).output();
    if (out.success) nproc = new TextDecoder().decode(out.stdout).trim();
  } catch {
    // no nproc: the runtime's count
  }
  let psql = "not on PATH";
  try {
    const out = await new Deno.Command("psql", { args: ["--version"], stdout: "piped" }).output();
    if (out.success) psql = new TextDecoder().decode(out.stdout).trim();
  } catch {
    // stays "not on PATH"
  }
  const settings = await local.unsafe<{ name: string; setting: string }[]>(
    `SELECT name, setting FROM pg_settings
      WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers',
                     'huge_pages_status')
      ORDER BY name`,
  );
  const version = await scalar<string>(local, "SHOW server_version");
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    cpus: nproc,
    memory: `${(memKib / 1024 / 1024).toFixed(1)} GiB`,
    cpu: /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1].trim() ?? "unknown",
    deno: Deno.version.deno,
    os: `${Deno.build.os} ${Deno.osRelease()}`,
    postgres: `${version} (${settings.map((s) => `${s.name}=${s.setting}`).join(", ")})`,
    psql,
  };
}

function table(outcomes: Outcome[], rows: number, copyBytes: number | undefined): string[] {
  const pipe = outcomes.find((o) => o.key === "pipe" && o.ok);
  const pipeRate = pipe ? rows / pipe.seconds : undefined;
  const lines = [
    "| contender | batch | wall s | in-process s | rows/s | MB/s | vs (a) | CPU s local + remote + contender | peak RSS | values | result |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
  ];
  for (const o of outcomes) {
    const rate = rows / o.seconds;
    const cells = [
      o.label,
      o.batchSize === undefined ? "-" : String(o.batchSize),
      o.runs.length > 1
        ? `${o.seconds.toFixed(2)} (${Math.min(...o.runs).toFixed(2)}-${
          Math.max(...o.runs).toFixed(2)
        })`
        : o.seconds.toFixed(2),
      o.innerSeconds === undefined ? "-" : o.innerSeconds.toFixed(2),
      o.ok ? Math.round(rate).toLocaleString("en-US") : "-",
      o.ok && copyBytes ? (copyBytes / 1e6 / o.seconds).toFixed(1) : "-",
      o.ok && pipeRate ? (rate / pipeRate).toFixed(2) : "-",
      cpuText(o.cpu),
      rssText(o.peakKib),
      o.ok ? (o.identical ? "identical" : "DIFFER") : "-",
      o.ok ? "ok" : `FAILED: ${o.failure?.split("\n")[0].slice(0, 120)}`,
    ];
    lines.push(`| ${cells.join(" | ")} |`);
  }
  return lines;
}

/** Which runs autovacuum worked in (see watchAutovacuum): a slow run is not always a slow contender. */
function autovacuumLine(outcomes: Outcome[]): string {
  const hit = outcomes.filter((o) => o.disturbed > 0);
  if (hit.length === 0) {
    return "- autovacuum: no worker was at work on the readings table during any run";
  }
  return "- autovacuum at work on the readings table (started by the runs' own commits; it adds " +
    "work to the run it lands in): " +
    hit.map((o) =>
      `${o.label.replace(/ \(best\)$/, "")}${
        o.batchSize ? ` ${o.batchSize}` : ""
      } in ${o.disturbed} of ${o.runs.length} runs${
        o.autovacuum.length ? `, the reported one among them (${o.autovacuum.join(" and ")})` : ""
      }`
    ).join("; ");
}

function targets(outcomes: Outcome[], rows: number, rttMs: number, memory: boolean): string[] {
  const ok = outcomes.filter((o) => o.ok);
  const rate = (o: Outcome | undefined) => (o ? rows / o.seconds : undefined);
  const lines: string[] = [];
  const verdict = (pass: boolean) => (pass ? "met" : "MISSED");
  if (memory) {
    for (const o of ok.filter((o) => o.key.startsWith("sync"))) {
      const mib = o.peakKib[0] / 1024;
      lines.push(
        `- peak RSS of meter-sync at batch ${o.batchSize} with ${rows} rows: ${
          mib.toFixed(0)
        } MiB (target <= ${MEMORY_TARGET_MIB} MiB): ${verdict(mib <= MEMORY_TARGET_MIB)}`,
      );
    }
    return lines;
  }
  const pipe = rate(ok.find((o) => o.key === "pipe"));
  const original = rate(ok.find((o) => o.key === "original"));
  const at100 = rate(ok.find((o) => o.key === "sync" && o.batchSize === 100));
  const syncs = ok.filter((o) => o.key === "sync");
  const best = syncs.sort((x, y) => x.seconds - y.seconds)[0];
  const [vsPipe, vsOriginal] = rttMs > 0 ? [0.7, 5] : [0.8, 2.5];
  if (best && pipe) {
    const r = rate(best)! / pipe;
    lines.push(
      `- meter-sync at its best batch size (${best.batchSize}): ${
        r.toFixed(2)
      } of (a) (target >= ${vsPipe}): ${verdict(r >= vsPipe)}`,
    );
  }
  const locking = rate(ok.find((o) => o.key === "locking-pipe"));
  if (locking && pipe) {
    lines.push(
      `- (d), the pipe that claims and deletes, with no agent in the way and in one batch: ${
        (locking / pipe).toFixed(2)
      } of (a), a ceiling for any agent that deletes what it delivers${
        best
          ? `; meter-sync at its best batch size: ${(rate(best)! / locking).toFixed(2)} of (d)`
          : ""
      }`,
    );
  }
  if (at100 && original) {
    const r = at100 / original;
    lines.push(
      `- meter-sync at batch size 100: ${r.toFixed(2)} times (c) (target >= ${vsOriginal}): ${
        verdict(r >= vsOriginal)
      }`,
    );
  }
  return lines;
}

async function appendResults(path: string, section: string): Promise<void> {
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : ".";
  await Deno.mkdir(dir || "/", { recursive: true });
  let existing = "";
  try {
    existing = await Deno.readTextFile(path);
  } catch {
    existing = "# meter-sync benchmark results\n\n" +
      "Appended by `deno task bench` (scripts/bench.ts), newest last. Figures from a shared\n" +
      "machine are noisy: compare rows within one section, not across sections.\n";
  }
  await Deno.writeTextFile(path, `${existing.trimEnd()}\n\n${section.trim()}\n`);
}

// ---------------------------------------------------------------------------------------

async function main(): Promise<number> {
  const opts = parseOptions(Deno.args);
  const servers: EmbeddedServer[] = [];
  let proxy: DelayProxy | undefined;
  const dbs: Sql[] = [];
  const cleanup = async () => {
    killAll();
    await proxy?.close();
    for (const sql of dbs) await sql.end({ timeout: 2 }).catch(() => {});
    for (const s of servers) await s.dispose().catch(() => {});
  };
  const onSignal = () => {
    console.error("\nbench: interrupted, stopping the servers");
    cleanup().finally(() => Deno.exit(130));
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    let localUrl = opts.localUrl;
    let remoteUrl = opts.remoteUrl;
    if (!localUrl || !remoteUrl) {
      console.log("starting two embedded PostgreSQL servers (durable settings: fsync on) ...");
      const started = await Promise.allSettled([
        startEmbeddedServer({ name: "bench-local" }),
        startEmbeddedServer({ name: "bench-remote" }),
      ]);
      for (const s of started) if (s.status === "fulfilled") servers.push(s.value);
      const failed = started.find((s) => s.status === "rejected");
      if (failed) throw new Error(`an embedded server did not start: ${failed.reason}`);
      const [l, r] = servers;
      await Promise.all([l.createDatabase("gateway"), r.createDatabase("central")]);
      localUrl = l.url("gateway");
      remoteUrl = r.url("central");
    }
    const local = await connect(parseDatabaseUrl(localUrl, "local"), { max: 2 });
    const remote = await connect(parseDatabaseUrl(remoteUrl, "remote"), { max: 2 });
    dbs.push(local, remote);
    await migrate(local, await loadMigrations(migrationsDir("local")));
    await migrate(remote, await loadMigrations(migrationsDir("remote")));
    console.log("both databases migrated");

    const remoteInfo = await readTable(remote, TABLE);
    const columns = remoteInfo!.columns.filter((c) => !c.generated).map((c) => c.name);

    // The backlog, seeded once into a template table; not part of any measurement.
    const existing = await scalar<boolean>(local, `SELECT to_regclass('${TEMPLATE}') IS NOT NULL`);
    const templateRows = existing
      ? Number(await scalar<string>(local, `SELECT count(*) FROM ${TEMPLATE}`))
      : -1;
    if (templateRows !== opts.rows) {
      await local.unsafe(`DROP TABLE IF EXISTS ${TEMPLATE}`);
      await local.unsafe(
        `CREATE UNLOGGED TABLE ${TEMPLATE} (LIKE ${TABLE} INCLUDING DEFAULTS)`,
      );
      const started = performance.now();
      let shown = 0;
      await seedReadings(local, {
        count: opts.rows,
        table: TEMPLATE,
        onProgress: (done) => {
          if (done - shown >= 100_000 || done === opts.rows) {
            shown = done;
            console.log(`  seeded ${done} of ${opts.rows} readings`);
          }
        },
      });
      console.log(
        `seeded ${opts.rows} readings in ${((performance.now() - started) / 1000).toFixed(1)} s`,
      );
    } else {
      console.log(`reusing the ${opts.rows}-row backlog in ${TEMPLATE}`);
    }
    await local.unsafe(`VACUUM (ANALYZE) ${TEMPLATE}`);
    const bench: Bench = {
      local,
      remote,
      localUrl,
      remoteUrl,
      columns,
      templateFingerprint: await fingerprint(local, TEMPLATE, columns),
      copyBytes: await binaryCopyBytes(local, TEMPLATE, columns),
      serverDirs: servers.length === 2
        ? { local: servers[0].dir, remote: servers[1].dir }
        : undefined,
    };

    if (opts.rttMs > 0) {
      const target = parseDatabaseUrl(remoteUrl, "remote");
      proxy = startDelayProxy(
        { hostname: target.host, port: target.port },
        { oneWayMs: opts.rttMs / 2 },
      );
      console.log(
        `remote reached through a delaying proxy on 127.0.0.1:${proxy.port} (rtt ${opts.rttMs} ms)`,
      );
      // Round trips per batch of 100, measured behind 50 ms: meter-sync about 2.3 (its COPY
      // starting and ending, with the local work between), the original design about 5.
      const trips = (opts.contenders.has("sync") ? 2.3 / opts.parallel : 0) +
        (opts.contenders.has("original") ? 5 : 0);
      const minutes = (opts.repeat * Math.ceil(opts.rows / 100) * trips * opts.rttMs / 1000) / 60;
      if (minutes > 5) {
        console.log(
          `  note: at batch size 100 every batch costs several round trips; expect roughly ${
            Math.round(minutes)
          } minutes for the batch-100 runs (--rows shortens it)`,
        );
      }
    }
    const contenderRemote = viaProxy(remoteUrl, proxy);

    const onPath = (cmd: string) =>
      new Deno.Command(cmd, { args: ["--version"], stdout: "null", stderr: "null" })
        .output().then((o) => o.success, () => false);
    // psql's two ends are joined by bash (see runPsqlPipe).
    const hasPsql = await onPath("psql") && await onPath("bash");
    const usePsql = hasPsql && !opts.noPsql;
    const pipeLabel = usePsql ? "(a) psql COPY pipe" : "(a) postgres.js COPY pipe";
    if (opts.contenders.has("pipe") && !usePsql) {
      console.log(
        hasPsql
          ? "(a) uses the postgres.js COPY pipe (--no-psql)"
          : "psql or bash is not on PATH: (a) uses the best pipe postgres.js allows (COPY TO readable -> COPY FROM writable)",
      );
    }

    // Module graphs compiled and cached before anything is timed.
    for (const script of ["../main.ts", "./bench_baseline.ts"]) {
      await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          new URL(script, import.meta.url).pathname,
          script.includes("main") ? "--version" : "warmup",
        ],
        stdout: "null",
        stderr: "null",
      }).output();
    }

    const rows = opts.rows;
    const entries: Entry[] = [];
    if (opts.contenders.has("pipe")) {
      entries.push({
        spec: { key: "pipe", label: pipeLabel },
        run: () => runPipe(bench, contenderRemote, usePsql),
      });
    }
    if (opts.contenders.has("locking-pipe")) {
      if (usePsql) {
        entries.push({
          spec: { key: "locking-pipe", label: "(d) psql pipe, claiming and deleting locally" },
          run: () => runLockingPipe(bench, contenderRemote),
        });
      } else console.log("(d) needs psql and bash: not run");
    }
    if (opts.contenders.has("sync")) {
      // Batch size 100 is what the original design is compared with: run it whenever (c)
      // runs. Without (c), only the sizes asked for (behind a slow link batch 100 takes minutes).
      const sizes = opts.memory || !opts.contenders.has("original")
        ? opts.batchSizes
        : [100, ...opts.batchSizes.filter((n) => n !== 100)];
      for (const size of sizes) {
        entries.push({
          spec: {
            key: "sync",
            label: `(b) meter-sync upload${
              opts.parallel > 1 ? ` --parallel ${opts.parallel}` : ""
            }`,
            batchSize: size,
          },
          run: () => runSync(bench, contenderRemote, size, opts.parallel),
        });
      }
    }
    if (opts.contenders.has("original")) {
      entries.push({
        spec: { key: "original", label: "(c) original design", batchSize: 100 },
        run: () => runOriginal(bench, contenderRemote, 100),
      });
    }
    const outcomes = await measureRounds(bench, rows, entries, opts.repeat);

    // Mark meter-sync's best batch size.
    const best = outcomes.filter((o) =>
      o.key === "sync" && o.ok
    ).sort((a, b) => a.seconds - b.seconds)[0];
    if (best && !opts.memory) best.label += " (best)";

    const info = await machine(local);
    const mb = bench.copyBytes;
    const lines = [
      `## ${info.date}: ${opts.memory ? "memory, " : ""}${rows.toLocaleString("en-US")} rows, ${
        opts.rttMs ? `rtt ${opts.rttMs} ms` : "loopback"
      }`,
      "",
      `- machine: ${info.cpus} CPUs (${info.cpu}), ${info.memory} RAM, ${info.os}`,
      `- Deno ${info.deno}; PostgreSQL ${info.postgres}; ${info.psql}`,
      `- servers: ${opts.localUrl ? "given URLs" : "two embedded servers on loopback"}${
        opts.rttMs ? `; the remote behind a delaying TCP proxy (${opts.rttMs / 2} ms each way)` : ""
      }`,
      `- MB/s: the binary COPY size of the backlog's remote columns (${
        (mb / 1e6).toFixed(1)
      } MB, counted once before the runs) over wall time; MB = 10^6 bytes`,
      "- wall s: from spawn to exit of the contender's process(es), start-up included" +
      (opts.repeat > 1
        ? ` (the median of ${opts.repeat} runs, which the other columns describe; in brackets the fastest and slowest; the runs go in rounds, every contender once per round, each round starting one contender further on)`
        : "") +
      "; " +
      "in-process s: the cycle's own figure (meter-sync's summary log line, the baseline's timer)",
      "- CPU s: CPU time during the run of the local server, the remote server (every process of " +
      "each embedded server; ? with given URLs) and the contender's process(es); the machine has " +
      `${info.cpus} CPUs, so a run of W wall seconds has at most ${info.cpus}W to share`,
      ...(outcomes.some((o) => o.key === "locking-pipe")
        ? [
          "- (d): the pipe of (a) whose sender claims the queue as meter-sync does (queue order, " +
          "FOR UPDATE SKIP LOCKED) and deletes it in the same transaction: one batch, not " +
          "idempotent, the local commit not waiting for the remote's; a yardstick, not a design",
        ]
        : []),
      "- peak RSS: VmHWM of each process (the two psql processes of (a) and (d): sender + receiver)",
      "- values: a hash of every remote row in PostgreSQL's text form equals the seeded rows'",
      "",
      ...table(outcomes, rows, mb),
      "",
      ...targets(outcomes, rows, opts.rttMs, opts.memory),
      autovacuumLine(outcomes),
    ];
    const section = lines.join("\n");
    console.log(`\n${section}\n`);
    if (opts.results) {
      await appendResults(opts.results, section);
      console.log(`appended to ${opts.results}`);
    }
    return outcomes.every((o) => o.ok) ? 0 : 1;
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await cleanup();
  }
}

if (import.meta.main) Deno.exit(await main());
