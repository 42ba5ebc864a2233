/** The few typed errors of meter-sync, and how a PostgreSQL error is classified. */

/** Bad flags, environment or URL: exit 2 with one line saying what and how to fix it. */
export class ConfigError extends Error {
  override name = "ConfigError";
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/** Local and remote tables cannot be reconciled without losing data: exit 3. */
export class SchemaError extends Error {
  override name = "SchemaError";
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/** A cycle failed after its retries; every row is still in place: exit 1. */
export class CycleError extends Error {
  override name = "CycleError";
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
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
