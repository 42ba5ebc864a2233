/** LogTape set-up: pretty or JSON lines on stderr, every line passed through the redactor. */
import { configure, getTextFormatter, type LogRecord, type Sink } from "@logtape/logtape";
import type { LogFormat, LogLevel } from "./config.ts";
import { redactText, redactValue } from "./redact.ts";

/** Options of {@link setupLogging}. */
export interface LoggingOptions {
  level: LogLevel;
  format: LogFormat;
  /** Passwords that must never be written. */
  secrets: readonly string[];
  /** Where formatted lines go. @default stderr */
  write?: (line: string) => void;
  /** Colour the level in pretty mode. @default false */
  color?: boolean;
}

const LEVEL_COLOR: Record<string, string> = {
  trace: "\x1b[90m",
  debug: "\x1b[90m",
  info: "\x1b[32m",
  warning: "\x1b[33m",
  error: "\x1b[31m",
  fatal: "\x1b[35m",
};

/** The pretty formatter: `2026-11-25T14:00:00.000Z INF upload: uploaded 100 rows`. */
function prettyFormatter(color: boolean): (record: LogRecord) => string {
  const text = getTextFormatter({
    timestamp: "date-time-timezone",
    category: ".",
    value: (v) => (typeof v === "string" ? v : Deno.inspect(v, { colors: false, depth: 3 })),
  });
  return (record) => {
    const line = text(record);
    if (!color) return line;
    const c = LEVEL_COLOR[record.level] ?? "";
    return `${c}${line.trimEnd()}\x1b[0m\n`;
  };
}

function plain(value: unknown): unknown {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Error) return value.message;
  return value;
}

function renderMessage(record: LogRecord): string {
  return record.message.map((part, i) =>
    i % 2 === 0 ? String(part) : typeof part === "string" ? part : JSON.stringify(plain(part))
  ).join("");
}

/**
 * One JSON object per line with stable field names: time (ISO 8601), level,
 * category (dotted), message (rendered) and properties (the structured values).
 */
export function jsonFormatter(record: LogRecord): string {
  return JSON.stringify({
    time: new Date(record.timestamp).toISOString(),
    level: record.level,
    category: record.category.join("."),
    message: renderMessage(record),
    properties: record.properties,
  }, (_key, value) => plain(value)) + "\n";
}

/** A sink that masks secrets before a line leaves the process. */
export function redactingSink(
  format: (record: LogRecord) => string,
  write: (line: string) => void,
  secrets: readonly string[],
): Sink {
  return (record) => {
    // Values first (a secret inside JSON or inspect output is escaped), then the line.
    const clean: LogRecord = {
      ...record,
      message: record.message.map((part) => redactValue(part, secrets)),
      properties: redactValue(record.properties, secrets) as Record<string, unknown>,
    };
    write(redactText(format(clean), secrets));
  };
}

const encoder = new TextEncoder();

let beforeLine: (() => void) | null = null;

/**
 * Registers what must happen before a log line is written (a progress bar erasing itself,
 * so that the line does not land in the middle of it); null removes it.
 */
export function beforeLogLine(fn: (() => void) | null): void {
  beforeLine = fn;
}

/** Configures LogTape once; main.ts calls it before any command runs. */
export async function setupLogging(options: LoggingOptions): Promise<void> {
  const raw = options.write ?? ((line: string) => Deno.stderr.writeSync(encoder.encode(line)));
  const write = (line: string) => {
    beforeLine?.();
    raw(line);
  };
  const format = options.format === "json"
    ? jsonFormatter
    : prettyFormatter(options.color ?? false);
  await configure({
    reset: true,
    // The very array main.ts holds: passwords read from files later are added to it.
    sinks: { main: redactingSink(format, write, options.secrets) },
    loggers: [
      { category: ["meter-sync"], lowestLevel: options.level, sinks: ["main"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["main"] },
    ],
  });
}
