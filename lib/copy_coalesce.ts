/**
 * Gathers the server's CopyData messages into one before postgres.js sees them.
 *
 * A COPY ... TO STDOUT sends one CopyData message per row, and postgres.js handles each on
 * its own (three buffer slices, a dispatch, a push into a Readable and its 'data' event),
 * and copyOut() then copied the pieces into one batch: for batches of rows of 100+ columns
 * a large part of the agent's CPU time (measured: 2.9-3.2 s before, 2.3-2.8 s after, for
 * 200,000 readings at batch 5000). The filter sits between the socket and the driver's 'data'
 * handler and copies the payload of a run of CopyData messages straight into one buffer,
 * which it hands on as a single CopyData message when the run ends (CopyDone, an error, any
 * other message) or reaches {@link GATHER_LIMIT}. COPY data is a byte stream whose message
 * boundaries carry no meaning (splitRows() reads a batch as one buffer), so the driver's
 * stream yields the same bytes, for a batch in one piece. Every other message goes through
 * unchanged and in order; a chunk without CopyData is handed on as it came.
 *
 * A reader done with a batch gives its memory back ({@link recycleCopyData}), and the next
 * runs are gathered into it: on this machine (a virtual machine) fresh memory costs a page
 * fault of about 10 µs per 4 KB on first touch, and a batch of 10,000 readings fills 11 MB
 * (measured, three A/B pairs of runs, 200,000 readings at batch 10000: the agent's page faults
 * 61,000-64,000 -> 44,000-46,000, its CPU time 2.7-3.2 -> 2.4-2.6 s, its peak RSS 235-242 ->
 * 209-218 MiB).
 */
import { Buffer } from "node:buffer";
import type { ReusedReads } from "./socket_reads.ts";

/** The CopyData message type ('d'). */
const COPY_DATA = 0x64;

/** Payload bytes after which a run is handed on in parts (a COPY read as a stream). */
const GATHER_LIMIT = 32 * 1024 * 1024;

/** The smallest buffer a run starts with. */
const MIN_BUFFER = 64 * 1024;

type DataHandler = (chunk: Buffer) => void;

/** Buffers given back by their readers, for the next runs: at most {@link SPARE_MAX}. */
const spare: Buffer[] = [];
/**
 * Two: the batch that travels while the next is claimed gives its memory back before the
 * one after is claimed. The largest are kept.
 */
const SPARE_MAX = 2;
/** The backing stores of the buffers runs were gathered in: only those are taken back. */
const issued = new WeakSet<ArrayBufferLike>();
/** The size of the last run handed on, on any socket: the next one's first guess. */
let expected = MIN_BUFFER;
/** The rows the COPY being read sends at most, 0 when unknown (see {@link expectCopyRows}). */
let rowsHint = 0;

/**
 * Tells the coalescers how many rows the COPY ... TO STDOUT about to start sends at most (a
 * claim's LIMIT; 0: unknown). A run that outgrows its first buffer then grows once, to what its
 * first rows promise for all of them, rather than doubling again and again: each doubling
 * copies what came so far into fresh memory. It matters for the first batch of a process,
 * which has no run before it to go by: at batch 20000 its buffers grew from 64 KB to 37 MB,
 * touching some 60 MB, and the agent's peak RSS was 146-147 MiB instead of 125-126 (200,000
 * readings, eight runs each; the first batch some 0.1 s sooner).
 */
export function expectCopyRows(rows: number): void {
  rowsHint = rows;
}

/** Where the smallest spare buffer of at least `least` bytes is, or -1. */
function smallestSpare(least: number): number {
  let best = -1;
  for (let i = 0; i < spare.length; i++) {
    if (spare[i].length >= least && (best < 0 || spare[i].length < spare[best].length)) best = i;
  }
  return best;
}

/** A buffer of at least `least` bytes: the smallest spare one that fits, else a new one. */
function takeBuffer(least: number): Buffer {
  const best = smallestSpare(least);
  if (best >= 0) return spare.splice(best, 1)[0];
  // An eighth more than asked for: COPY batches are alike, not the same size.
  const buffer = Buffer.allocUnsafe(least + (least >> 3));
  issued.add(buffer.buffer);
  return buffer;
}

/**
 * Gives the memory of a run back once nothing refers to any of its bytes any more: the
 * caller promises that neither it nor anything it handed the bytes to reads them again,
 * since the next run is gathered into them. Bytes of any other buffer are ignored, and so
 * is a buffer already given back.
 */
export function recycleCopyData(bytes: Uint8Array): void {
  const backing = bytes.buffer;
  if (!issued.has(backing) || spare.some((b) => b.buffer === backing)) return;
  spare.push(Buffer.from(backing));
  if (spare.length > SPARE_MAX) spare.splice(smallestSpare(0), 1);
}

