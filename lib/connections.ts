/** Opens the databases a command needs, says clearly when one cannot be reached, and closes them. */
import { getLogger } from "@logtape/logtape";
import type { Config } from "./config.ts";
import {
  closePool,
  connect,
  type ConnectOptions,
  openPool,
  passwordSourceOf,
  type Pool,
  type Sql,
  TlsError,
} from "./db.ts";
import type { DbTarget } from "./db_url.ts";
import { classifyError, CycleError, describeError, sqlState } from "./errors.ts";

const log = getLogger(["meter-sync", "db"]);

/** The open databases of one command. */
export interface Databases {
  local?: Sql;
  remote?: Sql;
}

/** Options of {@link withDatabases}. */
export interface WithDatabasesOptions {
  /** Connections per pool. @default 1 */
  max?: number;
}

/** Makes sure the database answers, turning a failure into one line that names it. */
export async function ping(sql: Sql, target: DbTarget, side: string): Promise<void> {
  try {
    await sql`SELECT 1`;
  } catch (err) {
    const why = describeError(err);
    let hint = " (check the URL)";
    // A TLS message already says what to check.
    if (err instanceof TlsError) hint = "";
    else if (classifyError(err) === "transient") hint = " (is the server running and reachable?)";
    else if (sqlState(err) === "28P01") {
      const source = passwordSourceOf(sql);
      if (source) {
        hint = source.startsWith("no ") ? ` (${source})` : ` (the password came from ${source})`;
      }
    }
    throw new CycleError(`cannot reach the ${side} database ${target.display}: ${why}${hint}`, {
      cause: err,
    });
  }
}

/**
 * Adds a password read from a file to the secrets main.ts and the log sink mask. They
 * hold this very array, so a password read at connect time is masked from then on.
 */
export function rememberSecret(secrets: string[], secret: string): void {
  const forms = [secret, JSON.stringify(secret).slice(1, -1), encodeURIComponent(secret)];
  for (const form of forms) if (form && !secrets.includes(form)) secrets.push(form);
  // Longest first, as secretsOf() orders them: a secret inside another is masked whole.
  secrets.sort((a, b) => b.length - a.length);
}

/**
 * How every command connects to one side: the password file of that side, the pgpass
 * file, warnings to the log, and every password read from a file added to the secrets.
 */
export function connectOptions(config: Config, side: "local" | "remote"): ConnectOptions {
  const path = side === "local" ? config.localPasswordFile : config.passwordFile;
  const setting = side === "local"
    ? "--local-password-file or METER_SYNC_LOCAL_PASSWORD_FILE"
    : "--password-file or METER_SYNC_PASSWORD_FILE";
  return {
    pgpassFile: config.pgpassFile,
    passwordFile: path ? { path, setting, side } : undefined,
    warn: (message) => log.warn(message),
    onSecret: (secret) => rememberSecret(config.secrets, secret),
  };
}

/** Runs fn with connections to the databases the config names, closing them afterwards. */
export async function withDatabases<T>(
  config: Config,
  fn: (dbs: Databases) => Promise<T>,
  options: WithDatabasesOptions = {},
): Promise<T> {
  const dbs: Databases = {};
  const max = options.max;
  try {
    if (config.local) {
      dbs.local = await connect(config.local, { ...connectOptions(config, "local"), max });
    }
    if (config.remote) {
      dbs.remote = await connect(config.remote, { ...connectOptions(config, "remote"), max });
    }
    return await fn(dbs);
  } finally {
    await Promise.all([dbs.local && closePool(dbs.local), dbs.remote && closePool(dbs.remote)]);
  }
}

/**
 * Local connections of an upload lane: one holds the batch in flight (its transaction stays
 * open until the remote has committed the batch), the other claims the next batch while the
 * remote writes, once the one before has committed. A third, so that the claim need not wait for
 * that commit, cost more than it saved on 2 cores, where the claim and the commit only take CPU
 * from each other and every backend pays again for its first touch of the shared buffers (quiet
 * servers, 200,000 readings: batch 20000, ten A/B pairs, 5.09 against 5.46 s and the local server
 * 3.66 against 3.91 CPU seconds; batch 10000, four pairs, 5.11 against 5.32 s; 2026-11-26).
 */
export const LOCAL_CONNECTIONS = 2;

/** Runs fn with renewable pools to both databases (the upload engine's), closing them afterwards. */
export async function withPools<T>(
  config: Config,
  fn: (pools: { local: Pool; remote: Pool }) => Promise<T>,
): Promise<T> {
  const local = await openPool(config.local!, {
    ...connectOptions(config, "local"),
    max: LOCAL_CONNECTIONS,
  });
  let remote: Pool;
  try {
    remote = await openPool(config.remote!, connectOptions(config, "remote"));
  } catch (err) {
    await local.end();
    throw err;
  }
  try {
    return await fn({ local, remote });
  } finally {
    await Promise.all([local.end(), remote.end()]);
  }
}
