/** The run mode's HTTP endpoint: /metrics for Prometheus, /healthz for probes, /status as JSON. */
import { getLogger } from "@logtape/logtape";
import { ConfigError, describeError } from "./errors.ts";
import { redactText } from "./redact.ts";

const log = getLogger(["meter-sync", "http"]);

/** Prometheus text exposition format 0.0.4. */
export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";
const JSON_CONTENT_TYPE = "application/json";
const ROUTES = ["/metrics", "/healthz", "/status"] as const;

/** Where the server listens. */
export interface ListenAddress {
  hostname: string;
  port: number;
}

/** Options of {@link startHttpServer}. */
export interface HttpServerOptions {
  /** Loopback unless the operator said otherwise: the caller passes 127.0.0.1 by default. */
  hostname: string;
  /** 0 picks a free port; {@link HttpServer.addr} tells which. */
  port: number;
  /** Aborting it stops the server: in-flight requests finish, then `finished` resolves. */
  signal: AbortSignal;
  /** The body of GET /metrics. */
  metrics: () => string | Promise<string>;
  /** GET /healthz: the status code, and a body such as `{ ok, reasons }`. */
  health: () => Promise<{ status: 200 | 503; body: object }>;
  /** The body of GET /status: the object `status --json` prints. */
  status: () => Promise<object>;
  /** Passwords to mask in every JSON body and error (lib/redact.ts secretsOf). @default [] */
  secrets?: readonly string[];
  /** A handler that has not answered after this long gets a 503. @default 10000 */
  timeoutMs?: number;
  /** Called once the socket is bound, with the real port. */
  onListen?: (addr: ListenAddress) => void;
}

/** A running server. */
export interface HttpServer {
  /** Resolves when the server has stopped after the signal was aborted. */
  finished: Promise<void>;
  addr: ListenAddress;
}

/** "127.0.0.1:9464", "[::1]:9464". */
function hostPort({ hostname, port }: ListenAddress): string {
  return hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
}

/** Why the socket could not be bound, in the words an operator searches for. */
function listenProblem(err: unknown): string {
  if (err instanceof Deno.errors.AddrInUse) {
    return "address in use (another process holds that port; choose another with --http)";
  }
  if (err instanceof Deno.errors.AddrNotAvailable) {
    return "address not available (not an address of this host)";
  }
  if (err instanceof Deno.errors.PermissionDenied || err instanceof Deno.errors.NotCapable) {
    return `permission denied (${describeError(err)})`;
  }
  return describeError(err);
}

class HandlerTimeout extends Error {
  override name = "HandlerTimeout";
}

async function within<T>(ms: number, work: () => T | Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      Promise.resolve().then(work),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new HandlerTimeout(`no answer within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts the endpoint. Throws a {@link ConfigError} with one line ("cannot listen on
 * 127.0.0.1:9464: address in use") when the socket cannot be bound. A handler that throws or
 * hangs gets a 500 or 503 with a one-line JSON error; the server itself keeps serving.
 */
export function startHttpServer(options: HttpServerOptions): HttpServer {
  const secrets = options.secrets ?? [];
  const timeoutMs = options.timeoutMs ?? 10_000;
  const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
    new Response(redactText(JSON.stringify(body), secrets) + "\n", {
      status,
      headers: { "content-type": JSON_CONTENT_TYPE, "cache-control": "no-store", ...headers },
    });

  const route = async (path: string): Promise<Response> => {
    switch (path) {
      case "/metrics":
        return new Response(await options.metrics(), {
          headers: { "content-type": METRICS_CONTENT_TYPE, "cache-control": "no-store" },
        });
      case "/healthz": {
        const { status, body } = await options.health();
        return json(status, body);
      }
      default:
        return json(200, await options.status());
    }
  };

  const handler = async (req: Request): Promise<Response> => {
    const path = new URL(req.url).pathname;
    if (!(ROUTES as readonly string[]).includes(path)) {
      return json(404, { error: `not found: ${path}`, routes: ROUTES });
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      return json(405, { error: `method not allowed: ${req.method}` }, { allow: "GET, HEAD" });
    }
    let res: Response;
    try {
      res = await within(timeoutMs, () => route(path));
    } catch (err) {
      const error = redactText(describeError(err), secrets);
      log.warn("{path} failed: {error}", { path, error });
      res = json(err instanceof HandlerTimeout ? 503 : 500, { error: `${path}: ${error}` });
    }
    return req.method === "HEAD" ? new Response(null, res) : res;
  };

  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = Deno.serve({
      hostname: options.hostname,
      port: options.port,
      signal: options.signal,
      // Replaces Deno's own "Listening on ..." line on stdout; the caller logs it.
      onListen: (addr) => options.onListen?.({ hostname: addr.hostname, port: addr.port }),
      // A backstop: handler() catches its own errors.
      onError: (err) => json(500, { error: redactText(describeError(err), secrets) }),
    }, handler);
  } catch (err) {
    throw new ConfigError(
      `cannot listen on ${hostPort(options)}: ${listenProblem(err)}`,
      { cause: err },
    );
  }
  return {
    finished: server.finished,
    addr: { hostname: server.addr.hostname, port: server.addr.port },
  };
}
