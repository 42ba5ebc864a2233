/** Flags over environment over defaults: every setting validated here, in one place. */
import { parseArgs } from "node:util";
import { type DbTarget, parseDatabaseUrl } from "./db_url.ts";
import { parseDuration } from "./duration.ts";
import { ConfigError } from "./errors.ts";
import { redactText, secretsOf } from "./redact.ts";

/** The commands of SPEC §3. */
export const COMMANDS = [
  "sync",
  "upload",
  "download",
  "run",
  "status",
  "migrate",
  "check-schema",
  "seed",
  "requeue",
  "demo",
] as const;
export type CommandName = typeof COMMANDS[number];

export type LogLevel = "trace" | "debug" | "info" | "warning" | "error" | "fatal";
export type LogFormat = "pretty" | "json";
export type MigrateTarget = "local" | "remote" | "both";

interface FlagSpec {
  type: "string" | "boolean";
  multiple?: boolean;
  short?: string;
  /** Shown in --help. */
  help: string;
  /** Placeholder for the value in --help. */
  arg?: string;
  /** Shown in --help as the default. */
  default?: string;
  /** Environment variable read when the flag is absent. */
  env?: string;
}

const CONNECTION_FLAGS: Record<string, FlagSpec> = {
  "local-url": {
    type: "string",
    arg: "URL",
    env: "LOCAL_DATABASE_URL",
    help: "the gateway's database, postgres://user:pass@host:port/db?sslmode=...",
  },
  "remote-url": {
    type: "string",
    arg: "URL",
    env: "REMOTE_DATABASE_URL",
    help: "the central database, postgres://user:pass@host:port/db?sslmode=...",
  },
  "password-file": {
    type: "string",
    arg: "FILE",
    env: "METER_SYNC_PASSWORD_FILE",
    help: "file holding the remote database password (recommended: keeps it out of URLs)",
  },
  "local-password-file": {
    type: "string",
    arg: "FILE",
    env: "METER_SYNC_LOCAL_PASSWORD_FILE",
    help: "file holding the local database password",
  },
};

/** Flags every command accepts. */
export const COMMON_FLAGS: Record<string, FlagSpec> = {
  ...CONNECTION_FLAGS,
  "batch-size": {
    type: "string",
    arg: "N",
    default: "100",
    env: "METER_SYNC_BATCH_SIZE",
    help: "readings per batch (1-100000)",
  },
  "max-retries": {
    type: "string",
    arg: "N",
    default: "3",
    env: "METER_SYNC_MAX_RETRIES",
    help: "retries of a transient fault before the cycle fails (0-100)",
  },
  table: {
    type: "string",
    arg: "NAME",
    default: "meter_readings",
    env: "METER_SYNC_TABLE",
    help: "the readings table, on both sides",
  },
  "log-level": {
    type: "string",
    arg: "LEVEL",
    default: "info",
    env: "METER_SYNC_LOG_LEVEL",
    help: "trace, debug, info, warning, error or fatal",
  },
  "log-format": {
    type: "string",
    arg: "FORMAT",
    default: "pretty",
    env: "METER_SYNC_LOG_FORMAT",
    help: "pretty (for people) or json (one object per line, for journald/Loki)",
  },
  help: { type: "boolean", short: "h", help: "show this help" },
};

/** What one command is, needs and accepts. */
export interface CommandSpec {
  summary: string;
  usage: string;
  /** Command-specific flags, on top of COMMON_FLAGS. */
  flags: Record<string, FlagSpec>;
  /** Which databases it talks to (for migrate: decided by --target). */
  needs: "local" | "remote" | "both" | "none" | "target";
  /** False while a later release builds it: it says so and exits 2. */
  available: boolean;
}

