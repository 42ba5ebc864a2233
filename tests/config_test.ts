/** Tests of lib/config.ts: flags over environment over defaults, and one-line usage errors. */
import assert from "node:assert/strict";
import { type Config, helpText, parseInvocation } from "../lib/config.ts";
import { ConfigError } from "../lib/errors.ts";

const LOCAL = "postgres://gw:localpw@10.0.0.5:5432/gateway";
const REMOTE = "postgres://central:remotepw@db.example.com:5432/central";
const BOTH = { LOCAL_DATABASE_URL: LOCAL, REMOTE_DATABASE_URL: REMOTE };

/** The config of a command invocation; fails the test when it is help, version or an error. */
function configOf(args: string[], env: Record<string, string | undefined> = BOTH): Config {
  const parsed = parseInvocation({ args, env });
  assert.equal(parsed.kind, "command", `expected a command for ${args.join(" ")}`);
  return (parsed as { kind: "command"; config: Config }).config;
}

/** The ConfigError an invocation throws, checked to be one line. */
function usageError(args: string[], env: Record<string, string | undefined> = BOTH): ConfigError {
  let caught: unknown;
  try {
    parseInvocation({ args, env });
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ConfigError, `expected a ConfigError for: ${args.join(" ")}`);
  assert.ok(caught.message.length > 0, "the message is empty");
  assert.ok(!caught.message.includes("\n"), `not one line: ${JSON.stringify(caught.message)}`);
  return caught;
}

Deno.test("parseInvocation() uses the defaults when neither flag nor environment says otherwise", () => {
  const c = configOf(["status"]);
  assert.equal(c.command, "status");
  assert.equal(c.batchSize, 100);
  assert.equal(c.maxRetries, 3);
  assert.equal(c.table, "meter_readings");
  assert.equal(c.logLevel, "info");
  assert.equal(c.logFormat, "pretty");
  assert.equal(c.json, false);
});

Deno.test("parseInvocation() takes METER_SYNC_BATCH_SIZE over the default and --batch-size over both", () => {
  assert.equal(configOf(["status"], { ...BOTH, METER_SYNC_BATCH_SIZE: "250" }).batchSize, 250);
  assert.equal(
    configOf(["status", "--batch-size", "50"], { ...BOTH, METER_SYNC_BATCH_SIZE: "250" }).batchSize,
    50,
  );
  assert.equal(configOf(["status", "--batch-size=7"]).batchSize, 7);
});

Deno.test("parseInvocation() takes every environment setting over its default and the flag over the environment", () => {
  const env = {
    ...BOTH,
    METER_SYNC_MAX_RETRIES: "7",
    METER_SYNC_TABLE: "readings_env",
    METER_SYNC_LOG_LEVEL: "debug",
    METER_SYNC_LOG_FORMAT: "json",
  };
  const fromEnv = configOf(["status"], env);
  assert.equal(fromEnv.maxRetries, 7);
  assert.equal(fromEnv.table, "readings_env");
  assert.equal(fromEnv.logLevel, "debug");
  assert.equal(fromEnv.logFormat, "json");

  const fromFlags = configOf([
    "status",
    "--max-retries",
    "0",
    "--table",
    "Readings Flag",
    "--log-level",
    "error",
    "--log-format",
    "pretty",
  ], env);
  assert.equal(fromFlags.maxRetries, 0);
  assert.equal(fromFlags.table, "Readings Flag");
  assert.equal(fromFlags.logLevel, "error");
  assert.equal(fromFlags.logFormat, "pretty");
});

Deno.test("parseInvocation() takes --local-url over LOCAL_DATABASE_URL", () => {
  const c = configOf(["status", "--local-url", "postgres://flaguser:pw@flaghost:6000/flagdb"]);
  assert.equal(c.local?.host, "flaghost");
  assert.equal(c.local?.port, 6000);
  assert.equal(c.local?.user, "flaguser");
  assert.equal(c.local?.database, "flagdb");
  assert.equal(configOf(["status"]).local?.host, "10.0.0.5");
});

Deno.test("parseInvocation() does not validate an environment value that a flag overrides", () => {
  const c = configOf(["status", "--batch-size", "10"], { ...BOTH, METER_SYNC_BATCH_SIZE: "abc" });
  assert.equal(c.batchSize, 10);
});

