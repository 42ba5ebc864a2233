/** Opens the databases a command needs, says clearly when one cannot be reached, and closes them. */
import { getLogger } from "@logtape/logtape";
import type { Config } from "./config.ts";
import { connect, type ConnectOptions, openPool, type Pool, type Sql } from "./db.ts";
import type { DbTarget } from "./db_url.ts";
import { classifyError, CycleError, describeError } from "./errors.ts";

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
    const kind = classifyError(err);
    const hint = kind === "transient" ? "is the server running and reachable?" : "check the URL";
    throw new CycleError(`cannot reach the ${side} database ${target.display}: ${why} (${hint})`, {
      cause: err,
    });
  }
}

/** How every command connects: the pgpass file of the config, warnings to the log. */
function connectOptions(config: Config): ConnectOptions {
  return { pgpassFile: config.pgpassFile, warn: (message) => log.warn(message) };
}

/** Runs fn with connections to the databases the config names, closing them afterwards. */
export async function withDatabases<T>(
  config: Config,
  fn: (dbs: Databases) => Promise<T>,
  options: WithDatabasesOptions = {},
): Promise<T> {
  const dbs: Databases = {};
  const connectWith = { ...connectOptions(config), max: options.max };
  try {
    if (config.local) dbs.local = await connect(config.local, connectWith);
    if (config.remote) dbs.remote = await connect(config.remote, connectWith);
    return await fn(dbs);
  } finally {
    await Promise.all([dbs.local?.end({ timeout: 5 }), dbs.remote?.end({ timeout: 5 })]);
  }
}

/** Runs fn with renewable pools to both databases (the upload engine's), closing them afterwards. */
export async function withPools<T>(
  config: Config,
  fn: (pools: { local: Pool; remote: Pool }) => Promise<T>,
): Promise<T> {
  const options = connectOptions(config);
  // Two local connections: the next batch is claimed while the current one travels.
  const local = await openPool(config.local!, { ...options, max: 2 });
  const remote = await openPool(config.remote!, options);
  try {
    return await fn({ local, remote });
  } finally {
    await Promise.all([local.end(), remote.end()]);
  }
}
