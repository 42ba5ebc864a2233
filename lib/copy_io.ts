/** COPY streams over postgres.js, with the driver's two COPY pitfalls handled. */
import type postgres from "postgres";

/** A connection or a transaction: COPY works on both. */
type Tx = postgres.Sql | postgres.TransactionSql;

/** Bytes per CopyData message. */
const COPY_CHUNK = 64 * 1024;

type CopyQuery = Promise<unknown> & {
  reject: (err: unknown) => void;
  readable(): Promise<NodeJS.ReadableStream>;
  writable(): Promise<NodeJS.WritableStream>;
};

/** Reads a COPY ... TO STDOUT into one buffer (a batch is bounded by --batch-size). */
export async function copyOut(tx: Tx, statement: string): Promise<Uint8Array> {
  const stream = await (tx.unsafe(statement) as unknown as CopyQuery).readable();
  const chunks: Uint8Array[] = [];
  let size = 0;
  await new Promise<void>((resolve, reject) => {
    // Flowing mode with a synchronous consumer: the buffer never fills, so postgres.js
    // never pauses the socket (and resumeSockets() covers the case where it did).
    stream.on("data", (chunk: Uint8Array) => {
      chunks.push(chunk);
      size += chunk.length;
    });
    stream.on("end", () => resolve());
    stream.on("error", (err) => reject(err));
  });
  const data = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    data.set(chunk, at);
    at += chunk.length;
  }
  return data;
}

/**
 * Writes a payload into an open COPY ... FROM STDIN. postgres.js resolves the query
 * with the stream before the server answers, and an error that arrives after end()
 * neither fails the stream nor the (already resolved) query: it is only handed to
 * query.reject, which we wrap so that a rejected COPY fails here instead of hanging.
 */
export async function copyIn(tx: Tx, statement: string, payload: Uint8Array): Promise<void> {
  const query = tx.unsafe(statement) as unknown as CopyQuery;
  let fail: (err: unknown) => void = () => {};
  let failure: unknown;
  const reject = query.reject;
  query.reject = (err: unknown) => {
    failure ??= err;
    fail(err);
    reject(err);
  };
  const stream = await query.writable();
  await new Promise<void>((resolve, rejectCopy) => {
    if (failure) return rejectCopy(failure);
    fail = rejectCopy;
    stream.on("error", (err) => rejectCopy(failure ?? err));
    stream.on("finish", () => resolve());
    // Slices, not one giant CopyData message: the server parses rows as they arrive
    // instead of waiting for the whole batch.
    for (let at = 0; at < payload.length; at += COPY_CHUNK) {
      stream.write(payload.subarray(at, at + COPY_CHUNK));
    }
    stream.end();
  });
}
