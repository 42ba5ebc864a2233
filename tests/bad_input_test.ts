/** Bad input, fuzzed (issue #6 point 5): odd command lines and URLs, and databases of the wrong shape. */
import assert from "node:assert/strict";
import { COMMAND_SPECS, COMMANDS, COMMON_FLAGS, ENV_VARS, parseInvocation } from "../lib/config.ts";
import { freePort } from "../lib/embedded.ts";
import {
  classifyError,
  ConfigError,
  CycleError,
  describeError,
  ExitCode,
  exitCodeOf,
  failureLine,
  oneLine,
  SchemaError,
} from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { redactText } from "../lib/redact.ts";
import { seedReadings } from "../lib/seed.ts";
import { seededRandom } from "../scripts/seeded_random.ts";
import { type CliResult, freshDb, runCli, type Sql, type TestDb } from "./_harness.ts";

// ---------------------------------------------------------------------------------------------
// A seeded source of randomness: every failure names the seed and the case that reproduce it.

/** The seed of this run: METER_SYNC_FUZZ_SEED replays a failure, otherwise a fixed one. */
const SEED = Number(Deno.env.get("METER_SYNC_FUZZ_SEED") ?? 0x5eed6);

class Gen {
  constructor(readonly random: () => number) {}
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.random() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.random() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.random() * items.length)];
  }
}

/** Every flag name a command knows, and a few it does not. */
const KNOWN_FLAGS = [
  ...new Set([
    ...Object.keys(COMMON_FLAGS),
    ...COMMANDS.flatMap((c) => Object.keys(COMMAND_SPECS[c].flags)),
  ]),
];
const UNKNOWN_FLAGS = [
  "--bogus",
  "--batch_size",
  "--batchsize",
  "--Batch-Size",
  "--local",
  "--url",
  "--verbose",
  "--dry-run",
  "-x",
  "-b",
  "-hx",
  "---batch-size",
  "--=1",
  "--ünïcode",
  "--json=",
  "--all=yes",
];

/** Odd characters that turn up in URLs typed by hand: reserved, unicode, spaces, escapes. */
const ODD = [
  "%",
  "%4",
  "%zz",
  "%40",
  "%3A",
  "%2F",
  "%00",
  "@",
  ":",
  "/",
  "?",
  "#",
  " ",
  "\t",
  "&",
  "=",
  "[",
  "]",
  "\\",
  '"',
  "'",
  "`",
  "ü",
  "Zähler",
  "电表",
  "🔌",
  "\u200b",
  "+",
  ";",
  ",",
  "*",
  "$",
  "!",
  "~",
  "^",
  "|",
  "<",
  ">",
  "{",
  "}",
];

/** A fragment that may hold odd characters. */
function oddText(g: Gen, base: string): string {
  if (g.chance(0.35)) return base;
  // By code point: an insertion never splits a surrogate pair.
  const out = Array.from(base);
  for (let i = g.int(1, 3); i > 0; i--) out.splice(g.int(0, out.length), 0, g.pick(ODD));
  return out.join("");
}

/** The password of a generated URL: a marker that must never be printed, plus odd characters. */
function password(g: Gen, n: number): string {
  return oddText(g, `Pw${n}q${g.pick(["Secret", "Hunter", "Zebra"])}`);
}

const SCHEMES = ["postgres", "postgresql", "postgres", "postgresql", "http", "mysql", "pg", ""];
const PARAMS = [
  "sslmode=require",
  "sslmode=disable",
  "sslmode=verify-full",
  "sslmode=sometimes",
  "sslmode=",
  "sslmode=REQUIRE",
  "sslrootcert=/etc/ssl/ca.pem",
  "connect_timeout=1",
  "connect_timeout=0",
  "connect_timeout=-5",
  "connect_timeout=abc",
  "connect_timeout=99999",
  "application_name=gw 7",
  "application_name=Zähler",
  "user=other",
  "dbname=other",
  "host=",
  "port=0",
  "port=99999",
  "port=5432",
  "target_session_attrs=any",
  "options=-c%20x=1",
  "bogus=1",
  "sslmode",
  "=",
  "&&",
];

