/** `check-schema`: compares the local and remote readings tables; exit 3 if the upload could not run. */
import { readTable, type TableInfo } from "../columns.ts";
import type { Config } from "../config.ts";
import { ping, withDatabases } from "../connections.ts";
import type { Sql } from "../db.ts";
import { SchemaError } from "../errors.ts";
import { formatIssues, planUpload, type SchemaPlan } from "../schema.ts";
import type { CommandContext } from "./context.ts";

/**
 * Reads both catalogs and plans the upload; throws SchemaError when a table is missing.
 * `onLocal` gets the local table as soon as it is read, before the remote's may be.
 */
export async function comparedSchemas(
  local: Sql,
  remote: Sql,
  table: string,
  onLocal?: (info: TableInfo) => void,
): Promise<SchemaPlan> {
  const [l, r] = await Promise.all([
    readTable(local, table).then((info) => {
      if (info) onLocal?.(info);
      return info;
    }),
    readTable(remote, table),
  ]);
  if (!l) {
    throw new SchemaError(
      `table "${table}" does not exist in the local database; run: meter-sync migrate --target local`,
    );
  }
  if (!r) {
    throw new SchemaError(
      `table "${table}" does not exist in the remote database; run: meter-sync migrate --target remote`,
    );
  }
  return planUpload(l, r);
}

export async function checkSchemaCommand(config: Config, ctx: CommandContext): Promise<number> {
  return await withDatabases(config, async ({ local, remote }) => {
    await ping(local!, config.local!, "local");
    await ping(remote!, config.remote!, "remote");
    const plan = await comparedSchemas(local!, remote!, config.table);
    if (config.json) {
      ctx.out(JSON.stringify({
        ok: plan.ok,
        columns: plan.columns.map((c) => c.name),
        issues: plan.issues,
      }));
    } else {
      ctx.out(formatIssues(plan));
    }
    return plan.ok ? 0 : 3;
  });
}
