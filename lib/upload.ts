/** The upload engine: drains the local queue into the remote, each reading delivered once. */
import { getLogger } from "@logtape/logtape";
import { type Column, quoteIdent, quoteLiteral, type TableInfo } from "./columns.ts";
import { comparedSchemas } from "./commands/check_schema.ts";
import type { Clock } from "./commands/context.ts";
import { recycleCopyData } from "./copy_coalesce.ts";
import { type CopyBatch, type CopyFormat, payloadOf, splitRows } from "./copy_format.ts";
import { copyIn, copyOut, type OpenCopy, openCopyIn } from "./copy_io.ts";
import { type Pool, resumeSockets } from "./db.ts";
import { classifyError, CycleError, describeError, SchemaError, sqlState } from "./errors.ts";
import { pgArray, quarantineRows, type Rejection, UUID_TEXT } from "./quarantine.ts";
import { retry, RetryError } from "./retry.ts";
import { expectedPlan, formatIssues, type SchemaPlan, SYNC_FLAG } from "./schema.ts";
import { claimCondition } from "./status.ts";

const log = getLogger(["meter-sync", "upload"]);

/** The two databases and the injected clock and randomness. */
export interface UploadDeps {
  local: Pool;
  remote: Pool;
  clock: Clock;
  random: () => number;
  /** Aborted by SIGINT/SIGTERM: the batch in flight finishes, no new one starts. */
  signal?: AbortSignal;
}

/** Options of {@link upload}. */
export interface UploadOptions {
  /** @default "meter_readings" */
  table?: string;
  /** Readings per batch. @default 100 */
  batchSize?: number;
  /** Stop after this many batches. @default until the queue is empty */
  maxBatches?: number;
  /** Retries of a transient fault per batch. @default 3 */
  maxRetries?: number;
  /** First backoff scale in ms. @default 200 */
  baseMs?: number;
  /** Longest backoff in ms. @default 10000 */
  capMs?: number;
  /** Resident size above which each finished batch's garbage is collected at once. @default 96 */
  memoryBudgetMb?: number;
  /** Called after every batch with the totals so far and that batch's rows and duration. */
  onBatch?: (progress: UploadResult, batch: { rows: number; ms: number }) => void;
  /** Called before each retry of a transient fault, with its SQLSTATE (null: no SQLSTATE). */
  onRetry?: (retry: { sqlstate: string | null; attempt: number }) => void;
}

/** What a cycle did. */
export interface UploadResult {
  /** Readings newly inserted on the remote. */
  uploaded: number;
  /** Readings found on the remote already (a replay after a crash) and not inserted again. */
  skipped: number;
  /** Readings deleted locally: uploaded + skipped. */
  deleted: number;
  quarantined: number;
  batches: number;
  retries: number;
  seconds: number;
  /** True when a signal ended the cycle before the queue was empty. */
  stopped: boolean;
}

/**
 * The local transaction failed after the remote had the batch: never retried here
 * (the rows stay, the next cycle replays them and the remote skips what it has).
 */
export class LocalDeleteError extends Error {
  override name = "LocalDeleteError";
}

/**
 * The plans a claim transaction allows, for the rest of it: the queue is read in index order
 * (with stale statistics after a big drain the planner would otherwise sort the whole table for
 * every batch), and the sweep's count by an index scan, since a bitmap scan marks nothing dead.
 */
export const CLAIM_PLANS =
  "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true)";

/**
 * The plans the range delete allows, for the rest of its transaction: a bitmap of the queue
 * index, which visits each page of the batch once, instead of the index scan CLAIM_PLANS
 * leaves it (the planner's choice, since the queue is in index order), which fetches row by
 * row. One batch of 10,000 readings: 16.8 ms against 23.4 (EXPLAIN ANALYZE, three pairs).
 */
export const DELETE_PLANS =
  "SELECT set_config('enable_indexscan', 'off', true), set_config('enable_bitmapscan', 'on', true)";

