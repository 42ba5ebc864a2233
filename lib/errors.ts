/** The few typed errors of meter-sync, and how a PostgreSQL error is classified. */

// deno-lint-ignore no-control-regex
const CONTROL = /[\u0000-\u001f\u007f]/g;

/**
 * A message as one clean line: a value echoed from the command line or a URL may hold a
 * newline (a second line), a carriage return or an escape sequence (a terminal rewriting
 * what was printed). Those are shown escaped, as JSON shows them (and DEL too).
 */
export function oneLine(message: string): string {
  return message.replace(
    CONTROL,
    (c) => c === "\u007f" ? "\\u007f" : JSON.stringify(c).slice(1, -1),
  );
}

/** Bad flags, environment or URL: exit 2 with one line saying what and how to fix it. */
export class ConfigError extends Error {
  override name = "ConfigError";
  constructor(message: string, options?: ErrorOptions) {
    super(oneLine(message), options);
  }
}

/** Local and remote tables cannot be reconciled without losing data: exit 3. */
export class SchemaError extends Error {
  override name = "SchemaError";
  constructor(message: string, options?: ErrorOptions) {
    super(oneLine(message), options);
  }
}

/** A cycle failed after its retries; every row is still in place: exit 1. */
export class CycleError extends Error {
  override name = "CycleError";
  constructor(message: string, options?: ErrorOptions) {
    super(oneLine(message), options);
  }
}

/** A command that a later release builds. */
export class NotAvailableError extends ConfigError {
  override name = "NotAvailableError";
}

/** Exit codes of SPEC §3. */
export const ExitCode = {
  ok: 0,
  cycleFailed: 1,
  usage: 2,
  schema: 3,
} as const;

/** The SQLSTATE of a PostgreSQL error, or undefined for anything else. */
export function sqlState(err: unknown): string | undefined {
  if (err && typeof err === "object" && "code" in err) {
    const code = (err as { code: unknown }).code;
    // Every SQLSTATE class starts with a digit; "EPIPE" is a Node error code, not a SQLSTATE.
    if (typeof code === "string" && /^[0-9][0-9A-Z]{4}$/.test(code)) return code;
  }
  return undefined;
}

const transientStates = new Set(["57P01", "57P02", "57P03", "40001", "40P01", "55P03", "57014"]);
const transientCodes = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EAI_AGAIN",
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
]);

/** What the agent should do about an error. */
export type ErrorKind = "transient" | "data" | "permanent";

/**
 * Transient faults are retried (connection refused or lost, admin shutdown,
 * serialization failure, deadlock, too many connections, timeouts); class 22 and 23
 * are the data's fault (the row is quarantined); everything else stops the cycle.
 */
export function classifyError(err: unknown): ErrorKind {
  const state = sqlState(err);
  if (state) {
    const cls = state.slice(0, 2);
    if (cls === "08" || cls === "53" || transientStates.has(state)) return "transient";
    if (cls === "22" || cls === "23") return "data";
    return "permanent";
  }
  if (err && typeof err === "object") {
    const code = (err as { code?: unknown }).code;
    if (typeof code === "string" && transientCodes.has(code)) return "transient";
    // A TLS refusal (untrusted certificate, wrong host, no TLS offered) never heals by retrying.
    if (typeof code === "string" && code.startsWith("TLS_")) return "permanent";
    const name = (err as { name?: unknown }).name;
    if (name === "ConnectionRefused" || name === "ConnectionReset" || name === "TimedOut") {
      return "transient";
    }
    const message = String((err as { message?: unknown }).message ?? "");
    if (
      /ECONNREFUSED|ECONNRESET|connection (refused|reset)|broken pipe|timed? ?out/i.test(message)
    ) {
      return "transient";
    }
  }
  return "permanent";
}

/** One line for a human: the error message with its SQLSTATE, never a stack. */
export function describeError(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const state = sqlState(err);
  const message = err.message.split("\n")[0];
  return state ? `${message} (SQLSTATE ${state})` : message;
}

