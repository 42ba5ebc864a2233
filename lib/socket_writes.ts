/**
 * Which socket a write went to: so that a COPY's data can go straight onto the connection's
 * socket instead of through postgres.js's COPY stream, which copies every chunk into a fresh
 * buffer to frame it as a CopyData message (for a batch of 10,000 readings, 11 MB of fresh
 * memory; see copy_io.ts).
 */

interface Writable {
  write: (...args: never[]) => unknown;
}

/** The socket that took the last write, while {@link writerOf} watches. */
let lastWriter: Writable | undefined;
let watching = false;

/** Notes the socket's writes for {@link writerOf}. */
export function noteWrites<S extends { write: unknown }>(socket: S): S {
  const target = socket as unknown as { write: (...args: unknown[]) => unknown };
  const write = target.write;
  target.write = function (this: Writable, ...args: unknown[]) {
    if (watching) lastWriter = this;
    return write.apply(this, args);
  };
  return socket;
}

/** The noted socket that `fn` wrote to, synchronously (the last one if several), if any. */
export function writerOf(fn: () => void): { write: (chunk: Uint8Array) => unknown } | undefined {
  lastWriter = undefined;
  watching = true;
  try {
    fn();
    return lastWriter as { write: (chunk: Uint8Array) => unknown } | undefined;
  } finally {
    watching = false;
    lastWriter = undefined;
  }
}
