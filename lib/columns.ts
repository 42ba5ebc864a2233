/** Reads a table's columns, keys and unique indexes from the PostgreSQL catalogs. */
import type { Sql } from "./db.ts";

/** One column as the catalog describes it. */
export interface Column {
  name: string;
  /** format_type(): "numeric(18,3)", "text[]", "timestamp with time zone". */
  type: string;
  notNull: boolean;
  hasDefault: boolean;
  /** Generated or identity-always columns cannot be written. */
  generated: boolean;
  /**
   * A built-in type (and, for an array, a built-in element type): its binary form is
   * the same in every database, so it can travel in binary COPY.
   */
  builtin: boolean;
}

/** What the connected user may do with a table, and whether the database takes writes at all. */
export interface TableAccess {
  database: string;
  user: string;
  /**
   * New transactions are read-only: default_transaction_read_only is on (for the
   * database, the user or the server), or the server is a standby.
   */
  readOnly: boolean;
  /** The server is a standby (in recovery): only the primary takes writes. */
  standby: boolean;
  /** Table privileges (SELECT, INSERT and UPDATE on any column count). */
  select: boolean;
  insert: boolean;
  update: boolean;
  delete: boolean;
}

/** A table as meter-sync needs to know it. */
export interface TableInfo {
  /** The name as given, resolved through the search_path. */
  name: string;
  schema: string;
  columns: Column[];
  /** Columns of the primary key, in key order; empty when there is none. */
  primaryKey: string[];
  /** Single-column unique indexes or constraints (the primary key included). */
  uniqueColumns: string[];
  /** Read with the table, so that a read-only database is named before a batch is sent. */
  access: TableAccess;
}

/**
 * The table's columns in their order, or undefined when it does not exist.
 * `name` is a plain table name, matched exactly (capitals, spaces and quotes included).
 */
export async function readTable(sql: Sql, name: string): Promise<TableInfo | undefined> {
  // One statement, not four in a row, and without parameters: postgres.js describes a new
  // statement with parameters before running it, two round trips instead of one.
  const found = await sql.unsafe<
    {
      oid: string;
      schema: string;
      database: string;
      user: string;
      default_read_only: boolean;
      standby: boolean;
      can_select: boolean;
      can_insert: boolean;
      can_update: boolean;
      can_delete: boolean;
      cols: {
        name: string;
        type: string;
        not_null: boolean;
        has_default: boolean;
        generated: boolean;
        builtin: boolean;
      }[];
      keys: { name: string; primary: boolean }[];
      pk: string[];
    }[]
  >(`
    WITH rel AS (
      SELECT c.oid, n.nspname
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
       WHERE c.relname = ${quoteLiteral(name)}
         AND c.relkind IN ('r', 'p')
         AND n.nspname = ANY (current_schemas(false))
       ORDER BY array_position(current_schemas(false), n.nspname)
       LIMIT 1)
    SELECT rel.oid::text AS oid, rel.nspname AS schema,
           current_database() AS database, current_user AS "user",
           current_setting('default_transaction_read_only') = 'on' AS default_read_only,
           pg_is_in_recovery() AS standby,
           has_any_column_privilege(rel.oid, 'SELECT') AS can_select,
           has_any_column_privilege(rel.oid, 'INSERT') AS can_insert,
           has_any_column_privilege(rel.oid, 'UPDATE') AS can_update,
           has_table_privilege(rel.oid, 'DELETE') AS can_delete,
           (SELECT coalesce(json_agg(json_build_object(
                     'name', a.attname,
                     'builtin', a.atttypid < 16384 AND t.typelem < 16384,
                     'type', format_type(a.atttypid, a.atttypmod),
                     'not_null', a.attnotnull,
                     'has_default', a.atthasdef OR a.attidentity <> '',
                     'generated', a.attgenerated <> '' OR a.attidentity = 'a')
                   ORDER BY a.attnum), '[]')
              FROM pg_catalog.pg_attribute a
              JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped) AS cols,
           (SELECT coalesce(json_agg(json_build_object('name', a.attname,
                                                       'primary', i.indisprimary)
                   ORDER BY i.indisprimary DESC, array_position(i.indkey::int2[], a.attnum)), '[]')
              FROM pg_catalog.pg_index i
              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid
               AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1])
             WHERE i.indrelid = rel.oid AND i.indisunique AND i.indisvalid
               AND (i.indisprimary
                    OR (i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL))) AS keys,
           (SELECT coalesce(json_agg(a.attname ORDER BY k.ord), '[]')
              FROM pg_catalog.pg_index i
              CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = rel.oid AND i.indisprimary AND k.ord <= i.indnkeyatts) AS pk
      FROM rel`);
  if (found.length === 0) return undefined;
  const t = found[0];
  const uniqueColumns = [
    ...new Set(t.keys.filter((k) => !k.primary || t.pk.length === 1).map((k) => k.name)),
  ];
  return {
    name,
    schema: t.schema,
    columns: t.cols.map((c) => ({
      name: c.name,
      type: c.type,
      notNull: c.not_null,
      hasDefault: c.has_default,
      generated: c.generated,
      builtin: c.builtin,
    })),
    primaryKey: t.pk,
    uniqueColumns,
    access: {
      database: t.database,
      user: t.user,
      // default_transaction_read_only, not transaction_read_only: the caller may be inside
      // a read-only transaction of its own on a database that takes writes.
      readOnly: t.default_read_only || t.standby,
      standby: t.standby,
      select: t.can_select,
      insert: t.can_insert,
      update: t.can_update,
      delete: t.can_delete,
    },
  };
}

/**
 * A string constant for SQL text: an escape string (E'...'), read the same way whatever
 * standard_conforming_strings says.
 */
export function quoteLiteral(text: string): string {
  return `E'${text.replaceAll("\\", "\\\\").replaceAll("'", "''")}'`;
}

/** Quotes an identifier the way PostgreSQL's quote_ident does, always. */
export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}
