/** Reads a database password from a file of its own (--password-file), as strictly as libpq reads key files. */
import { ConfigError } from "./errors.ts";

/** Options of {@link readPasswordFile}. */
export interface PasswordFileOptions {
  /** Which setting named the file, for messages: "--password-file or METER_SYNC_PASSWORD_FILE". */
  setting: string;
  /** Which database it is for, for messages: "remote". */
  side: string;
}

/**
 * The password held by the file: its whole content minus one trailing newline
 * (LF or CRLF), as `echo secret > FILE` or an editor leaves it.
 *
 * Refused with a one-line ConfigError (exit 2) when the file is missing, unreadable,
 * not a regular file, empty, or open to group or others (see {@link tooOpen}): a password
 * file that other accounts can read is a leaked password, and a tool that quietly
 * accepts it teaches operators to leave it that way.
 */
export async function readPasswordFile(
  path: string,
  options: PasswordFileOptions,
): Promise<string> {
  const what = `the ${options.side} database password file ${path} (${options.setting})`;
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (err) {
    throw new ConfigError(`${what} ${fileProblem(err)}`, { cause: err });
  }
  if (!info.isFile) {
    throw new ConfigError(`${what} is not a regular file; point it at a file holding the password`);
  }
  if (tooOpen(info)) {
    throw new ConfigError(
      `${what} is open to group or others (mode ${modeOf(info)}); run chmod 600 ${path}`,
    );
  }
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw new ConfigError(`${what} ${fileProblem(err)}`, { cause: err });
  }
  const password = text.replace(/\r?\n$/, "");
  if (password.length === 0) {
    throw new ConfigError(`${what} is empty; write the password into it (one line)`);
  }
  return password;
}

/** "does not exist", "cannot be read (permission denied)": the reason without Deno's decoration. */
export function fileProblem(err: unknown): string {
  if (err instanceof Deno.errors.NotFound) return "does not exist";
  if (err instanceof Deno.errors.PermissionDenied) {
    return "cannot be read (permission denied for the user meter-sync runs as)";
  }
  if (err instanceof Deno.errors.IsADirectory) return "is a directory, not a file";
  if (err instanceof Deno.errors.NotCapable) {
    return "is outside what this build may read (its --allow-read: /etc/meter-sync and /run/credentials; move the file there, or build with METER_SYNC_ALLOW_READ)";
  }
  const message = err instanceof Error ? err.message.split("\n")[0] : String(err);
  return `cannot be read (${message.replace(/:\s*(stat|readfile|open) '.*'$/, "")})`;
}

/**
 * libpq's rule for private keys: mode 0600 or less, or 0640 or less when root owns the
 * file. The second case matters here: systemd's LoadCredential= hands the service a
 * root-owned copy with an ACL that lets the service's user read it, which stat shows as
 * mode 0440; the root-owned 0640 file of group meter-sync is the other common setup.
 */
export function tooOpen(info: Deno.FileInfo): boolean {
  if (info.mode === null) return false;
  return (info.mode & (info.uid === 0 ? 0o037 : 0o077)) !== 0;
}

/** "0644". */
export function modeOf(info: Deno.FileInfo): string {
  return ((info.mode ?? 0) & 0o777).toString(8).padStart(4, "0");
}