/** A database URL with odd characters in any part, a missing part, or a wrong scheme. */
function randomUrl(g: Gen, n: number): { url: string; secret?: string } {
  const scheme = g.pick(SCHEMES);
  const user = g.chance(0.1) ? "" : oddText(g, g.pick(["meter", "gw", "Ünï", "a b"]));
  const secret = g.chance(0.75) ? password(g, n) : undefined;
  const host = g.pick([
    "127.0.0.1",
    "localhost",
    "db.example.com",
    "[::1]",
    "[fe80::1%25eth0]",
    "::1",
    "[::1",
    "",
    "db_host",
    "zähler.example",
    "host name",
    "1.2.3.4.5",
    oddText(g, "h"),
  ]);
  const port = g.pick(["", ":5432", ":0", ":65536", ":-1", ":abc", ":", ":1e3", ":5432:1"]);
  const db = g.chance(0.1) ? "" : oddText(g, g.pick(["gateway", "central", "My DB", "d"]));
  const userinfo = user || secret !== undefined
    ? `${user}${secret !== undefined ? `:${secret}` : ""}@`
    : "";
  const query = g.chance(0.5)
    ? "?" + Array.from({ length: g.int(1, 3) }, () => g.pick(PARAMS)).join("&")
    : "";
  const slashes = g.pick(["//", "//", "//", "/", "///", ""]);
  let url = `${scheme}${scheme ? ":" : ""}${slashes}${userinfo}${host}${port}/${db}${query}`;
  if (g.chance(0.05)) url = g.pick(["", " ", "postgres://", "not a url", url.toUpperCase()]);
  if (g.chance(0.05)) url = ` ${url} `;
  if (g.chance(0.1) && secret !== undefined) {
    // The password as a parameter instead of in the user info.
    url = `${scheme || "postgres"}://${user || "meter"}@${host}${port}/${db}?password=${secret}`;
  }
  return { url, secret };
}

/** A flag value: numbers in and out of range, empty, unicode, spaces, leading dashes. */
function randomValue(g: Gen, flag: string, n: number, secrets: string[]): string {
  if (flag.endsWith("-url")) {
    const { url, secret } = randomUrl(g, n);
    if (secret) secrets.push(secret);
    return url;
  }
  return g.pick([
    "",
    " ",
    "0",
    "1",
    "7",
    "100",
    "-1",
    "-5",
    "1e3",
    "0x10",
    "1.5",
    "12abc",
    "99999999999999999999999",
    String(Number.MAX_SAFE_INTEGER),
    "Infinity",
    "NaN",
    "١٢",
    "５",
    "30s",
    "500ms",
    "5m",
    "-30s",
    "1h",
    "25h",
    "*/5 * * * *",
    "* * *",
    "local",
    "remote",
    "both",
    "json",
    "pretty",
    "debug",
    "LOUD",
    "meter_readings",
    "Readings Table",
    'a"b',
    "x".repeat(64),
    "x".repeat(5000),
    "meters,,foo, bar",
    "127.0.0.1:9464",
    "[::1]:9464",
    ":0",
    "00000000-0000-4000-8000-000000000000",
    "not-a-uuid",
    "--batch-size",
    "-",
    "--",
    "Zähler 电表 🔌",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "bell\u0007",
    "esc\u001b[31mred",
    "=",
    "==",
    "/dev/null",
    "/nonexistent/file",
  ]);
}

/** A command line: a command (or not), flags known and unknown, values in every form. */
function randomArgs(g: Gen, n: number, secrets: string[]): string[] {
  const args: string[] = [];
  const first = g.chance(0.85) ? g.pick(COMMANDS) : g.pick([
    "",
    "SYNC",
    "sync ",
    "synk",
    "help",
    "--help",
    "-h",
    "--version",
    "-V",
    "--batch-size",
    "-",
    "--",
    "ẞync",
    "status\n",
  ]);
  args.push(first);
  if (first === "help" && g.chance(0.5)) args.push(g.pick([...COMMANDS, "nope"]));
  for (let i = g.int(0, 6); i > 0; i--) {
    const r = g.random();
    if (r < 0.7) {
      const name = g.pick(KNOWN_FLAGS);
      const value = randomValue(g, name, n, secrets);
      const form = g.int(0, 3);
      if (form === 0) args.push(`--${name}`, value);
      else if (form === 1) args.push(`--${name}=${value}`);
      else if (form === 2) args.push(`--${name}`);
      else args.push(`--${name}`, value, `--${name}=${randomValue(g, name, n, secrets)}`);
    } else if (r < 0.85) {
      args.push(g.pick(UNKNOWN_FLAGS));
      if (g.chance(0.5)) args.push(randomValue(g, "x", n, secrets));
    } else if (r < 0.9) {
      args.push(g.pick(["-h", "--help", "--", "-", "stray", "--version"]));
    } else {
      args.push(randomValue(g, "x", n, secrets));
    }
  }
  return args;
}

/** An environment: sometimes the URLs, sometimes odd settings. */
function randomEnv(g: Gen, n: number, secrets: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of ENV_VARS) {
    if (!g.chance(name.endsWith("DATABASE_URL") ? 0.6 : 0.08)) continue;
    env[name] = name.endsWith("DATABASE_URL")
      ? randomValue(g, "local-url", n, secrets)
      : randomValue(g, name, n, secrets);
  }
  return env;
}

/** One fuzz case. */
interface Case {
  n: number;
  args: string[];
  env: Record<string, string>;
  secrets: string[];
}

