/** The run-time flags of the compile task (permissions, unstable and V8 flags), read from deno.json. */

/** Tests and the bench run main.ts with exactly these, so the binary's limits are exercised. */
export async function shippedFlags(): Promise<string[]> {
  const config = JSON.parse(await Deno.readTextFile(new URL("../deno.json", import.meta.url)));
  return (config.tasks.compile as string).split(/\s+/).filter((w) =>
    w.startsWith("--allow-") || w.startsWith("--unstable") || w.startsWith("--v8-flags")
  );
}
