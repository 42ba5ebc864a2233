/** Reference data down (SPEC §4): remote tables mirrored into the local database, remote wins. */
import { getLogger } from "@logtape/logtape";
import { quoteIdent, readTable } from "./columns.ts";
import { copyIn, copyOut } from "./copy_io.ts";
import type { Sql } from "./db.ts";
import { resumeSockets } from "./db.ts";
import { SchemaError } from "./errors.ts";
import { travelsInBinary } from "./schema.ts";

const log = getLogger(["meter-sync", "download"]);

/** What mirroring one table did. */
export interface MirrorResult {
  table: string;
  inserted: number;
  updated: number;
  deleted: number;
  /**
   * Rows gone from the remote that stay: local rows still reference them, or a local transaction
   * holds them (a reading being inserted for that meter); the next download looks again.
   */
  kept: number;
  unchanged: number;
}

/** Foreign keys of other local tables that point at `table` (single-column ones). */
async function referencingKeys(
  sql: Sql,
  table: string,
): Promise<{ table: string; column: string; target: string }[]> {
  const rows = await sql<{ table: string; column: string; target: string }[]>`
    SELECT src.relname AS table, a.attname AS column, ta.attname AS target
      FROM pg_catalog.pg_constraint c
      JOIN pg_catalog.pg_class src ON src.oid = c.conrelid
      JOIN pg_catalog.pg_class dst ON dst.oid = c.confrelid
      JOIN pg_catalog.pg_namespace n ON n.oid = dst.relnamespace
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
      JOIN pg_catalog.pg_attribute ta ON ta.attrelid = c.confrelid AND ta.attnum = c.confkey[1]
     WHERE c.contype = 'f' AND dst.relname = ${table}
       AND n.nspname = ANY (current_schemas(false))
       AND array_length(c.conkey, 1) = 1`;
  return [...rows];
}

/**
 * Mirrors one table: the remote's rows are copied into a temporary table, then, in one
 * local transaction, new rows are inserted, changed rows updated (compared by primary
 * key and content, so an unchanged row is not written at all), and rows the remote no
 * longer has are deleted, unless local rows still reference them.
 */
export async function mirrorTable(local: Sql, remote: Sql, table: string): Promise<MirrorResult> {
  const [l, r] = await Promise.all([readTable(local, table), readTable(remote, table)]);
  if (!r) {
    throw new SchemaError(
      `download: table "${table}" does not exist in the remote database; run: meter-sync migrate --target remote, or fix --download-tables`,
    );
  }
  if (!l) {
    throw new SchemaError(
      `download: table "${table}" does not exist in the local database; run: meter-sync migrate --target local, or fix --download-tables`,
    );
  }
  if (r.primaryKey.length === 0 || l.primaryKey.length === 0) {
    throw new SchemaError(
      `download: table "${table}" has no primary key ${
        r.primaryKey.length ? "locally" : "centrally"
      }; rows cannot be matched without one`,
    );
  }
  if (r.primaryKey.join(",") !== l.primaryKey.join(",")) {
    throw new SchemaError(
      `download: table "${table}" has primary key (${r.primaryKey.join(", ")}) centrally but (${
        l.primaryKey.join(", ")
      }) locally`,
    );
  }
  const localCols = new Map(l.columns.map((c) => [c.name, c]));
  const cols = r.columns.filter((c) =>
    !c.generated && localCols.has(c.name) && !localCols.get(c.name)!.generated
  );
  const binary = travelsInBinary(cols, localCols);
  const opts = binary ? " (FORMAT binary)" : "";
  const t = quoteIdent(table);
  const list = cols.map((c) => quoteIdent(c.name)).join(", ");
  const pk = l.primaryKey.map(quoteIdent);
  const data = await remote.begin("read only", async (tx) => {
    const out = await copyOut(tx, `COPY (SELECT ${list} FROM ${t}) TO STDOUT${opts}`);
    resumeSockets(remote);
    return out;
  });
  const refs = await referencingKeys(local, table);
  const nonKey = cols.filter((c) => !l.primaryKey.includes(c.name));
  return await local.begin(async (tx) => {
    await tx.unsafe(
      `CREATE TEMP TABLE meter_sync_mirror ON COMMIT DROP AS SELECT ${list} FROM ${t} WITH NO DATA`,
    );
    await copyIn(tx, `COPY meter_sync_mirror (${list}) FROM STDIN${opts}`, data);
    const [{ n: total }] = await tx.unsafe<{ n: number }[]>(
      `SELECT count(*)::int AS n FROM meter_sync_mirror`,
    );
    const set = nonKey.map((c) => `${quoteIdent(c.name)} = EXCLUDED.${quoteIdent(c.name)}`);
    const changed = nonKey.length
      ? `WHERE (${nonKey.map((c) => `${t}.${quoteIdent(c.name)}`).join(", ")}) IS DISTINCT FROM (${
        nonKey.map((c) => `EXCLUDED.${quoteIdent(c.name)}`).join(", ")
      })`
      : "";
    const upsert = await tx.unsafe<{ inserted: boolean }[]>(
      `INSERT INTO ${t} (${list}) SELECT ${list} FROM meter_sync_mirror
       ON CONFLICT (${pk.join(", ")}) DO ${
        nonKey.length ? `UPDATE SET ${set.join(", ")} ${changed}` : "NOTHING"
      }
       RETURNING (xmax = 0) AS inserted`,
    );
    const inserted = upsert.filter((u) => u.inserted).length;
    const updated = upsert.length - inserted;
    const gone = `NOT EXISTS (SELECT 1 FROM meter_sync_mirror m WHERE ${
      pk.map((k) => `m.${k} = ${t}.${k}`).join(" AND ")
    })`;
    const referenced = refs.map((f) =>
      `EXISTS (SELECT 1 FROM ${quoteIdent(f.table)} x WHERE x.${quoteIdent(f.column)} = ${t}.${
        quoteIdent(f.target)
      })`
    );
    const keep = referenced.length ? ` AND NOT (${referenced.join(" OR ")})` : "";
    // A row that a gateway transaction has locked is skipped, not waited for: a poller's reading
    // being inserted holds its meter (the foreign key's check), and its reference is not visible
    // yet. Waiting for it while that poller waited for a row this delete had taken was a deadlock
    // (PostgreSQL then failed one side, the poller's insert included); the next download decides.
    const deleted = await tx.unsafe(
      `DELETE FROM ${t} WHERE ctid IN (SELECT ctid FROM ${t} WHERE ${gone}${keep}
                                      FOR UPDATE SKIP LOCKED)`,
    );
    const [{ n: kept }] = await tx.unsafe<{ n: number }[]>(
      `SELECT count(*)::int AS n FROM ${t} WHERE ${gone}`,
    );
    const result: MirrorResult = {
      table,
      inserted,
      updated,
      deleted: deleted.count,
      kept,
      unchanged: total - inserted - updated,
    };
    if (kept) {
      log.warn(
        "{table}: {kept} rows are gone centrally but still referenced by local readings (or in use); kept",
        { table, kept },
      );
    }
    return result;
  });
}

/** Mirrors each table in turn, each in its own local transaction. */
export async function download(
  deps: { local: Sql; remote: Sql },
  tables: string[],
): Promise<MirrorResult[]> {
  const results: MirrorResult[] = [];
  for (const table of tables) {
    const r = await mirrorTable(deps.local, deps.remote, table);
    log.info(
      "{table}: {inserted} inserted, {updated} updated, {deleted} deleted, {kept} kept (referenced or in use), {unchanged} unchanged",
      { ...r },
    );
    results.push(r);
  }
  return results;
}
