/** Opens postgres.js connections the way meter-sync needs them: no Nagle, own TLS, fixed session settings. */
import { EventEmitter } from "node:events";
import net from "node:net";
import tls from "node:tls";
import postgres from "postgres";
import { coalesceCopyData } from "./copy_coalesce.ts";
import { type ReusedReads, reusedReads } from "./socket_reads.ts";
import { noteWrites } from "./socket_writes.ts";
import type { DbTarget } from "./db_url.ts";
import { ConfigError } from "./errors.ts";
import { fileProblem, modeOf, readPasswordFile, tooOpen } from "./password_file.ts";
import { readPgpass } from "./pgpass.ts";

export type Sql = postgres.Sql;

/** Options of {@link connect}. */
export interface ConnectOptions {
  /** Connections in the pool. @default 1 */
  max?: number;
  /** The pgpass file to consult when neither the URL nor a password file gives a password. */
  pgpassFile?: string;
  /** A file holding this database's password; read when the URL carries none. */
  passwordFile?: { path: string; setting: string; side: string };
  /** Receives warnings (an unsafe pgpass file, an ignored password file). @default ignore */
  warn?: (message: string) => void;
  /**
   * Receives a password read from a file (password file or pgpass), so that the caller
   * can mask it in everything it prints; a URL's password is known before connecting.
   * @default ignore
   */
  onSecret?: (secret: string) => void;
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

/**
 * A TLS failure that retrying will not mend: no TLS on the server, a certificate that is
 * not trusted or not for this host. Its code starts with TLS_, so it is never taken for
 * a transient fault.
 */
export class TlsError extends Error {
  override name = "TlsError";
  readonly code: "TLS_UNAVAILABLE" | "TLS_UNTRUSTED" | "TLS_HOST_MISMATCH" | "TLS_FAILED";
  constructor(code: TlsError["code"], message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** How connect() talks TLS to one target, decided (and its files read) before any connection. */
interface TlsPlan {
  /** never: plain TCP; prefer: TLS when the server offers it; require: TLS or fail. */
  use: "never" | "prefer" | "require";
  /** The handshake's options: trust anchors, identity check, client certificate. */
  options: tls.ConnectionOptions;
  /** Where trust comes from, for messages: "sslrootcert /etc/meter-sync/ca.pem". */
  trust: string;
  /** What to check when the server is not trusted. */
  trustHint: string;
}

/** Reads a certificate or key file named by the URL; a problem with it is a config error. */
async function readTlsFile(target: DbTarget, param: string, path: string): Promise<string> {
  try {
    const info = await Deno.stat(path);
    if (param === "sslkey" && tooOpen(info)) {
      throw new ConfigError(
        `${target.source}: sslkey ${path} is open to group or others (mode ${
          modeOf(info)
        }); run chmod 600 ${path}`,
      );
    }
    return await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    throw new ConfigError(`${target.source}: ${param} ${path} ${fileProblem(err)}`, {
      cause: err,
    });
  }
}

/** "localhost:5432 (--remote-url)": which server, and which setting named it. */
function serverOf(target: DbTarget): string {
  const host = net.isIPv6(target.host) ? `[${target.host}]` : target.host;
  return `${host}:${target.port} (${target.source})`;
}

/** The certificate's names, as a person would list them: "DNS:localhost, IP Address:10.0.0.5". */
function certificateNames(cert: tls.PeerCertificate): string {
  return cert.subjectaltname || (cert.subject?.CN ? `CN=${cert.subject.CN}` : "no name at all");
}

/**
 * libpq's sslmode semantics on top of node:tls. `require` with an sslrootcert checks the
 * chain, as libpq does; `verify-full` compares the host name (or IP address) of the URL
 * with the certificate, also when it is an IP address (node:tls alone would compare an
 * IP-less handshake against "localhost").
 */
async function tlsPlan(target: DbTarget): Promise<TlsPlan> {
  const mode = target.sslmode;
  if (mode === "disable") return { use: "never", options: {}, trust: "", trustHint: "" };
  // "system": the default store, which is also what verify-* without sslrootcert uses
  // (libpq would read ~/.postgresql/root.crt; an agent under systemd has no such home).
  const caFile = target.sslrootcert === "system" ? undefined : target.sslrootcert;
  const options: tls.ConnectionOptions = {
    rejectUnauthorized: mode === "verify-ca" || mode === "verify-full" ||
      (mode === "require" && caFile !== undefined),
    // SNI carries host names only.
    servername: net.isIP(target.host) ? undefined : target.host,
    checkServerIdentity: (_name, cert) => {
      if (mode !== "verify-full" || !tls.checkServerIdentity(target.host, cert)) return undefined;
      return new TlsError(
        "TLS_HOST_MISMATCH",
        `TLS: host name mismatch: the certificate of ${serverOf(target)} is for ${
          certificateNames(cert)
        }, but the URL connects to ${target.host} (sslmode=verify-full); connect by a name the certificate lists, or reissue it for this name`,
      );
    },
  };
  if (caFile) options.ca = await readTlsFile(target, "sslrootcert", caFile);
  if (target.sslcert && target.sslkey) {
    options.cert = await readTlsFile(target, "sslcert", target.sslcert);
    options.key = await readTlsFile(target, "sslkey", target.sslkey);
  }
  return {
    use: mode === "prefer" || mode === "allow" ? "prefer" : "require",
    options,
    trust: caFile ? `sslrootcert ${caFile}` : "the default CA store",
    trustHint: caFile
      ? "check that it holds the CA that signed the server's certificate"
      : "for a private CA, name its certificate with sslrootcert=/path/to/ca.pem",
  };
}

/** OpenSSL's verdicts that mean "this chain does not lead to a CA we trust". */
const UNTRUSTED = new Set([
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "CERT_UNTRUSTED",
  "CERT_SIGNATURE_FAILURE",
  "CERT_CHAIN_TOO_LONG",
  "INVALID_CA",
]);

/** One line for a failed handshake, naming the server, the sslmode and what to check. */
function handshakeError(err: unknown, target: DbTarget, plan: TlsPlan): Error {
  if (err instanceof TlsError) return err;
  const code = String((err as { code?: unknown })?.code ?? "");
  const reason = err instanceof Error ? err.message.split("\n")[0] : String(err);
  const server = serverOf(target);
  if (UNTRUSTED.has(code)) {
    return new TlsError(
      "TLS_UNTRUSTED",
      `TLS: the server certificate of ${server} is not trusted by ${plan.trust} (${reason}, sslmode=${target.sslmode}); ${plan.trustHint}`,
      { cause: err },
    );
  }
  if (code === "CERT_HAS_EXPIRED" || code === "CERT_NOT_YET_VALID") {
    return new TlsError(
      "TLS_UNTRUSTED",
      `TLS: the server certificate of ${server} is ${
        code === "CERT_HAS_EXPIRED" ? "expired" : "not valid yet"
      } (${reason}); renew it on the server, or check this device's clock`,
      { cause: err },
    );
  }
  if (code.startsWith("ERR_TLS_CERT_ALTNAME")) {
    return new TlsError("TLS_HOST_MISMATCH", `TLS: ${reason} (sslmode=${target.sslmode})`, {
      cause: err,
    });
  }
  // A reset or a timeout in the middle of the handshake keeps its code: it may pass.
  const wrapped = new Error(`TLS: the handshake with ${server} failed: ${reason}`, { cause: err });
  if (code) Object.assign(wrapped, { code });
  else return new TlsError("TLS_FAILED", wrapped.message, { cause: err });
  return wrapped;
}

/** PostgreSQL's SSLRequest: length 8, code 1234.5679. */
const SSL_REQUEST = new Uint8Array([0, 0, 0, 8, 4, 210, 22, 47]);

type HostSocket = net.Socket & { host?: string; port?: number; reads?: ReusedReads };

/**
 * A TCP socket of our own with Nagle's algorithm off (postgres.js never disables it, and
 * the last small message of a COPY then waits ~40 ms for a delayed ACK), upgraded to TLS
 * here rather than by postgres.js: so that TLS failures get a clear message, `require`
 * refuses a server without TLS (postgres.js would start a handshake anyway), and
 * resumeSockets() sees the socket postgres.js actually reads from.
 *
 * A socket that may stay unencrypted reads into a buffer of its own (`reuse`, see
 * socket_reads.ts). Deno's TLS layer cannot take such a socket over, so when a server
 * offers TLS to `prefer`, the socket is dropped and a second one negotiates TLS.
 */
function openSocket(
  target: DbTarget,
  plan: TlsPlan,
  reuse = plan.use !== "require",
): Promise<HostSocket> {
  return new Promise((resolve, reject) => {
    let settled = false;
    let secure: tls.TLSSocket | undefined;
    const reads = reuse ? reusedReads() : undefined;
    const raw: HostSocket = net.connect({
      host: target.host,
      port: target.port,
      ...(reads && { onread: reads.onread }),
    });
    /** Ends this attempt: with an error, with the socket to use, or handing over to `next`. */
    const settle = (err: Error | undefined, socket?: HostSocket, next?: Promise<HostSocket>) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      raw.removeListener("close", onClose);
      raw.removeListener("error", onError);
      secure?.removeListener("error", onHandshakeError);
      if (err || next) {
        // Late errors of sockets we give up on must not become uncaught exceptions.
        for (const s of [secure, raw]) s?.on("error", () => {}).destroy();
        return next ? next.then(resolve, reject) : reject(err);
      }
      if (socket === raw && reads) {
        raw.reads = reads;
        // pause() would stop the reads for real (not just the events, as it does otherwise),
        // and postgres.js pauses behind a COPY TO stream and may never resume: a read left
        // unread then kept even the connection's end from being seen. Nothing is gained by
        // pausing: every COPY read here is a batch, bounded by --batch-size, and read whole.
        raw.pause = function () {
          return this;
        };
      }
      // postgres.js names host and port in its connection errors.
      socket!.host = target.host;
      socket!.port = target.port;
      resolve(socket!);
    };
    const timer = setTimeout(() => {
      const err = new Error(
        `connection to ${target.host}:${target.port} timed out after ${target.connectTimeout} s`,
      ) as Error & { code: string };
      err.code = "CONNECT_TIMEOUT";
      settle(err);
    }, target.connectTimeout * 1000);
    const onClose = () => {
      const err = new Error(
        `the server ${serverOf(target)} closed the connection during TLS negotiation`,
      ) as Error & { code: string };
      err.code = "CONNECTION_CLOSED";
      settle(err);
    };
    const onError = (err: Error) => settle(err);
    const onHandshakeError = (err: Error) => settle(handshakeError(err, target, plan));
    raw.on("error", onError);
    raw.once("close", onClose);
    raw.once("connect", () => {
      raw.setNoDelay(true);
      raw.setKeepAlive(true, 30_000);
      if (plan.use === "never") return settle(undefined, raw);
      raw.write(SSL_REQUEST);
      const onAnswer = (answer: Uint8Array) => {
        // Exactly one byte: anything after it was sent before the handshake, unencrypted,
        // and must not be read as coming from the server (CVE-2021-23222).
        if (answer.length !== 1 || (answer[0] !== 0x53 && answer[0] !== 0x4e)) {
          return settle(
            new TlsError(
              "TLS_FAILED",
              `TLS: the server ${
                serverOf(target)
              } answered the TLS request with unexpected data; is it a PostgreSQL server?`,
            ),
          );
        }
        if (answer[0] === 0x4e) { // "N": no TLS here
          if (plan.use === "prefer") return settle(undefined, raw);
          return settle(
            new TlsError(
              "TLS_UNAVAILABLE",
              `TLS: the server ${
                serverOf(target)
              } does not offer TLS, and sslmode=${target.sslmode} requires it; turn ssl on in the server's postgresql.conf`,
            ),
          );
        }
        if (reads) return settle(undefined, undefined, openSocket(target, plan, false));
        const upgraded = tls.connect({ ...plan.options, socket: raw });
        secure = upgraded;
        upgraded.on("error", onHandshakeError);
        upgraded.once("secureConnect", () => {
          // An error on the TCP socket underneath ends the TLS one, which postgres.js watches.
          raw.on("error", (err) => upgraded.destroy(err));
          settle(undefined, upgraded as HostSocket);
        });
      };
      if (!reads) return raw.once("data", onAnswer);
      reads.consume((answer) => {
        reads.release(undefined);
        onAnswer(answer);
      });
    });
  });
}

/**
 * A socket that fails the way a refused TCP connection does: "error", then "close".
 * postgres.js handles a rejected socket factory badly: the query fails, but the
 * connection stays in its connecting state and every later query on the pool waits
 * forever. Failing through the events it expects puts the connection back in its
 * closed state, ready for the next attempt.
 */
function failedSocket(err: Error, target: DbTarget): HostSocket {
  const socket = Object.assign(new EventEmitter(), {
    host: target.host,
    port: target.port,
    readyState: "closed",
    write: () => true,
    end: () => {},
    destroy: () => {},
    setKeepAlive: () => {},
    pause: () => {},
    resume: () => {},
    isPaused: () => false,
  });
  // After postgres.js has attached its listeners, which it does right after the factory resolves.
  setTimeout(() => {
    socket.emit("error", err);
    socket.emit("close", true);
  }, 0);
  return socket as unknown as HostSocket;
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

/** A password and where it came from, for the hint when the server refuses it. */
interface FoundPassword {
  password?: string;
  /** "the URL", "the password file /etc/meter-sync/remote.pw", "no password given (...)". */
  source: string;
}

/** Password files already reported as ignored: once per process, not once per cycle. */
const ignoredFiles = new Set<string>();

async function findPassword(target: DbTarget, options: ConnectOptions): Promise<FoundPassword> {
  if (target.password !== undefined) {
    if (options.passwordFile && !ignoredFiles.has(options.passwordFile.path)) {
      ignoredFiles.add(options.passwordFile.path);
      options.warn?.(
        `${options.passwordFile.setting} is ignored for the ${options.passwordFile.side} database: its URL carries a password (remove it from the URL to use the file)`,
      );
    }
    return { password: target.password, source: "the URL" };
  }
  if (options.passwordFile) {
    const { path, setting, side } = options.passwordFile;
    const password = await readPasswordFile(path, { setting, side });
    options.onSecret?.(password);
    return { password, source: `the password file ${path}` };
  }
  if (options.pgpassFile) {
    const password = await readPgpass(options.pgpassFile, target, options.warn);
    if (password !== undefined) {
      options.onSecret?.(password);
      return { password, source: `the pgpass file ${options.pgpassFile}` };
    }
  }
  return {
    source: `no password given (none in the URL, no password file${
      options.pgpassFile ? `, no matching line in ${options.pgpassFile}` : ""
    })`,
  };
}

/**
 * Resolves the password: from the URL, else from the password file, else from the pgpass
 * file, else none. A password read from a file is handed to `onSecret` for masking.
 */
export async function resolvePassword(
  target: DbTarget,
  options: ConnectOptions = {},
): Promise<string | undefined> {
  return (await findPassword(target, options)).password;
}

const passwordSources = new WeakMap<Sql, string>();

/** Where the pool's password came from: "the URL", "the password file /path", ... */
export function passwordSourceOf(sql: Sql): string | undefined {
  return passwordSources.get(sql);
}

let guarded = false;

/** The array-types query postgres.js runs on every fresh connection (fetch_types). */
export function isTypeFetch(err: unknown): boolean {
  const query = (err as { query?: unknown } | null)?.query;
  return typeof query === "string" && query.includes("a.typcategory = 'A'") &&
    query.includes("pg_catalog.pg_type");
}

/**
 * A connection-level failure (reset, destroyed, admin shutdown, class 08): what the
 * driver's internal type fetch rejects with when a fresh connection is lost. Every query
 * of meter-sync is awaited, so such a rejection that nobody handled can only be the
 * driver's own (its stack does not always name postgres.js: a bare ECONNRESET).
 */
export function isConnectionLoss(err: unknown): boolean {
  const code = String((err as { code?: unknown } | null)?.code ?? "");
  return /^(ECONNRESET|EPIPE|ECONNREFUSED|CONNECTION_\w+|08\w{3}|57P0[1-3])$/.test(code);
}

/**
 * Two postgres.js 3.4.9 bugs that would end the process:
 * - when a connection dies inside sql.begin(), the driver still writes its ROLLBACK to
 *   that connection from a setImmediate, on a socket it has already set to null. The
 *   TypeError must not escape the immediate: Deno's immediate queue would then keep the
 *   immediates behind it as its next batch, and when one of them is cleared meanwhile
 *   (another connection closing clears its pending write) the next turn of the queue dies
 *   of a TypeError of its own (found by the chaos run, a gateway server stopped mid-batch).
 *   So the immediates are scheduled through a wrapper that catches this one error in place;
 * - the array-types query of a fresh connection runs from a promise nobody handles
 *   (`return fetchArrayTypes()` in a message handler): a connection lost during it
 *   (a terminated backend, a restarting server; found by the chaos run) is an unhandled
 *   rejection. The connection is gone; the next query reconnects or fails on its own.
 * Only those exact errors are swallowed.
 */
export function guardDriverBug(): void {
  if (guarded) return;
  guarded = true;
  globalThis.addEventListener("unhandledrejection", (event) => {
    if (isTypeFetch(event.reason) || isConnectionLoss(event.reason)) event.preventDefault();
  });
  const schedule = globalThis.setImmediate;
  const guardedSchedule = (callback: (...args: unknown[]) => void, ...args: unknown[]) =>
    schedule((...given: unknown[]) => {
      try {
        callback(...given);
      } catch (err) {
        if (!isWriteToClosedSocket(err)) throw err;
      }
    }, ...args);
  globalThis.setImmediate = Object.assign(guardedSchedule, schedule) as typeof setImmediate;
}

/** The driver's write to a connection it has already closed (see {@link guardDriverBug}). */
function isWriteToClosedSocket(err: unknown): boolean {
  return err instanceof TypeError &&
    err.message === "Cannot read properties of null (reading 'write')" &&
    /postgres[\\/]src[\\/]connection\.js/.test(err.stack ?? "");
}

/**
 * A postgres.js pool for the target. Connections open lazily, on the first query; the
 * password and certificate files are read now, so that a problem with them is a
 * ConfigError before anything is sent.
 */
export async function connect(target: DbTarget, options: ConnectOptions = {}): Promise<Sql> {
  guardDriverBug();
  const { password, source } = await findPassword(target, options);
  const plan = await tlsPlan(target);
  const sockets = new Set<net.Socket>();
  const sql = postgres({
    host: target.host,
    port: target.port,
    user: target.user,
    pass: password ?? "",
    database: target.database,
    // TLS is negotiated by openSocket(); postgres.js sees a ready socket either way.
    ssl: false,
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
        let socket: HostSocket;
        try {
          socket = await openSocket(target, plan);
        } catch (err) {
          return failedSocket(err instanceof Error ? err : new Error(String(err)), target);
        }
        sockets.add(socket);
        socket.once("close", () => sockets.delete(socket));
        // One CopyData message per COPY batch instead of one per row (see the module).
        return noteWrites(coalesceCopyData(socket, socket.reads));
      },
    } as Record<string, unknown>),
  });
  socketsOf.set(sql, sockets);
  passwordSources.set(sql, source);
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
    end: () => closePool(sql),
  };
}

/**
 * Closes a pool, giving queries still running 5 s to finish. A query whose
 * socket died under it stays its connection's current query inside postgres.js, and
 * end() waits for it until the timeout: 5 s added to every cycle that lost the remote
 * during its heartbeat. With no socket of the pool still open nothing can finish, so
 * the pool closes at once.
 */
export function closePool(sql: Sql): Promise<void> {
  const open = [...(socketsOf.get(sql) ?? [])].some((socket) => !socket.destroyed);
  return sql.end({ timeout: open ? 5 : 0 });
}