/** Values each flag accepts, for the cases that should get through (boolean flags: none). */
const PLAUSIBLE: Record<string, string[]> = {
  "batch-size": ["1", "100", "5000", " 7 ", "100000"],
  "max-retries": ["0", "3", "100"],
  table: ["meter_readings", "Readings Table", 'a"b', "Zähler"],
  "log-level": ["debug", "error", "trace"],
  "log-format": ["json", "pretty"],
  "max-batches": ["1", "10"],
  "download-tables": ["meters", "meters, tariffs", ""],
  "agent-id": ["gw-17", "Zähler 电表"],
  "stale-after": ["15m", "1h", "90s"],
  every: ["30s", "500ms", "1h"],
  cron: ["*/5 * * * *", "0 3 * * 1"],
  jitter: ["0", "10s"],
  "max-backoff": ["10m", "1s"],
  http: ["9464", "127.0.0.1:9464", "[::1]:9464", ":9464"],
  target: ["local", "remote", "both"],
  count: ["1", "1000"],
  meters: ["5"],
  days: ["1", "3650"],
  id: ["00000000-0000-4000-8000-000000000000", "ABCDEF00-0000-4000-8000-000000000000"],
  "password-file": ["/nonexistent/pw"],
  "local-password-file": ["/nonexistent/pw"],
};

/** A URL that parses, odd characters percent-encoded, and its password. */
function validUrl(g: Gen, n: number, secrets: string[]): string {
  const secret = password(g, n);
  secrets.push(secret);
  const user = encodeURIComponent(oddText(g, g.pick(["meter", "gw", "Ünï"])));
  const db = encodeURIComponent(oddText(g, g.pick(["gateway", "central", "My DB"])));
  const host = g.pick(["127.0.0.1", "localhost", "[::1]", "db.example.com", "zähler.example"]);
  const port = g.pick(["", ":5432", ":6543"]);
  const query = g.pick([
    "",
    "?sslmode=require",
    "?sslmode=disable&connect_timeout=5",
    "?application_name=gw%207",
    `?password=${encodeURIComponent(secret)}`,
  ]);
  const info = query.startsWith("?password") ? user : `${user}:${encodeURIComponent(secret)}`;
  return `${g.pick(["postgres", "postgresql"])}://${info}@${host}${port}/${db}${query}`;
}

/** A command line that should mostly get through: the command's own flags, sound values. */
function plausibleCase(g: Gen, n: number): Case {
  const secrets: string[] = [];
  const command = g.pick(COMMANDS);
  const env: Record<string, string> = {};
  if (g.chance(0.8)) env.LOCAL_DATABASE_URL = validUrl(g, n, secrets);
  if (g.chance(0.8)) env.REMOTE_DATABASE_URL = validUrl(g, n, secrets);
  const args: string[] = [command];
  if (command === "run") args.push(g.chance(0.5) ? "--every=30s" : "--cron=*/5 * * * *");
  if (command === "requeue") args.push("--all");
  const flags = [...Object.keys(COMMON_FLAGS), ...Object.keys(COMMAND_SPECS[command].flags)]
    .filter((f) => f !== "help" && f !== "every" && f !== "cron");
  for (let i = g.int(0, 4); i > 0; i--) {
    const name = g.pick(flags);
    if (name.endsWith("-url")) {
      args.push(`--${name}`, validUrl(g, n, secrets));
    } else if (!PLAUSIBLE[name]) {
      args.push(`--${name}`);
    } else {
      const value = g.pick(PLAUSIBLE[name]);
      args.push(...(g.chance(0.5) ? [`--${name}=${value}`] : [`--${name}`, value]));
    }
  }
  return { n, args, env, secrets };
}

function randomCase(g: Gen, n: number): Case {
  if (g.chance(0.4)) return plausibleCase(g, n);
  const secrets: string[] = [];
  const env = randomEnv(g, n, secrets);
  const args = randomArgs(g, n, secrets);
  return { n, args, env, secrets };
}

function show(c: Case): string {
  return `seed ${SEED} case ${c.n}: args ${JSON.stringify(c.args)} env ${JSON.stringify(c.env)}`;
}

/** The forms a password takes once printed: as typed, percent-decoded, and its marker. */
function secretForms(secret: string): string[] {
  const forms = new Set([secret]);
  try {
    forms.add(decodeURIComponent(secret));
  } catch {
    // a malformed escape: printed as typed, if at all
  }
  const marker = /Pw\d+q(Secret|Hunter|Zebra)/.exec(secret.replace(/[^\w]/g, ""))?.[0];
  if (marker) forms.add(marker);
  return [...forms].filter((f) => f.length >= 4);
}

/** Where a password shows in a text, if it does. */
function leakIn(text: string, secrets: string[]): string | undefined {
  const squeezed = text.replace(/[^\w]/g, "");
  for (const secret of secrets) {
    for (const form of secretForms(secret)) {
      if (text.includes(form) || squeezed.includes(form.replace(/[^\w]/g, ""))) return form;
    }
  }
  return undefined;
}

