/** Keeps passwords out of every log line and error message. */

const MASK = "***";

/** A URL with its password (and any `password=` query parameter) replaced by ***. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = MASK;
    for (const key of [...u.searchParams.keys()]) {
      if (/pass/i.test(key)) u.searchParams.set(key, MASK);
    }
    return u.toString().replaceAll(encodeURIComponent(MASK), MASK);
  } catch {
    // Not parseable: mask whatever sits between "user:" and "@".
    return url.replace(/(\/\/[^:/@]*:)[^@]*@/, `$1${MASK}@`);
  }
}

/** Every password found in the given URLs, raw and percent-decoded, for {@link redactText}. */
export function secretsOf(urls: (string | undefined)[]): string[] {
  const secrets = new Set<string>();
  for (const url of urls) {
    if (!url) continue;
    const m = /\/\/[^:/@]*:([^@]*)@/.exec(url);
    if (m && m[1]) {
      secrets.add(m[1]);
      try {
        secrets.add(decodeURIComponent(m[1]));
      } catch {
        // malformed escape: the raw form is enough
      }
    }
    try {
      for (const [key, value] of new URL(url).searchParams) {
        if (/pass/i.test(key) && value) secrets.add(value);
      }
    } catch {
      // not a URL
    }
  }
  return [...secrets].filter((s) => s.length > 0).sort((a, b) => b.length - a.length);
}

/** Replaces every known secret, and the password part of any URL, in free text. */
export function redactText(text: string, secrets: readonly string[] = []): string {
  let out = text.replace(/(postgres(?:ql)?:\/\/[^:/@\s]*:)[^@\s]*@/g, `$1${MASK}@`);
  for (const secret of secrets) out = out.replaceAll(secret, MASK);
  return out;
}