/**
 * Wraps a 'data' handler: `next` gets the same protocol stream, with each run of CopyData
 * messages gathered into one message (or one per {@link GATHER_LIMIT} bytes). `copyPassed`:
 * the chunks are a reused buffer's (see socket_reads.ts), so the bytes handed on unchanged
 * are handed on as copies.
 */
export function copyDataCoalescer(
  next: DataHandler,
  limit = GATHER_LIMIT,
  copyPassed = false,
): DataHandler {
  // Where the stream is, carried from chunk to chunk (a message may span several).
  /** Header bytes of the current message read so far: 0 at a type byte, then 1 to 5. */
  let header = 0;
  /** The length field, assembled byte by byte. */
  let length = 0;
  /** Body bytes of the current message still to come. */
  let left = 0;
  /** The current message is CopyData. */
  let copying = false;

  /** The run being gathered: 5 bytes kept free for the header, then the payload. */
  let run: Buffer | undefined;
  let size = 0;
  /** CopyData messages begun in this run: one per row of a COPY ... TO STDOUT. */
  let rows = 0;

  const gather = (bytes: Uint8Array) => {
    // The last run's size is the first guess: COPY batches tend to be alike.
    if (!run) run = takeBuffer(5 + Math.max(Math.min(limit, expected), bytes.length));
    else if (5 + size + bytes.length > run.length) {
      const promised = rowsHint > rows
        ? Math.min(limit, Math.ceil(((size + bytes.length) / rows) * rowsHint))
        : 0;
      const grown = takeBuffer(Math.max(2 * run.length, 5 + size + bytes.length, 5 + promised));
      grown.set(run.subarray(0, 5 + size));
      recycleCopyData(run);
      run = grown;
    }
    run.set(bytes, 5 + size);
    size += bytes.length;
  };
  const handOn = () => {
    if (!run) return;
    const message = run.subarray(0, 5 + size);
    message[0] = COPY_DATA;
    message.writeUInt32BE(size + 4, 1);
    expected = Math.max(MIN_BUFFER, size);
    run = undefined;
    size = 0;
    rows = 0;
    next(message);
  };

  return (chunk: Buffer) => {
    const n = chunk.length;
    const bytes = new Uint8Array(chunk.buffer, chunk.byteOffset, n);
    /** Start of the bytes to pass on unchanged (-1: none pending). */
    let pass = left > 0 || header > 0 ? (copying ? -1 : 0) : -1;
    const passOn = (end: number) => {
      if (pass < 0 || end <= pass) return;
      const part = pass === 0 && end === n ? chunk : chunk.subarray(pass, end);
      next(copyPassed ? Buffer.from(part) : part);
      pass = -1;
    };
    let i = 0;
    while (i < n) {
      if (left > 0) {
        const take = Math.min(left, n - i);
        if (copying) {
          gather(bytes.subarray(i, i + take));
          if (size >= limit) handOn();
        }
        i += take;
        left -= take;
        if (left === 0) header = 0;
        continue;
      }
      if (header === 0) {
        copying = bytes[i] === COPY_DATA;
        if (copying) {
          passOn(i); // what came before goes first; the header is dropped
          rows++;
        } else {
          handOn(); // a run ends
          if (pass < 0) pass = i;
        }
        header = 1;
        length = 0;
        i++;
        continue;
      }
      length = length * 256 + bytes[i];
      header++;
      i++;
      if (header === 5) {
        left = Math.max(0, length - 4);
        if (left === 0) header = 0;
      }
    }
    passOn(n);
  };
}

/**
 * Puts the coalescer between a socket and the 'data' handler postgres.js registers on it
 * (and takes it off again when the driver removes its handler). A socket that reads into a
 * reused buffer (`reads`) emits no 'data' events: the handler gets its reads instead.
 */
export function coalesceCopyData<S extends { on: unknown; removeListener: unknown }>(
  socket: S,
  reads?: ReusedReads,
): S {
  type Listener = (...args: unknown[]) => void;
  const target = socket as unknown as {
    on(event: string, fn: Listener): unknown;
    removeListener(event: string, fn: Listener): unknown;
    off(event: string, fn: Listener): unknown;
  };
  const on = target.on;
  const removeListener = target.removeListener;
  const wrapped = new Map<Listener, Listener>();
  target.on = function (event, fn) {
    if (event !== "data") return on.call(this, event, fn);
    if (reads) {
      reads.consume(copyDataCoalescer(fn as DataHandler, GATHER_LIMIT, true), fn);
      return this;
    }
    const filter = copyDataCoalescer(fn as DataHandler) as Listener;
    wrapped.set(fn, filter);
    return on.call(this, event, filter);
  };
  target.removeListener = target.off = function (event, fn) {
    if (reads && event === "data") {
      reads.release(fn);
      return this;
    }
    const filter = event === "data" ? wrapped.get(fn) : undefined;
    if (filter) wrapped.delete(fn);
    return removeListener.call(this, event, filter ?? fn);
  };
  return socket;
}