/**
 * PostgreSQL errors that no retry cures and no schema change either: a setting of the
 * database or of the connection must change. Each maps to the fix, said in one clause.
 */
const SETTING_FIXES: Record<string, string> = {
  // read_only_sql_transaction: default_transaction_read_only is on, or the server is a standby.
  "25006":
    "the database is read-only (default_transaction_read_only, or a standby): run ALTER DATABASE ... SET default_transaction_read_only = off, or point the URL at the writable primary",
  // invalid_password, invalid_authorization_specification (no pg_hba.conf entry, no such role)
  "28P01":
    "fix the user or password (the URL, --password-file or --local-password-file, or the pgpass file)",
  "28000":
    "the server refuses this user from this host: check the user name and the server's pg_hba.conf",
  // invalid_catalog_name: the database in the URL does not exist
  "3D000": "fix the database name in the URL, or create the database",
  // insufficient_privilege
  "42501":
    "the database user lacks a privilege: GRANT it (see scripts/roles_local.sql and scripts/roles_remote.sql), or connect as a user that has it",
};

/**
 * A table that meter-sync's own queries need is missing (undefined_table): the database
 * was not migrated, or a table was dropped. Exit 3, with the fix.
 */
const MISSING_TABLE_FIX =
  "a table meter-sync needs is missing: run meter-sync migrate --target local (or remote)";

/** The error and the errors it was caused by, outermost first (at most 8 deep). */
function causes(err: unknown): unknown[] {
  const chain: unknown[] = [];
  for (let e = err; e !== undefined && e !== null && chain.length < 8; e = (e as Error).cause) {
    chain.push(e);
    if (typeof e !== "object") break;
  }
  return chain;
}

/**
 * How to fix an error that a setting causes (a read-only database, a missing privilege),
 * looked for along the `cause` chain; undefined for any other error.
 */
export function settingFix(err: unknown): string | undefined {
  for (const e of causes(err)) {
    const fix = SETTING_FIXES[sqlState(e) ?? ""];
    if (fix) return fix;
  }
  return undefined;
}

/** Whether a table meter-sync's queries need is missing, along the `cause` chain. */
function missingTable(err: unknown): boolean {
  return causes(err).some((e) => sqlState(e) === "42P01");
}

/**
 * The exit code of SPEC §3 for the error that ended a command: 2 for a setting to fix (a
 * ConfigError, or a database error that only a setting cures, however it was wrapped),
 * 3 for a schema mismatch (a SchemaError, or a table missing), 1 for a failed cycle.
 */
export function exitCodeOf(err: unknown): number {
  const chain = causes(err);
  if (chain.some((e) => e instanceof ConfigError)) return ExitCode.usage;
  if (chain.some((e) => e instanceof SchemaError)) return ExitCode.schema;
  if (settingFix(err)) return ExitCode.usage;
  // A TLS refusal (untrusted certificate, wrong host name, no TLS offered): the URL's TLS
  // settings and the server disagree, which only a setting cures.
  if (chain.some((e) => String((e as { code?: unknown } | null)?.code ?? "").startsWith("TLS_"))) {
    return ExitCode.usage;
  }
  if (missingTable(err)) return ExitCode.schema;
  return ExitCode.cycleFailed;
}

/**
 * The one line printed for the error that ended a command: what went wrong and, when a
 * setting causes it, how to fix it. Never a stack; passwords are main.ts's to mask.
 */
export function failureLine(err: unknown): string {
  const line = describeError(err);
  if (err instanceof ConfigError || err instanceof SchemaError) return line;
  const fix = settingFix(err) ?? (missingTable(err) ? MISSING_TABLE_FIX : undefined);
  if (fix) return `${line}; ${fix}`;
  return err instanceof CycleError ? line : `failed: ${line}`;
}