/** C0 controls (tab aside) and DEL: a newline splits the line, an escape recolours a terminal. */
// deno-lint-ignore no-control-regex
const CONTROL = /[\u0000-\u0008\u000a-\u001f\u007f]/;

/** What a case must do in parseInvocation: a result, or a ConfigError of one clean line. */
function checkParse(c: Case): ReturnType<typeof parseInvocation> | ConfigError {
  let parsed: ReturnType<typeof parseInvocation>;
  try {
    parsed = parseInvocation({ args: c.args, env: c.env });
  } catch (err) {
    assert.ok(
      err instanceof ConfigError,
      `not a ConfigError: ${(err as Error)?.stack ?? err}\n${show(c)}`,
    );
    const message = err.message;
    assert.ok(message.trim().length > 0, `empty message\n${show(c)}`);
    assert.ok(!CONTROL.test(message), `not one clean line: ${JSON.stringify(message)}\n${show(c)}`);
    const leak = leakIn(message, c.secrets);
    assert.equal(leak, undefined, `password "${leak}" in: ${message}\n${show(c)}`);
    return err;
  }
  if (parsed.kind !== "command") return parsed;
  const config = parsed.config;
  // Every setting within the bounds its --help states.
  assert.ok(Number.isInteger(config.batchSize) && config.batchSize >= 1, show(c));
  assert.ok(config.batchSize <= 100_000, show(c));
  assert.ok(Number.isInteger(config.maxRetries) && config.maxRetries >= 0, show(c));
  assert.ok(config.maxRetries <= 100, show(c));
  assert.ok(config.table.trim().length > 0 && config.table.length <= 63, show(c));
  for (const target of [config.local, config.remote]) {
    if (!target) continue;
    assert.ok(target.host.length > 0 && target.user.length > 0 && target.database.length > 0);
    assert.ok(Number.isInteger(target.port) && target.port >= 1 && target.port <= 65535);
    assert.ok(target.connectTimeout > 0 && target.connectTimeout <= 3600, show(c));
    const leak = leakIn(target.display, c.secrets);
    assert.equal(leak, undefined, `password "${leak}" in display ${target.display}\n${show(c)}`);
    // main.ts masks config.secrets in every line: the password must be among them.
    if (target.password) {
      const line = `failed: could not connect as ${target.password} to ${target.display}`;
      const masked = redactText(line, config.secrets);
      assert.ok(!masked.includes(target.password), `secrets miss the password\n${show(c)}`);
    }
  }
  return parsed;
}

Deno.test("parseInvocation() answers 5,000 random command lines with a config or a one-line ConfigError, never a password", () => {
  const g = new Gen(seededRandom(SEED));
  let errors = 0;
  let commands = 0;
  for (let n = 0; n < 5000; n++) {
    const result = checkParse(randomCase(g, n));
    if (result instanceof ConfigError) errors++;
    else if (result.kind === "command") commands++;
  }
  // The generator must exercise both outcomes, or the test proves little.
  assert.ok(errors > 2000, `only ${errors} errors (seed ${SEED})`);
  assert.ok(commands > 1000, `only ${commands} commands (seed ${SEED})`);
});

// ---------------------------------------------------------------------------------------------
// The same fuzz through the real CLI: a smaller sample, run as a user runs it.

/** A stack frame in any form: "    at f (file:///x.ts:1:2)", or escaped inside a JSON line. */
const STACK_FRAME = /(?:^|\\n|\n)\s*at .*\.(?:ts|js|mjs):\d+:\d+|error: Uncaught/m;

function describeRun(args: string[], r: CliResult, extra = ""): string {
  return `${extra}meter-sync ${
    JSON.stringify(args)
  } -> exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** Exit `codes`, one line on stderr starting "meter-sync:", no stack trace, no password. */
function assertOneLine(
  args: string[],
  r: CliResult,
  codes: number[],
  secrets: string[] = [],
  extra = "",
): string {
  const why = describeRun(args, r, extra);
  assert.ok(codes.includes(r.code), `exit ${r.code}, expected ${codes.join(" or ")}\n${why}`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `not one line on stderr\n${why}`);
  assert.match(lines[0], /^meter-sync: \S/, why);
  assert.doesNotMatch(r.stderr, STACK_FRAME, `stack trace\n${why}`);
  const leak = leakIn(r.stderr + r.stdout, secrets);
  assert.equal(leak, undefined, `password "${leak}" printed\n${why}`);
  return lines[0];
}

/** Runs `jobs` with at most `limit` at a time: the machine is shared. */
async function inBatches<T, R>(items: T[], limit: number, job: (item: T) => Promise<R>) {
  const results: R[] = new Array(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: limit }, async () => {
      while (next < items.length) {
        const i = next++;
        results[i] = await job(items[i]);
      }
    }),
  );
  return results;
}

/** Settings the subprocess needs to find its own cache: not for the fuzz to change. */
const KEEP_ENV = new Set(["HOME"]);

/** A URL to a port nobody listens on, with odd characters where URLs allow them. */
function closedUrl(g: Gen, n: number, secrets: string[]): string {
  const secret = password(g, n);
  secrets.push(secret);
  const enc = (s: string) => g.chance(0.5) ? encodeURIComponent(s) : s;
  const user = enc(oddText(g, "meter"));
  const db = enc(oddText(g, "gateway"));
  const host = g.pick(["127.0.0.1", "127.0.0.1", "localhost", "[::1]"]);
  return `postgres://${user}:${enc(secret)}@${host}:${freePort()}/${db}?connect_timeout=2`;
}

