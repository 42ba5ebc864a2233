/** The release, from deno.json, for --version, the heartbeat and the build_info metric. */
import meta from "../deno.json" with { type: "json" };

export const VERSION: string = meta.version;