const DOWNLOAD_TABLES: FlagSpec = {
  type: "string",
  arg: "LIST",
  default: "meters",
  env: "METER_SYNC_DOWNLOAD_TABLES",
  help: "comma-separated tables mirrored from the remote",
};
const AGENT_ID: FlagSpec = {
  type: "string",
  arg: "ID",
  env: "METER_SYNC_AGENT_ID",
  help: "this gateway's name in the remote sync_agents table (default: the host name)",
};
const STALE_AFTER: FlagSpec = {
  type: "string",
  arg: "DURATION",
  default: "15m",
  env: "METER_SYNC_STALE_AFTER",
  help: "unhealthy when the last successful cycle is older than this",
};
const PARALLEL: FlagSpec = {
  type: "string",
  arg: "N",
  default: "1",
  env: "METER_SYNC_PARALLEL",
  help: "batches in flight at once, each on its own connections (1-16); raise on slow links",
};
const MAX_BATCHES: FlagSpec = {
  type: "string",
  arg: "N",
  help: "stop after N batches (default: until the queue is empty)",
};

/** The command table of SPEC §3. */
export const COMMAND_SPECS: Record<CommandName, CommandSpec> = {
  sync: {
    summary: "one cycle: upload until the queue is empty (or --max-batches), then download",
    usage: "meter-sync sync [--batch-size N] [--max-batches N]",
    flags: {
      "max-batches": MAX_BATCHES,
      parallel: PARALLEL,
      "download-tables": DOWNLOAD_TABLES,
      "agent-id": AGENT_ID,
    },
    needs: "both",
    available: true,
  },
  upload: {
    summary: "the upload half only",
    usage: "meter-sync upload [--batch-size N] [--max-batches N]",
    flags: { "max-batches": MAX_BATCHES, parallel: PARALLEL, "agent-id": AGENT_ID },
    needs: "both",
    available: true,
  },
  download: {
    summary: "the download half only: mirror reference tables from the remote",
    usage: "meter-sync download [--download-tables meters]",
    flags: { "download-tables": DOWNLOAD_TABLES },
    needs: "both",
    available: true,
  },
  run: {
    summary: 'scheduled mode: --every 30s | --cron "*/5 * * * *"',
    usage:
      'meter-sync run --every 30s | --cron "*/5 * * * *" [--jitter 10s] [--http 127.0.0.1:9464]',
    flags: {
      every: {
        type: "string",
        arg: "DURATION",
        env: "METER_SYNC_EVERY",
        help: "interval between cycle starts: 500ms, 30s, 5m, 1h",
      },
      cron: {
        type: "string",
        arg: "SPEC",
        env: "METER_SYNC_CRON",
        help: "cron schedule, five fields, in UTC",
      },
      jitter: {
        type: "string",
        arg: "DURATION",
        default: "0",
        env: "METER_SYNC_JITTER",
        help: "delay each cycle by a random amount up to this, to spread a fleet",
      },
      "max-backoff": {
        type: "string",
        arg: "DURATION",
        default: "10m",
        env: "METER_SYNC_MAX_BACKOFF",
        help: "longest wait after failed cycles (the wait doubles per failure)",
      },
      http: {
        type: "string",
        arg: "[HOST:]PORT",
        env: "METER_SYNC_HTTP",
        help: "serve /metrics, /healthz and /status (host defaults to 127.0.0.1)",
      },
      "stale-after": STALE_AFTER,
      "max-batches": MAX_BATCHES,
      parallel: PARALLEL,
      "download-tables": DOWNLOAD_TABLES,
      "agent-id": AGENT_ID,
    },
    needs: "both",
    available: true,
  },
  status: {
    summary: "queue size, oldest pending age, quarantined rows, last run, last error",
    usage: "meter-sync status [--json] [--stale-after 15m]",
    flags: {
      json: { type: "boolean", help: "one JSON object, for machines" },
      "stale-after": STALE_AFTER,
      "agent-id": AGENT_ID,
    },
    needs: "local",
    available: true,
  },
  migrate: {
    summary: "apply pending migrations",
    usage: "meter-sync migrate --target local|remote|both",
    flags: {
      target: {
        type: "string",
        arg: "WHICH",
        default: "both",
        help: "local, remote or both",
      },
    },
    needs: "target",
    available: true,
  },
  "check-schema": {
    summary: "compare local and remote readings tables; exit 3 if the upload could not run",
    usage: "meter-sync check-schema",
    flags: { json: { type: "boolean", help: "the comparison as JSON" } },
    needs: "both",
    available: true,
  },
  seed: {
    summary: "insert --count N realistic readings into the local database",
    usage: "meter-sync seed --count N [--meters M] [--days D]",
    flags: {
      count: {
        type: "string",
        arg: "N",
        default: "1000",
        help: "readings to insert (1-100000000)",
      },
      meters: {
        type: "string",
        arg: "M",
        default: "50",
        help: "meters the readings come from, created if missing (1-1000000)",
      },
      days: {
        type: "string",
        arg: "D",
        default: "7",
        help: "readings spread over the last D days (1-3650)",
      },
    },
    needs: "local",
    available: true,
  },
  requeue: {
    summary: "put quarantined rows back in the queue",
    usage: "meter-sync requeue --all | --id UUID [--id UUID ...]",
    flags: {
      all: { type: "boolean", help: "every quarantined row" },
      id: { type: "string", multiple: true, arg: "UUID", help: "one quarantined reading" },
    },
    needs: "local",
    available: true,
  },
  demo: {
    summary:
      "two embedded PostgreSQL servers, migrate, seed, sync, status: needs nothing installed",
    usage: "meter-sync demo [--count N]",
    flags: {
      count: { type: "string", arg: "N", default: "50000", help: "readings to seed (1-10000000)" },
    },
    needs: "none",
    available: true,
  },
};