/** A case for the CLI, and what the pure parser says it must do. */
function cliCase(g: Gen, n: number): { c: Case; expect: "usage" | "ok" | "db" } | undefined {
  const c = randomCase(g, n);
  for (const k of KEEP_ENV) delete c.env[k];
  const first = checkParse(c);
  if (first instanceof ConfigError) return { c, expect: "usage" };
  if (first.kind !== "command") return { c, expect: "ok" };
  // Needs a database: point every URL at a closed port, and keep the retries short.
  const command = first.config.command;
  if (command === "demo" || command === "run") return undefined;
  const args = [
    ...c.args.filter((a, i) =>
      !/^--(local|remote)-url/.test(a) && !/^--(local|remote)-url$/.test(c.args[i - 1] ?? "")
    ),
  ];
  const env: Record<string, string> = { ...c.env };
  const secrets: string[] = [];
  env.LOCAL_DATABASE_URL = closedUrl(g, n, secrets);
  env.REMOTE_DATABASE_URL = closedUrl(g, n, secrets);
  delete env.METER_SYNC_PASSWORD_FILE;
  delete env.METER_SYNC_LOCAL_PASSWORD_FILE;
  env.METER_SYNC_MAX_RETRIES = "1";
  const rewritten: Case = { n, args, env, secrets };
  const second = checkParse(rewritten);
  if (second instanceof ConfigError) return { c: rewritten, expect: "usage" };
  if (second.kind !== "command") return { c: rewritten, expect: "ok" };
  if (["demo", "run"].includes(second.config.command) || second.config.maxRetries > 1) {
    return undefined;
  }
  return { c: rewritten, expect: "db" };
}

