/** Keeps passwords out of every log line and error message. */

const MASK = "***";

/** `scheme://user:PASSWORD@` (also with one slash, a typo that still carries a password). */
const USERINFO = /([a-z][a-z0-9+.-]*:\/{0,2}[^:/@\s]*:)[^@\s]*@/gi;
/** `password=...` as a URL parameter or a libpq keyword/value pair. */
const PASSWORD_PARAM = /((?:^|[?&\s;])[^=\s&?;]*pass[^=\s&?;]*=)(?:'(?:[^'\\]|\\.)*'|[^&\s;]*)/gi;

/** A URL (or anything that was meant to be one) with every password replaced by ***. */
export function redactUrl(url: string): string {
  return redactText(url);
}

/** Every password found in the given URLs, raw and percent-decoded, for {@link redactText}. */
export function secretsOf(urls: (string | undefined)[]): string[] {
  const secrets = new Set<string>();
  const add = (s: string | undefined) => {
    if (!s) return;
    secrets.add(s);
    try {
      secrets.add(decodeURIComponent(s));
    } catch {
      // malformed escape: the raw form is enough
    }
  };
  for (const url of urls) {
    if (!url) continue;
    try {
      const u = new URL(url);
      add(u.password);
      for (const [key, value] of u.searchParams) {
        if (/pass/i.test(key)) add(value);
      }
    } catch {
      // not a URL: fall back to the text patterns below
    }
    // The last "@" ends the password, as in new URL(); an unencoded "@" stays inside.
    const m = /^[a-z][a-z0-9+.-]*:\/{0,2}[^:/@\s]*:(.*)@[^@]*$/i.exec(url);
    if (m) add(m[1]);
    for (const p of url.matchAll(/(?:^|[?&\s;])[^=\s&?;]*pass[^=\s&?;]*=([^&\s;]*)/gi)) add(p[1]);
  }
  const all = [...secrets].filter((s) => s.length > 0);
  // Also the forms a secret takes inside JSON text, so that a formatted line is covered.
  for (const s of [...all]) all.push(JSON.stringify(s).slice(1, -1));
  return [...new Set(all)].sort((a, b) => b.length - a.length);
}

/** Replaces every known secret, and the password part of any URL, in free text. */
export function redactText(text: string, secrets: readonly string[] = []): string {
  let out = text;
  for (const secret of secrets) if (secret) out = out.replaceAll(secret, MASK);
  return out.replace(USERINFO, `$1${MASK}@`).replace(PASSWORD_PARAM, `$1${MASK}`);
}

/** A deep copy of a log value with every string redacted (errors become their message). */
export function redactValue(value: unknown, secrets: readonly string[], depth = 0): unknown {
  if (typeof value === "string") return redactText(value, secrets);
  if (value instanceof Error) return redactText(value.message, secrets);
  if (depth > 5 || value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map((v) => redactValue(v, secrets, depth + 1));
  if (Object.getPrototypeOf(value) !== Object.prototype) return value;
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => [k, redactValue(v, secrets, depth + 1)]),
  );
}