interface Statements {
  /**
   * Claims the next batch; `after`: the last key of the batch in flight, where the scan
   * starts; `sweep`: the span of a batch deleted earlier, whose index entries it visits first.
   */
  claim: (limit: number, after?: string, sweep?: Span) => string;
  copy: string;
  stageCreate: string;
  stageCopy: string;
  stageInsert: string;
  remove: string;
  /**
   * Deletes the rows this transaction has locked from the key $1 to the key $2 in queue
   * order: a whole batch, found through the queue's index instead of key by key.
   */
  removeLocked: string;
}

function statements(table: string, columns: Column[], key: string, format: CopyFormat): Statements {
  const t = quoteIdent(table);
  const id = quoteIdent(key);
  const cols = columns.map((c) => quoteIdent(c.name)).join(", ");
  const opts = format === "binary" ? " (FORMAT binary)" : "";
  return {
    // Claims the oldest readings so that no other agent can take them (G3, G4), and has
    // the local server write them in COPY format: the remote reads them back unchanged.
    //
    // `after` starts the index scan past the batch in flight. Without it every claim walked
    // over that batch's rows, each locked by the other transaction, to skip them one by one,
    // and over the dead entries the batch before left: the local server did twice the work.
    //
    // Past batches' entries stay in the queue's index, pointing at deleted rows, until a scan
    // visits them and marks them dead, and the scan from the start of the queue that proves
    // it empty comes last. It met all of them at once: 0.35 s at the end of 200,000 readings,
    // re-reading and writing out again pages long evicted. `sweep` visits a batch's entries
    // a little after its commit instead, while its pages are still in shared buffers: 3 ms a
    // batch of 10,000, and the last scan takes 0.05 s. One index-only count, in the claim's own
    // statement (no round trip more); bitmap scans are off because they mark nothing.
    claim: (limit, after, sweep) =>
      `COPY (${
        sweep === undefined ? "" : `WITH swept AS MATERIALIZED (
             SELECT count(*) AS n FROM ${t} s
              WHERE NOT s.${quoteIdent(SYNC_FLAG)}
                AND s.createdat >= ${quoteLiteral(sweep.lo)}
                AND s.createdat <= ${quoteLiteral(sweep.hi)})
             `
      }SELECT ${columns.map((c) => `m.${quoteIdent(c.name)}`).join(", ")}
               FROM ${t} m
              WHERE ${sweep === undefined ? "" : "(SELECT n FROM swept) >= 0 AND "}${
        claimCondition("m")
      }${
        after === undefined ? "" : `
                AND (m.createdat, m.${id}) >
                    (SELECT b.createdat, b.${id} FROM ${t} b
                      WHERE b.${id} = '${after}')`
      }
              ORDER BY m.createdat, m.${id}
              LIMIT ${Math.trunc(limit)}
                FOR UPDATE OF m SKIP LOCKED) TO STDOUT${opts}`,
    copy: `COPY ${t} (${cols}) FROM STDIN${opts}`,
    stageCreate:
      `CREATE TEMP TABLE meter_sync_stage ON COMMIT DROP AS SELECT ${cols} FROM ${t} WITH NO DATA`,
    stageCopy: `COPY meter_sync_stage (${cols}) FROM STDIN${opts}`,
    stageInsert: `INSERT INTO ${t} (${cols}) SELECT ${cols} FROM meter_sync_stage
                  ON CONFLICT (${id}) DO NOTHING`,
    remove: `DELETE FROM ${t} WHERE ${id} = ANY ($1::uuid[])`,
    // The row locks tell this batch's rows from any other in its range: a reading another
    // agent holds (its lock is not ours) or one that came late with an old timestamp (no lock).
    // txid_current() modulo 2^32 is the transaction's own xid on PostgreSQL 11 and later,
    // worked out once, not per row.
    //
    // The plain createdat bounds beside the row comparisons are for the planner: it prices a
    // row comparison against a subquery's values as a scan of the whole queue index, and chose
    // a skip scan of the (meter_id, createdat) index instead, which visits the batch's pages
    // meter by meter: 20,000 buffer visits for 20,000 readings against 2,600, and about 0.2
    // CPU seconds more on the local server for 200,000 (A/B pairs).
    removeLocked: `WITH lo AS MATERIALIZED (SELECT b.createdat, b.${id} AS k FROM ${t} b
                                           WHERE b.${id} = $1::uuid),
                        hi AS MATERIALIZED (SELECT b.createdat, b.${id} AS k FROM ${t} b
                                           WHERE b.${id} = $2::uuid),
                        d AS (DELETE FROM ${t} m
                    WHERE NOT m.${quoteIdent(SYNC_FLAG)}
                      AND m.createdat >= (SELECT createdat FROM lo)
                      AND m.createdat <= (SELECT createdat FROM hi)
                      AND (m.createdat, m.${id}) >= (SELECT createdat, k FROM lo)
                      AND (m.createdat, m.${id}) <= (SELECT createdat, k FROM hi)
                      AND m.xmax = (SELECT (txid_current() % 4294967296)::text::xid)
                RETURNING m.createdat)
                SELECT count(*)::int AS n, min(d.createdat)::text AS lo, max(d.createdat)::text AS hi
                  FROM d`,
  };
}