Deno.test("parseInvocation() names the environment variable when an environment value is out of range", () => {
  const err = usageError(["status"], { ...BOTH, METER_SYNC_BATCH_SIZE: "abc" });
  assert.match(err.message, /METER_SYNC_BATCH_SIZE/);
  assert.match(err.message, /abc/);
});

Deno.test("parseInvocation() rejects an unknown command with one line naming it and the commands", () => {
  const err = usageError(["synch"]);
  assert.match(err.message, /unknown command "synch"/);
  assert.match(err.message, /\bsync\b/);
  assert.match(err.message, /--help/);
});

Deno.test("parseInvocation() rejects an unknown flag with one line naming the flag", () => {
  const err = usageError(["status", "--bogus"]);
  assert.match(err.message, /unknown flag --bogus/);
  assert.match(err.message, /meter-sync status --help/);
});

Deno.test("parseInvocation() rejects a flag before the command with one line", () => {
  const err = usageError(["--batch-size", "5", "status"]);
  assert.match(err.message, /--batch-size/);
  assert.match(err.message, /command/);
});

Deno.test("parseInvocation() rejects a flag that is missing its value with one line naming the flag", () => {
  const err = usageError(["status", "--batch-size"]);
  assert.match(err.message, /--batch-size/);
  assert.match(err.message, /needs a value/);
});

Deno.test("parseInvocation() rejects a value given to a boolean flag", () => {
  const err = usageError(["status", "--json=yes"]);
  assert.match(err.message, /--json/);
  assert.match(err.message, /takes no value/);
});

Deno.test("parseInvocation() rejects a positional argument with one line naming it", () => {
  const err = usageError(["status", "extra"]);
  assert.match(err.message, /"extra"/);
  assert.match(err.message, /status/);
});

for (
  const [args, flag, shown] of [
    [["status", "--batch-size", "0"], "--batch-size", "0"],
    [["status", "--batch-size", "1000001"], "--batch-size", "1000001"],
    [["status", "--batch-size", "abc"], "--batch-size", "abc"],
    [["status", "--batch-size", "1e3"], "--batch-size", "1e3"],
    [["status", "--batch-size", "12.5"], "--batch-size", "12.5"],
    [["status", "--max-retries=-1"], "--max-retries", "-1"],
    [["status", "--max-retries", "101"], "--max-retries", "101"],
    [["seed", "--count", "0"], "--count", "0"],
  ] as const
) {
  Deno.test(`parseInvocation() rejects ${args.slice(1).join(" ")} with one line naming the flag, the value and the range`, () => {
    const err = usageError([...args]);
    assert.ok(err.message.includes(flag), err.message);
    assert.ok(err.message.includes(`"${shown}"`), err.message);
    assert.match(err.message, /whole number from \d+ to \d+/);
  });
}

Deno.test("parseInvocation() accepts the edges of the batch-size and max-retries ranges", () => {
  assert.equal(configOf(["status", "--batch-size", "1"]).batchSize, 1);
  assert.equal(configOf(["status", "--max-retries", "0"]).maxRetries, 0);
  assert.equal(configOf(["status", "--max-retries", "100"]).maxRetries, 100);
});

Deno.test("parseInvocation() rejects --max-retries -1 with a message that names the flag and does not claim it takes no value", () => {
  const err = usageError(["status", "--max-retries", "-1"]);
  assert.match(err.message, /--max-retries/);
  // --max-retries does take a value; telling the user otherwise sends them the wrong way.
  assert.doesNotMatch(err.message, /takes no value/);
});

Deno.test("parseInvocation() rejects an invalid log level with one line listing the levels", () => {
  const err = usageError(["status", "--log-level", "loud"]);
  assert.match(err.message, /--log-level/);
  assert.match(err.message, /"loud"/);
  assert.match(err.message, /warning/);
});

Deno.test("parseInvocation() rejects an invalid log format with one line listing the formats", () => {
  const err = usageError(["status", "--log-format", "xml"]);
  assert.match(err.message, /--log-format/);
  assert.match(err.message, /"xml"/);
  assert.match(err.message, /pretty/);
  assert.match(err.message, /json/);
});

