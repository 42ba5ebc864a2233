/** Looks a password up in a libpq password file (PGPASSFILE or ~/.pgpass). */
import { fileProblem } from "./password_file.ts";

/** What a pgpass line is matched against. */
export interface PgpassKey {
  host: string;
  port: number;
  database: string;
  user: string;
}

function splitLine(line: string): string[] {
  const fields: string[] = [];
  let current = "";
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (c === "\\" && i + 1 < line.length) {
      current += line[++i];
    } else if (c === ":") {
      fields.push(current);
      current = "";
    } else {
      current += c;
    }
  }
  fields.push(current);
  return fields;
}

/** The password of the first matching line of a pgpass file's text, as libpq reads it. */
export function findPassword(text: string, key: PgpassKey): string | undefined {
  for (const raw of text.split(/\r?\n/)) {
    if (!raw.trim() || raw.trimStart().startsWith("#")) continue;
    const fields = splitLine(raw);
    if (fields.length < 5) continue;
    const [host, port, database, user, ...rest] = fields;
    const wanted = [key.host, String(key.port), key.database, key.user];
    if ([host, port, database, user].every((f, i) => f === "*" || f === wanted[i])) {
      return rest.join(":");
    }
  }
  return undefined;
}

/**
 * Reads the file and finds the password; like libpq, a file that group or others
 * can read is ignored (with a warning through `warn`), and a missing file is no error.
 */
export async function readPgpass(
  path: string,
  key: PgpassKey,
  warn: (message: string) => void = () => {},
): Promise<string | undefined> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch {
    // Missing, or outside what the compiled binary may read (its --allow-read covers
    // /etc/meter-sync): ignored like libpq ignores a missing file; ~/.pgpass is the default
    // path and usually absent, so no warning.
    return undefined;
  }
  if (!info.isFile) {
    warn(`password file ${path} is not a plain file; it is ignored`);
    return undefined;
  }
  if (info.mode !== null && (info.mode & 0o077) !== 0) {
    warn(`password file ${path} has group or world access; permissions should be 0600 or less`);
    return undefined;
  }
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    warn(`password file ${path} ${fileProblem(err)}; it is ignored`);
    return undefined;
  }
  return findPassword(text, key);
}