/**
 * The createdat span of a batch deleted and committed, as the local server wrote it (in the
 * column's own type, read back the same by the same server and settings).
 */
interface Span {
  lo: string;
  hi: string;
}

/** How batches travel under a plan: the statements and the COPY format. */
interface Travel {
  sql: Statements;
  format: CopyFormat;
}

function travelOf(table: string, plan: SchemaPlan): Travel {
  const format: CopyFormat = plan.binary ? "binary" : "text";
  return { sql: statements(table, plan.columns, plan.key, format), format };
}

/** Same claim and delete statements, same format: a batch claimed under one travels under the other. */
function sameTravel(a: Travel, b: Travel): boolean {
  return a.format === b.format && a.sql.claim(1) === b.sql.claim(1) &&
    a.sql.remove === b.sql.remove;
}

/** A duplicate key on the idempotency key: the batch (or part of it) is on the remote already. */
function isReplay(err: unknown, key: string): boolean {
  if (sqlState(err) !== "23505") return false;
  const detail = (err as { detail?: unknown }).detail;
  // PostgreSQL leaves the key out of the detail when the role may not SELECT it: that may be a
  // replay too. The staged write tells: ON CONFLICT (id) skips replayed rows and raises again
  // for any other duplicate (or 42501 without SELECT on id, which ends the cycle clearly).
  if (detail === undefined || detail === null || detail === "") return true;
  const text = String(detail);
  return text.startsWith(`Key (${key})=`) || text.startsWith(`Key (${quoteIdent(key)})=`);
}

/** The 1-based line of a COPY error ("COPY t, line 57, column x: ..."), if the server said. */
function copyErrorLine(err: unknown): number | undefined {
  const where = String((err as { where?: unknown }).where ?? "");
  const m = /^COPY [^,]+, line (\d+)/.exec(where);
  return m ? Number(m[1]) : undefined;
}

/** A claimed batch whose local transaction stays open until finish() and allowCommit(). */
interface Claim {
  batch: CopyBatch;
  bytes: number;
  /** Claimed past the batch before it: every key is greater than every key of that batch. */
  ordered: boolean;
  finish: (outcome: Delivery | Error) => void;
  /**
   * Lets the transaction end once finish() has run its delete: until then it waits, so that
   * no claim still scanning sees its commit land (see runBatch). A rollback does not wait.
   */
  allowCommit: () => void;
  /** Settles when the local transaction has committed (or rolled back). */
  done: Promise<void>;
}

function localDeleteError(err: unknown): LocalDeleteError {
  return new LocalDeleteError(
    `the remote has the batch, but the local delete failed: ${describeError(err)}`,
    { cause: err },
  );
}

/** The first write of a batch tells when its data is sent and when its answer has come. */
interface Ahead {
  sent: () => void;
  answered: () => void;
}

interface Delivery {
  /** Size of the batch's COPY data. */
  bytes: number;
  /** Keys now on the remote (inserted or already there): deleted locally. */
  onRemote: string[];
  inserted: number;
  skipped: number;
  rejected: Rejection[];
  /**
   * The whole batch went in its first write: no COPY that failed ever had its bytes, so
   * nothing refers to them once the write is answered (see recycleCopyData).
   */
  firstTry: boolean;
}

