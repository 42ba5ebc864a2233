/** End-to-end tests: main.ts run as a subprocess with the compile task's permissions, as a user runs it. */
import assert from "node:assert/strict";
import meta from "../deno.json" with { type: "json" };
import { COMMAND_SPECS, COMMANDS } from "../lib/config.ts";
import { freePort } from "../lib/embedded.ts";
import { type CliResult, freshDb, runCli, SPEC_STATUS_KEYS } from "./_harness.ts";

/** The commands of SPEC §3, written out so that a command dropped from the code is noticed. */
const SPEC_COMMANDS = [
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
];

/** A URL to a port nobody listens on. */
function closedUrl(password: string, database = "gateway"): string {
  return `postgres://meter:${password}@127.0.0.1:${freePort()}/${database}?connect_timeout=5`;
}

function describe(args: string[], r: CliResult): string {
  return `meter-sync ${args.join(" ")} -> exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
}

/** Exit code `code`, and exactly one line on stderr that starts "meter-sync:" with no stack trace. */
function assertOneLineFailure(args: string[], r: CliResult, code: number): string {
  const why = describe(args, r);
  assert.equal(r.code, code, why);
  assert.ok(r.stderr.endsWith("\n"), why);
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, `not one line on stderr: ${why}`);
  assert.match(lines[0], /^meter-sync: \S/, why);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `stack trace: ${why}`);
  assert.doesNotMatch(r.stderr, /error: Uncaught/, why);
  return lines[0];
}

Deno.test("meter-sync --help exits 0 and lists every command of SPEC §3", async () => {
  const r = await runCli(["--help"]);
  assert.equal(r.code, 0, describe(["--help"], r));
  assert.equal(r.stderr, "");
  for (const command of SPEC_COMMANDS) {
    assert.match(r.stdout, new RegExp(`^\\s+${command}\\s`, "m"), `--help lacks ${command}`);
  }
  assert.match(r.stdout, /--local-url/);
  assert.match(r.stdout, /--batch-size/);
});

Deno.test("meter-sync <command> --help exits 0 with the command's usage for every command", async () => {
  const results = await Promise.all(
    SPEC_COMMANDS.map(async (command) => [command, await runCli([command, "--help"])] as const),
  );
  for (const [command, r] of results) {
    const why = describe([command, "--help"], r);
    assert.equal(r.code, 0, why);
    assert.equal(r.stderr, "", why);
    assert.match(r.stdout, new RegExp(`^meter-sync ${command}\\b`), why);
    assert.match(r.stdout, /--log-level/, why);
  }
});

Deno.test("meter-sync --version exits 0 and prints the version of deno.json", async () => {
  const r = await runCli(["--version"]);
  assert.equal(r.code, 0, describe(["--version"], r));
  assert.equal(r.stderr, "");
  assert.ok(r.stdout.startsWith(`meter-sync ${meta.version}`), r.stdout);
  assert.equal(r.stdout.trimEnd().split("\n").length, 1);
});

Deno.test("meter-sync exits 2 with one line for every usage and configuration error", async () => {
  const local = { LOCAL_DATABASE_URL: "postgres://meter@127.0.0.1:1/gateway" };
  const cases: { args: string[]; env?: Record<string, string>; says: RegExp }[] = [
    { args: ["frobnicate"], says: /unknown command "frobnicate"/ },
    { args: ["status", "--bogus"], env: local, says: /unknown flag --bogus/ },
    { args: ["status", "--batch-size"], env: local, says: /--batch-size needs a value/ },
    { args: ["status", "stray"], env: local, says: /"stray"/ },
    { args: ["status", "--local-url", "http://meter@h/gw"], says: /--local-url.*postgres:\/\// },
    {
      args: ["status"],
      env: { LOCAL_DATABASE_URL: "postgres://meter@h/gw?sslmode=sometimes" },
      says: /LOCAL_DATABASE_URL.*sslmode/,
    },
    { args: ["status"], says: /LOCAL_DATABASE_URL.*--local-url/ },
    { args: ["check-schema"], env: local, says: /REMOTE_DATABASE_URL.*--remote-url/ },
    { args: ["status", "--batch-size", "0"], env: local, says: /--batch-size.*"0"/ },
    {
      args: ["status"],
      env: { ...local, METER_SYNC_BATCH_SIZE: "1000001" },
      says: /METER_SYNC_BATCH_SIZE.*"1000001"/,
    },
    { args: ["status", "--max-retries", "101"], env: local, says: /--max-retries.*"101"/ },
    { args: ["status", "--log-level", "loud"], env: local, says: /--log-level/ },
    { args: ["migrate", "--target", "bogus"], env: local, says: /--target.*"bogus"/ },
  ];
  const results = await Promise.all(cases.map((c) => runCli(c.args, { env: c.env })));
  cases.forEach((c, i) => {
    const line = assertOneLineFailure(c.args, results[i], 2);
    assert.match(line, c.says, describe(c.args, results[i]));
    assert.equal(results[i].stdout, "", describe(c.args, results[i]));
  });
});

Deno.test("meter-sync exits 2 for a malformed URL without showing its password", async () => {
  const cases = [
    ["status", "--local-url", "http://meter:hunter2pw@db.example.com/gw"],
    ["status", "--local-url", "postgres://meter:hunter2pw@db.example.com/gw?sslmode=nope"],
    ["status", "--local-url", "postgres://meter:hunter2pw@db.example.com:70000/gw"],
  ];
  const results = await Promise.all(cases.map((args) => runCli(args)));
  cases.forEach((args, i) => {
    assertOneLineFailure(args, results[i], 2);
    assert.ok(!results[i].stderr.includes("hunter2pw"), describe(args, results[i]));
  });
});

Deno.test("meter-sync exits 2 saying so for a command this release does not have yet", async () => {
  const unavailable = COMMANDS.filter((c) => !COMMAND_SPECS[c].available);
  const env = {
    LOCAL_DATABASE_URL: closedUrl("pw1"),
    REMOTE_DATABASE_URL: closedUrl("pw2", "central"),
  };
  const results = await Promise.all(unavailable.map((c) => runCli([c], { env })));
  unavailable.forEach((command, i) => {
    const line = assertOneLineFailure([command], results[i], 2);
    assert.match(line, /not available/, describe([command], results[i]));
    assert.ok(line.includes(command), line);
  });
});

Deno.test("meter-sync status exits 1 with one line and no password when the database is down", async () => {
  const runs: { label: string; args: string[]; env?: Record<string, string>; secrets: string[] }[] =
    [
      {
        label: "--local-url",
        args: ["status", "--local-url", closedUrl("Hunter2Flag")],
        secrets: ["Hunter2Flag"],
      },
      {
        label: "LOCAL_DATABASE_URL",
        args: ["status"],
        env: { LOCAL_DATABASE_URL: closedUrl("Hunter2Env") },
        secrets: ["Hunter2Env"],
      },
      {
        label: "percent-encoded password",
        args: ["status"],
        env: { LOCAL_DATABASE_URL: closedUrl("s3cr%40t%3Apw") },
        secrets: ["s3cr%40t%3Apw", "s3cr@t:pw"],
      },
      {
        label: "password= parameter",
        args: ["status"],
        env: {
          LOCAL_DATABASE_URL: `postgres://meter@127.0.0.1:${freePort()}/gw?password=Hunter2Param`,
        },
        secrets: ["Hunter2Param"],
      },
    ];
  const results = await Promise.all(runs.map((r) => runCli(r.args, { env: r.env })));
  runs.forEach((run, i) => {
    const r = results[i];
    const line = assertOneLineFailure(run.args, r, 1);
    assert.match(line, /local database/, `${run.label}: ${line}`);
    for (const secret of run.secrets) {
      assert.ok(!r.stderr.includes(secret), `${run.label} leaked on stderr: ${r.stderr}`);
      assert.ok(!r.stdout.includes(secret), `${run.label} leaked on stdout: ${r.stdout}`);
    }
  });
});