Deno.test("the CLI answers 24 random command lines with exit 0, 1 or 2 and one clean line, never a stack trace or a password", async () => {
  const g = new Gen(seededRandom(SEED + 1));
  const cases: { c: Case; expect: "usage" | "ok" | "db" }[] = [];
  const want = { usage: 14, ok: 3, db: 7 };
  for (let n = 0; cases.length < 24 && n < 100_000; n++) {
    const next = cliCase(g, n);
    if (!next || cases.filter((x) => x.expect === next.expect).length >= want[next.expect]) {
      continue;
    }
    cases.push(next);
  }
  assert.equal(cases.length, 24, `seed ${SEED}: the generator found too few cases`);
  const results = await inBatches(
    cases,
    4,
    ({ c }) => runCli(c.args, { env: c.env, timeoutMs: 60_000 }),
  );
  cases.forEach(({ c, expect }, i) => {
    const r = results[i];
    const extra = `${show(c)}\n`;
    if (expect === "ok") {
      assert.equal(r.code, 0, describeRun(c.args, r, extra));
      assert.equal(r.stderr, "", describeRun(c.args, r, extra));
      assert.ok(r.stdout.length > 0, describeRun(c.args, r, extra));
    } else if (expect === "usage") {
      assertOneLine(c.args, r, [2], c.secrets, extra);
      assert.equal(r.stdout, "", describeRun(c.args, r, extra));
    } else {
      // The database does not answer: the cycle fails (1), or a setting is wrong (2).
      const why = describeRun(c.args, r, extra);
      assert.ok([1, 2].includes(r.code), why);
      assert.doesNotMatch(r.stderr, STACK_FRAME, `stack trace\n${why}`);
      const leak = leakIn(r.stderr + r.stdout, c.secrets);
      assert.equal(leak, undefined, `password "${leak}" printed\n${why}`);
      if (r.code === 2) assertOneLine(c.args, r, [2], c.secrets, extra);
      assert.match(
        r.stderr.trimEnd().split("\n").at(-1) ?? "",
        /meter-sync: |"level":"error"/,
        why,
      );
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Databases of the wrong shape: real PostgreSQL, one server for the file, fresh databases.

const READINGS = 40;

/** Readings and distinct ids on one side (0 when the table is missing). */
async function rows(sql: Sql): Promise<{ rows: number; ids: number }> {
  const [exists] = await sql`SELECT to_regclass('meter_readings') IS NOT NULL AS ok`;
  if (!exists.ok) return { rows: 0, ids: 0 };
  const [row] = await sql`
    SELECT count(*)::int AS rows, count(DISTINCT id)::int AS ids FROM meter_readings`;
  return row as unknown as { rows: number; ids: number };
}

/**
 * Every reading is on one side or the other, once: none lost, none duplicated.
 * `sharedIds` readings locally share an id with another on purpose.
 */
async function assertNothingLost(
  local: TestDb,
  remote: TestDb,
  total: number,
  why: string,
  sharedIds = 0,
) {
  const l = await rows(local.sql);
  const r = await rows(remote.sql);
  assert.equal(l.rows - l.ids, sharedIds, `duplicated locally: ${why}`);
  assert.equal(r.rows, r.ids, `duplicated remotely: ${why}`);
  if (l.rows + r.rows !== total) {
    assert.fail(
      `${total - l.rows - r.rows} readings lost (local ${l.rows}, remote ${r.rows}): ${why}`,
    );
  }
  if (r.rows > 0 && l.rows > 0) {
    const ids = (await local.sql`SELECT id::text AS id FROM meter_readings`).map((x) => x.id);
    const [both] = await remote.sql`
      SELECT count(*)::int AS n FROM meter_readings WHERE id = ANY (${ids}::uuid[])`;
    assert.equal(both.n, 0, `readings on both sides: ${why}`);
  }
}

async function migrated(side: "local" | "remote", seed = 0): Promise<TestDb & AsyncDisposable> {
  const db = await freshDb();
  await migrate(db.sql, await loadMigrations(migrationsDir(side)));
  if (seed) await seedReadings(db.sql, { count: seed, meters: 3, days: 1 });
  return db;
}

/** A database every new session of which is read-only. */
async function makeReadOnly(db: TestDb): Promise<void> {
  await db.sql.unsafe(`ALTER DATABASE "${db.name}" SET default_transaction_read_only = on`);
}

function envOf(local: TestDb, remote: TestDb): Record<string, string> {
  return {
    LOCAL_DATABASE_URL: local.url,
    REMOTE_DATABASE_URL: remote.url,
    METER_SYNC_MAX_RETRIES: "1",
  };
}

/**
 * Runs commands against the pair, three at a time (each must leave the data as it is), each
 * checked to exit with one of `code` and one line; then counts the readings on both sides.
 */
async function expectEach(
  local: TestDb,
  remote: TestDb,
  runs: { args: string[]; code: number[]; says?: RegExp }[],
  total: number,
  sharedIds = 0,
): Promise<void> {
  const secrets = [local.server.password];
  const env = envOf(local, remote);
  const results = await inBatches(runs, 3, (run) => runCli(run.args, { env, timeoutMs: 60_000 }));
  runs.forEach((run, i) => {
    const line = assertOneLine(run.args, results[i], run.code, secrets);
    if (run.says) assert.match(line, run.says, describeRun(run.args, results[i]));
  });
  await assertNothingLost(
    local,
    remote,
    total,
    runs.map((r) => r.args.join(" ")).join(", "),
    sharedIds,
  );
}

Deno.test("a gateway table without a primary key stops the upload with exit 3 naming id; nothing moves", async () => {
  await using local = await migrated("local", READINGS);
  await using remote = await migrated("remote");
  await local.sql`ALTER TABLE meter_readings DROP CONSTRAINT meter_readings_pkey CASCADE`;
  // Two readings with one id: without a key on the gateway, one would be lost centrally.
  await local.sql.unsafe(`INSERT INTO meter_readings
    SELECT * FROM meter_readings ORDER BY createdat LIMIT 1`);
  await local.sql.unsafe(`UPDATE meter_readings SET voltage_l1_v = 1 WHERE ctid = (
    SELECT max(ctid) FROM meter_readings)`);
  const says = /"id".*no primary key or unique index on id on the gateway/;
  await expectEach(local, remote, [{ args: ["sync"], code: [3], says }], READINGS + 1, 1);
  const r = await runCli(["check-schema"], { env: envOf(local, remote) });
  assert.equal(r.code, 3, describeRun(["check-schema"], r));
  assert.match(r.stdout, /BLOCKS\s+id\b.*gateway/, describeRun(["check-schema"], r));
  assert.doesNotMatch(r.stderr, STACK_FRAME, describeRun(["check-schema"], r));
});

Deno.test("a central column of another type stops the upload with exit 3 naming the column and both types", async () => {
  for (
    const [column, localType, remoteType] of [
      ["voltage_l1_v", "real", "integer"],
      ["energy_import_kwh", "numeric(18,3)", "text"],
    ]
  ) {
    await using local = await migrated("local", READINGS);
    await using remote = await migrated("remote");
    await remote.sql.unsafe(
      `ALTER TABLE meter_readings ALTER COLUMN ${column} TYPE ${remoteType} USING NULL`,
    );
    const says = new RegExp(`"${column}".*${localType.replace(/[()]/g, "\\$&")}.*${remoteType}`);
    const args = column === "voltage_l1_v" ? ["sync"] : ["upload", "--batch-size", "7"];
    await expectEach(local, remote, [{ args, code: [3], says }], READINGS);
    if (column !== "voltage_l1_v") continue;
    const r = await runCli(["check-schema"], { env: envOf(local, remote) });
    assert.equal(r.code, 3, describeRun(["check-schema"], r));
    assert.match(r.stdout, new RegExp(`BLOCKS\\s+${column}\\s+real\\s+integer`), r.stdout);
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  }
});

Deno.test("an empty gateway database: every command exits 3 with one line that says to migrate", async () => {
  await using local = await freshDb();
  await using remote = await migrated("remote");
  const migrateLocal = /meter_readings.*local.*migrate/;
  await expectEach(local, remote, [
    { args: ["sync"], code: [3], says: migrateLocal },
    { args: ["check-schema"], code: [3], says: migrateLocal },
    { args: ["status", "--json"], code: [3], says: migrateLocal },
    { args: ["download"], code: [3], says: /"meters".*local/ },
    { args: ["seed", "--count", "5"], code: [3], says: migrateLocal },
    { args: ["requeue", "--all"], code: [3], says: /meter_sync_quarantine.*migrate/ },
  ], 0);
});

Deno.test("an empty central database: sync, upload, check-schema and download exit 3 saying to migrate; no reading moves", async () => {
  await using local = await migrated("local", READINGS);
  await using remote = await freshDb();
  await expectEach(local, remote, [
    { args: ["sync"], code: [3], says: /meter_readings.*remote.*migrate/ },
    { args: ["upload"], code: [3], says: /meter_readings.*remote.*migrate/ },
    { args: ["check-schema"], code: [3], says: /meter_readings.*remote.*migrate/ },
    { args: ["download"], code: [3], says: /"meters".*remote/ },
  ], READINGS);
  // Status reads the gateway: it still answers (1 only because no cycle ever succeeded).
  const r = await runCli(["status", "--json"], { env: envOf(local, remote) });
  assert.ok([0, 1].includes(r.code), describeRun(["status", "--json"], r));
  assert.equal(JSON.parse(r.stdout).queue_size, READINGS, r.stdout);
  assert.doesNotMatch(r.stderr, STACK_FRAME);
});

Deno.test("a read-only central database (default_transaction_read_only): sync exits 2 with one line saying how to fix it; every reading stays queued", async () => {
  await using local = await migrated("local", READINGS);
  await using remote = await migrated("remote");
  await makeReadOnly(remote);
  const says =
    /remote database.*is read-only \(default_transaction_read_only is on\).*ALTER DATABASE/;
  await expectEach(local, remote, [
    { args: ["sync"], code: [2], says },
    { args: ["check-schema"], code: [2], says },
  ], READINGS);
  assert.equal((await rows(local.sql)).rows, READINGS);
  // Reading from it is fine: the reference data still comes down.
  const r = await runCli(["download"], { env: envOf(local, remote) });
  assert.equal(r.code, 0, describeRun(["download"], r));
});

Deno.test("a read-only gateway database with readings queued: every writing command exits 2 with one line saying how to fix it; nothing is lost or sent twice", async () => {
  await using local = await migrated("local", READINGS);
  await using remote = await migrated("remote");
  await makeReadOnly(local);
  await expectEach(local, remote, [
    {
      args: ["sync"],
      code: [2],
      says: /local database.*is read-only.*default_transaction_read_only/,
    },
    { args: ["download"], code: [2], says: /read-only/ },
    { args: ["seed", "--count", "5"], code: [2], says: /read-only/ },
    { args: ["migrate", "--target", "local"], code: [2], says: /read-only.*ALTER DATABASE/ },
  ], READINGS);
  assert.equal((await rows(remote.sql)).rows, 0);
  // Status only reads: it still answers on a read-only gateway (1 only when it is stale).
  const r = await runCli(["status", "--json"], { env: envOf(local, remote) });
  assert.ok([0, 1].includes(r.code), describeRun(["status", "--json"], r));
  assert.equal(JSON.parse(r.stdout).queue_size, READINGS, r.stdout);
  assert.doesNotMatch(r.stderr, STACK_FRAME);
});

Deno.test("a central user without INSERT on the readings exits 2 naming the privilege and the fix; nothing moves", async () => {
  await using local = await migrated("local", READINGS);
  await using remote = await migrated("remote");
  const role = `ro_${remote.name}`;
  const pass = `Pw${crypto.randomUUID().slice(0, 8)}qSecret`;
  await remote.sql.unsafe(`CREATE ROLE "${role}" LOGIN PASSWORD '${pass}'`);
  await remote.sql.unsafe(`GRANT SELECT ON ALL TABLES IN SCHEMA public TO "${role}"`);
  try {
    const url = new URL(remote.url);
    url.username = role;
    url.password = pass;
    const env = { ...envOf(local, remote), REMOTE_DATABASE_URL: url.href };
    const r = await runCli(["sync"], { env });
    const line = assertOneLine(["sync"], r, [2], [pass, remote.server.password]);
    assert.match(line, new RegExp(`user "${role}" lacks INSERT on "meter_readings".*roles_remote`));
    await assertNothingLost(local, remote, READINGS, describeRun(["sync"], r));
    assert.equal((await rows(local.sql)).rows, READINGS);
  } finally {
    await remote.sql.unsafe(`REVOKE ALL ON ALL TABLES IN SCHEMA public FROM "${role}"`);
    await remote.sql.unsafe(`DROP OWNED BY "${role}"`).catch(() => {});
    await remote.sql.unsafe(`DROP ROLE IF EXISTS "${role}"`).catch(() => {});
  }
});

// ---------------------------------------------------------------------------------------------
// How errors map to exit codes and lines (lib/errors.ts), without a database.

/** An error shaped like a postgres.js PostgresError. */
function pgError(code: string, message: string): Error {
  return Object.assign(new Error(message), { name: "PostgresError", code, severity: "ERROR" });
}

Deno.test("a read-only database or a missing privilege mid-cycle is not retried, exits 2 and keeps the server's message with the fix", () => {
  const readOnly = pgError("25006", "cannot execute COPY FROM in a read-only transaction");
  const denied = pgError("42501", "permission denied for table meter_readings");
  for (const err of [readOnly, denied]) {
    assert.equal(classifyError(err), "permanent", err.message);
    const wrapped = new CycleError(
      `upload failed: ${describeError(err)}; every reading is still in the local queue`,
      { cause: err },
    );
    assert.equal(exitCodeOf(wrapped), ExitCode.usage, err.message);
    const line = failureLine(wrapped);
    assert.ok(line.includes(err.message), line);
    assert.ok(line.includes(`SQLSTATE ${(err as { code?: string }).code}`), line);
    assert.ok(!line.includes("\n"), line);
  }
  assert.match(failureLine(readOnly), /read-only.*default_transaction_read_only.*primary/);
  assert.match(failureLine(denied), /GRANT/);
});

Deno.test("exitCodeOf() gives 2 for a ConfigError, 3 for a SchemaError or a missing table, 1 otherwise, wrapped or not", () => {
  assert.equal(exitCodeOf(new ConfigError("x")), 2);
  assert.equal(exitCodeOf(new CycleError("x", { cause: new ConfigError("y") })), 2);
  assert.equal(exitCodeOf(new SchemaError("x")), 3);
  assert.equal(exitCodeOf(pgError("42P01", 'relation "meter_sync_quarantine" does not exist')), 3);
  assert.match(
    failureLine(pgError("42P01", 'relation "meter_sync_quarantine" does not exist')),
    /does not exist.*meter-sync migrate/,
  );
  // A wrong password, a user the server refuses, a database that does not exist: settings.
  for (const code of ["28P01", "28000", "3D000"]) {
    const wrapped = new CycleError("cannot reach the remote database", {
      cause: pgError(code, "refused"),
    });
    assert.equal(exitCodeOf(wrapped), 2, code);
    assert.match(failureLine(wrapped), /; (fix|the server refuses)/, code);
  }
  assert.equal(exitCodeOf(new CycleError("upload failed after 4 attempts")), 1);
  assert.equal(exitCodeOf(pgError("57P01", "terminating connection")), 1);
  assert.equal(exitCodeOf(new Error("boom")), 1);
  assert.equal(failureLine(new Error("boom\n    at x (file:///a.ts:1:2)")), "failed: boom");
  assert.equal(exitCodeOf("a string"), 1);
  // A cause chain that loops ends.
  const a = new Error("a") as Error & { cause?: unknown };
  a.cause = a;
  assert.equal(exitCodeOf(a), 1);
});

Deno.test("ConfigError, SchemaError and CycleError are one line whatever value they echo", () => {
  const raw = 'bell\u0007 new\nline carriage\rreturn esc\u001b[31m del\u007f tab\tok "Zähler"';
  for (const E of [ConfigError, SchemaError, CycleError]) {
    const message = new E(`--table must be a name (got "${raw}")`).message;
    assert.doesNotMatch(message, CONTROL, message);
    assert.ok(message.includes("new\\nline") && message.includes("\\u001b[31m"), message);
    assert.ok(message.includes("Zähler"), message);
  }
  assert.equal(oneLine("plain text, ünïcode 🔌"), "plain text, ünïcode 🔌");
});
