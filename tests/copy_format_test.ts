/** Tests of lib/copy_format.ts against COPY data written and read by a real PostgreSQL server. */
import assert from "node:assert/strict";
import { freshDb, type Sql } from "./_harness.ts";
import {
  BINARY_HEADER,
  BINARY_TRAILER,
  type CopyFormat,
  payloadOf,
  rowPayload,
  splitRows,
} from "../lib/copy_format.ts";
import {
  copyIn as writeCopy,
  copyOut as readCopy,
  type OpenCopy,
  openCopyIn,
} from "../lib/copy_io.ts";
import { connect, resumeSockets } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";

const FORMATS: CopyFormat[] = ["binary", "text"];

const formatOption = (format: CopyFormat) => (format === "binary" ? " (FORMAT binary)" : "");

/** COPY (query) TO STDOUT through the engine's own reader, then resumeSockets() as it does. */
async function copyOut(sql: Sql, query: string, format: CopyFormat): Promise<Uint8Array> {
  const data = await readCopy(sql, `COPY (${query}) TO STDOUT${formatOption(format)}`);
  resumeSockets(sql);
  return data;
}

/** COPY table FROM STDIN through the engine's own writer, then a round trip. */
async function copyIn(
  sql: Sql,
  table: string,
  payload: Uint8Array,
  format: CopyFormat,
): Promise<void> {
  await writeCopy(sql, `COPY ${table} FROM STDIN${formatOption(format)}`, payload);
  await sql`SELECT 1`;
}

async function fixture() {
  const db = await freshDb();
  // lib/db.ts: the engine's own connection (no Nagle, socket resumed after COPY TO).
  const sql = await connect(parseDatabaseUrl(db.url, "test"), { max: 1 });
  await sql.unsafe(`
    CREATE TABLE src (
      id uuid PRIMARY KEY,
      n integer NOT NULL,
      label text,
      amount numeric,
      payload jsonb,
      flags text[],
      big bigint,
      at timestamptz,
      ratio double precision
    );
    CREATE TABLE dst (LIKE src INCLUDING ALL);
    INSERT INTO src
    SELECT md5(g::text)::uuid, g,
           CASE g % 7
             WHEN 0 THEN NULL
             WHEN 1 THEN E'tab\\there, newline\\nthere, cr\\rhere'
             WHEN 2 THEN E'back\\\\slash \\\\N and \\\\.'
             WHEN 3 THEN 'quotes '' " and Zähler ✓ 電気'
             WHEN 4 THEN ''
             WHEN 5 THEN E'\\\\.'
             ELSE repeat('x', g * 37)
           END,
           CASE WHEN g % 5 = 0 THEN NULL ELSE (g * 1234567.0001)::numeric / 7 END,
           CASE WHEN g % 4 = 0 THEN NULL
                ELSE jsonb_build_object('g', g, 'note', E'a\\tb\\nc\\\\d "q"', 'list', jsonb_build_array(1, null, 'x'))
           END,
           CASE g % 3
             WHEN 0 THEN NULL
             WHEN 1 THEN ARRAY[NULL, 'a b', E'tab\\t', NULL]::text[]
             ELSE ARRAY['{braces}', 'NULL', '"quoted"', E'back\\\\slash']::text[]
           END,
           CASE WHEN g % 6 = 0 THEN NULL ELSE 9007199254740993 + g END,
           '2024-03-01 12:34:56.123456+00'::timestamptz + g * interval '1 minute 0.000001 second',
           CASE WHEN g % 8 = 0 THEN NULL ELSE 1.0 / g END
      FROM generate_series(1, 40) AS g;
    INSERT INTO src (id, n) VALUES ('00000000-0000-0000-0000-000000000000', 0),
                                   ('ffffffff-ffff-ffff-ffff-ffffffffffff', 41);
  `).simple();
  return {
    sql,
    async [Symbol.asyncDispose]() {
      await sql.end({ timeout: 1 });
      await db[Symbol.asyncDispose]();
    },
  };
}

const ORDERED = "SELECT * FROM src ORDER BY n";

