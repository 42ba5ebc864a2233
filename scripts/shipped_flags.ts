/** The run-time flags of the binary (permissions, unstable and V8 flags), read from deno.json. */

/**
 * The compile task is `deno run <its own flags> scripts/compile.ts <the binary's flags>`;
 * tests and the bench run main.ts with exactly the binary's flags, so its limits are exercised.
 */
export async function shippedFlags(): Promise<string[]> {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  const words = (config.tasks.compile as string).split(/\s+/);
  const at = words.indexOf("scripts/compile.ts");
  if (at < 0) throw new Error("deno.json: the compile task no longer runs scripts/compile.ts");
  return words.slice(at + 1);
}

/**
 * The environment a spawned agent gets (with clearEnv): what Deno itself needs and nothing of
 * the caller's own database settings; NO_COLOR for plain log lines.
 */
export function childEnv(): Record<string, string> {
  const env: Record<string, string> = { NO_COLOR: "1" };
  for (const key of ["PATH", "HOME", "DENO_DIR", "TMPDIR", "XDG_CACHE_HOME", "LANG"]) {
    const value = Deno.env.get(key);
    if (value !== undefined) env[key] = value;
  }
  return env;
}

/** Build-time choices of {@link binaryFlags}. */
export interface BinaryOptions {
  /** METER_SYNC_ALLOW_NET: hosts (host:port,...) instead of all net. */
  allowNet?: string;
  /** METER_SYNC_ALLOW_READ: paths instead of the default list; "all" for any file. */
  allowRead?: string;
  /** The checkout's absolute path: the migrations the binary carries live under it. */
  checkout: string;
}

/** Where a gateway keeps what meter-sync reads: settings, pgpass, certificates; systemd credentials. */
export const DEFAULT_READ = ["/etc/meter-sync", "/run/credentials"];

/**
 * The compiled binary's flags: the shipped ones with net and read narrowed. Read is limited
 * to /etc/meter-sync (pgpass, password files, TLS certificates), /run/credentials (systemd's
 * LoadCredential=) and the migrations compiled in, unless the build says otherwise.
 */
export function binaryFlags(flags: string[], options: BinaryOptions): string[] {
  const migrations = `${options.checkout.replace(/\/$/, "")}/migrations`;
  return flags.map((f) => {
    if (f === "--allow-net" && options.allowNet) return `--allow-net=${options.allowNet}`;
    if (f === "--allow-read" && options.allowRead !== "all") {
      const paths = options.allowRead ? options.allowRead.split(",") : DEFAULT_READ;
      return `--allow-read=${[...paths, migrations].join(",")}`;
    }
    return f;
  });
}
