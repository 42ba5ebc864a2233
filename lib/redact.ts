/** Keeps passwords out of every log line and error message. */

const MASK = "***";

/** `scheme://user:PASSWORD@` (also with one slash, a typo that still carries a password). */
const USERINFO = /([a-z][a-z0-9+.-]*:\/{0,2}[^:/@\s]*:)[^@\s]*@/gi;
/** `password=...` as a URL parameter or a libpq keyword/value pair. */
const PASSWORD_PARAM = /((?:^|[?&\s;])[^=\s&?;]*pass[^=\s&?;]*=)(?:'(?:[^'\\]|\\.)*'|[^&\s;]*)/gi;

/**
 * Typed by hand, a URL's user info may hold spaces or an unencoded "@", "/", "?" or "#",
 * and its scheme or slashes may be missing or wrong: everything from the first ":" after
 * the user name to the last "@" is taken for a password, with and without a scheme.
 * Masking too much in a URL that is shown is harmless; showing part of a password is not.
 */
const LOOSE_USERINFO = [
  /^\s*[a-z][a-z0-9+.-]*:\/*[^:]*:(.*)@/is,
  /^\s*\/*[^:]*:(?!\/)(.*)@/s,
];
/**
 * `password=` up to the next parameter libpq knows: a password typed into a URL may hold
 * spaces, ";" or even "&".
 */
const LOOSE_PASSWORD_PARAM =
  /[?&][^=&]*pass[^=&]*=(.*?)(?=&(?:sslmode|sslrootcert|sslcert|sslkey|sslnegotiation|connect_timeout|application_name|options|target_session_attrs|user|dbname|host|port|password)=|$)/gis;

/** A URL (or anything that was meant to be one) with every password replaced by ***. */
export function redactUrl(url: string): string {
  return redactText(url, secretsOf([url]));
}

/** Every password found in the given URLs, raw and percent-decoded, for {@link redactText}. */
export function secretsOf(urls: (string | undefined)[]): string[] {
  const secrets = new Set<string>();
  const add = (s: string | undefined) => {
    if (!s) return;
    secrets.add(s);
    // As a path decodes it, and as a query parameter does ("+" is a space there).
    for (const encoded of [s, s.replaceAll("+", " ")]) {
      try {
        secrets.add(decodeURIComponent(encoded));
      } catch {
        secrets.add(encoded); // malformed escape: the text as it is
      }
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
    const loose = [
      ...LOOSE_USERINFO.map((re) => re.exec(url)?.[1]),
      ...[...url.matchAll(LOOSE_PASSWORD_PARAM)].map((p) => p[1]),
    ];
    for (const secret of loose) {
      // Guessed, not parsed: a guess of a character or two would mask half of every line.
      if (!secret || secret.length < 3) continue;
      add(secret);
      // An unencoded "?", "#", "/" or "&" splits such a password between the URL's parts,
      // and a message may echo one part (as a parameter name, a path): mask each part too.
      for (const part of secret.split(/[?#/&=@\s]+/)) if (part.length >= 4) add(part);
    }
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
