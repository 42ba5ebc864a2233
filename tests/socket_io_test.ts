/** Socket reads into a reused buffer, and telling which socket a write went to. */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import net from "node:net";
import { reusedReads } from "../lib/socket_reads.ts";
import { noteWrites, writerOf } from "../lib/socket_writes.ts";

Deno.test("reads before anyone consumes them are kept as copies and handed over first, in order", () => {
  const reads = reusedReads(8);
  const { buffer, callback } = reads.onread;
  buffer.set([1, 2, 3]);
  callback(3, buffer);
  buffer.set([4, 5]);
  callback(2, buffer);
  buffer.fill(9);
  const got: number[][] = [];
  reads.consume((bytes) => got.push([...bytes]));
  buffer.set([6]);
  callback(1, buffer);
  assert.deepEqual(got, [[1, 2, 3], [4, 5], [6]]);
});

Deno.test("only the owner releases a consumer", () => {
  const reads = reusedReads(8);
  const got: number[] = [];
  const owner = {};
  reads.consume((bytes) => got.push(...bytes), owner);
  reads.release({});
  reads.onread.buffer[0] = 1;
  reads.onread.callback(1, reads.onread.buffer);
  reads.release(owner);
  reads.onread.buffer[0] = 2;
  reads.onread.callback(1, reads.onread.buffer); // kept for the next consumer
  assert.deepEqual(got, [1]);
  reads.consume((bytes) => got.push(...bytes));
  assert.deepEqual(got, [1, 2]);
});

Deno.test("a socket reading into a reused buffer receives every byte a server sends, in order", async () => {
  const sent = Buffer.alloc(3_000_000);
  for (let i = 0; i < sent.length; i++) sent[i] = (i * 7 + (i >> 11)) & 0xff;
  const server = net.createServer((conn) => conn.end(sent));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as net.AddressInfo).port;
  try {
    const reads = reusedReads(16 * 1024);
    const got: Buffer[] = [];
    reads.consume((bytes) => got.push(Buffer.from(bytes)));
    const socket = net.connect({ host: "127.0.0.1", port, onread: reads.onread });
    await new Promise((resolve, reject) => {
      socket.on("close", resolve);
      socket.on("error", reject);
    });
    assert.ok(got.length > 1, "several reads, into the same buffer");
    assert.ok(Buffer.concat(got).equals(sent));
  } finally {
    await new Promise((resolve) => server.close(resolve));
  }
});

Deno.test("writerOf() names the noted socket a function wrote to at once, and nothing else", async () => {
  const written: string[] = [];
  const socket = (name: string) => noteWrites({ name, write: (s: string) => written.push(s) });
  const a = socket("a");
  const b = socket("b");
  assert.equal(writerOf(() => a.write("1")), a);
  assert.equal(writerOf(() => (b.write("2"), a.write("3"))), a, "the last one");
  assert.equal(writerOf(() => {}), undefined);
  b.write("4"); // outside: not carried into the next question
  assert.equal(writerOf(() => {}), undefined);
  let later: Promise<void> | undefined;
  assert.equal(
    writerOf(() => (later = Promise.resolve().then(() => void a.write("5")))),
    undefined,
  );
  await later;
  assert.throws(() =>
    writerOf(() => {
      throw new Error("boom");
    })
  );
  assert.equal(writerOf(() => {}), undefined);
  assert.deepEqual(written, ["1", "2", "3", "4", "5"]);
});
