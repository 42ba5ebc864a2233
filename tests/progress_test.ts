/** Tests of lib/progress.ts with a fake clock, and the progress line of `sync` on a real terminal. */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { compileFlags, runCli } from "./_harness.ts";
import { pair } from "./_sync_fixture.ts";
import { seedReadings } from "../lib/seed.ts";
import {
  createProgress,
  formatDuration,
  type ProgressOptions,
  renderProgressLine,
  shouldShowProgress,
} from "../lib/progress.ts";

/** A progress line on a fake clock, with everything it wrote. */
function fake(over: Partial<ProgressOptions> = {}) {
  const clock = { t: 1_000_000 };
  const writes: string[] = [];
  const progress = createProgress({
    total: 50_000,
    write: (text) => writes.push(text),
    now: () => clock.t,
    columns: 120,
    ...over,
  });
  return {
    progress,
    writes,
    /** Moves the clock on by ms and reports done rows. */
    at(ms: number, done: number) {
      clock.t += ms;
      progress.update(done);
    },
    advance(ms: number) {
      clock.t += ms;
    },
    /** The last line drawn, without its control sequences. */
    last(): string {
      const w = writes.at(-1) ?? "";
      return w.replace(/^\r/, "").replace("\x1b[K", "").replace(/\n$/, "");
    },
  };
}

Deno.test("createProgress() draws nothing before the first update", () => {
  const p = fake();
  assert.deepEqual(p.writes, []);
});

