/** Tests of lib/log.ts: JSON lines for machines, pretty lines for people, no password in either. */
import assert from "node:assert/strict";
import { getLogger, type LogRecord, reset } from "@logtape/logtape";
import type { LogFormat, LogLevel } from "../lib/config.ts";
import { beforeLogLine, jsonFormatter, setupLogging } from "../lib/log.ts";

const log = getLogger(["meter-sync", "x"]);

/** Configures logging into an array, runs fn, and always resets LogTape's global config. */
async function captured(
  options: { level?: LogLevel; format?: LogFormat; secrets?: string[] },
  fn: () => void,
): Promise<string[]> {
  const lines: string[] = [];
  await setupLogging({
    level: options.level ?? "info",
    format: options.format ?? "json",
    secrets: options.secrets ?? [],
    write: (line) => lines.push(line),
  });
  try {
    fn();
  } finally {
    await reset();
  }
  return lines;
}

function record(overrides: Partial<LogRecord> = {}): LogRecord {
  return {
    category: ["meter-sync", "upload"],
    level: "info",
    message: ["uploaded ", 100, " rows in ", 12, " ms"],
    rawMessage: "uploaded {rows} rows in {ms} ms",
    timestamp: Date.UTC(2026, 0, 2, 3, 4, 5, 678),
    properties: { rows: 100, ms: 12 },
    ...overrides,
  };
}

Deno.test("jsonFormatter() writes one JSON line with time, level, category, message and properties", () => {
  const line = jsonFormatter(record());
  assert.ok(line.endsWith("\n"));
  assert.equal(line.trimEnd().split("\n").length, 1, "more than one line");
  assert.deepEqual(JSON.parse(line), {
    time: "2026-01-02T03:04:05.678Z",
    level: "info",
    category: "meter-sync.upload",
    message: "uploaded 100 rows in 12 ms",
    properties: { rows: 100, ms: 12 },
  });
});

Deno.test("jsonFormatter() keeps a bigint property exact and an error property as its message", () => {
  const line = jsonFormatter(record({
    message: ["failed: ", "boom", ""],
    properties: { meter: 9007199254740993n, error: new Error("remote went away") },
  }));
  const parsed = JSON.parse(line);
  assert.equal(parsed.properties.meter, "9007199254740993");
  assert.equal(parsed.properties.error, "remote went away");
  assert.equal(parsed.message, "failed: boom");
});

Deno.test("setupLogging() in json format writes one parseable object per line", async () => {
  const lines = await captured({ format: "json" }, () => {
    log.info("first {n}", { n: 1 });
    log.warn("second\nwith a newline {n}", { n: 2 });
    log.error("third {n}", { n: 3 });
  });
  const text = lines.join("");
  const objects = text.trimEnd().split("\n").map((l) => JSON.parse(l));
  assert.equal(objects.length, 3);
  assert.deepEqual(objects.map((o) => o.level), ["info", "warning", "error"]);
  assert.deepEqual(objects.map((o) => o.properties.n), [1, 2, 3]);
  assert.equal(objects[0].message, "first 1");
  assert.equal(objects[1].message, "second\nwith a newline 2");
  assert.equal(objects[0].category, "meter-sync.x");
  assert.ok(!Number.isNaN(Date.parse(objects[0].time)));
});

Deno.test("setupLogging() in pretty format writes one readable line per record", async () => {
  const lines = await captured({ format: "pretty" }, () => {
    log.info("uploaded {rows} rows", { rows: 100 });
  });
  assert.equal(lines.length, 1);
  assert.ok(lines[0].endsWith("\n"));
  assert.match(lines[0], /meter-sync\.x/);
  assert.match(lines[0], /uploaded 100 rows/);
  assert.ok(!lines[0].includes("\x1b["), "colour codes without color: true");
});

Deno.test("setupLogging() masks the password of a URL in a log line, in both formats", async () => {
  for (const format of ["json", "pretty"] as const) {
    const lines = await captured({ format }, () => {
      log.error("cannot reach {url}", { url: "postgres://meter:hunter2@db.example.com/central" });
    });
    const text = lines.join("");
    assert.ok(!text.includes("hunter2"), `${format}: ${text}`);
    assert.match(text, /postgres:\/\/meter:\*\*\*@db\.example\.com\/central/, format);
  }
});

Deno.test("setupLogging() masks a secret given in secrets wherever it appears", async () => {
  for (const format of ["json", "pretty"] as const) {
    const lines = await captured({ format, secrets: ["s3cr@t:pw", "s3cr%40t:pw"] }, () => {
      log.error("server said: password {pw} rejected", { pw: "s3cr@t:pw" });
      log.warn("raw form s3cr%40t:pw seen");
    });
    const text = lines.join("");
    assert.equal(lines.length, 2, format);
    assert.ok(!text.includes("s3cr@t:pw"), `${format}: ${text}`);
    assert.ok(!text.includes("s3cr%40t:pw"), `${format}: ${text}`);
    assert.match(text, /password \*\*\* rejected/, format);
  }
});

Deno.test("setupLogging() masks a secret holding a quote and a backslash in json format", async () => {
  const secret = 'Pa"ss\\w0rd';
  const lines = await captured({ format: "json", secrets: [secret] }, () => {
    log.error("server said: password {pw} rejected", { pw: secret });
  });
  assert.equal(lines.length, 1);
  const parsed = JSON.parse(lines[0]);
  // What a reader of the log sees once the JSON is decoded must not hold the password.
  assert.ok(!parsed.message.includes(secret), parsed.message);
  assert.ok(!JSON.stringify(parsed.properties).includes(JSON.stringify(secret).slice(1, -1)));
  assert.match(parsed.message, /\*\*\*/);
});

Deno.test("setupLogging() drops records below the configured level", async () => {
  const lines = await captured({ level: "warning" }, () => {
    log.trace("t");
    log.debug("d");
    log.info("i");
    log.warn("w");
    log.error("e");
    log.fatal("f");
  });
  const messages = lines.map((l) => JSON.parse(l).message);
  assert.deepEqual(messages, ["w", "e", "f"]);
});

Deno.test("setupLogging() at debug writes debug but not trace", async () => {
  const lines = await captured({ level: "debug" }, () => {
    log.trace("t");
    log.debug("d");
    log.info("i");
  });
  assert.deepEqual(lines.map((l) => JSON.parse(l).message), ["d", "i"]);
});

Deno.test("setupLogging() called again replaces the previous configuration", async () => {
  const first: string[] = [];
  const second: string[] = [];
  await setupLogging({ level: "info", format: "json", secrets: [], write: (l) => first.push(l) });
  await setupLogging({ level: "info", format: "json", secrets: [], write: (l) => second.push(l) });
  try {
    log.info("once");
  } finally {
    await reset();
  }
  assert.equal(first.length, 0);
  assert.equal(second.length, 1);
});

Deno.test("beforeLogLine() runs before every line (a progress bar erases itself) until removed", async () => {
  const events: string[] = [];
  await setupLogging({
    level: "info",
    format: "pretty",
    secrets: [],
    write: (line) => events.push(`line ${line.includes("second") ? 2 : 1}`),
  });
  try {
    beforeLogLine(() => events.push("clear"));
    log.warn("first");
    log.info("second");
    beforeLogLine(null);
    log.info("first again");
  } finally {
    beforeLogLine(null);
    await reset();
  }
  assert.deepEqual(events, ["clear", "line 1", "clear", "line 2", "line 1"]);
});
