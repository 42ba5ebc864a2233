/** Tests of tests/_harness.ts and lib/embedded.ts: isolation, loopback, orphan reaping, restart. */
import assert from "node:assert/strict";
import { connectTo, freshDb, server } from "./_harness.ts";
import { postmasterPid as pidOf, reapOrphans } from "../lib/embedded.ts";

function tempRoot(): string {
  return Deno.env.get("TMPDIR") ?? "/tmp";
}

/** Alive means running: a missing process or a zombie waiting to be reaped is gone. */
function running(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/** The PID of a process that has exited: nothing runs under it now. */
async function deadPid(): Promise<number> {
  const child = new Deno.Command("true", { stdout: "null", stderr: "null" }).spawn();
  await child.status;
  assert.ok(!running(child.pid));
  return child.pid;
}

function postmasterPid(dir: string): number {
  const pid = pidOf(dir);
  assert.ok(pid, `no postmaster.pid in ${dir}/data`);
  return pid;
}

async function waitFor(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

Deno.test("two fresh databases are independent", async () => {
  await using a = await freshDb();
  await using b = await freshDb();
  assert.notEqual(a.name, b.name);
  assert.notEqual(a.url, b.url);
  await a.sql`CREATE TABLE only_in_a (x int)`;
  await a.sql`INSERT INTO only_in_a VALUES (1)`;
  const [inA] = await a.sql`SELECT to_regclass('only_in_a') IS NOT NULL AS ok`;
  const [inB] = await b.sql`SELECT to_regclass('only_in_a') IS NOT NULL AS ok`;
  assert.equal(inA.ok, true);
  assert.equal(inB.ok, false);
  const [db] = await b.sql`SELECT current_database() AS name`;
  assert.equal(db.name, b.name);
});

Deno.test("a fresh database is dropped when its test ends", async () => {
  let name: string;
  {
    await using db = await freshDb();
    name = db.name;
  }
  const s = await server();
  const admin = connectTo(s.url());
  try {
    const rows = await admin`SELECT 1 FROM pg_database WHERE datname = ${name}`;
    assert.equal(rows.length, 0);
  } finally {
    await admin.end({ timeout: 1 });
  }
});

Deno.test("the file's server listens on a loopback port and answers", async () => {
  await using db = await freshDb();
  const url = new URL(db.url);
  assert.equal(url.hostname, "127.0.0.1");
  assert.equal(Number(url.port), db.server.port);
  assert.ok(db.server.port > 0 && db.server.port < 65536);
  const [row] = await db.sql`
    SELECT host(inet_server_addr()) AS addr, inet_server_port() AS port,
           current_setting('listen_addresses') AS listen, 6 * 7 AS answer`;
  assert.deepEqual({ ...row }, {
    addr: "127.0.0.1",
    port: db.server.port,
    listen: "127.0.0.1",
    answer: 42,
  });
  // The same server for every test of the file.
  assert.equal(await server(), db.server);
});

Deno.test("reapOrphans() shuts down the server of a SIGKILLed owner and removes its folder, and spares live ones", async () => {
  const mine = await server();
  // A real owner process, killed as an interrupted test run would be: no cleanup runs.
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("./fixtures/orphan_owner.ts", import.meta.url).pathname],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const reader = child.stdout.getReader();
  let out = "";
  while (!out.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    out += new TextDecoder().decode(value);
  }
  const orphanDir = out.trim();
  assert.ok(orphanDir.startsWith(`${tempRoot()}/meter-sync-pg-`), orphanDir);
  const postmaster = postmasterPid(orphanDir);
  assert.ok(running(postmaster));
  // A folder with the prefix but no owner.pid (being created right now) is left alone,
  // and so is a folder without the prefix whose owner is dead.
  const unowned = await Deno.makeTempDir({ dir: tempRoot(), prefix: "meter-sync-pg-unowned-" });
  const foreign = await Deno.makeTempDir({ dir: tempRoot(), prefix: "someone-else-" });
  try {
    // While its owner lives, the orphan's folder is not touched.
    reapOrphans();
    assert.ok(await exists(orphanDir), "a live owner's server is spared");
    assert.ok(running(postmaster));

    child.kill("SIGKILL");
    await child.status;
    reader.releaseLock();
    await child.stdout.cancel().catch(() => {});
    await Deno.writeTextFile(`${foreign}/owner.pid`, String(await deadPid()));

    reapOrphans();

    await waitFor("the orphan's postmaster to exit", () => !running(postmaster));
    assert.equal(await exists(orphanDir), false, "the orphan's folder is removed");
    assert.ok(await exists(unowned), "a folder without owner.pid is spared");
    assert.ok(await exists(foreign), "a folder without the prefix is spared");
    // This file's own server belongs to a live process: untouched, still answering.
    assert.ok(await exists(mine.dir));
    assert.ok(running(postmasterPid(mine.dir)));
    await using db = await freshDb();
    const [row] = await db.sql`SELECT 1 AS one`;
    assert.equal(row.one, 1);
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // already dead
    }
    await Deno.remove(unowned, { recursive: true }).catch(() => {});
    await Deno.remove(foreign, { recursive: true }).catch(() => {});
    if (running(postmaster)) Deno.kill(postmaster, "SIGQUIT");
    await Deno.remove(orphanDir, { recursive: true }).catch(() => {});
  }
});

