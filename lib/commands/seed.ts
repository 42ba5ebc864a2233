/** `seed --count N [--meters M] [--days D]`: inserts realistic readings into the local database. */
import type { Config } from "../config.ts";
import { ping, withDatabases } from "../connections.ts";
import { seedReadings } from "../seed.ts";
import type { CommandContext } from "./context.ts";

export async function seedCommand(config: Config, ctx: CommandContext): Promise<number> {
  return await withDatabases(config, async ({ local }) => {
    // Two connections: seedReadings inserts two chunks at a time.
    await ping(local!, config.local!, "local");
    const started = performance.now();
    const rows = await seedReadings(local!, {
      count: config.count,
      meters: config.meters,
      days: config.days,
      table: config.table,
    });
    const s = (performance.now() - started) / 1000;
    ctx.out(
      `seeded ${rows} readings from ${config.meters} meters over ${config.days} days in ${
        s.toFixed(1)
      } s (${Math.round(rows / s)} rows/s)`,
    );
    return 0;
  }, { max: 2 });
}
