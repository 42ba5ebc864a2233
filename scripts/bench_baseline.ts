/**
 * The benchmark's contenders that are not meter-sync, each run in a process of its own so
 * that its peak memory can be measured like the agent's:
 *   original  the original design: SELECT ... LIMIT n, one multi-row INSERT with bind
 *             parameters in a remote transaction, DELETE ... WHERE id IN (...) locally;
 *             rows travel as JS values.
 *   pipe      the plain binary COPY pipe through postgres.js, for machines without psql.
 * Reads LOCAL_DATABASE_URL and REMOTE_DATABASE_URL; prints one JSON line with the result.
 */
import { parseArgs } from "node:util";
import postgres from "postgres";
import { quoteIdent, readTable } from "../lib/columns.ts";
import { connect, resumeSockets, type Sql } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";

const TABLE = "meter_readings";

/** What a run prints, as JSON on one line. */
export interface BaselineResult {
  mode: "original" | "pipe";
  rows: number;
  batches: number;
  /** Measured inside the process, without its start-up. */
  seconds: number;
}

async function remoteColumnNames(remote: Sql): Promise<string[]> {
  const info = await readTable(remote, TABLE);
  if (!info) throw new Error(`the remote database has no ${TABLE} table`);
  return info.columns.filter((c) => !c.generated).map((c) => c.name);
}

/** The original design, as written in its requirements (2.1-4.5), with postgres.js defaults. */
async function original(localUrl: string, remoteUrl: string, batchSize: number) {
  const local = postgres(localUrl, { max: 1, onnotice: () => {} });
  const remote = postgres(remoteUrl, { max: 1, onnotice: () => {} });
  try {
    const columns = await remoteColumnNames(remote as unknown as Sql);
    const started = performance.now();
    let rows = 0;
    let batches = 0;
    for (;;) {
      const batch = await local`
        SELECT * FROM ${local(TABLE)} WHERE is_synchronized = false LIMIT ${batchSize}`;
      if (batch.length === 0) break;
      await remote.begin((tx) => tx`INSERT INTO ${tx(TABLE)} ${tx(batch, columns)}`);
      const ids = batch.map((r) => r.id as string);
      const deleted = await local.begin((tx) =>
        tx`DELETE FROM ${tx(TABLE)} WHERE id IN ${tx(ids)}`
      );
      rows += deleted.count;
      batches++;
    }
    return { rows, batches, seconds: (performance.now() - started) / 1000 };
  } finally {
    await local.end({ timeout: 5 });
    await remote.end({ timeout: 5 });
  }
}

type CopyQuery = Promise<unknown> & {
  readable(): Promise<NodeJS.ReadableStream>;
  writable(): Promise<NodeJS.WritableStream>;
};

/** COPY TO STDOUT on the local side streamed into COPY FROM STDIN on the remote, with backpressure. */
async function pipe(localUrl: string, remoteUrl: string) {
  const local = await connect(parseDatabaseUrl(localUrl, "LOCAL_DATABASE_URL"));
  const remote = await connect(parseDatabaseUrl(remoteUrl, "REMOTE_DATABASE_URL"));
  try {
    const cols = (await remoteColumnNames(remote)).map(quoteIdent).join(", ");
    const started = performance.now();
    const out = await (local.unsafe(
      `COPY (SELECT ${cols} FROM ${quoteIdent(TABLE)}) TO STDOUT (FORMAT binary)`,
    ) as unknown as CopyQuery).readable();
    const copyIn = remote.unsafe(
      `COPY ${quoteIdent(TABLE)} (${cols}) FROM STDIN (FORMAT binary)`,
    ) as unknown as CopyQuery;
    const into = await copyIn.writable();
    await new Promise<void>((resolve, reject) => {
      out.on("data", (chunk: Uint8Array) => {
        if (!into.write(chunk)) out.pause();
      });
      into.on("drain", () => out.resume());
      out.on("end", () => into.end());
      out.on("error", reject);
      into.on("error", reject);
      into.on("finish", () => resolve());
    });
    resumeSockets(local);
    await copyIn;
    const [{ n }] = await remote<{ n: string }[]>`SELECT count(*) AS n FROM ${remote(TABLE)}`;
    return { rows: Number(n), batches: 1, seconds: (performance.now() - started) / 1000 };
  } finally {
    await local.end({ timeout: 5 });
    await remote.end({ timeout: 5 });
  }
}

if (import.meta.main) {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    allowPositionals: true,
    options: { "batch-size": { type: "string", default: "100" } },
  });
  const mode = positionals[0];
  const localUrl = Deno.env.get("LOCAL_DATABASE_URL");
  const remoteUrl = Deno.env.get("REMOTE_DATABASE_URL");
  if (mode === "warmup") Deno.exit(0);
  if ((mode !== "original" && mode !== "pipe") || !localUrl || !remoteUrl) {
    console.error(
      "usage: LOCAL_DATABASE_URL=... REMOTE_DATABASE_URL=... bench_baseline.ts original [--batch-size N] | pipe",
    );
    Deno.exit(2);
  }
  const result: BaselineResult = mode === "original"
    ? { mode, ...(await original(localUrl, remoteUrl, Number(values["batch-size"]))) }
    : { mode, ...(await pipe(localUrl, remoteUrl)) };
  console.log(JSON.stringify(result));
}
