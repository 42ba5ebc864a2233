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
