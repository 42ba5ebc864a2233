/**
 * COPY data as PostgreSQL writes it (text or binary format): split into rows, the key
 * read off each row, and subsets of rows put back together, without ever parsing a
 * value into a JS Date or Number.
 */

/** Which COPY format a batch travels in. */
export type CopyFormat = "binary" | "text";

/** PGCOPY\n\377\r\n\0, then flags (int32 0) and the header extension length (int32 0). */
export const BINARY_HEADER = new Uint8Array([
  0x50,
  0x47,
  0x43,
  0x4f,
  0x50,
  0x59,
  0x0a,
  0xff,
  0x0d,
  0x0a,
  0x00,
  0,
  0,
  0,
  0,
  0,
  0,
  0,
  0,
]);
/** The int16 -1 that ends binary COPY data. */
export const BINARY_TRAILER = new Uint8Array([0xff, 0xff]);

/** A batch of COPY data and where each row lies in it. */
export interface CopyBatch {
  format: CopyFormat;
  data: Uint8Array;
  /** Offsets: row i is data[starts[i] .. ends[i]). */
  starts: number[];
  ends: number[];
  /** The first column of each row, as text (the key travels first). */
  keys: string[];
}

const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

function uuidText(b: Uint8Array, at: number): string {
  let s = "";
  for (let i = 0; i < 16; i++) {
    if (i === 4 || i === 6 || i === 8 || i === 10) s += "-";
    s += HEX[b[at + i]];
  }
  return s;
}

const decoder = new TextDecoder();

/**
 * Finds the rows of a COPY payload. Binary: the header, then per row an int16 field
 * count and per field an int32 length (-1 for NULL) and the bytes; the key (first
 * field) must be a uuid. Text: rows end with a newline (newlines inside values are
 * escaped), fields are separated by tabs.
 */
export function splitRows(data: Uint8Array, format: CopyFormat): CopyBatch {
  const starts: number[] = [];
  const ends: number[] = [];
  const keys: string[] = [];
  if (format === "text") {
    let at = 0;
    while (at < data.length) {
      let nl = data.indexOf(0x0a, at);
      if (nl < 0) nl = data.length;
      const tab = data.indexOf(0x09, at);
      const keyEnd = tab >= 0 && tab < nl ? tab : nl;
      starts.push(at);
      ends.push(Math.min(nl + 1, data.length));
      keys.push(decoder.decode(data.subarray(at, keyEnd)));
      at = nl + 1;
    }
    return { format, data, starts, ends, keys };
  }
  if (data.length === 0) return { format, data, starts, ends, keys };
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  for (let i = 0; i < 11; i++) {
    if (data[i] !== BINARY_HEADER[i]) throw new Error("not binary COPY data: bad signature");
  }
  let at = 11;
  at += 4; // flags
  const extension = view.getInt32(at);
  at += 4 + extension;
  for (;;) {
    const fields = view.getInt16(at);
    if (fields === -1) break;
    const start = at;
    at += 2;
    let key = "";
    for (let f = 0; f < fields; f++) {
      const len = view.getInt32(at);
      at += 4;
      if (f === 0) {
        if (len !== 16) throw new Error(`binary COPY key is ${len} bytes, expected a 16-byte uuid`);
        key = uuidText(data, at);
      }
      if (len > 0) at += len;
    }
    starts.push(start);
    ends.push(at);
    keys.push(key);
  }
  return { format, data, starts, ends, keys };
}

/** The rows from..to (exclusive) as a complete COPY payload of the batch's format. */
export function payloadOf(batch: CopyBatch, from: number, to: number): Uint8Array {
  if (from === 0 && to === batch.starts.length) return batch.data;
  const body = batch.data.subarray(batch.starts[from], batch.ends[to - 1]);
  if (batch.format === "text") return body;
  const out = new Uint8Array(BINARY_HEADER.length + body.length + BINARY_TRAILER.length);
  out.set(BINARY_HEADER, 0);
  out.set(body, BINARY_HEADER.length);
  out.set(BINARY_TRAILER, BINARY_HEADER.length + body.length);
  return out;
}

/** One row alone, as a complete payload. */
export function rowPayload(batch: CopyBatch, row: number): Uint8Array {
  return payloadOf(batch, row, row + 1);
}
