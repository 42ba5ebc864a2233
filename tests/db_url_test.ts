/** Tests of lib/db_url.ts: what a PostgreSQL URL means, and errors that never show its password. */
import assert from "node:assert/strict";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { ConfigError } from "../lib/errors.ts";

/** Percent-encoded in the URL; "s3cr@t:pw" once decoded. */
const RAW_PW = "s3cr%40t:pw";
const DECODED_PW = "s3cr@t:pw";

/** The ConfigError for a URL, checked to be one line that names the source and hides the password. */
function rejection(url: string, source = "LOCAL_DATABASE_URL"): ConfigError {
  let caught: unknown;
  try {
    parseDatabaseUrl(url, source);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ConfigError, `expected a ConfigError for ${url}`);
  const message = caught.message;
  assert.ok(!message.includes("\n"), `not one line: ${JSON.stringify(message)}`);
  assert.ok(message.includes(source), `the message does not name ${source}: ${message}`);
  assert.ok(!message.includes(RAW_PW), `the raw password leaked: ${message}`);
  assert.ok(!message.includes(DECODED_PW), `the decoded password leaked: ${message}`);
  return caught;
}

Deno.test("parseDatabaseUrl() reads host, port, user, password and database from a postgres:// URL", () => {
  const t = parseDatabaseUrl(`postgres://meter:${RAW_PW}@db.example.com:6543/central`, "X");
  assert.equal(t.source, "X");
  assert.equal(t.host, "db.example.com");
  assert.equal(t.port, 6543);
  assert.equal(t.user, "meter");
  assert.equal(t.password, DECODED_PW);
  assert.equal(t.database, "central");
});

Deno.test("parseDatabaseUrl() accepts postgresql:// and fills in port 5432, sslmode prefer and a 10 s timeout", () => {
  const t = parseDatabaseUrl("postgresql://meter@gw.local/readings", "X");
  assert.equal(t.host, "gw.local");
  assert.equal(t.port, 5432);
  assert.equal(t.user, "meter");
  assert.equal(t.password, undefined);
  assert.equal(t.database, "readings");
  assert.equal(t.sslmode, "prefer");
  assert.equal(t.connectTimeout, 10);
  assert.equal(t.applicationName, "meter-sync");
});

Deno.test("parseDatabaseUrl() decodes a percent-encoded user, password and database", () => {
  const t = parseDatabaseUrl("postgres://meter%20sync:p%2Fw%3Ad%25@h/my%20readings", "X");
  assert.equal(t.user, "meter sync");
  assert.equal(t.password, "p/w:d%");
  assert.equal(t.database, "my readings");
});

Deno.test("parseDatabaseUrl() reads sslmode, the certificate paths, connect_timeout and application_name", () => {
  const t = parseDatabaseUrl(
    "postgres://u@h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem&sslcert=/etc/c.pem" +
      "&sslkey=/etc/k.pem&connect_timeout=5&application_name=gateway-17",
    "X",
  );
  assert.equal(t.sslmode, "verify-full");
  assert.equal(t.sslrootcert, "/etc/ca.pem");
  assert.equal(t.sslcert, "/etc/c.pem");
  assert.equal(t.sslkey, "/etc/k.pem");
  assert.equal(t.connectTimeout, 5);
  assert.equal(t.applicationName, "gateway-17");
});

Deno.test("parseDatabaseUrl() accepts every libpq sslmode", () => {
  for (const mode of ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]) {
    assert.equal(parseDatabaseUrl(`postgres://u@h/db?sslmode=${mode}`, "X").sslmode, mode);
  }
});

Deno.test("parseDatabaseUrl() strips the brackets of an IPv6 host", () => {
  const t = parseDatabaseUrl(`postgres://u:${RAW_PW}@[::1]:5433/db`, "X");
  assert.equal(t.host, "::1");
  assert.equal(t.port, 5433);
  assert.equal(parseDatabaseUrl("postgres://u@[2001:db8::7]/db", "X").host, "2001:db8::7");
});

Deno.test("parseDatabaseUrl() takes host, port, user and dbname from the query string", () => {
  const t = parseDatabaseUrl(
    "postgres:///ignored?host=10.1.2.3&port=5434&user=bob&dbname=other",
    "X",
  );
  assert.equal(t.host, "10.1.2.3");
  assert.equal(t.port, 5434);
  assert.equal(t.user, "bob");
  assert.equal(t.database, "other");
});

Deno.test("parseDatabaseUrl() takes a password= query parameter and masks it in display", () => {
  const t = parseDatabaseUrl("postgres://u@h/db?password=qsecret&sslmode=require", "X");
  assert.equal(t.password, "qsecret");
  assert.ok(!t.display.includes("qsecret"), t.display);
  assert.match(t.display, /password=\*\*\*/);
  assert.match(t.display, /sslmode=require/);
});

Deno.test("parseDatabaseUrl() keeps display free of the password but keeps user, host and database", () => {
  const t = parseDatabaseUrl(`postgres://meter:${RAW_PW}@db.example.com:6543/central`, "X");
  assert.equal(t.display, "postgres://meter:***@db.example.com:6543/central");
  assert.ok(!t.display.includes(RAW_PW));
  assert.ok(!t.display.includes(DECODED_PW));
});

