/** `demo`: two embedded PostgreSQL servers, migrated, seeded, synced, summed up and removed. */
import type { CommandContext } from "./commands/context.ts";
import { syncCommand } from "./commands/sync.ts";
import type { Config } from "./config.ts";
import { ping } from "./connections.ts";
import { connect, type Sql } from "./db.ts";
import { parseDatabaseUrl } from "./db_url.ts";
import { type EmbeddedServer, startEmbeddedServer } from "./embedded.ts";
import { loadMigrations, migrate, migrationsDir } from "./migrate.ts";
import { redactUrl } from "./redact.ts";
import { seedReadings } from "./seed.ts";
import { formatStatus, readStatus } from "./status.ts";

/**
 * One sync cycle against the demo's databases. It gets the demo's config with both
 * URLs filled in (command "sync") and a context whose output is indented under the
 * step, and returns the exit code a `sync` command would: the `sync` command itself fits.
 */
export type SyncStep = (config: Config, ctx: CommandContext) => Promise<number>;

/** Options of {@link demo}. */
export interface DemoOptions {
  /** The sync step. @default SYNC_ENGINE */
  sync?: SyncStep;
}

/**
 * The one place the upload engine plugs in: once the `sync` command exists, set this to
 * it (`syncCommand` from ./commands/sync.ts) and the demo runs it as step 4.
 */
const SYNC_ENGINE: SyncStep | undefined = syncCommand;

const TABLE = "meter_readings";
const STEPS = 5;
const INDENT = "      ";
const CMD = "npx --yes deno@2.9.6 task";

const fmt = (n: number) => n.toLocaleString("en-US");
const secondsSince = (started: number) => `${((performance.now() - started) / 1000).toFixed(1)} s`;

/** Joins words with ", " into lines of at most `width` characters. */
function wrap(words: string[], width: number): string[] {
  const lines: string[] = [];
  for (const word of words) {
    const last = lines.length - 1;
    if (last >= 0 && lines[last].length + word.length + 2 <= width) lines[last] += `, ${word}`;
    else lines.push(word);
  }
  return lines;
}

