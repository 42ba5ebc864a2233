/** `migrate --target local|remote|both`: applies the pending migrations of each side. */
import type { Config } from "../config.ts";
import { ping, withDatabases } from "../connections.ts";
import { loadMigrations, migrate, migrationsDir } from "../migrate.ts";
import type { CommandContext } from "./context.ts";

export async function migrateCommand(config: Config, ctx: CommandContext): Promise<number> {
  return await withDatabases(config, async ({ local, remote }) => {
    for (
      const [side, sql, target] of [
        ["local", local, config.local],
        ["remote", remote, config.remote],
      ] as const
    ) {
      if (!sql || !target) continue;
      await ping(sql, target, side);
      const result = await migrate(sql, await loadMigrations(migrationsDir(side)));
      ctx.out(
        result.applied.length
          ? `${side}: applied ${result.applied.length} migration(s): ${result.applied.join(", ")}`
          : `${side}: up to date (${result.alreadyApplied} migrations applied earlier)`,
      );
    }
    return 0;
  });
}