/** The rows of a table as PostgreSQL prints them, sorted. */
async function rowTexts(sql: Sql, from: string): Promise<string[]> {
  const rows = await sql.unsafe<{ t: string }[]>(`SELECT t::text AS t FROM ${from} t ORDER BY 1`);
  return rows.map((r) => r.t);
}

for (const format of FORMATS) {
  Deno.test(`splitRows() finds every row of ${format} COPY output and the key of each`, async () => {
    await using f = await fixture();
    const data = await copyOut(f.sql, ORDERED, format);
    const batch = splitRows(data, format);
    const ids = (await f.sql.unsafe<{ id: string }[]>(`SELECT id::text AS id FROM src ORDER BY n`))
      .map((r) => r.id);
    assert.equal(batch.format, format);
    assert.equal(ids.length, 42);
    assert.deepEqual(batch.keys, ids);
    assert.equal(batch.starts.length, ids.length);
    assert.equal(batch.ends.length, ids.length);
    // Rows are contiguous: each starts where the previous ended.
    for (let i = 1; i < ids.length; i++) assert.equal(batch.starts[i], batch.ends[i - 1]);
    if (format === "text") {
      assert.equal(batch.starts[0], 0);
      assert.equal(batch.ends.at(-1), data.length);
    } else {
      assert.equal(batch.starts[0], BINARY_HEADER.length);
      assert.equal(batch.ends.at(-1), data.length - BINARY_TRAILER.length);
    }
  });

  Deno.test(`payloadOf() subsets of ${format} COPY output load back into PostgreSQL unchanged`, async () => {
    await using f = await fixture();
    const batch = splitRows(await copyOut(f.sql, ORDERED, format), format);
    const n = batch.keys.length;
    const ranges: [number, number][] = [
      [0, n],
      [0, 1],
      [n - 1, n],
      [1, 2],
      [3, 17],
      [0, n - 1],
      [1, n],
      [20, 21],
    ];
    for (const [from, to] of ranges) {
      await f.sql`TRUNCATE dst`;
      await copyIn(f.sql, "dst", payloadOf(batch, from, to), format);
      const expected = await rowTexts(
        f.sql,
        `(SELECT * FROM src WHERE id = ANY ('{${batch.keys.slice(from, to).join(",")}}'::uuid[]))`,
      );
      assert.equal(expected.length, to - from);
      assert.deepEqual(await rowTexts(f.sql, "dst"), expected, `rows ${from}..${to}`);
    }
  });

  Deno.test(`payloadOf() pieces of ${format} COPY output together rebuild the whole table`, async () => {
    await using f = await fixture();
    const batch = splitRows(await copyOut(f.sql, ORDERED, format), format);
    const n = batch.keys.length;
    // Single rows (as the quarantine bisection sends them) and uneven runs.
    const cuts = [0, 1, 2, 5, 13, 14, 30, n - 1, n];
    for (let i = 0; i + 1 < cuts.length; i++) {
      await copyIn(f.sql, "dst", payloadOf(batch, cuts[i], cuts[i + 1]), format);
    }
    assert.deepEqual(await rowTexts(f.sql, "dst"), await rowTexts(f.sql, "src"));
  });

  Deno.test(`rowPayload() of ${format} COPY output is one complete row`, async () => {
    await using f = await fixture();
    const batch = splitRows(await copyOut(f.sql, ORDERED, format), format);
    const i = batch.keys.indexOf("00000000-0000-0000-0000-000000000000");
    assert.ok(i >= 0);
    const one = rowPayload(batch, i);
    assert.deepEqual(splitRows(one, format).keys, [batch.keys[i]]);
    await copyIn(f.sql, "dst", one, format);
    assert.deepEqual(
      await rowTexts(f.sql, "dst"),
      await rowTexts(f.sql, `(SELECT * FROM src WHERE n = 0)`),
    );
  });

  Deno.test(`splitRows() of ${format} COPY output with no rows finds none, and the payload loads`, async () => {
    await using f = await fixture();
    const data = await copyOut(f.sql, "SELECT * FROM src WHERE false", format);
    assert.equal(
      data.length,
      format === "binary" ? BINARY_HEADER.length + BINARY_TRAILER.length : 0,
    );
    const batch = splitRows(data, format);
    assert.deepEqual(batch.keys, []);
    assert.deepEqual(batch.starts, []);
    const payload = payloadOf(batch, 0, 0);
    await copyIn(f.sql, "dst", payload, format);
    const [{ count }] = await f.sql<{ count: number }[]>`SELECT count(*)::int AS count FROM dst`;
    assert.equal(count, 0);
  });
}