Deno.test("parseInvocation() names METER_SYNC_LOG_LEVEL when the invalid level came from the environment", () => {
  const err = usageError(["status"], { ...BOTH, METER_SYNC_LOG_LEVEL: "verbose" });
  assert.match(err.message, /METER_SYNC_LOG_LEVEL/);
  assert.match(err.message, /"verbose"/);
});

Deno.test("parseInvocation() rejects migrate --target bogus with one line listing the targets", () => {
  const err = usageError(["migrate", "--target", "bogus"]);
  assert.match(err.message, /--target/);
  assert.match(err.message, /"bogus"/);
  assert.match(err.message, /local/);
  assert.match(err.message, /remote/);
  assert.match(err.message, /both/);
});

Deno.test("parseInvocation() rejects requeue --id not-a-uuid with one line naming the value", () => {
  const err = usageError(["requeue", "--id", "not-a-uuid"]);
  assert.match(err.message, /--id/);
  assert.match(err.message, /UUID/);
  assert.match(err.message, /"not-a-uuid"/);
});

Deno.test("parseInvocation() accepts several requeue --id UUIDs and lowercases them", () => {
  const c = configOf([
    "requeue",
    "--id",
    "0F8FAD5B-D9CB-469F-A165-70867728950E",
    "--id",
    "7c9e6679-7425-40de-944b-e07fc1f90ae7",
  ]);
  assert.deepEqual(c.requeueIds, [
    "0f8fad5b-d9cb-469f-a165-70867728950e",
    "7c9e6679-7425-40de-944b-e07fc1f90ae7",
  ]);
  assert.equal(c.requeueAll, false);
});

Deno.test("parseInvocation() rejects a missing LOCAL_DATABASE_URL naming the variable and the flag", () => {
  const err = usageError(["status"], {});
  assert.match(err.message, /LOCAL_DATABASE_URL/);
  assert.match(err.message, /--local-url/);
});

Deno.test("parseInvocation() rejects a missing REMOTE_DATABASE_URL for check-schema naming the variable and the flag", () => {
  const err = usageError(["check-schema"], { LOCAL_DATABASE_URL: LOCAL });
  assert.match(err.message, /REMOTE_DATABASE_URL/);
  assert.match(err.message, /--remote-url/);
});

Deno.test("parseInvocation() treats an empty LOCAL_DATABASE_URL as missing", () => {
  const err = usageError(["status"], { LOCAL_DATABASE_URL: "" });
  assert.match(err.message, /LOCAL_DATABASE_URL/);
});

Deno.test("parseInvocation() lets migrate --target local run without REMOTE_DATABASE_URL", () => {
  const c = configOf(["migrate", "--target", "local"], { LOCAL_DATABASE_URL: LOCAL });
  assert.equal(c.migrateTarget, "local");
  assert.equal(c.local?.host, "10.0.0.5");
  assert.equal(c.remote, undefined);
});

Deno.test("parseInvocation() lets migrate --target remote run without LOCAL_DATABASE_URL", () => {
  const c = configOf(["migrate", "--target", "remote"], { REMOTE_DATABASE_URL: REMOTE });
  assert.equal(c.migrateTarget, "remote");
  assert.equal(c.remote?.host, "db.example.com");
  assert.equal(c.local, undefined);
});

Deno.test("parseInvocation() makes migrate without --target need both databases", () => {
  assert.equal(configOf(["migrate"]).migrateTarget, "both");
  const err = usageError(["migrate"], { LOCAL_DATABASE_URL: LOCAL });
  assert.match(err.message, /REMOTE_DATABASE_URL/);
});

Deno.test("parseInvocation() names the setting when a database URL is malformed", () => {
  const fromEnv = usageError(["status"], { LOCAL_DATABASE_URL: "http://u:pw@h/db" });
  assert.match(fromEnv.message, /LOCAL_DATABASE_URL/);
  const fromFlag = usageError(["status", "--local-url", "http://u:pw@h/db"]);
  assert.match(fromFlag.message, /--local-url/);
});

Deno.test("parseInvocation() returns help for no arguments, --help, -h and help", () => {
  for (const args of [[], ["--help"], ["-h"], ["help"]]) {
    assert.deepEqual(parseInvocation({ args, env: {} }), { kind: "help" }, args.join(" "));
  }
});