Deno.test("meter-sync status --log-format json reports a down database as one JSON line without the password", async () => {
  const args = ["status", "--log-format", "json"];
  const r = await runCli(args, { env: { LOCAL_DATABASE_URL: closedUrl("Hunter2Json") } });
  assert.equal(r.code, 1, describe(args, r));
  const lines = r.stderr.trimEnd().split("\n");
  assert.equal(lines.length, 1, describe(args, r));
  const record = JSON.parse(lines[0]);
  assert.equal(record.level, "error");
  assert.match(record.message, /local database/);
  assert.ok(!r.stderr.includes("Hunter2Json"), r.stderr);
  assert.ok(!r.stdout.includes("Hunter2Json"), r.stdout);
});

Deno.test("meter-sync migrates, seeds, reports status and catches schema drift on real PostgreSQL", async (t) => {
  await using local = await freshDb();
  await using remote = await freshDb();
  const env = { LOCAL_DATABASE_URL: local.url, REMOTE_DATABASE_URL: remote.url };
  const password = local.server.password;
  const run = async (args: string[]) => {
    const r = await runCli(args, { env });
    assert.ok(!r.stdout.includes(password) && !r.stderr.includes(password), describe(args, r));
    return r;
  };

  await t.step("migrate --target both applies the migrations of both sides", async () => {
    const r = await run(["migrate", "--target", "both"]);
    assert.equal(r.code, 0, describe(["migrate"], r));
    assert.match(r.stdout, /^local: applied \d+ migration/m);
    assert.match(r.stdout, /^remote: applied \d+ migration/m);
    const [row] = await local.sql<{ ok: boolean }[]>`
      SELECT to_regclass('meter_readings') IS NOT NULL AS ok`;
    assert.equal(row.ok, true);
  });

  await t.step("migrate a second time says both sides are up to date", async () => {
    const r = await run(["migrate", "--target", "both"]);
    assert.equal(r.code, 0, describe(["migrate"], r));
    assert.match(r.stdout, /^local: up to date/m);
    assert.match(r.stdout, /^remote: up to date/m);
    assert.doesNotMatch(r.stdout, /applied \d+ migration/);
  });

  await t.step("seed --count 2000 inserts 2000 readings into the local database", async () => {
    const r = await run(["seed", "--count", "2000"]);
    assert.equal(r.code, 0, describe(["seed"], r));
    const [row] = await local.sql<{ n: string }[]>`SELECT count(*)::text AS n FROM meter_readings`;
    assert.equal(row.n, "2000");
    const [remoteRow] = await remote.sql<
      { n: string }[]
    >`SELECT count(*)::text AS n FROM meter_readings`;
    assert.equal(remoteRow.n, "0");
  });

  await t.step("status --json shows a queue of 2000 and the keys of SPEC §3", async () => {
    const r = await run(["status", "--json"]);
    // Never synced yet: stale, so that status as a check command flags the gateway (exit 1).
    assert.equal(r.code, 1, describe(["status", "--json"], r));
    assert.equal(r.stdout.trimEnd().split("\n").length, 1, r.stdout);
    const status = JSON.parse(r.stdout);
    for (const key of SPEC_STATUS_KEYS) {
      assert.ok(key in status, `status --json lacks ${key}: ${r.stdout}`);
    }
    assert.equal(status.queue_size, 2000);
    assert.equal(status.quarantined, 0);
    assert.equal(typeof status.oldest_pending_age_s, "number");
    assert.ok(status.oldest_pending_age_s >= 0);
    assert.equal(status.last_success_at, null);
    assert.equal(status.last_error, null);
    assert.equal(status.stale, true);
  });

  await t.step("status without --json says how many readings wait", async () => {
    const r = await run(["status"]);
    assert.equal(r.code, 1, describe(["status"], r));
    assert.match(r.stdout, /STALE \(no successful cycle yet/);
    assert.match(r.stdout, /2000 readings waiting/);
  });

  await t.step("check-schema exits 0 when the freshly migrated sides match", async () => {
    const r = await run(["check-schema"]);
    assert.equal(r.code, 0, describe(["check-schema"], r));
  });

  await t.step("check-schema exits 3 naming a local column the remote lacks", async () => {
    await local.sql`ALTER TABLE meter_readings ADD COLUMN "Phase Angle N" double precision`;
    const r = await run(["check-schema"]);
    assert.equal(r.code, 3, describe(["check-schema"], r));
    assert.ok((r.stdout + r.stderr).includes("Phase Angle N"), describe(["check-schema"], r));
    await local.sql`ALTER TABLE meter_readings DROP COLUMN "Phase Angle N"`;
  });

  await t.step(
    "check-schema exits 0 for a remote column the local side lacks that may be NULL",
    async () => {
      await remote.sql`ALTER TABLE meter_readings ADD COLUMN "Operator Note" text`;
      const r = await run(["check-schema"]);
      assert.equal(r.code, 0, describe(["check-schema"], r));
    },
  );

  await t.step("check-schema exits 3 naming a remote NOT NULL column without default", async () => {
    await remote.sql`ALTER TABLE meter_readings ADD COLUMN "Grid Zone" text NOT NULL`;
    const r = await run(["check-schema"]);
    assert.equal(r.code, 3, describe(["check-schema"], r));
    const output = r.stdout + r.stderr;
    assert.ok(output.includes("Grid Zone"), describe(["check-schema"], r));
  });
});
