/** Compares the local and remote readings tables: which columns travel, and what blocks the upload. */
import { type Column, quoteIdent, type TableInfo } from "./columns.ts";
import { ConfigError } from "./errors.ts";

/** The local-only column that marks a reading as synchronized; it never travels. */
export const SYNC_FLAG = "is_synchronized";

/** One difference between the two sides. */
export interface SchemaIssue {
  column: string;
  /** Blocking issues stop the upload (exit 3); the others are reported only. */
  blocking: boolean;
  local?: string;
  remote?: string;
  problem: string;
}

/** The verdict on a pair of tables. */
export interface SchemaPlan {
  /** Columns written to the remote, in local order; the key column first. */
  columns: Column[];
  /** The column the remote write is idempotent on. */
  key: string;
  issues: SchemaIssue[];
  ok: boolean;
  /**
   * Every travelling column has the same built-in type on both sides, so batches can
   * travel in binary COPY; otherwise in text COPY, which the remote parses into its types.
   */
  binary: boolean;
}

/** Type changes that carry every value over exactly (text form in, same value out). */
const WIDENINGS: Record<string, string[]> = {
  smallint: ["integer", "bigint", "numeric", "double precision"],
  integer: ["bigint", "numeric", "double precision"],
  bigint: ["numeric"],
  real: ["double precision"],
  "character varying": ["text"],
  character: ["text", "character varying"],
  json: ["jsonb", "text"],
  jsonb: ["json", "text"],
};

/** Decimal digits of the largest value of each integer type. */
const INTEGER_DIGITS: Record<string, number> = { smallint: 5, integer: 10, bigint: 19 };

function baseType(type: string): string {
  return type.replace(/\(.*\)/, "").trim();
}

function typeChange(local: string, remote: string): { ok: boolean; problem: string } {
  if (local === remote) return { ok: true, problem: "" };
  const l = baseType(local);
  const r = baseType(remote);
  if (l === r && l === "numeric" && remote === "numeric") {
    return { ok: true, problem: `type ${local} -> ${remote} (wider)` };
  }
  if (l === r && (l === "character varying" || l === "character")) {
    const lm = Number(/\((\d+)\)/.exec(local)?.[1] ?? Infinity);
    const rm = Number(/\((\d+)\)/.exec(remote)?.[1] ?? Infinity);
    if (rm >= lm) return { ok: true, problem: `type ${local} -> ${remote} (wider)` };
  }
  if (l === "numeric" && r === "numeric") {
    const [lp, ls] = (/\((\d+),(\d+)\)/.exec(local) ?? []).slice(1).map(Number);
    const [rp, rs] = (/\((\d+),(\d+)\)/.exec(remote) ?? []).slice(1).map(Number);
    if (rp !== undefined && lp !== undefined && rs >= ls && rp - rs >= lp - ls) {
      return { ok: true, problem: `type ${local} -> ${remote} (wider)` };
    }
  }
  if (INTEGER_DIGITS[l] && r === "numeric") {
    const m = /\((\d+)(?:,(\d+))?\)/.exec(remote);
    const room = m ? Number(m[1]) - Number(m[2] ?? 0) : Infinity;
    return room >= INTEGER_DIGITS[l]
      ? { ok: true, problem: `type ${local} -> ${remote} (wider)` }
      : {
        ok: false,
        problem: `type ${local} on the gateway, ${remote} centrally: large values would not fit`,
      };
  }
  if ((WIDENINGS[l] ?? []).includes(r) && !remote.endsWith("[]") && !local.endsWith("[]")) {
    return { ok: true, problem: `type ${local} -> ${remote} (wider)` };
  }
  return {
    ok: false,
    problem: `type ${local} on the gateway, ${remote} centrally: values could change`,
  };
}

/**
 * The upload uses the columns both sides have, minus the sync flag. A local column
 * absent on the remote blocks it (its data would be lost), and so does a remote NOT
 * NULL column without default that the local side lacks, a type that could change a
 * value, a remote without a unique key on id (a replayed batch could not be detected)
 * and a local one without (two readings with one id would arrive as one).
 *
 * When the schemas would do, throws a ConfigError if a side cannot take the upload's
 * writes: a read-only database, or a user without the privileges. No schema change
 * fixes those, and no retry: a setting must change (exit 2).
 */