/** Everything a command needs to know, validated. */
export interface Config {
  command: CommandName;
  help: boolean;
  local?: DbTarget;
  remote?: DbTarget;
  batchSize: number;
  maxRetries: number;
  maxBatches?: number;
  /** Upload lanes: batches in flight at once, each on its own connections. */
  parallel: number;
  table: string;
  logLevel: LogLevel;
  logFormat: LogFormat;
  json: boolean;
  migrateTarget: MigrateTarget;
  count: number;
  meters: number;
  days: number;
  requeueAll: boolean;
  requeueIds: string[];
  downloadTables: string[];
  /** run: milliseconds between cycle starts (--every). */
  everyMs?: number;
  /** run: five-field cron schedule (--cron), checked by Deno.cron when the agent starts. */
  cron?: string;
  /** run: upper bound of the random delay before each cycle. */
  jitterMs: number;
  /** run: longest wait after failed cycles. */
  maxBackoffMs: number;
  /** run: where to serve /metrics, /healthz and /status. */
  http?: { hostname: string; port: number };
  /** The name in the remote sync_agents table; main.ts fills in the host name when unset. */
  agentId?: string;
  /** status and run: the last success older than this is stale (exit 1, /healthz 503). */
  staleAfterMs: number;
  /** File holding the remote database password. */
  passwordFile?: string;
  /** File holding the local database password. */
  localPasswordFile?: string;
  /** The pgpass file to consult when a URL has no password. */
  pgpassFile?: string;
  /** Passwords to mask in anything printed. */
  secrets: string[];
}

/** The environment variables meter-sync reads; main.ts reads exactly these. */
export const ENV_VARS = [
  "LOCAL_DATABASE_URL",
  "REMOTE_DATABASE_URL",
  "METER_SYNC_BATCH_SIZE",
  "METER_SYNC_MAX_RETRIES",
  "METER_SYNC_TABLE",
  "METER_SYNC_LOG_LEVEL",
  "METER_SYNC_LOG_FORMAT",
  "METER_SYNC_DOWNLOAD_TABLES",
  "METER_SYNC_AGENT_ID",
  "METER_SYNC_PARALLEL",
  "METER_SYNC_PASSWORD_FILE",
  "METER_SYNC_LOCAL_PASSWORD_FILE",
  "METER_SYNC_EVERY",
  "METER_SYNC_CRON",
  "METER_SYNC_JITTER",
  "METER_SYNC_MAX_BACKOFF",
  "METER_SYNC_HTTP",
  "METER_SYNC_STALE_AFTER",
  "PGPASSFILE",
  "HOME",
] as const;

/** What the process got: main.ts passes Deno.args and Deno.env.toObject(). */
export interface Invocation {
  args: string[];
  env: Record<string, string | undefined>;
}

/** The result of reading the command line before any command runs. */
export type Parsed =
  | { kind: "help"; command?: CommandName }
  | { kind: "version" }
  | { kind: "command"; config: Config };

