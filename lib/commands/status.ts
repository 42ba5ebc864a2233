/** `status [--json]`: queue size, oldest pending age, quarantined rows, last run, last error. */
import type { Config } from "../config.ts";
import { ping, withDatabases } from "../connections.ts";
import { formatStatus, readStatus } from "../status.ts";
import type { CommandContext } from "./context.ts";

export async function statusCommand(config: Config, ctx: CommandContext): Promise<number> {
  return await withDatabases(config, async ({ local }) => {
    await ping(local!, config.local!, "local");
    const report = await readStatus(local!, config.table);
    ctx.out(config.json ? JSON.stringify(report) : formatStatus(report));
    return 0;
  });
}