export function planUpload(local: TableInfo, remote: TableInfo): SchemaPlan {
  const issues: SchemaIssue[] = [];
  const remoteByName = new Map(remote.columns.map((c) => [c.name, c]));
  const localByName = new Map(local.columns.map((c) => [c.name, c]));
  const columns: Column[] = [];
  for (const lc of local.columns) {
    if (lc.name === SYNC_FLAG) continue;
    const rc = remoteByName.get(lc.name);
    if (!rc) {
      issues.push({
        column: lc.name,
        blocking: true,
        local: lc.type,
        problem: "only on the gateway: its values would be lost",
      });
      continue;
    }
    if (rc.generated) {
      issues.push({
        column: lc.name,
        blocking: true,
        local: lc.type,
        remote: rc.type,
        problem: "generated on the central side: it cannot be written",
      });
      continue;
    }
    const change = typeChange(lc.type, rc.type);
    if (change.problem) {
      issues.push({
        column: lc.name,
        blocking: !change.ok,
        local: lc.type,
        remote: rc.type,
        problem: change.problem,
      });
    }
    if (change.ok) columns.push(lc);
  }
  for (const rc of remote.columns) {
    if (localByName.has(rc.name) || rc.generated) continue;
    const required = rc.notNull && !rc.hasDefault;
    issues.push({
      column: rc.name,
      blocking: required,
      remote: rc.type,
      problem: required
        ? "only centrally, NOT NULL without a default: no row could be inserted"
        : "only centrally: left to its default",
    });
  }
  const key = "id";
  if (!localByName.has(key)) {
    issues.push({
      column: key,
      blocking: true,
      problem: "the gateway's table has no id column to deliver readings by",
    });
  }
  for (const [side, table] of [["gateway", local], ["central", remote]] as const) {
    const type = table.columns.find((c) => c.name === key)?.type;
    if (type !== undefined && type !== "uuid") {
      issues.push({
        column: key,
        blocking: true,
        [side === "gateway" ? "local" : "remote"]: type,
        problem: `is ${type} on the ${side}; meter-sync delivers readings by a uuid id`,
      });
    }
  }
  if (localByName.has(key) && !local.uniqueColumns.includes(key)) {
    issues.push({
      column: key,
      blocking: true,
      local: localByName.get(key)?.type,
      problem:
        "no primary key or unique index on id on the gateway: two readings with one id would arrive centrally as one",
    });
  }
  if (!remote.uniqueColumns.includes(key)) {
    issues.push({
      column: key,
      blocking: true,
      remote: remoteByName.get(key)?.type,
      problem:
        "no primary key or unique index on id centrally: a replayed batch would be billed twice",
    });
  }
  // The key travels first, so that a batch's ids can be read off its COPY lines.
  columns.sort((a, b) => (a.name === key ? -1 : b.name === key ? 1 : 0));
  const binary = travelsInBinary(columns, remoteByName);
  const ok = issues.every((i) => !i.blocking);
  if (ok) {
    assertWritable("remote", remote, ["INSERT"]);
    // FOR UPDATE needs UPDATE on some column; the delivered readings are deleted.
    assertWritable("local", local, ["SELECT", "UPDATE", "DELETE"]);
  }
  return { columns, key, issues, ok, binary };
}

/**
 * The plan a central table just like the gateway's would give, or undefined when even that
 * one could not upload. The first batch is claimed with it while the remote's catalog is
 * still on its way, and kept only if the real plan travels the very same way.
 */
export function expectedPlan(local: TableInfo): SchemaPlan | undefined {
  const twin: TableInfo = {
    ...local,
    access: { ...local.access, readOnly: false, standby: false, insert: true },
  };
  try {
    const plan = planUpload(local, twin);
    return plan.ok ? plan : undefined;
  } catch {
    return undefined; // a local setting to fix: the real plan says which
  }
}

/** Throws a ConfigError saying how to fix it when a side cannot take the upload's writes. */
function assertWritable(
  side: "local" | "remote",
  table: TableInfo,
  needs: ("SELECT" | "INSERT" | "UPDATE" | "DELETE")[],
): void {
  const { access } = table;
  const db = `the ${side} database "${access.database}"`;
  const url = side === "local" ? "LOCAL_DATABASE_URL" : "REMOTE_DATABASE_URL";
  const stays = "every reading stays in the local queue";
  if (access.standby) {
    throw new ConfigError(
      `${db} is a read-only standby (in recovery): point ${url} at the primary; ${stays}`,
    );
  }
  if (access.readOnly) {
    throw new ConfigError(
      `${db} is read-only (default_transaction_read_only is on): run ALTER DATABASE ${
        quoteIdent(access.database)
      } SET default_transaction_read_only = off (or reset it for user "${access.user}"), or point ${url} at a writable database; ${stays}`,
    );
  }
  const has = {
    SELECT: access.select,
    INSERT: access.insert,
    UPDATE: access.update,
    DELETE: access.delete,
  };
  const missing = needs.filter((p) => !has[p]);
  if (missing.length) {
    throw new ConfigError(
      `${db}: user "${access.user}" lacks ${missing.join(", ")} on ${
        quoteIdent(table.name)
      }: as the table owner, run psql -v agent_role=${access.user} -f scripts/roles_${side}.sql (it grants what the agent needs), or connect as a user that has it; ${stays}`,
    );
  }
}

/**
 * Binary COPY carries a value only into the very same built-in type: true when every
 * column has it on the other side too (by name); otherwise batches go in text COPY.
 */
export function travelsInBinary(columns: Column[], other: Map<string, Column>): boolean {
  return columns.every((c) => c.builtin && other.get(c.name)?.type === c.type);
}

/** A readable table of the differences, for check-schema and the exit-3 message. */
export function formatIssues(plan: SchemaPlan): string {
  if (plan.issues.length === 0) {
    return `schemas match: ${plan.columns.length} columns travel`;
  }
  const rows = plan.issues.map((i) => [
    i.blocking ? "BLOCKS" : "note",
    i.column,
    i.local ?? "-",
    i.remote ?? "-",
    i.problem,
  ]);
  const header = ["", "column", "gateway", "central", "problem"];
  const widths = header.map((h, k) => Math.max(h.length, ...rows.map((r) => r[k].length)));
  const line = (r: string[]) => r.map((c, k) => c.padEnd(widths[k])).join("  ").trimEnd();
  const verdict = plan.ok
    ? `upload can run: ${plan.columns.length} columns travel`
    : `upload cannot run: ${
      plan.issues.filter((i) => i.blocking).map((i) => `"${i.column}"`).join(", ")
    } must be fixed first`;
  return [line(header), ...rows.map(line), "", verdict].join("\n");
}
