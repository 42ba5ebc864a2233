/** A TCP proxy on loopback that delays every byte by a fixed time each way: a slow link without netem. */

/** A running proxy. */
export interface DelayProxy {
  readonly hostname: string;
  readonly port: number;
  /** Connections accepted so far. */
  readonly accepted: number;
  /** Stops listening and closes every open connection. */
  close(): Promise<void>;
}

/** Options of {@link startDelayProxy}. */
export interface DelayProxyOptions {
  /** Delay added to each direction, in ms: half the round-trip time to simulate. */
  oneWayMs: number;
  /** Port to listen on. @default a free port */
  port?: number;
  /**
   * Bytes waiting in one direction before the proxy stops reading from the sender
   * (backpressure instead of an unbounded queue). @default 64 MiB
   */
  maxQueuedBytes?: number;
}

interface Chunk {
  due: number;
  /** null: the sender closed its side. */
  data: Uint8Array | null;
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

async function writeAll(conn: Deno.Conn, data: Uint8Array): Promise<void> {
  for (let at = 0; at < data.length;) at += await conn.write(data.subarray(at));
}

/**
 * Moves bytes from src to dst, each chunk no earlier than `delayMs` after it was read.
 * Reading and writing run apart, joined by a queue of timestamped chunks, so the delay
 * adds latency without limiting throughput (a sleep per chunk would serialize it).
 */
async function delayedPump(
  src: Deno.Conn,
  dst: Deno.Conn,
  delayMs: number,
  maxQueued: number,
): Promise<boolean> {
  const queue: Chunk[] = [];
  let queued = 0;
  let wakeWriter: (() => void) | undefined;
  let wakeReader: (() => void) | undefined;
  const push = (chunk: Chunk) => {
    queue.push(chunk);
    queued += chunk.data?.length ?? 0;
    wakeWriter?.();
    wakeWriter = undefined;
  };

  const reading = (async () => {
    const buffer = new Uint8Array(256 * 1024);
    try {
      for (;;) {
        const n = await src.read(buffer);
        if (n === null) break;
        push({ due: performance.now() + delayMs, data: buffer.slice(0, n) });
        while (queued > maxQueued) await new Promise<void>((resolve) => (wakeReader = resolve));
      }
    } catch {
      // reset or closed: treated as the end of the stream
    }
    push({ due: performance.now() + delayMs, data: null });
  })();

  const writing = (async () => {
    for (;;) {
      if (queue.length === 0) {
        await new Promise<void>((resolve) => (wakeWriter = resolve));
        continue;
      }
      const head = queue[0];
      const wait = head.due - performance.now();
      if (wait > 0) await sleep(wait);
      queue.shift();
      if (head.data === null) {
        await dst.closeWrite().catch(() => {});
        return;
      }
      await writeAll(dst, head.data);
      queued -= head.data.length;
      if (queued <= maxQueued) {
        wakeReader?.();
        wakeReader = undefined;
      }
    }
  })();

  try {
    await Promise.all([reading, writing]);
    return true;
  } catch {
    return false; // the receiver went away
  }
}

/**
 * Listens on 127.0.0.1 and forwards every connection to `target`, delaying each
 * direction by `oneWayMs`. Only application bytes are delayed: TCP handshakes and ACKs
 * between the client and the proxy stay on loopback, so a real link's congestion
 * control and delayed-ACK behaviour are not reproduced, only its latency.
 */
export function startDelayProxy(
  target: { hostname: string; port: number },
  options: DelayProxyOptions,
): DelayProxy {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: options.port ?? 0 });
  const maxQueued = options.maxQueuedBytes ?? 64 * 1024 * 1024;
  const open = new Set<Deno.Conn>();
  const sessions = new Set<Promise<void>>();
  let accepted = 0;

  const closeQuietly = (conn: Deno.Conn) => {
    open.delete(conn);
    try {
      conn.close();
    } catch {
      // already closed
    }
  };

  const session = async (client: Deno.TcpConn) => {
    let server: Deno.TcpConn;
    try {
      server = await Deno.connect({ hostname: target.hostname, port: target.port });
    } catch {
      closeQuietly(client);
      return;
    }
    open.add(server);
    // The proxy itself must not hold small writes back (Nagle): it only adds its delay.
    client.setNoDelay(true);
    server.setNoDelay(true);
    // A direction that fails (a reset) ends the whole session, as it would on a real link.
    const pump = (src: Deno.Conn, dst: Deno.Conn) =>
      delayedPump(src, dst, options.oneWayMs, maxQueued).then((ok) => {
        if (!ok) {
          closeQuietly(client);
          closeQuietly(server);
        }
      });
    await Promise.all([pump(client, server), pump(server, client)]);
    closeQuietly(client);
    closeQuietly(server);
  };

  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        accepted++;
        open.add(conn);
        const s = session(conn);
        sessions.add(s);
        s.finally(() => sessions.delete(s));
      }
    } catch {
      // listener closed
    }
  })();

  return {
    hostname: "127.0.0.1",
    port: (listener.addr as Deno.NetAddr).port,
    get accepted() {
      return accepted;
    },
    async close() {
      try {
        listener.close();
      } catch {
        // already closed
      }
      for (const conn of [...open]) closeQuietly(conn);
      await accepting;
      await Promise.allSettled([...sessions]);
    },
  };
}

/** The same URL, reached through the proxy (or as it is without one). */
export function viaProxy(url: string, proxy: DelayProxy | undefined): string {
  if (!proxy) return url;
  const u = new URL(url);
  u.hostname = proxy.hostname;
  u.port = String(proxy.port);
  return u.toString();
}