Deno.test("parseDatabaseUrl() rejects a string that is not a URL", () => {
  const err = rejection(`postgres://meter:${RAW_PW}@db.example.com:5432:5433/central`);
  assert.match(err.message, /not a valid URL/);
  assert.match(err.message, /postgres:\/\//, "the message shows the expected form");
});

Deno.test("parseDatabaseUrl() rejects a libpq keyword/value string without showing its password", () => {
  const err = rejection(`host=db.example.com user=meter password=${DECODED_PW} dbname=central`);
  assert.match(err.message, /URL/);
});

Deno.test("parseDatabaseUrl() rejects an http:// URL naming the schemes it accepts", () => {
  const err = rejection(`http://meter:${RAW_PW}@db.example.com/central`);
  assert.match(err.message, /postgres:\/\/ or postgresql:\/\//);
});

Deno.test("parseDatabaseUrl() rejects a URL without a host", () => {
  const err = rejection("postgres:///central");
  assert.match(err.message, /no host/);
  rejection(`postgres://meter:${RAW_PW}@/central`);
});

Deno.test("parseDatabaseUrl() rejects a URL with a single slash after the scheme without showing its password", () => {
  const err = rejection(`postgres:/meter:${RAW_PW}@db.example.com/central`);
  assert.match(err.message, /host/);
});

Deno.test("parseDatabaseUrl() rejects a URL without a user", () => {
  const err = rejection(`postgres://:${RAW_PW}@db.example.com/central`);
  assert.match(err.message, /no user/);
});

Deno.test("parseDatabaseUrl() rejects a URL without a database", () => {
  assert.match(rejection(`postgres://meter:${RAW_PW}@db.example.com/`).message, /no database/);
  assert.match(rejection(`postgres://meter:${RAW_PW}@db.example.com`).message, /no database/);
});

Deno.test("parseDatabaseUrl() rejects a bad port", () => {
  for (const port of ["0", "99999", "abc"]) {
    const err = rejection(`postgres://meter:${RAW_PW}@db.example.com:${port}/central`);
    assert.match(err.message, /port|not a valid URL/, err.message);
  }
  const err = rejection(`postgres://meter:${RAW_PW}@db.example.com/central?port=70000`);
  assert.match(err.message, /invalid port "70000"/);
});

Deno.test("parseDatabaseUrl() rejects an unknown sslmode listing the valid ones", () => {
  const err = rejection(`postgres://meter:${RAW_PW}@h/db?sslmode=maybe`);
  assert.match(err.message, /sslmode=maybe/);
  assert.match(err.message, /verify-full/);
});

Deno.test("parseDatabaseUrl() rejects an unknown parameter naming it", () => {
  const err = rejection(`postgres://meter:${RAW_PW}@h/db?sslmod=require`);
  assert.match(err.message, /"sslmod"/);
  assert.match(err.message, /sslmode/);
});

Deno.test("parseDatabaseUrl() rejects connect_timeout=0 and a non-numeric timeout", () => {
  assert.match(
    rejection(`postgres://meter:${RAW_PW}@h/db?connect_timeout=0`).message,
    /connect_timeout=0/,
  );
  assert.match(
    rejection(`postgres://meter:${RAW_PW}@h/db?connect_timeout=soon`).message,
    /connect_timeout=soon/,
  );
});

Deno.test("parseDatabaseUrl() rejects a malformed percent-escape without showing the password", () => {
  const err = rejection(`postgres://meter:${RAW_PW}@h/d%ZZb`);
  assert.match(err.message, /%-escape/);
  rejection(`postgres://meter:${RAW_PW}%ZZ@h/db`);
});

Deno.test("parseDatabaseUrl() names the flag it was given as source", () => {
  const err = rejection(`http://meter:${RAW_PW}@h/db`, "--remote-url");
  assert.match(err.message, /^--remote-url /);
});

Deno.test("parseDatabaseUrl() reads sslrootcert=system as the default CA store with verify-full, as libpq 16 does", () => {
  const t = parseDatabaseUrl("postgres://u@h/db?sslrootcert=system", "X");
  assert.equal(t.sslmode, "verify-full");
  assert.equal(t.sslrootcert, "system");
  const err = rejection(`postgres://meter:${RAW_PW}@h/db?sslrootcert=system&sslmode=require`);
  assert.match(err.message, /sslrootcert=system with sslmode=require/);
  assert.match(err.message, /verify-full/);
});

Deno.test("parseDatabaseUrl() wants sslcert and sslkey together", () => {
  assert.match(
    rejection(`postgres://meter:${RAW_PW}@h/db?sslcert=/etc/c.pem`).message,
    /sslcert without sslkey/,
  );
  assert.match(
    rejection(`postgres://meter:${RAW_PW}@h/db?sslkey=/etc/k.pem`).message,
    /sslkey without sslcert/,
  );
});

Deno.test("parseDatabaseUrl() treats an empty sslrootcert, sslcert or sslkey as not given", () => {
  const t = parseDatabaseUrl(
    "postgres://u@h/db?sslmode=require&sslrootcert=&sslcert=&sslkey=",
    "X",
  );
  assert.deepEqual([t.sslrootcert, t.sslcert, t.sslkey], [undefined, undefined, undefined]);
  assert.equal(t.sslmode, "require");
});
