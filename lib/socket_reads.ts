/**
 * A socket's reads into one buffer of its own, reused for every read (Node's `onread`
 * option of net.connect, which Deno's Node layer implements).
 *
 * Without it, Deno's Node layer reads every chunk into fresh memory, and on this machine (a
 * virtual machine) the first touch of each fresh 4 KB page costs a page fault of about 10 µs:
 * reading 230 MB through 'data' events took 1.2-1.3 CPU seconds and 63,000 page faults, and
 * through one reused buffer 0.17 s and 4,000 (a bare socket, loopback, measured 2026-11-26).
 * The consumer gets a view of the buffer that the next read overwrites: it must copy what it
 * keeps (the CopyData coalescer copies every byte once anyway, into the batch's memory).
 */
import { Buffer } from "node:buffer";

/** Bytes per read. */
const READ_BUFFER = 256 * 1024;

type Consumer = (bytes: Buffer) => void;

export interface ReusedReads {
  /** The `onread` option for net.connect. */
  readonly onread: { buffer: Buffer; callback: (n: number, buf: Buffer) => boolean };
  /**
   * Hands every read from now on to `fn`, first any bytes read while nobody consumed them.
   * `owner` names who registered it, for {@link ReusedReads.release}.
   */
  consume(fn: Consumer, owner?: unknown): void;
  /** Stops handing reads to the consumer `owner` registered (any other call is ignored). */
  release(owner: unknown): void;
}

export function reusedReads(size = READ_BUFFER): ReusedReads {
  let consumer: Consumer | undefined;
  let owner: unknown;
  /** Copies of reads that came while nobody consumed them. */
  let early: Buffer[] = [];
  return {
    onread: {
      buffer: Buffer.allocUnsafe(size),
      callback: (n, buf) => {
        const bytes = buf.subarray(0, n);
        if (consumer) consumer(bytes);
        else early.push(Buffer.from(bytes));
        return true;
      },
    },
    consume(fn, who) {
      consumer = fn;
      owner = who;
      const pending = early;
      early = [];
      for (const bytes of pending) fn(bytes);
    },
    release(who) {
      if (consumer && who === owner) consumer = owner = undefined;
    },
  };
}
