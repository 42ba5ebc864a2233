/** The postgres.js bugs lib/db.ts guards against: they must not end the agent, nothing else may hide. */
import assert from "node:assert/strict";
import { isConnectionLoss, isTypeFetch } from "../lib/db.ts";

const FIXTURE = new URL("./fixtures/driver_rejection.ts", import.meta.url).pathname;

async function rejectIn(kind: string): Promise<{ code: number; stdout: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--quiet", "--allow-read", "--allow-env", FIXTURE, kind],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stdout: new TextDecoder().decode(out.stdout) };
}

Deno.test("isTypeFetch() and isConnectionLoss() recognise only the driver's lost connections", () => {
  const err = (props: Record<string, unknown>) => Object.assign(new Error("x"), props);
  assert.ok(isTypeFetch(err({
    query: `select b.oid, b.typarray from pg_catalog.pg_type a
            left join pg_catalog.pg_type b on b.oid = a.typelem where a.typcategory = 'A'`,
  })));
  assert.ok(!isTypeFetch(err({ query: "SELECT 1" })));
  assert.ok(!isTypeFetch(null));
  for (const code of ["ECONNRESET", "EPIPE", "CONNECTION_DESTROYED", "08006", "57P01"]) {
    assert.ok(isConnectionLoss(err({ code })), code);
  }
  for (const code of ["23505", "42501", "57014", undefined]) {
    assert.ok(!isConnectionLoss(err({ code })), String(code));
  }
});

Deno.test("a lost connection's unhandled rejection inside postgres.js does not end the process", async () => {
  // Found by the chaos run: a fresh connection lost during the driver's type fetch.
  for (const kind of ["reset", "type-fetch"]) {
    const r = await rejectIn(kind);
    assert.equal(r.code, 0, kind);
    assert.match(r.stdout, /survived/);
  }
  // Anything else still ends it: the guard hides nothing of ours.
  const other = await rejectIn("other");
  assert.equal(other.code, 1);
  assert.doesNotMatch(other.stdout, /survived/);
});

Deno.test("the driver's write to a closed socket is caught in its immediate, and the immediates behind it still run", async () => {
  // Found by the chaos run (a gateway server stopped mid-batch): let out of its immediate,
  // the TypeError left Deno's immediate queue pointing at the next immediate; a closing
  // connection then cleared that one, and the queue's next turn ended the process.
  const r = await rejectIn("null-socket");
  assert.equal(r.code, 0);
  assert.match(r.stdout, /survived/);
  // The same TypeError from anywhere but the driver still ends the process.
  const ours = await rejectIn("immediate-ours");
  assert.equal(ours.code, 1);
  assert.doesNotMatch(ours.stdout, /survived/);
});