/** A cycle that has done nothing yet (a fresh object: upload() counts into it). */
export function emptyResult(): UploadResult {
  return {
    uploaded: 0,
    skipped: 0,
    deleted: 0,
    quarantined: 0,
    batches: 0,
    retries: 0,
    seconds: 0,
    stopped: false,
  };
}

/** Drains the queue into the remote: see the module comment and README "Upload guarantees". */
export async function upload(deps: UploadDeps, options: UploadOptions = {}): Promise<UploadResult> {
  const table = options.table ?? "meter_readings";
  const batchSize = options.batchSize ?? 100;
  const maxRetries = options.maxRetries ?? 3;
  const started = deps.clock.now();
  const result = emptyResult();

  /** Retries transient faults with backoff, renewing both pools: a dead connection is not reusable (see Pool). */
  const retrying = <T>(what: string, fn: () => Promise<T>, isRetriable: (e: unknown) => boolean) =>
    retry(fn, {
      maxRetries,
      isRetriable,
      clock: deps.clock,
      random: deps.random,
      baseMs: options.baseMs,
      capMs: options.capMs,
      signal: deps.signal,
      onRetry: async (err, n, ms) => {
        result.retries++;
        warnRetry(what, err, n, maxRetries, ms);
        options.onRetry?.({ sqlstate: sqlState(err) ?? null, attempt: n });
        await Promise.all([deps.local.renew(), deps.remote.renew()]);
      },
    });
  const transient = (e: unknown) => classifyError(e) === "transient";

  /** The span of the batches whose delete has committed since the last sweep. */
  let sweepable: Span | undefined;
  const takeSweep = () => {
    const span = sweepable;
    sweepable = undefined;
    return span;
  };
  /**
   * Opens a local transaction that claims the next batch and keeps it open: the
   * caller writes the batch remotely, then calls finish() with the outcome, which
   * deletes the delivered rows, and allowCommit() once no claim scans beside it, which
   * commits (given an error, finish() rolls back at once).
   */
  const claim = (travel: Travel, after?: string): Promise<Claim | undefined> =>
    new Promise((resolveClaim, rejectClaim) => {
      let finish!: (outcome: Delivery | Error) => void;
      const outcome = new Promise<Delivery | Error>((r) => (finish = r));
      let allowCommit!: () => void;
      const commitAllowed = new Promise<void>((r) => (allowCommit = r));
      let claimed = false;
      let abandoned: Error | undefined;
      let span: Span | undefined;
      // `done` is declared below; the callback runs only after BEGIN has come back.
      const tx = deps.local.sql.begin(async (tx) => {
        await tx.unsafe(CLAIM_PLANS);
        // A span is sweepable once its delete has committed: the count cannot see those rows,
        // and marks their entries dead once no older transaction can see them either. Only
        // claims past the batch in flight sweep; a claim from the start visits them anyway.
        const sweep = after === undefined ? undefined : takeSweep();
        const data = await copyOut(tx, travel.sql.claim(batchSize, after, sweep), batchSize);
        resumeSockets(deps.local.sql);
        const batch = splitRows(data, travel.format);
        if (batch.keys.length === 0) return resolveClaim(undefined);
        claimed = true;
        resolveClaim({
          batch,
          bytes: data.length,
          ordered: after !== undefined,
          finish,
          allowCommit,
          done,
        });
        const out = await outcome;
        if (out instanceof Error) throw (abandoned = out); // roll back: the rows stay queued
        let failure: unknown;
        try {
          const keys = batch.keys;
          if (out.rejected.length === 0 && out.onRemote.length === keys.length) {
            // The whole batch is on the remote: its rows are the ones this transaction
            // locked, from its first key to its last (the claim's order). One range scan
            // instead of a lookup per key (a 10,000-key array took 9 ms to plan and 60 ms to
            // run, the range 24 ms). A row the range cannot hold goes by its key: a NULL
            // createdat, which a gateway's own table may allow and the queue puts last.
            // Both in one write: the settings cost no round trip.
            const [, [gone]] = await Promise.all([
              tx.unsafe(DELETE_PLANS),
              tx.unsafe<{ n: number; lo: string | null; hi: string | null }[]>(
                travel.sql.removeLocked,
                [keys[0], keys[keys.length - 1]],
              ),
            ]);
            let deleted = gone.n;
            if (gone.lo !== null && gone.hi !== null) span = { lo: gone.lo, hi: gone.hi };
            if (deleted < keys.length) {
              deleted += (await tx.unsafe(travel.sql.remove, [pgArray(keys)])).count;
            }
            if (deleted !== keys.length) {
              throw new Error(`deleted ${deleted} of ${keys.length} claimed readings`);
            }
          } else if (out.onRemote.length) {
            const removed = await tx.unsafe(travel.sql.remove, [pgArray(out.onRemote)]);
            if (removed.count !== out.onRemote.length) {
              throw new Error(
                `deleted ${removed.count} of ${out.onRemote.length} claimed readings`,
              );
            }
          }
          await quarantineRows(tx, out.rejected);
        } catch (err) {
          failure = err;
        }
        await commitAllowed; // a failed delete rolls back then too, like a commit
        if (failure !== undefined) throw localDeleteError(failure);
      });
      // The commit can fail too, after the remote committed: also a local delete error.
      const done: Promise<void> = tx.then(() => {
        // Batches commit in queue order: two commits before the next claim make one span.
        if (span) sweepable = sweepable ? { lo: sweepable.lo, hi: span.hi } : span;
      }, (err) => {
        if (!claimed) return rejectClaim(err);
        if (err === abandoned) return; // rolled back on purpose
        throw err instanceof LocalDeleteError ? err : localDeleteError(err);
      });
      done.catch(() => {}); // awaited by whoever holds the claim
    });

  /** Rolls back a claim nobody will deliver: its rows stay in the queue. */
  const abandon = async (p: Promise<Claim | undefined> | undefined) => {
    const c = await p?.catch(() => undefined);
    if (c) {
      c.finish(new Error("abandoned"));
      await c.done.catch(() => {});
    }
  };

  /**
   * The first batch, claimed with the plan a remote just like the gateway would give as soon
   * as the local catalog is in: behind a slow link the remote's connection and catalog take
   * several round trips, and the claim no longer waits for them. Kept only when the real
   * plan travels the same way (same claim, same format); otherwise, and whenever the
   * schemas cannot upload, rolled back before anything is sent.
   */
  let early: { travel: Travel; claim: Promise<Claim | undefined> } | undefined;
  const claimEarly = (local: TableInfo) => {
    if (early || options.maxBatches === 0 || deps.signal?.aborted) return;
    const guess = expectedPlan(local);
    if (!guess) return;
    const travel = travelOf(table, guess);
    early = { travel, claim: claim(travel) };
    early.claim.catch(() => {}); // taken below, or abandoned
  };
  const dropEarly = async () => {
    const e = early;
    early = undefined;
    await abandon(e?.claim);
  };

  // G7: both catalogs, every cycle, with the same code as check-schema.
  const plan = await retrying(
    "reading the schemas",
    async () => {
      // The first batch's claim belongs to its attempt: the local catalog may come back after
      // the remote's read has failed, and no claim may start then (the pool it would hold is
      // renewed before the next attempt, or nobody would ever finish it).
      let failed = false;
      try {
        return await comparedSchemas(deps.local.sql, deps.remote.sql, table, (info) => {
          if (!failed) claimEarly(info);
        });
      } catch (err) {
        failed = true;
        await dropEarly();
        throw err;
      }
    },
    transient,
  ).catch((err) => {
    throw err instanceof RetryError ? giveUp("reading the schemas", err) : err;
  });
  if (!plan.ok) {
    await dropEarly();
    const blocking = plan.issues.filter((i) => i.blocking);
    throw new SchemaError(
      `upload stopped, schemas incompatible: ${
        blocking.map((i) => `"${i.column}" ${i.problem}`).join("; ")
      } (meter-sync check-schema shows the full table)`,
      { cause: formatIssues(plan) },
    );
  }
  const travel = travelOf(table, plan);
  const { sql, format } = travel;
  log.debug("{columns} columns travel in {format} COPY", {
    columns: plan.columns.length,
    format,
  });

  /**
   * The next batch's remote COPY, started as soon as the current one's data is on its way
   * (pipelined behind it on the same connection), so that the round trip that starts a COPY
   * is not spent between two batches. Started only once the next batch is claimed;
   * any other remote statement waits until it is taken or cancelled (a connection in COPY
   * mode takes nothing else).
   */
  let openedAhead: Promise<OpenCopy> | undefined;
  const openAhead = () => {
    openedAhead = openCopyIn(deps.remote.sql, sql.copy);
    openedAhead.catch(() => {}); // a failure shows when it is taken
  };
  /** The COPY opened ahead, or undefined when there is none or it failed to start. */
  const takeOpened = async () => {
    const p = openedAhead;
    openedAhead = undefined;
    return await p?.catch(() => undefined);
  };
  const cancelOpened = async () => (await takeOpened())?.cancel();

  /**
   * One remote transaction for a payload; returns how many rows it inserted. The plain COPY
   * is a statement of its own, so it runs in its own implicit transaction, which commits
   * with the statement: two round trips (COPY started, COPY done) instead of four with
   * BEGIN and COMMIT around it, and one when the COPY was opened ahead (see openedAhead).
   */
  const remoteWrite = async (
    payload: Uint8Array,
    rows: number,
    staged: boolean,
    onSent?: () => void,
  ) => {
    if (!staged) {
      const opened = await takeOpened();
      await (opened ?? await openCopyIn(deps.remote.sql, sql.copy)).write(payload, onSent);
      return rows;
    }
    return await deps.remote.sql.begin(async (tx) => {
      await tx.unsafe(sql.stageCreate);
      await copyIn(tx, sql.stageCopy, payload);
      const inserted = await tx.unsafe(sql.stageInsert);
      return inserted.count;
    });
  };

  /**
   * Writes rows from..to, isolating rows the remote rejects for their data (G5): the
   * row the server names, else halves, down to single rows. A duplicate key means a
   * replay: that part goes again through a staging table, ON CONFLICT DO NOTHING (G2).
   */
  const deliver = async (
    batch: CopyBatch,
    from: number,
    to: number,
    staged: boolean,
    out: Delivery,
    ahead?: Ahead,
  ): Promise<void> => {
    try {
      let inserted: number;
      try {
        inserted = await remoteWrite(payloadOf(batch, from, to), to - from, staged, ahead?.sent);
      } finally {
        ahead?.answered();
      }
      out.inserted += inserted;
      out.skipped += to - from - inserted;
      for (let i = from; i < to; i++) out.onRemote.push(batch.keys[i]);
      if (ahead) out.firstTry = true; // only the first write of a batch has `ahead`
      return;
    } catch (err) {
      await cancelOpened(); // before the statements that isolate the fault
      if (!staged && isReplay(err, plan.key)) {
        log.info(
          "{rows} readings may be on the remote already (a replay after a crash); writing them idempotently",
          { rows: to - from },
        );
        return await deliver(batch, from, to, true, out);
      }
      if (classifyError(err) !== "data") throw err;
      if (to - from === 1) {
        const rejection = {
          id: batch.keys[from],
          sqlstate: sqlState(err) ?? "22000",
          error: describeError(err).replace(/ \(SQLSTATE \w+\)$/, ""),
        };
        log.warn(
          "reading {id} rejected by the remote ({sqlstate}: {error}); quarantined",
          rejection,
        );
        out.rejected.push(rejection);
        return;
      }
      const line = copyErrorLine(err);
      if (line !== undefined && line >= 1 && line <= to - from) {
        const bad = from + line - 1;
        if (bad > from) await deliver(batch, from, bad, staged, out);
        await deliver(batch, bad, bad + 1, staged, out);
        if (bad + 1 < to) await deliver(batch, bad + 1, to, staged, out);
        return;
      }
      const mid = from + ((to - from) >> 1);
      await deliver(batch, from, mid, staged, out);
      await deliver(batch, mid, to, staged, out);
    }
  };

  /** The claim of the next batch, taken while the current one travels. */
  let prefetched: { claim: Promise<Claim | undefined>; ready?: boolean } | undefined;
  const dropPrefetched = async () => {
    const p = prefetched;
    prefetched = undefined;
    await abandon(p?.claim);
  };
  if (early && sameTravel(early.travel, travel)) {
    prefetched = { claim: early.claim };
    early = undefined;
  } else await dropEarly();

  /**
   * One batch: claim (or take the prefetched claim), write remotely, delete locally.
   * Overlaps, and the one rule that keeps them safe: no claim scans rows that an earlier
   * batch's commit changes while that commit runs. Otherwise the claim's snapshot would miss
   * the quarantine rows that commit brings, and claim a rejected reading again once its lock
   * is released.
   * - the previous batch's local commit runs while this batch is written remotely;
   * - the next batch is claimed during the remote write: at once when this batch lay past
   *   the previous one (the scan starts past this batch, beyond anything that commit
   *   touches), else once that commit is in;
   * - when nothing lies past this batch, a claim from the start of the queue follows, still
   *   during the remote write: the queue is empty only when it finds nothing;
   * - this batch's delete runs as soon as the remote has it; its commit (or rollback) only
   *   after those scans have finished.
   * The rule allows more than the pool gives: with a lane's two local connections (see
   * LOCAL_CONNECTIONS), a claim also waits for the previous batch's commit to free one.
   */
  const runBatch = async (): Promise<Delivery | undefined> => {
    let current: Claim | undefined;
    try {
      const taken = prefetched;
      prefetched = undefined;
      current = await (taken?.claim ?? claim(travel));
    } catch (err) {
      await settlePrevious(); // a failed local commit outranks the claim's error
      throw err;
    }
    if (!current) return undefined;
    const committed = current.done;
    const out: Delivery = {
      bytes: current.bytes,
      onRemote: [],
      inserted: 0,
      skipped: 0,
      rejected: [],
      firstTry: false,
    };
    // The next batch's COPY is opened ahead once both this one's data is on its way and the
    // next batch is claimed, if this one's answer has not come yet.
    let sent = false;
    let answered = false;
    const openIfDue = () => {
      if (sent && !answered && prefetched?.ready && !openedAhead) openAhead();
    };
    const ahead: Ahead = {
      sent: () => {
        sent = true;
        openIfDue();
      },
      answered: () => (answered = true),
    };
    const delivering = deliver(current.batch, 0, current.batch.keys.length, false, out, ahead);
    delivering.catch(() => {}); // awaited below
    try {
      const more = () =>
        !deps.signal?.aborted &&
        (options.maxBatches === undefined || result.batches + 1 < options.maxBatches);
      // A key that can go into the claim's text as it is (a text-format key might need
      // quoting) bounds the scan (see Statements.claim).
      const last = current.batch.keys[current.batch.keys.length - 1];
      const after = UUID_TEXT.test(last) ? last : undefined;
      if (more() && after !== undefined && current.ordered) {
        prefetched = { claim: claim(travel, after) };
        prefetched.claim.catch(() => {}); // awaited by the next batch, or dropped
      }
      await settlePrevious();
      if (more()) {
        const next = prefetched?.claim ?? (after === undefined ? undefined : claim(travel, after));
        // Nothing past this batch; rows older than it may still wait (a reading that came
        // late with an old createdat, rows another agent rolled back). The previous batch
        // has committed and this batch's rows are locked: a scan from the start skips them.
        const p = next ? next.then((c) => c ?? claim(travel)) : claim(travel);
        prefetched = { claim: p };
        p.then((c) => {
          if (prefetched?.claim !== p) return;
          prefetched.ready = c !== undefined;
          openIfDue();
        }, () => {});
      }
      // While the remote ingests this batch, not between two batches, where it would wait.
      releaseMemory(options.memoryBudgetMb ?? 96);
      await delivering;
      // Its memory gathers the batch after next (fresh memory costs page faults).
      if (out.firstTry) recycleCopyData(current.batch.data);
      // The delete runs at once, beside the claim past this batch, which starts past these
      // rows or skips them while they are locked; only the commit waits for that claim.
      // Waiting with the delete freed the connection 25-55 ms later for the claim after it,
      // and the remote waited as long for its next batch.
      current.finish(out);
      await prefetched?.claim.catch(() => {}); // its scans are over: now this batch may commit
      current.allowCommit();
    } catch (err) {
      await delivering.catch(() => {});
      current.finish(err instanceof Error ? err : new Error(String(err)));
      current.allowCommit();
      await committed.catch(() => {});
      await dropPrefetched();
      await cancelOpened();
      throw err;
    }
    pendingCommit = committed;
    return out;
  };

  /** The local commit of the last delivered batch, not awaited yet. */
  let pendingCommit: Promise<void> | undefined;
  const settlePrevious = async () => {
    const p = pendingCommit;
    pendingCommit = undefined;
    await p;
  };

  while (!deps.signal?.aborted) {
    if (options.maxBatches !== undefined && result.batches >= options.maxBatches) break;
    const batchStart = deps.clock.now();
    let out: Delivery | undefined;
    try {
      out = await retrying(
        "batch",
        runBatch,
        (e) => !(e instanceof LocalDeleteError) && transient(e),
      );
    } catch (err) {
      if (err instanceof RetryError) throw giveUp("upload", err);
      if (err instanceof LocalDeleteError) throw replayNextCycle(err);
      if (deps.signal?.aborted && (err as Error)?.name === "AbortError") {
        result.stopped = true;
        break;
      }
      throw new CycleError(
        `upload failed: ${describeError(err)}; every reading is still in the local queue`,
        { cause: err },
      );
    }
    if (!out) break;
    result.batches++;
    result.uploaded += out.inserted;
    result.skipped += out.skipped;
    result.deleted += out.onRemote.length;
    result.quarantined += out.rejected.length;
    log.debug(
      "batch {batch}: {rows} uploaded, {skipped} already there, {rejected} quarantined in {ms} ms",
      {
        batch: result.batches,
        rows: out.inserted,
        skipped: out.skipped,
        rejected: out.rejected.length,
        ms: deps.clock.now() - batchStart,
      },
    );
    result.seconds = (deps.clock.now() - started) / 1000;
    options.onBatch?.({ ...result }, {
      rows: out.onRemote.length + out.rejected.length,
      ms: deps.clock.now() - batchStart,
    });
  }
  await dropPrefetched();
  await cancelOpened();
  // The last batch's local commit: it can only fail as a LocalDeleteError.
  await settlePrevious().catch((err) => {
    throw replayNextCycle(err);
  });
  if (deps.signal?.aborted) result.stopped = true;
  result.seconds = (deps.clock.now() - started) / 1000;
  return result;
}