/** Rejects with the signal's reason as soon as it aborts; the work's own outcome is then moot. */
function untilAborted<T>(work: Promise<T>, signal: AbortSignal): Promise<T> {
  work.catch(() => {});
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/**
 * Starts a "gateway" and a "central" PostgreSQL server in temporary folders, migrates
 * both, seeds config.count readings on the gateway, runs one sync cycle (when the
 * upload engine exists), prints the status and removes everything again, also on Ctrl-C.
 */
export async function demo(
  config: Config,
  ctx: CommandContext,
  options: DemoOptions = {},
): Promise<number> {
  const sync = options.sync ?? SYNC_ENGINE;
  const say = (line = "") => ctx.out(line ? `${INDENT}${line}` : "");
  let stepNo = 0;
  /** A numbered step: what, why, the work (cut short by Ctrl-C), and how long it took. */
  const step = async <T>(title: string, why: string, work: () => Promise<T>): Promise<T> => {
    stepNo++;
    ctx.out("");
    ctx.out(`[${stepNo}/${STEPS}] ${title}`);
    say(why);
    const started = performance.now();
    const result = await untilAborted(work(), ctx.signal);
    say(`done in ${secondsSince(started)}`);
    return result;
  };

  const begun = performance.now();
  const starting: Promise<EmbeddedServer>[] = [];
  const pools: Sql[] = [];
  let code = 0;
  ctx.out("meter-sync demo: a gateway database and a central database, both on this machine.");
  ctx.out(
    "Everything runs in temporary folders that are removed at the end (Ctrl-C stops it cleanly).",
  );
  try {
    const [localUrl, remoteUrl] = await step(
      "Start two PostgreSQL servers",
      "One plays the database on an edge gateway, the other the central database.",
      async () => {
        // fsync off: nothing here needs to survive a power cut, and it starts faster.
        starting.push(startEmbeddedServer({ name: "gateway", fast: true }));
        starting.push(startEmbeddedServer({ name: "central", fast: true }));
        const [gateway, central] = await Promise.all(starting);
        await Promise.all([gateway.createDatabase("gateway"), central.createDatabase("central")]);
        const urls = [gateway.url("gateway"), central.url("central")] as const;
        say(`gateway  ${redactUrl(urls[0])}   (LOCAL_DATABASE_URL)`);
        say(`central  ${redactUrl(urls[1])}   (REMOTE_DATABASE_URL)`);
        return urls;
      },
    );
    const localTarget = parseDatabaseUrl(localUrl, "gateway");
    const remoteTarget = parseDatabaseUrl(remoteUrl, "central");
    // Two gateway connections: the seed inserts two chunks at a time.
    const local = await connect(localTarget, { max: 2 });
    pools.push(local);
    const remote = await connect(remoteTarget, { max: 1 });
    pools.push(remote);
    // As every command does; migrate() also hangs if its reserve() is a pool's first use.
    await ping(local, localTarget, "gateway");
    await ping(remote, remoteTarget, "central");

    await step(
      "Apply the migrations",
      "Numbered SQL files, each once, in its own transaction, recorded with a checksum.",
      async () => {
        for (const [side, sql] of [["local", local], ["remote", remote]] as const) {
          const result = await migrate(sql, await loadMigrations(migrationsDir(side)));
          const name = side === "local" ? "gateway  " : "central  ";
          const files = result.applied.map((f) => f.replace(/\.sql$/, ""));
          for (const [i, line] of wrap(files, 80).entries()) {
            say(`${i ? "         " : name}${line}`);
          }
        }
        say("The gateway's readings carry is_synchronized; the central table does not.");
      },
    );

    const count = config.count;
    const seeded = await step(
      `Seed ${fmt(count)} readings on the gateway`,
      "What the meter poller would have written: 100+ typed columns, some NULLs, over 7 days.",
      async () => {
        const started = performance.now();
        // The meters list lives centrally (sync mirrors it down); the gateway has a copy.
        await remote`
          INSERT INTO meters (id, serial_number, name, location, model, installed_at)
          SELECT m, 'SN-' || lpad(m::text, 8, '0'), 'Meter ' || m, 'Feeder ' || (1 + m % 12),
                 (ARRAY['EM340', 'PRO380', 'SDM630'])[1 + m % 3], now() - interval '400 days'
            FROM generate_series(1, ${config.meters}::bigint) AS m`;
        const chunk = Math.min(50_000, Math.max(5_000, Math.ceil(count / 10_000) * 1_000));
        let shown = 0;
        const rows = await seedReadings(local, {
          count,
          meters: config.meters,
          days: 7,
          table: TABLE,
          chunk,
          onProgress: (done) => {
            const pct = Math.floor((done / count) * 100);
            if (ctx.isTerminal) {
              // Redraw one line in place instead of scrolling.
              ctx.out(
                `${shown ? "\x1b[1A\x1b[2K" : ""}${INDENT}${fmt(done)} of ${fmt(count)} (${pct}%)`,
              );
              shown = 1;
            } else if (pct >= shown + 25 || done === count) {
              say(`${fmt(done)} of ${fmt(count)} (${pct}%)`);
              shown = pct - (pct % 25);
            }
          },
        });
        const rate = rows / Math.max(0.001, (performance.now() - started) / 1000);
        say(
          `${fmt(rows)} readings from ${fmt(config.meters)} meters, ${
            fmt(Math.round(rate))
          } rows/s`,
        );
        return rows;
      },
    );

    let syncCode = 0;
    if (sync) {
      syncCode = await step(
        "Sync the gateway to the central database",
        `Oldest first, ${config.batchSize} per batch; a reading leaves the gateway only once central has committed it.`,
        async () => {
          const started = performance.now();
          const code = await sync({
            ...config,
            command: "sync",
            table: TABLE,
            local: localTarget,
            remote: remoteTarget,
          }, { ...ctx, out: (line) => say(line) });
          const [moved] = await remote<{ n: string }[]>`
            SELECT count(*)::text AS n FROM ${remote(TABLE)}`;
          const rate = Number(moved.n) / Math.max(0.001, (performance.now() - started) / 1000);
          say(`${fmt(Number(moved.n))} readings now on central, ${fmt(Math.round(rate))} rows/s`);
          if (code !== 0) {
            say(`The sync ended with exit code ${code}: nothing is lost, see the log lines above.`);
          }
          return code;
        },
      );
    } else {
      stepNo++;
      ctx.out("");
      ctx.out(`[${stepNo}/${STEPS}] Sync the gateway to the central database: not in this release`);
      say("The upload engine is the next release, so the demo stops after seeding:");
      say(`the ${fmt(seeded)} readings stay queued on the gateway and central stays empty.`);
    }

    await step(
      "Status",
      "What `meter-sync status` reports on the gateway, and what central holds.",
      async () => {
        const report = await readStatus(local, TABLE);
        for (const line of formatStatus(report).split("\n")) say(line);
        const [central] = await remote<{ n: string }[]>`
          SELECT count(*)::text AS n FROM ${remote(TABLE)}`;
        say(`central        ${fmt(Number(central.n))} readings`);
      },
    );

    code = syncCode;
  } catch (err) {
    if (!ctx.signal.aborted) throw err;
    ctx.out("");
    ctx.out("Interrupted.");
    return 130;
  } finally {
    const started = performance.now();
    await Promise.all(pools.map((sql) => sql.end({ timeout: 1 }).catch(() => {})));
    const servers = (await Promise.allSettled(starting)).flatMap((r) =>
      r.status === "fulfilled" ? [r.value] : []
    );
    if (servers.length) {
      await Promise.all(servers.map((s) => s.dispose().catch(() => {})));
      ctx.out("");
      ctx.out(
        `Stopped ${
          servers.length === 2 ? "both servers" : "the server"
        } and removed their folders (${secondsSince(started)}).`,
      );
    }
  }
  ctx.out(`Demo finished in ${secondsSince(begun)}. Try next:`);
  for (
    const line of [
      `${CMD} test                 # the tests, on real PostgreSQL`,
      `${CMD} start --help         # every command and flag`,
      "# Against your own databases (passwords in ~/.pgpass, mode 0600; README.md has more):",
      "export LOCAL_DATABASE_URL=postgres://meter_sync@gateway-db:5432/gateway",
      "export REMOTE_DATABASE_URL=postgres://meter_sync@central-db:5432/central",
      `${CMD} start check-schema   # compare the two readings tables`,
      `${CMD} start migrate        # add what is missing (back up production first)`,
      `${CMD} sync                 # one cycle: upload the queue`,
      `${CMD} start run --every 30s --http 127.0.0.1:9464  # the agent, with /metrics`,
      `${CMD} start status --json  # the queue, for machines`,
      `${CMD} compile              # one binary for a gateway`,
    ]
  ) ctx.out(`  ${line}`);
  return code;
}