function intSetting(
  name: string,
  raw: string | undefined,
  fallback: number | undefined,
  [min, max]: [number, number],
): number | undefined {
  if (raw === undefined) return fallback;
  const text = raw.trim();
  if (!/^[0-9]+$/.test(text) || Number(text) < min || Number(text) > max) {
    throw new ConfigError(`${name} must be a whole number from ${min} to ${max} (got "${raw}")`);
  }
  return Number(text);
}

function oneOf<T extends string>(name: string, raw: string, allowed: readonly T[]): T {
  if (!(allowed as readonly string[]).includes(raw)) {
    throw new ConfigError(`${name} must be one of ${allowed.join(", ")} (got "${raw}")`);
  }
  return raw as T;
}

function durationSetting(
  name: string,
  raw: string | undefined,
  fallback: number,
  [min, max]: [number, number],
): number {
  if (raw === undefined) return fallback;
  const ms = parseDuration(raw);
  if (ms === undefined || ms < min || ms > max) {
    throw new ConfigError(
      `${name} must be a duration like 500ms, 30s, 5m or 1h, from ${min} ms to ${
        max / 3_600_000
      } h (got "${raw}")`,
    );
  }
  return ms;
}

/** "9464", ":9464", "0.0.0.0:9464", "[::1]:9464"; the host defaults to loopback. */
function httpSetting(name: string, raw: string | undefined): Config["http"] {
  if (raw === undefined) return undefined;
  const m = /^(?:\[([0-9a-fA-F:.]+)\]:|([^:\s\[\]]*):)?(\d{1,5})$/.exec(raw.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || port < 1 || port > 65535) {
    throw new ConfigError(
      `${name} must be [HOST:]PORT, for example 127.0.0.1:9464 or 9464 (got "${raw}")`,
    );
  }
  return { hostname: m[1] ?? (m[2] || "127.0.0.1"), port };
}

const HOUR = 3_600_000;

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Reads the command line: the command, its flags, the environment, the defaults. */
export function parseInvocation(invocation: Invocation): Parsed {
  try {
    return parse(invocation);
  } catch (err) {
    // A URL in the wrong place (after "--", as another flag's value, as the command) or
    // a malformed one is echoed by the message that rejects it: mask its password there.
    if (!(err instanceof ConfigError)) throw err;
    const values = [...invocation.args, ...Object.values(invocation.env)].flatMap((v) =>
      v === undefined
        ? []
        : v.startsWith("-") && v.includes("=")
        ? [v, v.slice(v.indexOf("=") + 1)]
        : [v]
    );
    throw new ConfigError(redactText(err.message, secretsOf(values)), { cause: err.cause });
  }
}

