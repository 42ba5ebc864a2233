/** What ships to the gateway: the binary's permission flags, the compile task, the systemd unit. */
import assert from "node:assert/strict";
import { ENV_VARS, parseInvocation } from "../lib/config.ts";
import { shippedFlags } from "../scripts/shipped_flags.ts";

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

Deno.test("deno task compile says in one line per target that the runtime download failed, and exits 1", async () => {
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
  assert.match(
    lines[0],
    /^compile: cannot build dist\/meter-sync-x86_64: deno compile must download the Deno runtime \(https:\/\/dl\.deno\.land\/\S+x86_64-unknown-linux-gnu\.zip\)/,
  );
  assert.match(
    lines[1],
    /^compile: cannot build dist\/meter-sync-aarch64: .*aarch64-unknown-linux-gnu/,
  );
  assert.doesNotMatch(stderr, /\n\s+at |Stack backtrace/);
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
