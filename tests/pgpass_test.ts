/** Tests of lib/pgpass.ts: libpq's password file, its matching rules and its permission check. */
import assert from "node:assert/strict";
import { findPassword, type PgpassKey, readPgpass } from "../lib/pgpass.ts";

const KEY: PgpassKey = { host: "db.example.com", port: 5432, database: "central", user: "meter" };

Deno.test("findPassword() returns the password of a line that matches every field", () => {
  assert.equal(findPassword("db.example.com:5432:central:meter:hunter2\n", KEY), "hunter2");
});

Deno.test("findPassword() skips lines where any one field differs", () => {
  const text = [
    "other.example.com:5432:central:meter:wrong-host",
    "db.example.com:5433:central:meter:wrong-port",
    "db.example.com:5432:other:meter:wrong-db",
    "db.example.com:5432:central:someone:wrong-user",
  ].join("\n");
  assert.equal(findPassword(text, KEY), undefined);
});

Deno.test("findPassword() lets * match any value in every field", () => {
  assert.equal(findPassword("*:*:*:*:everywhere", KEY), "everywhere");
  assert.equal(findPassword("db.example.com:*:central:meter:anyport", KEY), "anyport");
  assert.equal(findPassword("*:5432:*:meter:anyhostanydb", KEY), "anyhostanydb");
  assert.equal(findPassword("*:5432:*:other:no", KEY), undefined);
});

Deno.test("findPassword() returns the first matching line, not the most specific", () => {
  const text = "*:*:*:meter:first\ndb.example.com:5432:central:meter:second\n";
  assert.equal(findPassword(text, KEY), "first");
});

Deno.test("findPassword() skips comments and blank lines", () => {
  const text = [
    "# db.example.com:5432:central:meter:commented-out",
    "",
    "   ",
    "  # indented comment:5432:central:meter:x",
    "db.example.com:5432:central:meter:real",
  ].join("\n");
  assert.equal(findPassword(text, KEY), "real");
});

Deno.test("findPassword() reads escaped colons and backslashes in fields and password", () => {
  const key: PgpassKey = { host: "h", port: 5432, database: "db:one", user: "dom\\meter" };
  const text = "h:5432:db\\:one:dom\\\\meter:pa\\:ss\\\\word\n";
  assert.equal(findPassword(text, key), "pa:ss\\word");
});

Deno.test("findPassword() does not let an escaped colon split a field", () => {
  // "db\:one" is one database name, so a key for database "db" must not match.
  const text = "h:5432:db\\:one:meter:nope\n";
  assert.equal(
    findPassword(text, { host: "h", port: 5432, database: "db", user: "meter" }),
    undefined,
  );
});

Deno.test("findPassword() ignores lines with fewer than five fields", () => {
  assert.equal(findPassword("db.example.com:5432:central:meter\n*:*:*:*:ok", KEY), "ok");
});

Deno.test("findPassword() reads files with Windows line endings", () => {
  assert.equal(
    findPassword("x:1:y:z:no\r\ndb.example.com:5432:central:meter:crlf\r\n", KEY),
    "crlf",
  );
});

Deno.test("readPgpass() reads the password from a file with mode 0600", async () => {
  const dir = await Deno.makeTempDir({ prefix: "pgpass-test-" });
  try {
    const path = `${dir}/pgpass`;
    await Deno.writeTextFile(path, "db.example.com:5432:central:meter:from-file\n", {
      mode: 0o600,
    });
    await Deno.chmod(path, 0o600);
    const warnings: string[] = [];
    assert.equal(await readPgpass(path, KEY, (m) => warnings.push(m)), "from-file");
    assert.deepEqual(warnings, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readPgpass() ignores a file with mode 0644 and warns naming the file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "pgpass-test-" });
  try {
    const path = `${dir}/pgpass`;
    await Deno.writeTextFile(path, "*:*:*:*:world-readable\n");
    await Deno.chmod(path, 0o644);
    const warnings: string[] = [];
    assert.equal(await readPgpass(path, KEY, (m) => warnings.push(m)), undefined);
    assert.equal(warnings.length, 1);
    assert.ok(warnings[0].includes(path), warnings[0]);
    assert.match(warnings[0], /0600/);
    assert.ok(!warnings[0].includes("world-readable"), "the warning shows the password");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readPgpass() returns undefined for a file that does not exist, without a warning", async () => {
  const warnings: string[] = [];
  const path = `/nonexistent-${crypto.randomUUID()}/.pgpass`;
  assert.equal(await readPgpass(path, KEY, (m) => warnings.push(m)), undefined);
  assert.deepEqual(warnings, []);
});

Deno.test("readPgpass() returns undefined when no line of a 0600 file matches", async () => {
  const dir = await Deno.makeTempDir({ prefix: "pgpass-test-" });
  try {
    const path = `${dir}/pgpass`;
    await Deno.writeTextFile(path, "other:5432:central:meter:x\n");
    await Deno.chmod(path, 0o600);
    assert.equal(await readPgpass(path, KEY), undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readPgpass() ignores a directory in place of the file, with a warning naming it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "pgpass-test-" });
  try {
    const warnings: string[] = [];
    assert.equal(await readPgpass(dir, KEY, (m) => warnings.push(m)), undefined);
    assert.deepEqual(warnings, [`password file ${dir} is not a plain file; it is ignored`]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