/**
 * G8: V8 collects the garbage of finished batches lazily, and the process grows by
 * tens of MB per few hundred thousand rows before it does (measured: 105 -> 188 MB
 * over 300,000 rows at batch 1000; collecting every 32 MB moved was not enough). When
 * the process runs with --v8-flags=--expose-gc (the tasks and the compiled binary
 * do), a full collection after a batch whenever the resident size is above the
 * budget keeps the peak flat. At most one per 200 ms: one after every batch halved
 * the speed at batch size 100 (each costs a few ms).
 */
let lastGc = 0;
function releaseMemory(budgetMb: number): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc || performance.now() - lastGc < 200) return;
  if (Deno.memoryUsage().rss > budgetMb * 1024 * 1024) {
    gc();
    lastGc = performance.now();
  }
}

function warnRetry(what: string, err: unknown, n: number, max: number, ms: number): void {
  log.warn("{what} failed ({code}): {error}; retry {retry} of {max} in {ms} ms", {
    what,
    error: describeError(err),
    code: sqlState(err) ? `SQLSTATE ${sqlState(err)}` : "connection error",
    sqlstate: sqlState(err) ?? null,
    retry: n,
    max,
    ms,
  });
}

/** A local delete that failed after the remote commit: the cycle fails, nothing is lost. */
function replayNextCycle(err: unknown): CycleError {
  return new CycleError(
    `${
      describeError(err)
    }; the readings stay in the local queue and the next cycle delivers them without duplicates`,
    { cause: err },
  );
}

function giveUp(what: string, err: RetryError): CycleError {
  return new CycleError(
    `${what} failed after ${err.attempts} attempts: ${
      describeError(err.cause)
    }; every reading is still in the local queue`,
    { cause: err.cause },
  );
}