Deno.test("a stopped server can be started again with its data intact", async () => {
  const s = await server();
  await using db = await freshDb();
  await db.sql`CREATE TABLE kept (id int PRIMARY KEY, note text)`;
  await db.sql`INSERT INTO kept VALUES (1, 'before the stop'), (2, 'Zähler')`;
  await db.sql.end({ timeout: 1 });

  const before = postmasterPid(s.dir);
  await s.stop();
  assert.ok(!running(before), "the postmaster exited");
  const probe = connectTo(db.url);
  try {
    await assert.rejects(() => probe`SELECT 1`);
  } finally {
    await probe.end({ timeout: 0 }).catch(() => {});
  }

  await s.start();
  const after = connectTo(db.url);
  try {
    const rows = await after`SELECT id, note FROM kept ORDER BY id`;
    assert.deepEqual(rows.map((r) => [r.id, r.note]), [[1, "before the stop"], [2, "Zähler"]]);
  } finally {
    await after.end({ timeout: 1 });
  }
});

Deno.test("the harness runs PostgreSQL as an ordinary user too (not only as root)", async () => {
  // As root, run the fixture as `nobody` with a copy of this deno; as an ordinary user,
  // run it directly: either way no root is involved in starting the server.
  const fixture = new URL("./fixtures/ordinary_user.ts", import.meta.url).pathname;
  const root = Deno.uid() === 0;
  const temp = await Deno.makeTempDir({ prefix: "meter-sync-user-" });
  try {
    await Deno.chmod(temp, 0o755);
    const home = `${temp}/home`;
    await Deno.mkdir(home);
    let deno = Deno.execPath();
    if (root) {
      deno = `${temp}/deno`;
      await Deno.copyFile(Deno.execPath(), deno);
      await Deno.chmod(deno, 0o755);
      await Deno.chown(home, 65534, 65534);
    }
    const env = [`HOME=${home}`, `DENO_DIR=${home}/deno`, `TMPDIR=${home}`];
    const args = ["run", "-A", "--cached-only", fixture];
    const cmd = root
      ? new Deno.Command("runuser", { args: ["-u", "nobody", "--", "env", ...env, deno, ...args] })
      : new Deno.Command(deno, { args, env: Object.fromEntries(env.map((e) => e.split("="))) });
    const out = await cmd.output();
    const text = new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    const result = JSON.parse(text.trim().split("\n").pop()!);
    assert.notEqual(result.uid, 0);
    assert.equal(result.dataOwner, result.uid, "the server's files belong to that user");
    assert.match(result.version, /^PostgreSQL 18/);
  } finally {
    await Deno.remove(temp, { recursive: true }).catch(() => {});
  }
});