Deno.test("splitRows() of an empty buffer finds no rows in either format", () => {
  for (const format of FORMATS) assert.deepEqual(splitRows(new Uint8Array(0), format).keys, []);
});

Deno.test("splitRows() refuses binary COPY data whose first column is not a uuid", async () => {
  await using f = await fixture();
  const bigintFirst = await copyOut(f.sql, "SELECT n::bigint, id FROM src ORDER BY n", "binary");
  assert.throws(() => splitRows(bigintFirst, "binary"), /key is 8 bytes, expected a 16-byte uuid/);
  const textFirst = await copyOut(f.sql, "SELECT label, id FROM src WHERE n = 6", "binary");
  assert.throws(() => splitRows(textFirst, "binary"), /expected a 16-byte uuid/);
  const nullFirst = await copyOut(f.sql, "SELECT NULL::uuid, id FROM src WHERE n = 1", "binary");
  assert.throws(() => splitRows(nullFirst, "binary"), /expected a 16-byte uuid/);
});

Deno.test("splitRows() refuses a binary COPY row without fields: every row has a key", async () => {
  await using f = await fixture();
  const noColumns = await copyOut(f.sql, "SELECT FROM src WHERE n <= 2", "binary");
  assert.throws(() => splitRows(noColumns, "binary"), /row without fields: no key/);
});

Deno.test("splitRows() refuses data that is not binary COPY at all", async () => {
  await using f = await fixture();
  const text = await copyOut(f.sql, ORDERED, "text");
  assert.throws(() => splitRows(text, "binary"), /not binary COPY data/);
});

Deno.test("a binary payload cut short inside a row is rejected by the server, not loaded in part", async () => {
  // Guards the helpers above: a broken payload must fail these tests, not pass unnoticed.
  await using f = await fixture();
  const batch = splitRows(await copyOut(f.sql, ORDERED, "binary"), "binary");
  const payload = payloadOf(batch, 2, 9);
  // Past the trailer (which the server does not insist on) into the last row's data.
  const cut = payload.subarray(0, payload.length - BINARY_TRAILER.length - 3);
  await assert.rejects(copyIn(f.sql, "dst", cut, "binary"), /unexpected EOF|COPY/i);
  const [{ count }] = await f.sql<{ count: number }[]>`SELECT count(*)::int AS count FROM dst`;
  assert.equal(count, 0);
});

Deno.test("a COPY opened while the one before is answered starts after it commits; cancel() loads nothing", async () => {
  // The upload engine opens the next batch's COPY this way, on its one remote connection.
  await using f = await fixture();
  const batch = splitRows(await copyOut(f.sql, ORDERED, "binary"), "binary");
  const statement = "COPY dst FROM STDIN (FORMAT binary)";
  const events: string[] = [];
  let second: Promise<OpenCopy> | undefined;
  const first = await openCopyIn(f.sql, statement);
  await first.write(payloadOf(batch, 0, 20), () => {
    events.push("first sent");
    second = openCopyIn(f.sql, statement);
  });
  events.push("first committed");
  assert.deepEqual(events, ["first sent", "first committed"]);
  let third: Promise<OpenCopy> | undefined;
  await (await second!).write(payloadOf(batch, 20, 30), () => {
    third = openCopyIn(f.sql, statement);
  });
  (await third!).cancel();
  // The connection takes statements again, and holds exactly the first 30 rows.
  assert.deepEqual(
    await rowTexts(f.sql, "dst"),
    await rowTexts(f.sql, "(SELECT * FROM src ORDER BY n LIMIT 30)"),
  );
  await writeCopy(f.sql, statement, payloadOf(batch, 30, 32));
  const [{ count }] = await f.sql<{ count: number }[]>`SELECT count(*)::int AS count FROM dst`;
  assert.equal(count, 32);
});
