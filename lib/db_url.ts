/** Parses and validates a PostgreSQL connection URL into the settings meter-sync connects with. */
import { ConfigError } from "./errors.ts";
import { redactUrl } from "./redact.ts";

/** libpq's sslmode values. */
export type SslMode = "disable" | "allow" | "prefer" | "require" | "verify-ca" | "verify-full";

/** Where one database is and how to reach it. */
export interface DbTarget {
  /** Which setting it came from, for messages: LOCAL_DATABASE_URL or --local-url. */
  source: string;
  host: string;
  port: number;
  user: string;
  /** From the URL; when absent, looked up in the pgpass file at connect time. */
  password?: string;
  database: string;
  /** libpq's sslmode; `allow` behaves as `prefer` (TLS when the server offers it). */
  sslmode: SslMode;
  /** CA certificates (PEM) the server's certificate must chain to, or "system": the default store. */
  sslrootcert?: string;
  /** Client certificate (PEM), sent when the server asks for one; always with sslkey. */
  sslcert?: string;
  /** The client certificate's private key (PEM, unencrypted, mode 0600). */
  sslkey?: string;
  /** Seconds. @default 10 */
  connectTimeout: number;
  applicationName: string;
  /** The URL with its password masked: the only form that may be logged. */
  display: string;
}

const SSL_MODES: SslMode[] = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];
const KNOWN_PARAMS = new Set([
  "sslmode",
  "sslrootcert",
  "sslcert",
  "sslkey",
  "connect_timeout",
  "application_name",
  "user",
  "password",
  "dbname",
  "host",
  "port",
]);

/** Parses a postgres:// or postgresql:// URL; throws ConfigError naming the setting and the fix. */
export function parseDatabaseUrl(url: string, source: string): DbTarget {
  const example = "postgres://USER@HOST:5432/DATABASE";
  const shown = redactUrl(url);
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new ConfigError(`${source} is not a valid URL (${shown}); expected ${example}`);
  }
  if (u.protocol !== "postgres:" && u.protocol !== "postgresql:") {
    throw new ConfigError(
      `${source} must start with postgres:// or postgresql:// (got ${u.protocol}//...); expected ${example}`,
    );
  }
  for (const key of u.searchParams.keys()) {
    if (!KNOWN_PARAMS.has(key)) {
      throw new ConfigError(
        `${source} has an unsupported parameter "${key}"; supported: ${
          [...KNOWN_PARAMS].join(", ")
        }`,
      );
    }
  }
  const param = (k: string) => u.searchParams.get(k) ?? undefined;
  const decode = (s: string) => {
    try {
      return decodeURIComponent(s);
    } catch {
      throw new ConfigError(`${source} has a malformed %-escape (${shown})`);
    }
  };
  const host = param("host") ?? decode(u.hostname).replace(/^\[|\]$/g, "");
  if (!host) throw new ConfigError(`${source} names no host (${shown}); expected ${example}`);
  const portText = param("port") ?? (u.port || "5432");
  const port = Number(portText);
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new ConfigError(`${source} has an invalid port "${portText}"; use 1-65535`);
  }
  const user = param("user") ?? decode(u.username);
  if (!user) {
    throw new ConfigError(`${source} names no user (${shown}); expected ${example}`);
  }
  const database = param("dbname") ?? decode(u.pathname.replace(/^\//, ""));
  if (!database) {
    throw new ConfigError(`${source} names no database (${shown}); expected ${example}`);
  }
  const password = param("password") ?? (u.password ? decode(u.password) : undefined);
  const sslrootcert = param("sslrootcert") || undefined;
  // As in libpq 16: sslrootcert=system means the default CA store, and only makes sense
  // with the host name checked too, so it implies verify-full and refuses anything weaker.
  const sslmode =
    (param("sslmode") ?? (sslrootcert === "system" ? "verify-full" : "prefer")) as SslMode;
  if (!SSL_MODES.includes(sslmode)) {
    throw new ConfigError(
      `${source} has sslmode=${sslmode}; use one of ${SSL_MODES.join(", ")}`,
    );
  }
  if (sslrootcert === "system" && sslmode !== "verify-full") {
    throw new ConfigError(
      `${source} has sslrootcert=system with sslmode=${sslmode}; the system CA store is only safe with sslmode=verify-full`,
    );
  }
  const sslcert = param("sslcert") || undefined;
  const sslkey = param("sslkey") || undefined;
  if ((sslcert === undefined) !== (sslkey === undefined)) {
    throw new ConfigError(
      `${source} has ${
        sslcert ? "sslcert without sslkey" : "sslkey without sslcert"
      }; a client certificate needs both`,
    );
  }
  const timeoutText = param("connect_timeout") ?? "10";
  const connectTimeout = Number(timeoutText);
  if (!Number.isFinite(connectTimeout) || connectTimeout <= 0 || connectTimeout > 3600) {
    throw new ConfigError(
      `${source} has connect_timeout=${timeoutText}; use seconds from 1 to 3600`,
    );
  }
  return {
    source,
    host,
    port,
    user,
    password,
    database,
    sslmode,
    sslrootcert,
    sslcert,
    sslkey,
    connectTimeout,
    applicationName: param("application_name") ?? "meter-sync",
    display: shown,
  };
}
