/** Tests of lib/redact.ts: no password survives into a line meant for people or logs. */
import assert from "node:assert/strict";
import { redactText, redactUrl, secretsOf } from "../lib/redact.ts";

Deno.test("redactUrl() masks the password and keeps user, host, port, database and parameters", () => {
  assert.equal(
    redactUrl("postgres://meter:hunter2@db.example.com:6543/central?sslmode=require"),
    "postgres://meter:***@db.example.com:6543/central?sslmode=require",
  );
});

Deno.test("redactUrl() masks a percent-encoded password", () => {
  const shown = redactUrl("postgresql://meter:s3cr%40t%3Apw@[::1]:5432/db");
  assert.equal(shown, "postgresql://meter:***@[::1]:5432/db");
});

Deno.test("redactUrl() masks a password= query parameter", () => {
  const shown = redactUrl("postgres://meter@h/db?sslmode=require&password=qsecret");
  assert.ok(!shown.includes("qsecret"), shown);
  assert.match(shown, /password=\*\*\*/);
  assert.match(shown, /sslmode=require/);
});

Deno.test("redactUrl() leaves a URL without a password as it is", () => {
  assert.equal(redactUrl("postgres://meter@h:5432/db"), "postgres://meter@h:5432/db");
});

Deno.test("redactUrl() masks the password of a URL it cannot parse", () => {
  const shown = redactUrl("postgres://meter:hunter2@h:99999/db");
  assert.ok(!shown.includes("hunter2"), shown);
  assert.match(shown, /meter:\*\*\*@h:99999/);
});

Deno.test("secretsOf() returns each URL password raw and percent-decoded", () => {
  const secrets = secretsOf(["postgres://u:s3cr%40t%3Apw@h/db"]);
  assert.ok(secrets.includes("s3cr%40t%3Apw"), JSON.stringify(secrets));
  assert.ok(secrets.includes("s3cr@t:pw"), JSON.stringify(secrets));
});

Deno.test("secretsOf() returns a password= query parameter", () => {
  assert.deepEqual(secretsOf(["postgres://u@h/db?password=qsecret"]), ["qsecret"]);
});

Deno.test("secretsOf() skips missing URLs and URLs without a password", () => {
  assert.deepEqual(secretsOf([undefined, "", "postgres://u@h/db", "not a url"]), []);
});

Deno.test("secretsOf() returns the whole password when it holds an unencoded @", () => {
  // new URL() accepts this (the last @ ends the user info) and connects with "p@ss0rd".
  const secrets = secretsOf(["postgres://u:p@ss0rd@h/db"]);
  assert.ok(secrets.includes("p@ss0rd"), JSON.stringify(secrets));
});

Deno.test("redactText() masks a secret that another secret starts with", () => {
  const secrets = secretsOf(["postgres://u:abc@h/db", "postgres://v:abcdef@h/db"]);
  assert.equal(redactText("tried abcdef then abc", secrets), "tried *** then ***");
});

Deno.test("redactText() masks the password of every postgres URL in free text without being told it", () => {
  const text =
    "copy from postgres://gw:localpw@10.0.0.5/gw to postgresql://c:remote%2Fpw@db.example.com:5432/central failed";
  assert.equal(
    redactText(text),
    "copy from postgres://gw:***@10.0.0.5/gw to postgresql://c:***@db.example.com:5432/central failed",
  );
});

Deno.test("redactText() masks a password= parameter of a URL in free text without being told it", () => {
  const out = redactText("connecting to postgres://gw@h/db?password=qsecret&sslmode=require");
  assert.ok(!out.includes("qsecret"), out);
  assert.match(out, /sslmode=require/);
});

Deno.test("redactText() masks a known secret wherever it appears, raw or decoded", () => {
  const secrets = secretsOf(["postgres://u:s3cr%40t%3Apw@h/db"]);
  const out = redactText(
    'auth failed for "s3cr@t:pw"; the URL said s3cr%40t%3Apw; done',
    secrets,
  );
  assert.equal(out, 'auth failed for "***"; the URL said ***; done');
});

Deno.test("redactText() leaves text without secrets or URL passwords unchanged", () => {
  const text = "uploaded 100 rows to postgres://u@h/db in 12 ms";
  assert.equal(redactText(text, ["hunter2"]), text);
});