function parse({ args, env }: Invocation): Parsed {
  const [first, ...rest] = args;
  if (first === undefined || first === "--help" || first === "-h" || first === "help") {
    const topic = rest[0];
    if (first === "help" && topic) {
      if (!(COMMANDS as readonly string[]).includes(topic)) unknownCommand(topic);
      return { kind: "help", command: topic as CommandName };
    }
    return { kind: "help" };
  }
  if (first === "--version" || first === "-V") return { kind: "version" };
  if (first.startsWith("-")) {
    throw new ConfigError(
      `expected a command before ${first}; run "meter-sync --help" for the list of commands`,
    );
  }
  if (!(COMMANDS as readonly string[]).includes(first)) unknownCommand(first);
  const command = first as CommandName;
  const spec = COMMAND_SPECS[command];
  const flags = { ...COMMON_FLAGS, ...spec.flags };
  const options = Object.fromEntries(
    Object.entries(flags).map(([name, f]) => [
      name,
      {
        type: f.type,
        ...(f.multiple ? { multiple: true } : {}),
        ...(f.short ? { short: f.short } : {}),
      },
    ]),
  );
  let values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  let positionals: string[];
  try {
    ({ values, positionals } = parseArgs({
      args: rest,
      options: options as Parameters<typeof parseArgs>[0] extends { options?: infer O } ? O
        : never,
      strict: true,
      allowPositionals: true,
    }));
  } catch (err) {
    throw new ConfigError(`${flagProblem(err)}; run "meter-sync ${command} --help" for its flags`);
  }
  if (positionals.length > 0) {
    throw new ConfigError(
      `unexpected argument "${positionals[0]}" for ${command}; run "meter-sync ${command} --help"`,
    );
  }
  if (values.help) return { kind: "help", command };
  if (!spec.available) {
    throw new ConfigError(
      `${command} is not available in this release yet; run "meter-sync --help" for what is`,
    );
  }

  const str = (name: string): string | undefined => {
    const v = values[name];
    if (typeof v === "string") return v;
    const f = flags[name];
    return f?.env ? (env[f.env] || undefined) : undefined;
  };
  const label = (name: string) => {
    const f = flags[name];
    return values[name] === undefined && f?.env && env[f.env] ? f.env : `--${name}`;
  };

  const logLevel = oneOf(
    label("log-level"),
    str("log-level") ?? "info",
    [
      "trace",
      "debug",
      "info",
      "warning",
      "error",
      "fatal",
    ] as const,
  );
  const logFormat = oneOf(
    label("log-format"),
    str("log-format") ?? "pretty",
    [
      "pretty",
      "json",
    ] as const,
  );
  const migrateTarget = oneOf(
    label("target"),
    str("target") ?? "both",
    [
      "local",
      "remote",
      "both",
    ] as const,
  );
  const table = str("table") ?? "meter_readings";
  if (!table.trim() || table.length > 63) {
    throw new ConfigError(`${label("table")} must be a table name of 1-63 characters`);
  }
  const maxCount = command === "demo" ? 10_000_000 : 100_000_000;
  const requeueIds = ((values.id as string[] | undefined) ?? []).map((id) => {
    if (!UUID.test(id)) throw new ConfigError(`--id must be a UUID (got "${id}")`);
    return id.toLowerCase();
  });
  const downloadTables = (str("download-tables") ?? "meters").split(",").map((t) => t.trim())
    .filter(Boolean);

  const needs = spec.needs === "target"
    ? (migrateTarget === "both" ? "both" : migrateTarget)
    : spec.needs;
  const target = (side: "local" | "remote"): DbTarget | undefined => {
    const flag = `${side}-url`;
    // status also looks at the remote, when it is configured.
    if (command === "status" && side === "remote") {
      const raw = str(flag);
      return raw ? parseDatabaseUrl(raw, label(flag)) : undefined;
    }
    if (needs !== side && needs !== "both") return undefined;
    const raw = str(flag);
    if (!raw) {
      const envName = side === "local" ? "LOCAL_DATABASE_URL" : "REMOTE_DATABASE_URL";
      throw new ConfigError(
        `${command} needs the ${side} database: set ${envName} or pass --${flag} postgres://USER@HOST:5432/DATABASE`,
      );
    }
    return parseDatabaseUrl(raw, label(flag));
  };
  const local = target("local");
  const remote = target("remote");
  const everyMs = str("every") === undefined
    ? undefined
    : durationSetting(label("every"), str("every"), 0, [100, 24 * HOUR]);
  const cron = str("cron")?.trim();
  if (command === "run" && (everyMs === undefined) === (cron === undefined)) {
    throw new ConfigError(
      'run needs a schedule: either --every 30s or --cron "*/5 * * * *" (not both)',
    );
  }
  if (cron !== undefined && cron.split(/\s+/).length !== 5) {
    throw new ConfigError(
      `${
        label("cron")
      } must have five fields: minute hour day-of-month month day-of-week (got "${cron}")`,
    );
  }
  const agentId = str("agent-id")?.trim();
  if (agentId !== undefined && (!agentId || agentId.length > 200)) {
    throw new ConfigError(`${label("agent-id")} must be a name of 1-200 characters`);
  }
  if (command === "requeue" && spec.available && !values.all && requeueIds.length === 0) {
    throw new ConfigError("requeue needs --all or at least one --id UUID");
  }

  const home = env.HOME;
  const config: Config = {
    command,
    help: false,
    local,
    remote,
    batchSize: intSetting(label("batch-size"), str("batch-size"), 100, [1, 100_000])!,
    maxRetries: intSetting(label("max-retries"), str("max-retries"), 3, [0, 100])!,
    maxBatches: intSetting("--max-batches", str("max-batches"), undefined, [1, 1_000_000_000]),
    parallel: intSetting(label("parallel"), str("parallel"), 1, [1, 16])!,
    table,
    logLevel,
    logFormat,
    json: values.json === true,
    migrateTarget,
    count: intSetting("--count", str("count"), command === "demo" ? 50_000 : 1000, [
      1,
      maxCount,
    ])!,
    meters: intSetting("--meters", str("meters"), 50, [1, 1_000_000])!,
    days: intSetting("--days", str("days"), 7, [1, 3650])!,
    requeueAll: values.all === true,
    requeueIds,
    downloadTables,
    everyMs,
    cron,
    jitterMs: durationSetting(label("jitter"), str("jitter"), 0, [0, 24 * HOUR]),
    maxBackoffMs: durationSetting(label("max-backoff"), str("max-backoff"), 600_000, [
      100,
      24 * HOUR,
    ]),
    http: httpSetting(label("http"), str("http")),
    agentId,
    staleAfterMs: durationSetting(label("stale-after"), str("stale-after"), 900_000, [
      1000,
      365 * 24 * HOUR,
    ]),
    passwordFile: str("password-file"),
    localPasswordFile: str("local-password-file"),
    pgpassFile: env.PGPASSFILE || (home ? `${home}/.pgpass` : undefined),
    secrets: secretsOf([str("local-url"), str("remote-url")]),
  };
  return { kind: "command", config };
}

