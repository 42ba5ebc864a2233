/**
 * `deno task compile`: builds dist/meter-sync-x86_64 and dist/meter-sync-aarch64 (Linux) with
 * the run-time flags the task passes after the script name (the same flags the tests run with).
 *
 * The binary reads files only under /etc/meter-sync and /run/credentials (and its migrations):
 * METER_SYNC_ALLOW_READ=/path,... chooses other paths, "all" any file. METER_SYNC_ALLOW_NET=
 * db1:5432,db2:5432 replaces --allow-net with those hosts (scripts/shipped_flags.ts).
 * `deno compile` downloads the runtime (denort) from dl.deno.land; when that is unreachable the
 * task says so in one line and exits 1. DENORT_BIN=/path/to/denort uses a local copy instead.
 *
 * The build uses scripts/compile.config.json, which maps only postgres and LogTape (pinned in
 * scripts/compile.lock, the same versions and hashes as deno.lock): with deno.json, deno compile
 * resolved every package of the project for its target, the demo's embedded PostgreSQL (server
 * binaries for each platform) among them, though the binary never imports it.
 */

import { binaryFlags } from "./shipped_flags.ts";

const TARGETS = {
  x86_64: "x86_64-unknown-linux-gnu",
  aarch64: "aarch64-unknown-linux-gnu",
} as const;

/**
 * The one line that says why `deno compile` failed for a target, from its stderr: which download
 * failed (the runtime, or an npm package of the build that the cache lacks, which is fetched
 * first) and the innermost cause, with what to do about it; no stack trace.
 */
export function compileFailure(
  output: string,
  target: string,
  stderr: string,
  code: number,
): string {
  const lines = stderr.split(/Stack backtrace/)[0].split("\n").map((l) => l.trim()).filter(Boolean);
  const runtime = /https:\/\/dl\.deno\.land\/\S+/.exec(stderr)?.[0];
  const npm = /Failed caching npm package '([^']+)'/.exec(stderr)?.[1];
  const npmUrl = /https:\/\/\S+?\.tgz/.exec(stderr)?.[0];
  // The innermost cause of the chain ("3: dns error: ...") names what went wrong.
  const causes = lines.filter((l) => /^\d+: /.test(l)).map((l) => l.replace(/^\d+: /, ""));
  const reason = causes.at(-1) ?? lines.find((l) => /error/i.test(l)) ?? lines[0] ?? `exit ${code}`;
  if (npm) {
    return `compile: cannot build ${output}: deno compile must download the npm package ${npm} for ${target}${
      npmUrl ? ` (${npmUrl})` : ""
    } and that failed: ${reason}; build on a machine that reaches the npm registry`;
  }
  if (runtime) {
    return `compile: cannot build ${output}: deno compile must download the Deno runtime (${runtime}) and that failed: ${reason}; build on a machine that reaches dl.deno.land, or set DENORT_BIN to a local denort`;
  }
  return `compile: cannot build ${output}: ${reason}`;
}

async function build(arch: keyof typeof TARGETS, flags: string[]): Promise<boolean> {
  const output = `dist/meter-sync-${arch}`;
  const args = [
    "compile",
    // Only the packages the agent imports (see compile.config.json), not the embedded PostgreSQL.
    "--config",
    "scripts/compile.config.json",
    "--target",
    TARGETS[arch],
    ...flags,
    "--include",
    "migrations",
    "--output",
    output,
    "main.ts",
  ];
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    stdout: "inherit",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).output();
  const text = new TextDecoder().decode(stderr);
  if (code === 0) {
    console.log(`built ${output} (${TARGETS[arch]})`);
    return true;
  }
  console.error(compileFailure(output, TARGETS[arch], text, code));
  return false;
}

if (import.meta.main) {
  const flags = binaryFlags(Deno.args, {
    allowNet: Deno.env.get("METER_SYNC_ALLOW_NET"),
    allowRead: Deno.env.get("METER_SYNC_ALLOW_READ"),
    checkout: Deno.cwd(),
  });
  console.log(`run-time flags: ${flags.join(" ")}`);
  let ok = true;
  for (const arch of Object.keys(TARGETS) as (keyof typeof TARGETS)[]) {
    ok = (await build(arch, flags)) && ok;
  }
  Deno.exit(ok ? 0 : 1);
}