Deno.test("createProgress() shows rows done and left, rows/s and the ETA on one rewritten line", () => {
  const p = fake();
  p.at(1000, 10_000);
  assert.equal(p.writes.length, 1);
  assert.ok(p.writes[0].startsWith("\r"), "rewrites the line");
  assert.ok(p.writes[0].endsWith("\x1b[K"), "clears what a longer line left");
  assert.ok(!p.writes[0].includes("\n"));
  const line = p.last();
  assert.match(line, /^\[#{6}\.{24}\] /, "a fifth of a 30-column bar");
  assert.match(line, /10,000 \/ 50,000 rows {2}40,000 left {2}10,000 rows\/s {2}ETA 0:04$/);
  // At the default 80 columns, the bar shrinks to fit.
  const narrow = fake({ columns: undefined });
  narrow.at(1000, 10_000);
  assert.equal(narrow.last().length, 79);
  assert.match(narrow.last(), /^\[#+\.+\] 10,000 \/ 50,000 rows/);
});

Deno.test("createProgress() measures the rate over the recent window, not since the start", () => {
  const p = fake({ total: 1_000_000, rateWindowMs: 5000 });
  // A slow start: 1,000 rows/s for 10 s ...
  for (let s = 1; s <= 10; s++) p.at(1000, s * 1000);
  assert.match(p.last(), /1,000 rows\/s {2}ETA 16:30$/);
  // ... then 10,000 rows/s: after 5 s of it the window holds only the fast part.
  for (let s = 1; s <= 5; s++) p.at(1000, 10_000 + s * 10_000);
  assert.match(p.last(), /60,000 \/ 1,000,000 rows {2}940,000 left {2}10,000 rows\/s {2}ETA 1:34$/);
});

Deno.test("createProgress() writes the ETA as h:mm:ss from one hour on", () => {
  const p = fake({ total: 10_000_000 });
  p.at(10_000, 10_000);
  // 9,990,000 rows left at 1,000 rows/s: 9,990 s.
  assert.match(p.last(), /1,000 rows\/s {2}ETA 2:46:30$/);
  assert.equal(formatDuration(59.4), "0:59");
  assert.equal(formatDuration(3600), "1:00:00");
  assert.equal(formatDuration(-3), "0:00");
});

Deno.test("createProgress() draws at most once per minIntervalMs, but remembers every update", () => {
  const p = fake({ minIntervalMs: 100 });
  p.at(50, 100);
  p.at(50, 200); // 50 ms after the first draw
  p.at(49, 300); // 99 ms
  assert.equal(p.writes.length, 1);
  p.at(1, 400); // 100 ms
  assert.equal(p.writes.length, 2);
  assert.match(p.last(), /^\[.*\] 400 \/ 50,000 rows/);
  p.at(10, 500);
  assert.equal(p.writes.length, 2);
  // finish() always draws, with the latest count.
  p.progress.finish();
  assert.equal(p.writes.length, 3);
  assert.match(p.last(), / 500 \/ 50,000 rows/);
});

Deno.test("finish() draws the final state with the average rate and the time taken, then a newline", () => {
  const p = fake({ total: 5000 });
  p.at(1000, 3000);
  p.at(1000, 5000);
  p.advance(500);
  p.progress.finish();
  const w = p.writes.at(-1)!;
  assert.ok(w.startsWith("\r") && w.endsWith("\x1b[K\n"), JSON.stringify(w));
  assert.match(p.last(), /^\[#{30}\] 5,000 \/ 5,000 rows {2}0 left {2}2,000 rows\/s {2}took 0:03$/);
  // Later calls change nothing: the line is closed.
  const n = p.writes.length;
  p.at(100, 6000);
  p.progress.finish();
  assert.equal(p.writes.length, n);
});

Deno.test("clear() erases the line for a log record and the next update draws at once", () => {
  const p = fake({ minIntervalMs: 1000 });
  p.progress.clear();
  assert.deepEqual(p.writes, [], "nothing drawn yet: nothing to erase");
  p.at(10, 100);
  p.progress.clear();
  assert.equal(p.writes.at(-1), "\r\x1b[K");
  p.at(10, 200); // within minIntervalMs of the last draw, drawn anyway
  assert.equal(p.writes.length, 3);
  assert.match(p.last(), / 200 \/ 50,000 rows/);
  p.progress.finish();
  const n = p.writes.length;
  p.progress.clear();
  assert.equal(p.writes.length, n, "a finished line stays");
});

Deno.test("createProgress() with total 0 draws a full bar and no division by zero", () => {
  const p = fake({ total: 0 });
  p.at(0, 0);
  assert.match(p.last(), /^\[#{30}\] 0 \/ 0 rows {2}0 left {2}- rows\/s {2}ETA 0:00$/);
  p.advance(200);
  p.progress.finish();
  assert.match(p.last(), /0 \/ 0 rows {2}0 left {2}0 rows\/s {2}took 0:00$/);
  assert.ok(!/NaN|Infinity/.test(p.writes.join("")));
});

Deno.test("createProgress() grows the total when more rows get done than expected (new readings arrived)", () => {
  const p = fake({ total: 1000 });
  p.at(1000, 800);
  assert.match(p.last(), /800 \/ 1,000 rows {2}200 left/);
  p.at(1000, 1500);
  assert.match(p.last(), /^\[#{30}\] 1,500 \/ 1,500 rows {2}0 left {2}.* ETA 0:00$/);
  // A count going backwards (it never should) does not move the line back.
  p.at(1000, 1200);
  assert.match(p.last(), /1,500 \/ 1,500 rows/);
});

Deno.test("a stalled drain shows 0 rows/s and an unknown ETA", () => {
  const p = fake({ total: 10_000, rateWindowMs: 2000 });
  p.at(1000, 1000);
  p.at(3000, 1000);
  assert.match(p.last(), /1,000 \/ 10,000 rows {2}9,000 left {2}0 rows\/s {2}ETA -:--$/);
});

Deno.test("narrow terminals: the bar goes first, then rows left, rows/s and the ETA; never wider than the terminal", () => {
  const state = { done: 12_300, total: 50_000, rate: 10_234, tail: "ETA 0:04" };
  const wide = renderProgressLine(state, 120);
  assert.equal(
    wide,
    `[${"#".repeat(7)}${
      ".".repeat(23)
    }] ${"12,300 / 50,000 rows  37,700 left  10,234 rows/s  ETA 0:04"}`,
  );
  const text = "12,300 / 50,000 rows  37,700 left  10,234 rows/s  ETA 0:04";
  // Just enough for the text and a 10-column bar.
  assert.equal(renderProgressLine(state, text.length + 14).length, text.length + 13);
  assert.match(renderProgressLine(state, text.length + 14), /^\[#{2}\.{8}\] /);
  // Less: no bar.
  assert.equal(renderProgressLine(state, text.length + 13), text);
  assert.equal(renderProgressLine(state, 50), "12,300 / 50,000 rows  10,234 rows/s  ETA 0:04");
  assert.equal(renderProgressLine(state, 40), "12,300 / 50,000 rows  ETA 0:04");
  assert.equal(renderProgressLine(state, 25), "12,300 / 50,000 rows");
  assert.equal(renderProgressLine(state, 10), "12,300 / ");
  for (let columns = 1; columns <= 130; columns++) {
    const line = renderProgressLine(state, columns);
    assert.ok(line.length <= Math.max(1, columns - 1), `${columns}: ${line}`);
  }
  const zero = fake({ columns: 0 });
  zero.at(1000, 10_000);
  assert.equal(zero.last().length, 79, "a terminal without a size counts as 80 columns");
  const p = fake({ columns: 31 });
  p.at(1000, 10_000);
  assert.equal(p.last(), "10,000 / 50,000 rows  ETA 0:04");
});

Deno.test("shouldShowProgress(): only on a terminal, with pretty logs and a backlog of at least the threshold", () => {
  const cases: [boolean, "pretty" | "json", number, number | undefined, boolean][] = [
    [true, "pretty", 5000, undefined, true],
    [true, "pretty", 2000, undefined, true],
    [true, "pretty", 1999, undefined, false],
    [true, "pretty", 0, undefined, false],
    [true, "json", 5000, undefined, false],
    [false, "pretty", 5000, undefined, false],
    [false, "json", 5000, undefined, false],
    [true, "pretty", 50, 10, true],
    [true, "pretty", 5000, 10_000, false],
  ];
  for (const [isTerminal, logFormat, backlog, threshold, expected] of cases) {
    assert.equal(
      shouldShowProgress({ isTerminal, logFormat, backlog, threshold }),
      expected,
      JSON.stringify({ isTerminal, logFormat, backlog, threshold }),
    );
  }
});

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const SCRIPT = "/usr/bin/script";

function shellWord(word: string): string {
  return `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * Runs main.ts with the compile flags under a pseudo-terminal (util-linux script), 120
 * columns wide, as someone watching it in a shell would; returns what the terminal showed.
 */
async function runUnderTerminal(
  args: string[],
  env: Record<string, string>,
): Promise<{ code: number; screen: string }> {
  const deno = [Deno.execPath(), "run", "--quiet", ...(await compileFlags()), MAIN, ...args]
    .map(shellWord).join(" ");
  const base: Record<string, string> = {};
  for (const key of ["PATH", "HOME", "DENO_DIR", "TMPDIR", "XDG_CACHE_HOME"]) {
    const value = Deno.env.get(key);
    if (value !== undefined) base[key] = value;
  }
  const child = new Deno.Command(SCRIPT, {
    args: ["-qfec", `stty cols 120 rows 40 2>/dev/null; exec ${deno}`, "/dev/null"],
    env: { ...base, TERM: "xterm-256color", NO_COLOR: "1", ...env },
    clearEnv: true,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
  const out = await child.output();
  clearTimeout(timer);
  const dec = new TextDecoder();
  // "Erase to end of line" spelled out, so that the patterns below stay readable.
  const screen = (dec.decode(out.stdout) + dec.decode(out.stderr)).replaceAll("\x1b[K", "<EL>");
  return { code: out.code, screen };
}

/** The progress line as createProgress() draws it (<EL>: erase to end of line). */
const PROGRESS_LINE =
  /\r\[[#.]+\] [\d,]+ \/ [\d,]+ rows {2}[\d,]+ left {2}[\d,-]+ rows\/s {2}ETA [\d:-]+<EL>/;

Deno.test({
  name:
    "sync shows a progress line on a terminal for a long drain, and none into a pipe or in JSON logs",
  ignore: !existsSync(SCRIPT),
  async fn() {
    await using p = await pair(5000);
    const env = { LOCAL_DATABASE_URL: p.local.url, REMOTE_DATABASE_URL: p.remote.url };
    const sync = ["sync", "--batch-size", "100"];

    const tty = await runUnderTerminal(sync, env);
    assert.equal(tty.code, 0, tty.screen);
    assert.match(tty.screen, PROGRESS_LINE, tty.screen);
    assert.match(tty.screen, /rows\/s {2}ETA \d+:\d\d/);
    // The last drawing is the finished state: every row done, then a newline.
    assert.match(
      tty.screen,
      /\r\[#+\] 5,000 \/ 5,000 rows {2}0 left {2}[\d,]+ rows\/s {2}took \d+:\d\d<EL>\r?\n/,
    );

    // Into a pipe (stdout and stderr not terminals): the same drain, no progress at all.
    await seedReadings(p.local.sql, { count: 5000, meters: 5, days: 2 });
    const piped = await runCli(sync, { env });
    assert.equal(piped.code, 0, piped.stderr);
    for (const out of [piped.stdout, piped.stderr]) {
      assert.ok(!out.includes("ETA") && !out.includes("\r") && !out.includes("\x1b[K"), out);
    }

    // JSON logs on a terminal: every line is a log record, nothing else.
    await seedReadings(p.local.sql, { count: 5000, meters: 5, days: 2 });
    const json = await runUnderTerminal([...sync, "--log-format", "json"], env);
    assert.equal(json.code, 0, json.screen);
    assert.ok(!json.screen.includes("ETA") && !json.screen.includes("<EL>"), json.screen);
    const lines = json.screen.split(/\r?\n/).map((l) => l.trim()).filter(Boolean);
    assert.ok(lines.length >= 1);
    for (const line of lines) assert.doesNotThrow(() => JSON.parse(line), line);
  },
});
