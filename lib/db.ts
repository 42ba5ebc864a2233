/** Opens postgres.js connections the way meter-sync needs them: no Nagle, fixed session settings. */
import net from "node:net";
import tls from "node:tls";
import postgres from "postgres";
import type { DbTarget } from "./db_url.ts";
import { readPgpass } from "./pgpass.ts";

export type Sql = postgres.Sql;

/** Options of {@link connect}. */
export interface ConnectOptions {
  /** Connections in the pool. @default 1 */
  max?: number;
  /** The pgpass file to consult when the URL carries no password. */
  pgpassFile?: string;
  /** Receives warnings (an unsafe pgpass file). @default ignore */
  warn?: (message: string) => void;
}

/**
 * Session settings that make PostgreSQL's text output a lossless, unambiguous
 * input for the other side: ISO dates in UTC, shortest exact floats.
 */
export const SESSION_SETTINGS = {
  DateStyle: "ISO, MDY",
  TimeZone: "UTC",
  IntervalStyle: "postgres",
  extra_float_digits: "3",
  client_encoding: "UTF8",
} as const;

function sslOption(target: DbTarget): postgres.Options<Record<string, never>>["ssl"] {
  switch (target.sslmode) {
    case "disable":
      return false;
    case "allow":
    case "prefer":
    case "require":
      return target.sslmode;
    case "verify-ca":
    case "verify-full": {
      const options: tls.ConnectionOptions = { rejectUnauthorized: true };
      if (target.sslrootcert) options.ca = Deno.readTextFileSync(target.sslrootcert);
      if (target.sslcert) options.cert = Deno.readTextFileSync(target.sslcert);
      if (target.sslkey) options.key = Deno.readTextFileSync(target.sslkey);
      if (target.sslmode === "verify-full") {
        options.servername = net.isIP(target.host) ? undefined : target.host;
      } else {
        // verify-ca: the chain must be trusted, the host name is not compared.
        options.checkServerIdentity = () => undefined;
      }
      return options;
    }
  }
}

/**
 * A TCP socket of our own with Nagle's algorithm off: postgres.js never disables it,
 * and the last small message of a COPY then waits ~40 ms for a delayed ACK.
 */
function openSocket(target: DbTarget): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: target.host, port: target.port });
    const timer = setTimeout(() => {
      socket.destroy();
      const err = new Error(
        `connection to ${target.host}:${target.port} timed out after ${target.connectTimeout} s`,
      ) as Error & { code: string };
      err.code = "CONNECT_TIMEOUT";
      reject(err);
    }, target.connectTimeout * 1000);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 30_000);
      // postgres.js reads the host from the socket for the TLS server name.
      (socket as net.Socket & { host?: string }).host = target.host;
      resolve(socket);
    });
    socket.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

const socketsOf = new WeakMap<Sql, Set<net.Socket>>();

/**
 * Resumes the pool's sockets. postgres.js pauses a socket when a COPY TO stream's
 * buffer is full and resumes it only on the next read; when CopyData and CopyDone
 * come in one chunk that read never happens and the next query waits forever
 * (porsager/postgres#499, #917). Called after every COPY TO.
 */
export function resumeSockets(sql: Sql): void {
  for (const socket of socketsOf.get(sql) ?? []) {
    if (socket.isPaused()) socket.resume();
  }
}

/** Resolves the password: from the URL, else from the pgpass file, else none. */
export async function resolvePassword(
  target: DbTarget,
  options: ConnectOptions = {},
): Promise<string | undefined> {
  if (target.password !== undefined) return target.password;
  if (!options.pgpassFile) return undefined;
  return await readPgpass(options.pgpassFile, target, options.warn);
}

let guarded = false;

/**
 * postgres.js 3.4.9 bug: when a connection dies inside sql.begin(), the driver still
 * writes its ROLLBACK to that connection from a setImmediate, on a socket it has
 * already set to null. The TypeError escapes every promise and would end the process;
 * the transaction is gone with the connection anyway and begin() has already rejected.
 * Only that exact error is swallowed.
 */
function guardDriverBug(): void {
  if (guarded) return;
  guarded = true;
  globalThis.addEventListener("error", (event) => {
    const err = (event as ErrorEvent).error;
    if (
      err instanceof TypeError &&
      err.message === "Cannot read properties of null (reading 'write')" &&
      /postgres[\\/]src[\\/]connection\.js/.test(err.stack ?? "")
    ) {
      event.preventDefault();
    }
  });
}

/** A postgres.js pool for the target. Connections open lazily, on the first query. */
export async function connect(target: DbTarget, options: ConnectOptions = {}): Promise<Sql> {
  guardDriverBug();
  const password = await resolvePassword(target, options);
  const sockets = new Set<net.Socket>();
  const sql = postgres({
    host: target.host,
    port: target.port,
    user: target.user,
    pass: password ?? "",
    database: target.database,
    ssl: sslOption(target),
    max: options.max ?? 1,
    connect_timeout: target.connectTimeout,
    idle_timeout: 0,
    max_lifetime: null,
    // With fetch_types off, postgres.js never hands a first connection to reserve().
    fetch_types: true,
    prepare: true,
    // Every remaining setting explicit: postgres.js reads PG<SETTING> variables from the
    // environment for any option not given, which the binary's --allow-env list does not grant.
    keep_alive: 60,
    debug: false,
    publications: "alltables",
    backoff: (attempt: number) => (0.5 + Math.random() / 2) * Math.min(3 ** attempt / 100, 20),
    onnotice: () => {},
    connection: { application_name: target.applicationName, ...SESSION_SETTINGS },
    // Present at run time, missing from the TypeScript types (SPEC §5).
    ...({
      sslnegotiation: null,
      target_session_attrs: null,
      max_pipeline: 100,
      socket: async () => {
        const socket = await openSocket(target);
        sockets.add(socket);
        socket.once("close", () => sockets.delete(socket));
        return socket;
      },
    } as Record<string, unknown>),
  });
  socketsOf.set(sql, sockets);
  return sql;
}

/**
 * A pool that can be thrown away and opened anew. After a connection dies inside a
 * transaction, postgres.js keeps the ROLLBACK it could not send and writes it ahead
 * of the next startup message, so that connection never works again: the upload
 * engine renews the pool after every connection-level fault.
 */
export interface Pool {
  readonly sql: Sql;
  /** Replaces the pool; the old one is closed without waiting. */
  renew(): Promise<void>;
  end(): Promise<void>;
}

/** Opens a renewable pool for the target. */
export async function openPool(target: DbTarget, options: ConnectOptions = {}): Promise<Pool> {
  let sql = await connect(target, options);
  return {
    get sql() {
      return sql;
    },
    async renew() {
      const old = sql;
      sql = await connect(target, options);
      old.end({ timeout: 0 }).catch(() => {});
    },
    end: () => sql.end({ timeout: 5 }),
  };
}