Deno.test("parseInvocation() returns a command's help without needing any database setting", () => {
  assert.deepEqual(parseInvocation({ args: ["status", "--help"], env: {} }), {
    kind: "help",
    command: "status",
  });
  assert.deepEqual(parseInvocation({ args: ["sync", "-h"], env: {} }), {
    kind: "help",
    command: "sync",
  });
  assert.deepEqual(parseInvocation({ args: ["help", "migrate"], env: {} }), {
    kind: "help",
    command: "migrate",
  });
});

Deno.test("parseInvocation() rejects help for an unknown command", () => {
  const err = usageError(["help", "frobnicate"], {});
  assert.match(err.message, /"frobnicate"/);
});

Deno.test("parseInvocation() returns version for --version and -V", () => {
  assert.deepEqual(parseInvocation({ args: ["--version"], env: {} }), { kind: "version" });
  assert.deepEqual(parseInvocation({ args: ["-V"], env: {} }), { kind: "version" });
});

Deno.test("parseInvocation() puts the URL passwords, raw and decoded, into config.secrets", () => {
  const c = configOf(["check-schema"], {
    LOCAL_DATABASE_URL: "postgres://gw:s3cr%40t:pw@h/db",
    REMOTE_DATABASE_URL: "postgres://central@h2/db2?password=qparam",
  });
  assert.ok(c.secrets.includes("s3cr%40t:pw"), JSON.stringify(c.secrets));
  assert.ok(c.secrets.includes("s3cr@t:pw"), JSON.stringify(c.secrets));
  assert.ok(c.secrets.includes("qparam"), JSON.stringify(c.secrets));
  assert.equal(c.local?.password, "s3cr@t:pw");
  assert.equal(c.remote?.password, "qparam");
});

Deno.test("parseInvocation() collects the secret of a --remote-url flag, not of the overridden variable", () => {
  const c = configOf(["check-schema", "--remote-url", "postgres://c:flagpw@h/db"]);
  assert.ok(c.secrets.includes("flagpw"), JSON.stringify(c.secrets));
  assert.ok(c.secrets.includes("localpw"), JSON.stringify(c.secrets));
});

Deno.test("parseInvocation() reads the pgpass file from PGPASSFILE, else HOME/.pgpass", () => {
  const noPw = { LOCAL_DATABASE_URL: "postgres://gw@h/db" };
  assert.equal(
    configOf(["status"], { ...noPw, PGPASSFILE: "/etc/meter-sync/pgpass", HOME: "/home/op" })
      .pgpassFile,
    "/etc/meter-sync/pgpass",
  );
  assert.equal(configOf(["status"], { ...noPw, HOME: "/home/op" }).pgpassFile, "/home/op/.pgpass");
  assert.equal(configOf(["status"], noPw).pgpassFile, undefined);
  assert.deepEqual(configOf(["status"], noPw).secrets, []);
});

Deno.test("helpText() lists every command of SPEC §3 with the exit codes", () => {
  const text = helpText();
  for (
    const command of [
      "sync",
      "upload",
      "download",
      "run",
      "status",
      "migrate",
      "check-schema",
      "seed",
      "requeue",
      "demo",
    ]
  ) {
    assert.match(text, new RegExp(`^  ${command} `, "m"), `--help does not list ${command}`);
  }
  for (const flag of ["--local-url", "--remote-url", "--batch-size", "--max-retries", "--table"]) {
    assert.ok(text.includes(flag), `--help does not list ${flag}`);
  }
  assert.match(text, /LOCAL_DATABASE_URL/);
  assert.match(text, /default 100/);
  assert.match(text, /3 schemas incompatible/);
});

Deno.test("helpText(command) shows the command's own flags and the common ones", () => {
  const seed = helpText("seed");
  assert.match(seed, /--count N/);
  assert.match(seed, /--batch-size/);
  const migrate = helpText("migrate");
  assert.match(migrate, /--target/);
  assert.match(migrate, /local\|remote\|both/);
  const status = helpText("status");
  assert.match(status, /--json/);
  assert.doesNotMatch(status, /--count/);
});