function unknownCommand(name: string): never {
  throw new ConfigError(
    `unknown command "${name}"; commands: ${COMMANDS.join(", ")} (meter-sync --help)`,
  );
}

function flagProblem(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const code = (err as { code?: string }).code;
  const flag = /'(-{1,2}[^' ]+)/.exec(message)?.[1];
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return `unknown flag ${flag ?? ""}`.trim();
  if (/ambiguous/.test(message)) {
    return `flag ${flag ?? ""} needs a value (for a value starting with "-", write ${
      flag ?? "--flag"
    }=VALUE)`;
  }
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    return /argument missing/.test(message) || /requires/.test(message) || /<value>/.test(message)
      ? `flag ${flag ?? ""} needs a value`
      : `flag ${flag ?? ""} takes no value`;
  }
  return message.split("\n")[0];
}

function flagLines(flags: Record<string, FlagSpec>): string[] {
  return Object.entries(flags).map(([name, f]) => {
    const left = `  ${f.short ? `-${f.short}, ` : ""}--${name}${f.arg ? ` ${f.arg}` : ""}`;
    const extra = [f.default ? `default ${f.default}` : "", f.env ? `env ${f.env}` : ""].filter(
      Boolean,
    ).join("; ");
    return `${left.padEnd(30)} ${f.help}${extra ? ` (${extra})` : ""}`;
  });
}

/** The text of `meter-sync --help` or `meter-sync COMMAND --help`. */
export function helpText(command?: CommandName): string {
  if (command) {
    const spec = COMMAND_SPECS[command];
    return [
      `${spec.usage}`,
      "",
      `${spec.summary}${spec.available ? "" : " (not available in this release)"}`,
      "",
      ...(Object.keys(spec.flags).length ? ["Flags:", ...flagLines(spec.flags), ""] : []),
      "Common flags:",
      ...flagLines(COMMON_FLAGS),
      "",
      "Passwords: in the URL, --password-file/--local-password-file (mode 0600, or 0640 owned",
      "by root), or PGPASSFILE/~/.pgpass (mode 0600).",
    ].join("\n");
  }
  return [
    "meter-sync: store-and-forward sync of meter readings from an edge gateway to the central database",
    "",
    "Usage: meter-sync <command> [flags]",
    "",
    "Commands:",
    ...COMMANDS.map((c) =>
      `  ${c.padEnd(14)} ${COMMAND_SPECS[c].summary}${
        COMMAND_SPECS[c].available ? "" : " (not yet)"
      }`
    ),
    "",
    "Common flags:",
    ...flagLines(COMMON_FLAGS),
    `${"  -V, --version".padEnd(30)} print the version`,
    "",
    "Exit codes: 0 success, 1 cycle failed (nothing lost), 2 usage or configuration error,",
    "3 schemas incompatible. Run meter-sync <command> --help for a command's flags.",
  ].join("\n");
}
