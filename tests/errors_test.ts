/** Tests of lib/errors.ts: which failures are retried, quarantined or fatal, and how they read. */
import assert from "node:assert/strict";
import { classifyError, ConfigError, describeError, sqlState } from "../lib/errors.ts";

/** An error shaped like a postgres.js PostgresError. */
function pgError(code: string, message = `server said ${code}`): Error {
  return Object.assign(new Error(message), { name: "PostgresError", code, severity: "ERROR" });
}

/** An error shaped like a Node socket error (what postgres.js passes through). */
function socketError(code: string, message: string): Error {
  return Object.assign(new Error(message), { code, errno: -1, syscall: "connect" });
}

Deno.test("classifyError() retries every SQLSTATE of class 08 (connection exception)", () => {
  for (const code of ["08000", "08001", "08003", "08006", "08P01"]) {
    assert.equal(classifyError(pgError(code)), "transient", code);
  }
});

Deno.test("classifyError() retries class 53 (too many connections, out of resources)", () => {
  for (const code of ["53300", "53000"]) {
    assert.equal(classifyError(pgError(code)), "transient", code);
  }
});

Deno.test("classifyError() retries admin shutdown, crash shutdown and cannot-connect-now (57P01-57P03)", () => {
  for (const code of ["57P01", "57P02", "57P03"]) {
    assert.equal(classifyError(pgError(code)), "transient", code);
  }
});

Deno.test("classifyError() retries serialization failures (40001) and deadlocks (40P01)", () => {
  assert.equal(classifyError(pgError("40001")), "transient");
  assert.equal(classifyError(pgError("40P01")), "transient");
});

Deno.test("classifyError() retries a statement timeout (57014) and a lock timeout (55P03)", () => {
  assert.equal(
    classifyError(pgError("57014", "canceling statement due to statement timeout")),
    "transient",
  );
  assert.equal(classifyError(pgError("55P03")), "transient");
});

Deno.test("classifyError() does not retry other class 57 and 40 states", () => {
  // 57P04: database dropped; 40002: integrity constraint violation at commit.
  assert.equal(classifyError(pgError("57P04")), "permanent");
  assert.notEqual(classifyError(pgError("40002")), "transient");
});

Deno.test("classifyError() blames the data for class 22 and 23 errors", () => {
  for (const code of ["22001", "22003", "22P02", "22007", "23502", "23503", "23505", "23514"]) {
    assert.equal(classifyError(pgError(code)), "data", code);
  }
});

Deno.test("classifyError() treats syntax errors, missing tables and bad passwords as permanent", () => {
  for (const code of ["42601", "42P01", "42703", "28P01", "3D000", "42501"]) {
    assert.equal(classifyError(pgError(code)), "permanent", code);
  }
});

Deno.test("classifyError() retries Node-style connection refused and reset errors", () => {
  assert.equal(
    classifyError(socketError("ECONNREFUSED", "connect ECONNREFUSED 127.0.0.1:5432")),
    "transient",
  );
  assert.equal(classifyError(socketError("ECONNRESET", "read ECONNRESET")), "transient");
  assert.equal(
    classifyError(socketError("ETIMEDOUT", "connect ETIMEDOUT 10.0.0.5:5432")),
    "transient",
  );
  assert.equal(classifyError(socketError("EHOSTUNREACH", "connect EHOSTUNREACH")), "transient");
});

Deno.test("classifyError() retries a broken pipe (EPIPE), a lost connection", () => {
  assert.equal(classifyError(socketError("EPIPE", "write EPIPE")), "transient");
});

Deno.test("classifyError() retries postgres.js CONNECTION_CLOSED, CONNECTION_ENDED and CONNECT_TIMEOUT", () => {
  for (const code of ["CONNECTION_CLOSED", "CONNECTION_ENDED", "CONNECT_TIMEOUT"]) {
    const err = Object.assign(new Error(`write ${code} 127.0.0.1:5432`), { code });
    assert.equal(classifyError(err), "transient", code);
  }
});

Deno.test("classifyError() retries Deno's own ConnectionRefused and ConnectionReset errors", () => {
  assert.equal(classifyError(new Deno.errors.ConnectionRefused("Connection refused")), "transient");
  assert.equal(classifyError(new Deno.errors.ConnectionReset("Connection reset")), "transient");
});

Deno.test("classifyError() treats a plain error, a string and undefined as permanent", () => {
  assert.equal(classifyError(new Error("boom")), "permanent");
  assert.equal(classifyError(new ConfigError("--batch-size must be a whole number")), "permanent");
  assert.equal(classifyError("boom"), "permanent");
  assert.equal(classifyError(undefined), "permanent");
  assert.equal(classifyError(null), "permanent");
});

Deno.test("sqlState() reads a PostgreSQL SQLSTATE and nothing else", () => {
  assert.equal(sqlState(pgError("23505")), "23505");
  assert.equal(sqlState(pgError("40P01")), "40P01");
  assert.equal(sqlState(socketError("ECONNREFUSED", "refused")), undefined);
  assert.equal(sqlState(new Error("no code")), undefined);
  assert.equal(sqlState("23505"), undefined);
});

Deno.test("sqlState() does not take the Node error code EPIPE for a SQLSTATE", () => {
  assert.equal(sqlState(socketError("EPIPE", "write EPIPE")), undefined);
});

Deno.test("describeError() gives one line with the SQLSTATE of a PostgreSQL error", () => {
  const err = pgError("42601", 'syntax error at or near "SELEC"\nLINE 1: SELEC 1\n        ^');
  assert.equal(describeError(err), 'syntax error at or near "SELEC" (SQLSTATE 42601)');
});

Deno.test("describeError() gives the first line of a plain error, without a stack", () => {
  const err = new Error("connect ECONNREFUSED 127.0.0.1:5432\nmore detail");
  const line = describeError(err);
  assert.equal(line, "connect ECONNREFUSED 127.0.0.1:5432");
  assert.doesNotMatch(line, /SQLSTATE/);
  assert.ok(!line.includes("\n"), line);
  assert.doesNotMatch(line, /^\s+at /m);
});

Deno.test("describeError() turns a thrown non-error into its text", () => {
  assert.equal(describeError("plain string"), "plain string");
  assert.equal(describeError(42), "42");
});
