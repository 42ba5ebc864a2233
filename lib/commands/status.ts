/** `status [--json]`: the local queue, quarantine and history, a brief remote probe; exit 1 when stale. */
import type { Config } from "../config.ts";
import { connectOptions, ping, withDatabases } from "../connections.ts";
import {
  formatStatus,
  readRemoteStatus,
  readStatus,
  type RemoteStatus,
  type StatusReport,
} from "../status.ts";
import type { CommandContext } from "./context.ts";

/** Options of {@link statusCommand}, for tests. */
export interface StatusCommandOptions {
  /** The whole remote probe's time limit. @default 3000 */
  remoteTimeoutMs?: number;
}

/**
 * The report of `status --json` (and of /status in run mode): the local side read now, the
 * remote probed briefly at the same time. Throws only when the local database fails.
 */
export async function collectStatus(
  config: Config,
  nowMs: number,
  options: StatusCommandOptions = {},
): Promise<StatusReport> {
  // Only the local database through withDatabases: the remote gets its own short probe.
  const local = { ...config, remote: undefined };
  return await withDatabases(local, async ({ local: sql }) => {
    const remoteProbe: Promise<RemoteStatus | null> = config.remote
      ? readRemoteStatus(config.remote, {
        agentId: config.agentId,
        timeoutMs: options.remoteTimeoutMs ?? 3000,
        // The password file, pgpass and the secrets to mask, exactly as the cycle connects.
        connect: connectOptions(config, "remote"),
        secrets: config.secrets,
      })
      : Promise.resolve(null);
    const [report, remote] = await Promise.all([
      (async () => {
        await ping(sql!, config.local!, "local");
        return await readStatus(sql!, config.table, {
          staleAfterMs: config.staleAfterMs,
          now: nowMs,
        });
      })(),
      remoteProbe,
    ]);
    report.remote = remote;
    return report;
  });
}

/**
 * Prints the status; returns 1 when the last successful cycle is older than
 * --stale-after (or there was none), so that it serves as a health check. An
 * unreachable remote is reported, never a failure: the exit code is staleness only.
 */
export async function statusCommand(
  config: Config,
  ctx: CommandContext,
  options: StatusCommandOptions = {},
): Promise<number> {
  const report = await collectStatus(config, ctx.clock.now(), options);
  ctx.out(config.json ? JSON.stringify(report) : formatStatus(report));
  return report.stale ? 1 : 0;
}
