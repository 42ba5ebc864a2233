/** meter-sync entry point: the only place that reads args and env, handles signals and exits. */
import { getLogger } from "@logtape/logtape";
import { checkSchemaCommand } from "./lib/commands/check_schema.ts";
import { type CommandContext, systemClock } from "./lib/commands/context.ts";
import { migrateCommand } from "./lib/commands/migrate.ts";
import { seedCommand } from "./lib/commands/seed.ts";
import { statusCommand } from "./lib/commands/status.ts";
import { runCommand } from "./lib/commands/run.ts";
import { downloadCommand, syncCommand } from "./lib/commands/sync.ts";
import { requeueCommand } from "./lib/commands/requeue.ts";
import {
  COMMAND_SPECS,
  type CommandName,
  type Config,
  ENV_VARS,
  helpText,
  parseInvocation,
} from "./lib/config.ts";
import { ConfigError, ExitCode, exitCodeOf, failureLine } from "./lib/errors.ts";
import { setupLogging } from "./lib/log.ts";
import { redactText } from "./lib/redact.ts";
import { VERSION } from "./lib/version.ts";

type Command = (config: Config, ctx: CommandContext) => Promise<number>;

/** The demo lives outside the compiled binary: it needs the embedded PostgreSQL packages. */
async function demoCommand(config: Config, ctx: CommandContext): Promise<number> {
  const specifier = "./lib/demo.ts";
  let mod: { demo: Command };
  try {
    mod = await import(specifier);
  } catch {
    throw new ConfigError(
      "demo needs the source checkout (embedded PostgreSQL): run npx --yes deno@2.9.6 task demo",
    );
  }
  return await mod.demo(config, ctx);
}

const COMMAND_TABLE: Partial<Record<CommandName, Command>> = {
  sync: syncCommand,
  upload: syncCommand,
  download: downloadCommand,
  run: runCommand,
  requeue: requeueCommand,
  status: statusCommand,
  migrate: migrateCommand,
  "check-schema": checkSchemaCommand,
  seed: seedCommand,
  demo: demoCommand,
};

const encoder = new TextEncoder();
function print(line: string): void {
  Deno.stdout.writeSync(encoder.encode(line + "\n"));
}
function printError(line: string): void {
  Deno.stderr.writeSync(encoder.encode(`meter-sync: ${line}\n`));
}

function readEnv(): Record<string, string | undefined> {
  return Object.fromEntries(ENV_VARS.map((name) => [name, Deno.env.get(name)]));
}

/** The agent's default name in sync_agents: the host name. */
function hostname(): string | undefined {
  try {
    return Deno.hostname();
  } catch {
    return undefined;
  }
}

/** --cron: Deno.cron (UTC), stopped by the signal. */
function cron(schedule: string, signal: AbortSignal, handler: () => void): void {
  try {
    Deno.cron("meter-sync", schedule, { signal }, handler);
  } catch (err) {
    throw new ConfigError(
      `--cron "${schedule}" is not a schedule cron accepts (${
        err instanceof Error ? err.message : err
      }); five fields: minute hour day-of-month month day-of-week, e.g. "*/5 * * * *"`,
    );
  }
}

async function main(): Promise<number> {
  let secrets: string[] = [];
  let jsonLogs = false;
  /** The failure, once: a plain line, or a JSON record when logs are JSON. */
  const report = (line: string) => {
    if (jsonLogs) getLogger(["meter-sync"]).error("{error}", { error: line });
    else printError(line);
  };
  try {
    const parsed = parseInvocation({ args: Deno.args, env: readEnv() });
    if (parsed.kind === "help") {
      print(helpText(parsed.command));
      return ExitCode.ok;
    }
    if (parsed.kind === "version") {
      print(`meter-sync ${VERSION} (deno ${Deno.version.deno})`);
      return ExitCode.ok;
    }
    const config = parsed.config;
    config.agentId ??= hostname();
    secrets = config.secrets;
    const command = COMMAND_TABLE[config.command];
    if (!COMMAND_SPECS[config.command].available || !command) {
      printError(
        `${config.command} is not available in this release yet; available: ${
          Object.keys(COMMAND_TABLE).join(", ")
        }`,
      );
      return ExitCode.usage;
    }
    jsonLogs = config.logFormat === "json";
    await setupLogging({
      level: config.logLevel,
      format: config.logFormat,
      secrets,
      color: config.logFormat === "pretty" && Deno.stderr.isTerminal() && !Deno.env.get("NO_COLOR"),
    });

    // First signal: finish (or roll back) the batch in flight and stop. Second: now.
    const stop = new AbortController();
    const onSignal = (name: Deno.Signal) => () => {
      if (stop.signal.aborted) {
        printError(`second ${name}: stopping at once`);
        Deno.exit(130);
      }
      stop.abort(new DOMException(`${name} received`, "AbortError"));
    };
    const handlers = (["SIGINT", "SIGTERM"] as const).map((s) => {
      const h = onSignal(s);
      Deno.addSignalListener(s, h);
      return [s, h] as const;
    });
    try {
      return await command(config, {
        out: print,
        signal: stop.signal,
        clock: systemClock,
        random: Math.random,
        isTerminal: Deno.stdout.isTerminal(),
        ...(config.logFormat === "pretty" && Deno.stderr.isTerminal()
          ? {
            progress: {
              write: (text: string) => Deno.stderr.writeSync(encoder.encode(text)),
              columns: Deno.consoleSize().columns,
            },
          }
          : {}),
        cron,
      });
    } finally {
      for (const [s, h] of handlers) Deno.removeSignalListener(s, h);
    }
  } catch (err) {
    // 2 for a setting to fix (also a read-only database or a missing privilege met
    // mid-cycle, however deep in the cause chain), 3 for a schema mismatch or a missing
    // table, 1 for a failed cycle.
    report(redactText(failureLine(err), secrets));
    return exitCodeOf(err);
  }
}

Deno.exit(await main());
