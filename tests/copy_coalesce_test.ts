import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { EventEmitter } from "node:events";
import {
  coalesceCopyData,
  copyDataCoalescer,
  expectCopyRows,
  recycleCopyData,
} from "../lib/copy_coalesce.ts";
import { copyOut, openCopyIn } from "../lib/copy_io.ts";
import { reusedReads } from "../lib/socket_reads.ts";
import { connect } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { seededRandom } from "../scripts/seeded_random.ts";
import { freshDb } from "./_harness.ts";

/** One protocol message: type byte, int32 length (itself included), body. */
function message(type: string, body: Uint8Array): Uint8Array {
  const m = new Uint8Array(5 + body.length);
  m[0] = type.charCodeAt(0);
  new DataView(m.buffer).setUint32(1, body.length + 4);
  m.set(body, 5);
  return m;
}

interface Parsed {
  type: string;
  body: Uint8Array;
}

function parse(stream: Uint8Array): Parsed[] {
  const out: Parsed[] = [];
  const view = new DataView(stream.buffer, stream.byteOffset, stream.byteLength);
  for (let at = 0; at < stream.length;) {
    const len = view.getUint32(at + 1);
    out.push({ type: String.fromCharCode(stream[at]), body: stream.slice(at + 5, at + 1 + len) });
    at += 1 + len;
  }
  return out;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * What a reader of the stream sees: every other message as it is, CopyData bytes joined
 * (an empty CopyData message carries nothing).
 */
function meaning(messages: Parsed[]): { type: string; body: number[] }[] {
  const out: { type: string; body: number[] }[] = [];
  for (const m of messages) {
    if (m.type === "d" && m.body.length === 0) continue;
    const last = out[out.length - 1];
    if (m.type === "d" && last?.type === "d") last.body.push(...m.body);
    else out.push({ type: m.type, body: [...m.body] });
  }
  return out;
}

function randomStream(random: () => number): Uint8Array {
  const parts: Uint8Array[] = [];
  const types = ["d", "d", "d", "d", "D", "C", "Z", "H", "c", "E", "N"];
  for (let m = 0; m < 200; m++) {
    const type = types[Math.floor(random() * types.length)];
    const body = new Uint8Array(Math.floor(random() * (random() < 0.1 ? 3000 : 40)));
    for (let i = 0; i < body.length; i++) body[i] = Math.floor(random() * 256);
    parts.push(message(type, body));
  }
  // A run of CopyData always ends with another message (CopyDone, an error).
  parts.push(message("Z", new Uint8Array([73])));
  return concat(parts);
}

/** Feeds the stream in chunks cut at random points; returns the chunks the handler got. */
function feed(
  stream: Uint8Array,
  random: () => number,
  maxChunk: number,
  limit?: number,
): Buffer[] {
  const got: Buffer[] = [];
  const filter = copyDataCoalescer((chunk) => got.push(Buffer.from(chunk)), limit);
  for (let at = 0; at < stream.length;) {
    const size = 1 + Math.floor(random() * maxChunk);
    filter(Buffer.from(stream.subarray(at, at + size)));
    at += size;
  }
  return got;
}

Deno.test("the coalescer hands on the same messages in order, CopyData bytes unchanged, whatever the chunking", () => {
  for (let seed = 1; seed <= 120; seed++) {
    const random = seededRandom(seed);
    const stream = randomStream(random);
    const maxChunk = [2, 3, 7, 64, 1000, 70000][seed % 6];
    const chunks = feed(stream, random, maxChunk, seed % 2 ? undefined : 1 + (seed % 500));
    const out = concat(chunks);
    assert.deepEqual(meaning(parse(out)), meaning(parse(stream)), `seed ${seed}`);
  }
});

Deno.test("the coalescer merges the CopyData messages of a chunk into one", () => {
  const rows = Array.from({ length: 100 }, (_, i) => message("d", new Uint8Array([i, i, i])));
  const stream = concat([message("H", new Uint8Array(3)), ...rows, message("c", new Uint8Array())]);
  const messages = parse(concat(feed(stream, () => 0.999999, stream.length)));
  assert.deepEqual(messages.map((m) => m.type), ["H", "d", "c"]);
  assert.equal(messages[1].body.length, 300);
  assert.deepEqual([...messages[1].body.subarray(3, 6)], [1, 1, 1]);
});

Deno.test("a run of CopyData over many chunks is handed on as one message, or in parts of the limit", () => {
  const rows = Array.from(
    { length: 1000 },
    (_, i) => message("d", new Uint8Array(50).fill(i % 256)),
  );
  const stream = concat([message("H", new Uint8Array(3)), ...rows, message("c", new Uint8Array())]);
  const whole = parse(concat(feed(stream, seededRandom(7), 700)));
  assert.deepEqual(whole.map((m) => m.type), ["H", "d", "c"]);
  assert.equal(whole[1].body.length, 50_000);
  assert.deepEqual(whole[1].body, concat(rows.map((r) => r.subarray(5))));
  const parts = parse(concat(feed(stream, seededRandom(7), 700, 20_000)));
  assert.deepEqual(parts.map((m) => m.type), ["H", "d", "d", "d", "c"]);
  assert.ok(parts.slice(1, 3).every((m) => m.body.length >= 20_000));
});

Deno.test("a chunk without CopyData goes on as the very same buffer", () => {
  let got: Buffer | undefined;
  const filter = copyDataCoalescer((chunk) => (got = chunk));
  const chunk = Buffer.from(
    concat([message("D", new Uint8Array(9)), message("Z", new Uint8Array(1))]),
  );
  filter(chunk);
  assert.equal(got, chunk);
});

/**
 * A run of `rows` CopyData messages of `width` bytes each (row i filled with fill(i)), then
 * CopyDone, through `filter`; returns the CopyData message it handed on, not copied.
 */
function gatherRun(
  filter: (chunk: Buffer) => void,
  got: Buffer[],
  rows: number,
  width: number,
  fill: (i: number) => number,
): Buffer {
  const before = got.length;
  const stream = concat([
    ...Array.from({ length: rows }, (_, i) => message("d", new Uint8Array(width).fill(fill(i)))),
    message("c", new Uint8Array()),
  ]);
  for (let at = 0; at < stream.length; at += 65536) {
    filter(Buffer.from(stream.subarray(at, at + 65536)));
  }
  const handed = got.slice(before);
  assert.deepEqual(handed.map((m) => String.fromCharCode(m[0])), ["d", "c"]);
  return handed[0];
}

/** Whether a message's payload is these bytes (deepEqual takes seconds over megabytes). */
function carries(message: Buffer, bytes: Uint8Array): boolean {
  return message.subarray(5).equals(bytes);
}

/** The payload a run of gatherRun() should carry. */
function expectedRun(rows: number, width: number, fill: (i: number) => number): Uint8Array {
  return concat(Array.from({ length: rows }, (_, i) => new Uint8Array(width).fill(fill(i))));
}

Deno.test("a run given back is reused for the next run, which carries its own bytes", () => {
  // 3 MB runs: larger than anything other tests leave among the spare buffers.
  const got: Buffer[] = [];
  const filter = copyDataCoalescer((chunk) => got.push(chunk));
  const first = gatherRun(filter, got, 3000, 1000, (i) => i % 251);
  assert.ok(carries(first, expectedRun(3000, 1000, (i) => i % 251)));
  const kept = gatherRun(filter, got, 3000, 1000, (i) => i % 13);
  assert.notEqual(kept.buffer, first.buffer, "memory not given back is not reused");
  recycleCopyData(first.subarray(5));
  const next = gatherRun(filter, got, 3000, 1000, (i) => 255 - (i % 241));
  assert.equal(next.buffer, first.buffer);
  assert.ok(carries(next, expectedRun(3000, 1000, (i) => 255 - (i % 241))));
  assert.ok(carries(kept, expectedRun(3000, 1000, (i) => i % 13)));
});

Deno.test("told how many rows a COPY sends, the coalescer sizes the run from its first rows", () => {
  const got: Buffer[] = [];
  const filter = copyDataCoalescer((chunk) => got.push(chunk));
  try {
    gatherRun(filter, got, 1, 10, () => 1); // a small run last: no size to go by
    // 4.8 MB: doubling from 64 KB would end in a buffer of 9.4 MB (or twice a spare one).
    expectCopyRows(4800);
    const run = gatherRun(filter, got, 4800, 1000, (i) => i % 199);
    assert.ok(carries(run, expectedRun(4800, 1000, (i) => i % 199)));
    const payload = run.length - 5;
    assert.ok(
      run.buffer.byteLength <= 1.2 * payload,
      `a buffer of ${run.buffer.byteLength} bytes for ${payload}`,
    );
  } finally {
    expectCopyRows(0);
  }
});

Deno.test("a run given back twice goes to one run only; foreign bytes are not taken", () => {
  const got: Buffer[] = [];
  const filter = copyDataCoalescer((chunk) => got.push(chunk));
  const run = gatherRun(filter, got, 3100, 1000, (i) => i % 7);
  recycleCopyData(run.subarray(5));
  recycleCopyData(run.subarray(5));
  const foreign = new Uint8Array(8_000_000);
  recycleCopyData(foreign);
  // Two runs gathered at once, on two sockets: each needs a buffer of its own.
  const gotA: Buffer[] = [];
  const gotB: Buffer[] = [];
  const a = copyDataCoalescer((chunk) => gotA.push(chunk));
  const b = copyDataCoalescer((chunk) => gotB.push(chunk));
  const row = (fill: number) => Buffer.from(message("d", new Uint8Array(1000).fill(fill)));
  for (let i = 0; i < 3100; i++) {
    a(row(1));
    b(row(2));
  }
  a(Buffer.from(message("c", new Uint8Array())));
  b(Buffer.from(message("c", new Uint8Array())));
  assert.notEqual(gotA[0].buffer, gotB[0].buffer);
  assert.ok(gotA[0].buffer !== foreign.buffer && gotB[0].buffer !== foreign.buffer);
  assert.ok(carries(gotA[0], new Uint8Array(3_100_000).fill(1)));
  assert.ok(carries(gotB[0], new Uint8Array(3_100_000).fill(2)));
});

Deno.test("read into a reused buffer, the bytes handed on unchanged are copies the next read cannot overwrite", () => {
  const got: Buffer[] = [];
  const filter = copyDataCoalescer((chunk) => got.push(chunk), undefined, true);
  const reused = Buffer.from(
    concat([message("D", new Uint8Array([1, 2, 3])), message("d", new Uint8Array([4]))]),
  );
  filter(reused);
  reused.fill(0); // the next read lands in the same buffer
  filter(Buffer.from(message("c", new Uint8Array())));
  assert.deepEqual(meaning(parse(concat(got))), [
    { type: "D", body: [1, 2, 3] },
    { type: "d", body: [4] },
    { type: "c", body: [] },
  ]);
});

Deno.test("on a socket that reads into a reused buffer, the driver's handler gets the reads, filtered, until removed", () => {
  const reads = reusedReads(64);
  const socket = coalesceCopyData(new EventEmitter(), reads);
  const got: Buffer[] = [];
  const handler = (chunk: Buffer) => got.push(Buffer.from(chunk));
  socket.on("data", handler);
  assert.equal(socket.listenerCount("data"), 0, "no 'data' events: the reads go to the handler");
  const read = (bytes: Uint8Array) => {
    reads.onread.buffer.set(bytes);
    assert.equal(reads.onread.callback(bytes.length, reads.onread.buffer), true);
  };
  read(concat([message("d", new Uint8Array([1])), message("d", new Uint8Array([2]))]));
  read(message("c", new Uint8Array()));
  assert.deepEqual(meaning(parse(concat(got))), [
    { type: "d", body: [1, 2] },
    { type: "c", body: [] },
  ]);
  socket.removeListener("data", () => {}); // not the driver's handler: changes nothing
  read(message("Z", new Uint8Array([73])));
  assert.equal(parse(concat(got)).length, 3);
  socket.removeListener("data", handler);
  read(message("Z", new Uint8Array([73])));
  assert.equal(parse(concat(got)).length, 3, "removed: nothing more reaches it");
});

Deno.test("the socket wrapper filters the driver's data handler and removes it again", () => {
  const socket = coalesceCopyData(new EventEmitter());
  const got: Buffer[] = [];
  const handler = (chunk: Buffer) => got.push(chunk);
  socket.on("data", handler);
  const stream = concat([
    message("d", new Uint8Array([1])),
    message("d", new Uint8Array([2])),
    message("c", new Uint8Array()),
  ]);
  socket.emit("data", Buffer.from(stream));
  assert.deepEqual(parse(concat(got)).map((m) => [m.type, [...m.body]]), [["d", [1, 2]], [
    "c",
    [],
  ]]);
  socket.removeListener("data", handler);
  assert.equal(socket.listenerCount("data"), 0);
});

Deno.test("a COPY read through connect() reaches the driver's stream in one piece, byte for byte", async () => {
  await using db = await freshDb();
  const sql = await connect(parseDatabaseUrl(db.url, "LOCAL_DATABASE_URL"));
  try {
    const query =
      `COPY (SELECT g, repeat(md5(g::text), 20), E'tab\\there' FROM generate_series(1, 3000) g)
                   TO STDOUT (FORMAT binary)`;
    const stream = await (sql.unsafe(query) as unknown as {
      readable(): Promise<NodeJS.ReadableStream>;
    }).readable();
    const pieces: Uint8Array[] = [];
    await new Promise<void>((resolve, reject) => {
      stream.on("data", (chunk: Uint8Array) => pieces.push(chunk));
      stream.on("end", resolve);
      stream.on("error", reject);
    });
    assert.equal(pieces.length, 1);
    // The same bytes as the server sends through a plain connection, one message per row.
    const plain = await copyOut(db.sql, query);
    assert.ok(plain.length > 3000 * 640);
    assert.deepEqual(pieces[0], Buffer.from(plain));
  } finally {
    await sql.end();
  }
});

Deno.test("a COPY written through connect() goes straight onto the socket and arrives byte for byte", async () => {
  await using db = await freshDb();
  const sql = await connect(parseDatabaseUrl(db.url, "LOCAL_DATABASE_URL"));
  try {
    await db.sql`CREATE TABLE dst (n int, s text, t text)`;
    const payload = await copyOut(
      db.sql,
      `COPY (SELECT g, repeat(md5(g::text), 20), E'tab\\there' FROM generate_series(1, 3000) g)
         TO STDOUT (FORMAT binary)`,
    );
    assert.ok(payload.length > 3 * 64 * 1024, "several CopyData messages");
    const copy = await openCopyIn(sql, "COPY dst FROM STDIN (FORMAT binary)");
    await copy.write(payload);
    assert.equal(copy.direct, true);
    const back = await copyOut(db.sql, "COPY (SELECT * FROM dst) TO STDOUT (FORMAT binary)");
    assert.deepEqual(Buffer.from(back), Buffer.from(payload));
    // The connection goes on as usual after it.
    const [row] = await sql`SELECT count(*)::int AS n FROM dst`;
    assert.equal(row.n, 3000);
  } finally {
    await sql.end();
  }
});
