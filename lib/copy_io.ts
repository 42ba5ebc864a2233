/** COPY streams over postgres.js, with the driver's two COPY pitfalls handled. */
import type postgres from "postgres";
import { Buffer } from "node:buffer";
import { expectCopyRows, recycleCopyData } from "./copy_coalesce.ts";
import { writerOf } from "./socket_writes.ts";

/** A connection or a transaction: COPY works on both. */
type Tx = postgres.Sql | postgres.TransactionSql;

/** Bytes per CopyData message. */
const COPY_CHUNK = 64 * 1024;

/** The CopyData message type ('d'). */
const COPY_DATA = 0x64;

type CopyQuery = Promise<unknown> & {
  reject: (err: unknown) => void;
  readable(): Promise<NodeJS.ReadableStream>;
  writable(): Promise<NodeJS.WritableStream>;
};

/**
 * Reads a COPY ... TO STDOUT into one buffer (a batch is bounded by --batch-size). `rows`:
 * how many rows it sends at most, when known (see expectCopyRows).
 */
export async function copyOut(tx: Tx, statement: string, rows = 0): Promise<Uint8Array> {
  expectCopyRows(rows);
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
  // The socket's filter hands a batch on in one piece (see copy_coalesce.ts): no copy then.
  if (chunks.length === 1) return chunks[0];
  const data = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) {
    data.set(chunk, at);
    at += chunk.length;
    recycleCopyData(chunk); // copied: nothing reads it again
  }
  return data;
}

/** A COPY ... FROM STDIN the server has started, waiting for its data. */
export interface OpenCopy {
  /**
   * Writes the payload and ends the COPY; resolves once the server has committed it.
   * `onSent` runs as soon as the end of the COPY (CopyDone) is on its way, before the answer.
   */
  write(payload: Uint8Array, onSent?: () => void): Promise<void>;
  /** Abandons it (CopyFail): the server rolls it back and answers with an error, ignored. */
  cancel(): void;
  /** Whether the last write() went straight onto the connection's socket (see write()). */
  readonly direct: boolean;
}

/**
 * Starts a COPY ... FROM STDIN. postgres.js resolves the query with the stream before the
 * server answers, and an error that arrives after end() neither fails the stream nor the
 * (already resolved) query: it is only handed to query.reject, which we wrap so that a
 * rejected COPY fails its write() instead of hanging.
 *
 * Issued while an earlier COPY on the same connection awaits its answer, the statement is
 * pipelined behind it: the server starts it once the earlier one has committed, and the
 * round trip that starting it costs is spent while the earlier one travels.
 */
export async function openCopyIn(tx: Tx, statement: string): Promise<OpenCopy> {
  const query = tx.unsafe(statement) as unknown as CopyQuery;
  let fail: (err: unknown) => void = () => {};
  let failure: unknown;
  const reject = query.reject;
  query.reject = (err: unknown) => {
    failure ??= err;
    fail(err);
    reject(err);
  };
  const stream = await query.writable() as NodeJS.WritableStream & {
    _final: (callback: (err?: Error | null) => void) => void;
    _destroy: (err: Error | null, callback: (err?: Error | null) => void) => void;
    destroy(err?: Error): void;
  };
  // The driver's stream destroys itself once finished (autoDestroy), and its destroy writes
  // a CopyFail even then. Harmless after a lone COPY (the server ignores it), but a COPY
  // pipelined behind would take it as its own and fail: only a real abort sends one.
  const destroy = stream._destroy;
  stream._destroy = function (err, callback) {
    if (err === null || err === undefined) return callback(null);
    destroy.call(this, err, callback);
  };
  // From now on: a lost connection destroys the stream, whose 'error' needs a listener.
  stream.on("error", (err) => {
    failure ??= err;
    fail(failure);
  });
  let direct = false;
  return {
    get direct() {
      return direct;
    },
    write: (payload, onSent) =>
      new Promise<void>((resolve, rejectCopy) => {
        if (failure) return rejectCopy(failure);
        fail = rejectCopy;
        stream.on("finish", () => resolve());
        if (onSent) {
          // The driver's final() writes CopyDone; 'finish' waits for the server's answer.
          const final = stream._final;
          stream._final = function (callback) {
            final.call(this, callback);
            // Not after an error: nothing may follow a COPY that the server has refused
            // before the engine has seen why.
            if (!failure) onSent();
          };
        }
        // The driver's stream frames each chunk as a CopyData message by copying it into
        // fresh memory: 11 MB per batch of 10,000 readings, each page a page fault on this
        // machine (0.3 CPU s of the agent's 2.3 for 200,000 readings, measured 2026-11-26).
        // So the data goes straight onto the socket the stream writes to, found by watching
        // where an empty CopyData message (which the server takes as no data) goes; the
        // stream's end() then writes CopyDone after it, in order. Should the driver ever write
        // elsewhere or later, the chunks go through the stream as before.
        const socket = writerOf(() => stream.write(new Uint8Array(0)));
        direct = socket !== undefined;
        // Slices, not one giant CopyData message: the server parses rows as they arrive
        // instead of waiting for the whole batch.
        for (let at = 0; at < payload.length; at += COPY_CHUNK) {
          const part = payload.subarray(at, at + COPY_CHUNK);
          if (!socket) {
            stream.write(part);
            continue;
          }
          const header = Buffer.allocUnsafe(5);
          header[0] = COPY_DATA;
          header.writeUInt32BE(part.length + 4, 1);
          socket.write(header);
          socket.write(part);
        }
        stream.end();
      }),
    cancel: () => {
      fail = () => {};
      stream.destroy(new Error("meter-sync: COPY not needed"));
    },
  };
}

/** Writes a payload through a new COPY ... FROM STDIN (see {@link openCopyIn}). */
export async function copyIn(tx: Tx, statement: string, payload: Uint8Array): Promise<void> {
  await (await openCopyIn(tx, statement)).write(payload);
}
