/** `requeue --all | --id UUID`: puts quarantined readings back in the queue. */
import type { Config } from "../config.ts";
import { ping, withDatabases } from "../connections.ts";
import { requeue } from "../quarantine.ts";
import type { CommandContext } from "./context.ts";

export async function requeueCommand(config: Config, ctx: CommandContext): Promise<number> {
  return await withDatabases(config, async ({ local }) => {
    await ping(local!, config.local!, "local");
    const count = await requeue(local!, config.requeueAll ? "all" : config.requeueIds);
    ctx.out(
      count
        ? `requeued ${count} reading(s); the next cycle uploads them`
        : "nothing to requeue: no such reading in quarantine",
    );
    return 0;
  });
}
