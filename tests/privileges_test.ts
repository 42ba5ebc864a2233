/** Least privilege (issue #6): the roles of scripts/roles_*.sql do the agent's whole job and no more. */
import assert from "node:assert/strict";
import postgres from "postgres";
import { sqlState } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { seedReadings } from "../lib/seed.ts";
import { CLAIM_PLANS } from "../lib/upload.ts";
import { type CliResult, connectTo, freshDb, runCli, type Sql, type TestDb } from "./_harness.ts";
import { count, countDistinct } from "./_sync_fixture.ts";

type Side = "local" | "remote";

function scriptPath(side: Side): string {
  return new URL(`../scripts/roles_${side}.sql`, import.meta.url).pathname;
}

/**
 * A role script with psql's part done here: the `\set` and `\if :{?name}` / `\else` /
 * `\endif` lines, and `:'name'` in the SQL. The test runs the very file an operator runs
 * with psql, on machines without psql; "the scripts run with psql ..." runs the real one.
 */
function expandPsql(text: string, given: Record<string, string>): string {
  const vars = new Map(Object.entries(given));
  const branches: boolean[] = [];
  const sql: string[] = [];
  for (const line of text.split("\n")) {
    const active = branches.every(Boolean);
    const meta = /^\s*\\(\w+)\s*(.*?)\s*$/.exec(line);
    if (!meta) {
      if (active) sql.push(line);
      continue;
    }
    const [, command, arg] = meta;
    if (command === "if") {
      const defined = /^:\{\?(\w+)\}$/.exec(arg);
      if (!defined) throw new Error(`psql \\if ${arg} is not emulated`);
      branches.push(vars.has(defined[1]));
    } else if (command === "else") {
      branches.push(!branches.pop());
    } else if (command === "endif") {
      branches.pop();
    } else if (command === "set") {
      const [, name, value] = /^(\w+)\s*(.*)$/.exec(arg)!;
      if (active && name !== "ON_ERROR_STOP") vars.set(name, value.replace(/^'(.*)'$/, "$1"));
    } else {
      throw new Error(`psql \\${command} is not emulated`);
    }
  }
  return sql.join("\n").replace(/:'(\w+)'/g, (all, name: string) => {
    const value = vars.get(name);
    return value === undefined ? all : `'${value.replaceAll("'", "''")}'`;
  });
}

/** Runs scripts/roles_<side>.sql on a connection, as psql -v NAME=VALUE -f would. */
async function runRoleScript(sql: Sql, side: Side, vars: Record<string, string>): Promise<void> {
  const text = expandPsql(await Deno.readTextFile(scriptPath(side)), vars);
  // One session, as psql has: the script's own BEGIN and COMMIT, and its settings.
  const conn = await sql.reserve();
  try {
    await conn.unsafe(text).simple();
  } catch (err) {
    // psql (ON_ERROR_STOP) would end the session, and the open transaction with it.
    await conn.unsafe("ROLLBACK");
    throw err;
  } finally {
    conn.release();
  }
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/** One side as production has it: tables owned by a non-superuser, the agent's own role. */
interface Site extends AsyncDisposable {
  /** The test's own (superuser) view of the database. */
  db: TestDb;
  /** The role that owns the tables: it ran the migrations and the role script. */
  owner: Sql;
  ownerRole: string;
  ownerUrl: string;
  agentRole: string;
  agentPassword: string;
  /** The agent's URL: its role and password, %-encoded. */
  agentUrl: string;
  /** A connection as the agent. */
  agent(): Sql;
}

function urlAs(base: string, user: string, password: string): string {
  const u = new URL(base);
  u.username = encodeURIComponent(user);
  u.password = encodeURIComponent(password);
  return u.toString();
}

function connectAs(db: TestDb, user: string, password: string): Sql {
  return postgres({
    host: "127.0.0.1",
    port: db.server.port,
    database: db.name,
    user,
    pass: password,
    max: 2,
    idle_timeout: 5,
    onnotice: () => {},
  });
}

/**
 * A fresh database on the side's server, owned by a CREATEROLE role that is not a
 * superuser (as on a managed service), migrated by that owner, which then runs the role
 * script. Roles are cluster-wide: `tag` keeps each test's apart.
 */
async function site(side: Side, tag: string): Promise<Site> {
  const db = await freshDb(side);
  const ownerRole = `meter_sync_owner_${tag}`;
  const ownerPassword = crypto.randomUUID();
  // Capitals and a space: the script quotes every name. The password has URL and SQL quoting
  // characters: it travels %-encoded in the URL and as a literal into the script.
  const agentRole = `Gateway Agent ${tag}`;
  const agentPassword = `p@ss:w/rd#'${tag}\\"`;
  const agents: Sql[] = [];
  let owner: Sql | undefined;
  const dispose = async () => {
    await Promise.all([owner, ...agents].map((s) => s?.end({ timeout: 1 })));
    await db[Symbol.asyncDispose]();
    const admin = connectTo(db.server.url("postgres"));
    try {
      await admin.unsafe(`DROP ROLE IF EXISTS ${quoteIdent(agentRole)}`);
      await admin.unsafe(`DROP ROLE IF EXISTS ${quoteIdent(ownerRole)}`);
    } finally {
      await admin.end({ timeout: 1 });
    }
  };
  try {
    await db.sql.unsafe(
      `CREATE ROLE ${quoteIdent(ownerRole)} LOGIN CREATEROLE PASSWORD '${ownerPassword}'`,
    );
    await db.sql.unsafe(`ALTER DATABASE ${quoteIdent(db.name)} OWNER TO ${quoteIdent(ownerRole)}`);
    owner = connectAs(db, ownerRole, ownerPassword);
    await migrate(owner, await loadMigrations(migrationsDir(side)));
    await runRoleScript(owner, side, { agent_role: agentRole, agent_password: agentPassword });
  } catch (err) {
    await dispose();
    throw err;
  }
  return {
    db,
    owner,
    ownerRole,
    ownerUrl: urlAs(db.url, ownerRole, ownerPassword),
    agentRole,
    agentPassword,
    agentUrl: urlAs(db.url, agentRole, agentPassword),
    agent: () => {
      const sql = connectAs(db, agentRole, agentPassword);
      agents.push(sql);
      return sql;
    },
    [Symbol.asyncDispose]: dispose,
  };
}

/** A gateway and a central database with the agent's roles, `seed` readings queued. */
interface Fleet extends AsyncDisposable {
  local: Site;
  remote: Site;
  agentId: string;
  /** The agent's environment: both URLs with the restricted roles. */
  env: Record<string, string>;
}

async function fleet(seed: number): Promise<Fleet> {
  const tag = crypto.randomUUID().slice(0, 8);
  const local = await site("local", tag);
  let remote: Site;
  try {
    remote = await site("remote", tag);
    if (seed > 0) {
      await seedReadings(local.owner, { count: seed, meters: 5, days: 2, chunk: 10_000 });
    }
  } catch (err) {
    await local[Symbol.asyncDispose]();
    throw err;
  }
  const agentId = `gw-${tag}`;
  return {
    local,
    remote,
    agentId,
    env: {
      LOCAL_DATABASE_URL: local.agentUrl,
      REMOTE_DATABASE_URL: remote.agentUrl,
      METER_SYNC_AGENT_ID: agentId,
    },
    async [Symbol.asyncDispose]() {
      await local[Symbol.asyncDispose]();
      await remote[Symbol.asyncDispose]();
    },
  };
}

/** Runs statements in one transaction that is always rolled back: "ok", or "SQLSTATE message". */
async function attempt(sql: Sql, ...statements: string[]): Promise<string> {
  const rollback = new Error("rollback");
  try {
    await sql.begin(async (tx) => {
      for (const s of statements) await tx.unsafe(s);
      throw rollback;
    });
  } catch (err) {
    if (err === rollback) return "ok";
    const state = sqlState(err);
    if (state) return `${state} ${(err as Error).message}`;
    throw err;
  }
  return "ok";
}

const DENIED = /^42501 permission denied for table /;

/**
 * How a cycle stopped by a missing privilege ends: exit 2 when the pre-flight check of the
 * schema plan names it (a setting to fix, SPEC §3), 1 when PostgreSQL's 42501 ends the
 * cycle; one line, no log line before it, no stack, no retry, no password.
 */
function assertRefused(r: CliResult, pattern: RegExp, password: string): void {
  assert.ok(r.code === 1 || r.code === 2, `exit ${r.code}: ${r.stderr}`);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0], pattern);
  assert.ok(!r.stderr.includes("    at "), "no stack trace");
  assert.ok(!/retry/i.test(r.stderr), "a missing privilege is not retried");
  assert.ok(!r.stderr.includes(password), "no password");
}

const REPLAY_ID = "00000000-0000-4000-8000-000000000001";

/** The detail of the duplicate-key error that inserting REPLAY_ID again raises. */
async function duplicateDetail(sql: Sql): Promise<string | undefined> {
  try {
    await sql.unsafe(
      `INSERT INTO meter_readings (id, meter_id, status) VALUES ('${REPLAY_ID}', 1, 'ok')`,
    );
  } catch (err) {
    assert.equal(sqlState(err), "23505");
    return (err as { detail?: string }).detail;
  }
  assert.fail("the duplicate was accepted");
}

Deno.test("the central role inserts readings, replays with ON CONFLICT (id), reads meters, and nothing more", async () => {
  await using s = await site("remote", crypto.randomUUID().slice(0, 8));
  await s.owner`INSERT INTO meters (id, serial_number, name) VALUES (1, 'SN-1', 'one')`;
  await s.owner`INSERT INTO meter_readings (id, meter_id, status) VALUES (${REPLAY_ID}, 1, 'ok')`;
  const agent = s.agent();
  const insert = `INSERT INTO meter_readings (id, meter_id, status)
                  VALUES (gen_random_uuid(), 1, 'ok')`;
  // The replay path of lib/upload.ts, statement for statement.
  const replay = [
    `CREATE TEMP TABLE meter_sync_stage ON COMMIT DROP AS
       SELECT id, meter_id, status FROM meter_readings WITH NO DATA`,
    `INSERT INTO meter_sync_stage VALUES ('${REPLAY_ID}', 1, 'ok'), (gen_random_uuid(), 1, 'ok')`,
    `INSERT INTO meter_readings (id, meter_id, status) SELECT id, meter_id, status
       FROM meter_sync_stage ON CONFLICT ("id") DO NOTHING`,
  ];
  assert.equal(await attempt(agent, insert), "ok");
  assert.equal(await attempt(agent, ...replay), "ok");
  assert.equal(await attempt(agent, "SELECT id, name, serial_number FROM meters"), "ok");
  assert.equal(
    await attempt(
      agent,
      `INSERT INTO sync_agents AS a (agent_id, version, last_cycle_started_at,
                                     last_cycle_finished_at, last_outcome)
       VALUES ('gw', '1', now(), now(), 'ok')
       ON CONFLICT (agent_id) DO UPDATE SET rows_uploaded_total = a.rows_uploaded_total + 1`,
    ),
    "ok",
  );
  // The readings themselves stay unreadable and untouchable from a gateway.
  for (
    const denied of [
      "SELECT status FROM meter_readings",
      "SELECT * FROM meter_readings",
      "UPDATE meter_readings SET status = 'x'",
      "DELETE FROM meter_readings",
      "TRUNCATE meter_readings",
      "INSERT INTO meters (id, serial_number, name) VALUES (2, 'SN-2', 'two')",
      "DELETE FROM meters",
      "DELETE FROM sync_agents",
      "SELECT * FROM meter_sync_migrations",
    ]
  ) {
    assert.match(await attempt(agent, denied), DENIED, denied);
  }
  assert.match(await attempt(agent, "CREATE TABLE mine (x int)"), /^42501 /);
  assert.match(await attempt(agent, "DROP TABLE meters"), /^42501 must be owner/);
  assert.match(String(await duplicateDetail(agent)), /^Key \(id\)=\(/);
  // What PostgreSQL demands, verified: the conflict target needs SELECT on its column...
  await s.owner.unsafe(`REVOKE SELECT (id) ON meter_readings FROM ${quoteIdent(s.agentRole)}`);
  assert.equal(await attempt(agent, insert), "ok", "a plain insert or COPY does not");
  assert.match(
    await attempt(agent, ...replay),
    /^42501 permission denied for table meter_readings/,
  );
  // ... and without it a duplicate key comes without the key in its detail, which is how
  // lib/upload.ts tells a replay from a poison row.
  assert.equal(await duplicateDetail(agent), undefined);
  // ... and CREATE TABLE ... AS ... WITH NO DATA needs no SELECT at all (it runs no query).
  assert.equal(await attempt(agent, replay[0]), "ok");
  await s.owner.unsafe(`REVOKE TEMPORARY ON DATABASE ${quoteIdent(s.db.name)} FROM PUBLIC`);
  await s.owner.unsafe(
    `REVOKE TEMPORARY ON DATABASE ${quoteIdent(s.db.name)} FROM ${quoteIdent(s.agentRole)}`,
  );
  assert.match(await attempt(s.agent(), replay[0]), /^42501 /, "the staging table needs TEMPORARY");
});

Deno.test("the gateway role claims FOR UPDATE, deletes, mirrors meters, keeps its books, and nothing more", async () => {
  await using s = await site("local", crypto.randomUUID().slice(0, 8));
  await seedReadings(s.owner, { count: 20, meters: 5, days: 2 });
  const agent = s.agent();
  const claim = `SELECT m.id FROM meter_readings m
                  WHERE NOT m.is_synchronized
                    AND NOT EXISTS (SELECT 1 FROM meter_sync_quarantine q WHERE q.id = m.id)
                  ORDER BY m.createdat, m.id LIMIT 5 FOR UPDATE OF m SKIP LOCKED`;
  assert.equal(await attempt(agent, CLAIM_PLANS, claim), "ok");
  assert.equal(
    await attempt(agent, "DELETE FROM meter_readings WHERE id = gen_random_uuid()"),
    "ok",
  );
  assert.equal(
    await attempt(
      agent,
      `CREATE TEMP TABLE meter_sync_mirror ON COMMIT DROP AS SELECT * FROM meters WITH NO DATA`,
      `INSERT INTO meters (id, serial_number, name) VALUES (1, 'SN-1', 'x'), (99, 'SN-99', 'y')
       ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name RETURNING (xmax = 0) AS inserted`,
      `DELETE FROM meters WHERE id = 99`,
      `INSERT INTO meter_sync_quarantine (id, sqlstate, error) VALUES (gen_random_uuid(), '23514', 'x')
       ON CONFLICT (id) DO UPDATE SET attempts = meter_sync_quarantine.attempts + 1`,
      `DELETE FROM meter_sync_quarantine`,
      `INSERT INTO meter_sync_runs (command, started_at, finished_at, outcome)
       VALUES ('sync', now(), now(), 'ok')`,
      `DELETE FROM meter_sync_runs WHERE finished_at < now() - interval '30 days'`,
    ),
    "ok",
  );
  // UPDATE of the sync flag is granted only for the row lock; it allows no more than DELETE.
  assert.equal(await attempt(agent, "UPDATE meter_readings SET is_synchronized = true"), "ok");
  for (
    const denied of [
      "INSERT INTO meter_readings (meter_id) VALUES (1)",
      "UPDATE meter_readings SET voltage_l1_v = 0",
      "TRUNCATE meter_readings",
      "UPDATE meter_sync_runs SET outcome = 'ok'",
      "TRUNCATE meters",
      "SELECT * FROM meter_sync_migrations",
    ]
  ) {
    assert.match(await attempt(agent, denied), DENIED, denied);
  }
  assert.match(await attempt(agent, "CREATE TABLE mine (x int)"), /^42501 /);
  // What PostgreSQL demands, verified: FOR UPDATE needs UPDATE on some column; DELETE is not enough.
  await s.owner.unsafe(
    `REVOKE UPDATE (is_synchronized) ON meter_readings FROM ${quoteIdent(s.agentRole)}`,
  );
  assert.match(await attempt(agent, claim), /^42501 permission denied for table meter_readings/);
  assert.equal(
    await attempt(agent, claim.replace(" FOR UPDATE OF m SKIP LOCKED", "")),
    "ok",
    "without the lock SELECT alone would do, but two agents could then take the same rows",
  );
});

Deno.test("sync, a replay after a crash, quarantine, status, requeue and check-schema all work as the restricted roles", async () => {
  await using f = await fleet(250);
  const { local, remote, env } = f;
  await remote.owner`INSERT INTO meters (id, serial_number, name) VALUES (1000, 'SN-1000', 'new')`;
  // The crash between the remote commit and the local delete, reproduced: the remote holds
  // half of the first batch already, so that batch goes through the staging table.
  const first = await local.owner`SELECT * FROM meter_readings ORDER BY createdat, id LIMIT 50`;
  const cols = Object.keys(first[0]).filter((c) => c !== "is_synchronized");
  await remote.owner`INSERT INTO meter_readings ${remote.owner(first as never, cols)}`;
  // A poison row: the central side rejects its frequency.
  const [bad] = await local.owner<{ id: string }[]>`
    SELECT id::text FROM meter_readings ORDER BY createdat, id OFFSET 120 LIMIT 1`;
  await local.owner`UPDATE meter_readings SET frequency_hz = 99.5 WHERE id = ${bad.id}`;
  await remote.owner`ALTER TABLE meter_readings ADD CONSTRAINT grid CHECK (frequency_hz < 60)`;

  const check = await runCli(["check-schema"], { env });
  assert.equal(check.code, 0, check.stderr);
  const sync = await runCli(["sync", "--batch-size", "100"], { env });
  assert.equal(sync.code, 0, sync.stderr);
  assert.match(sync.stderr, /50 already on the remote/);
  assert.match(sync.stderr, /1 quarantined/);
  assert.ok(!sync.stderr.includes(local.agentPassword), "no password in the log");
  assert.deepEqual(await countDistinct(remote.db.sql), { rows: 249, ids: 249 });
  assert.equal(await count(local.db.sql), 1, "only the quarantined reading is left");
  const meters = await local.db.sql<{ id: string }[]>`SELECT id::text FROM meters ORDER BY id`;
  assert.ok(meters.some((m) => m.id === "1000"), "the download brought the new meter");

  const status = await runCli(["status", "--json"], { env });
  assert.equal(status.code, 0, status.stderr);
  const report = JSON.parse(status.stdout);
  assert.equal(report.queue_size, 0);
  assert.equal(report.quarantined, 1);
  assert.equal(report.last_error, null);
  // status reads this gateway's sync_agents row centrally, when the remote answers in time.
  assert.doesNotMatch(String(report.remote?.error ?? ""), /permission denied/);

  await remote.owner`ALTER TABLE meter_readings DROP CONSTRAINT grid`;
  const requeue = await runCli(["requeue", "--all"], { env });
  assert.equal(requeue.code, 0, requeue.stderr);
  assert.match(requeue.stdout, /requeued 1 reading/);
  const again = await runCli(["sync"], { env });
  assert.equal(again.code, 0, again.stderr);
  assert.deepEqual(await countDistinct(remote.db.sql), { rows: 250, ids: 250 });
  assert.equal(await count(local.db.sql), 0);

  // The heartbeat went in, then was updated in place (INSERT, then ON CONFLICT DO UPDATE).
  const beats = await remote.db.sql<
    { last_outcome: string; rows_uploaded: string; rows_uploaded_total: string }[]
  >`SELECT last_outcome, rows_uploaded::text, rows_uploaded_total::text
      FROM sync_agents WHERE agent_id = ${f.agentId}`;
  assert.equal(beats.length, 1, "the heartbeat row of this gateway");
  assert.equal(beats[0].last_outcome, "ok");
  assert.equal(beats[0].rows_uploaded, "1");
  assert.equal(beats[0].rows_uploaded_total, "200");
});

Deno.test("INSERT on the central readings revoked: one line naming it, no retry, every reading in place", async () => {
  await using f = await fleet(150);
  await f.remote.owner.unsafe(
    `REVOKE INSERT ON meter_readings FROM ${quoteIdent(f.remote.agentRole)}`,
  );
  const r = await runCli(["sync", "--max-retries", "3"], { env: f.env });
  assertRefused(
    r,
    /(lacks INSERT on "meter_readings"|permission denied for table meter_readings).*(stays|still) in the local queue/,
    f.remote.agentPassword,
  );
  assert.equal(await count(f.local.db.sql), 150);
  assert.equal(await count(f.remote.db.sql), 0);
  const status = JSON.parse((await runCli(["status", "--json"], { env: f.env })).stdout);
  assert.equal(status.queue_size, 150);
  assert.match(status.last_error, /lacks INSERT|permission denied for table meter_readings/);
});

Deno.test("DELETE on the gateway's readings revoked: one line naming it, nothing lost; re-running the script fixes it, without duplicates", async () => {
  await using f = await fleet(250);
  await f.local.owner.unsafe(
    `REVOKE DELETE ON meter_readings FROM ${quoteIdent(f.local.agentRole)}`,
  );
  const r = await runCli(["sync", "--batch-size", "100"], { env: f.env });
  assertRefused(
    r,
    /lacks DELETE on "meter_readings".*stays in the local queue|local delete failed: permission denied for table meter_readings .*without duplicates/,
    f.local.agentPassword,
  );
  assert.equal(await count(f.local.db.sql), 250, "every reading still queued locally");
  // Caught before the first batch by the pre-flight check; else by the first local delete,
  // after the remote had the batch (and maybe the next: batches overlap).
  const onRemote = await count(f.remote.db.sql);
  assert.ok([0, 100, 200].includes(onRemote), `${onRemote} on the remote`);
  // The operator's fix: run the role script again.
  await runRoleScript(f.local.owner, "local", { agent_role: f.local.agentRole });
  const again = await runCli(["sync", "--batch-size", "100"], { env: f.env });
  assert.equal(again.code, 0, again.stderr);
  if (onRemote) assert.match(again.stderr, new RegExp(`${onRemote} already on the remote`));
  assert.deepEqual(await countDistinct(f.remote.db.sql), { rows: 250, ids: 250 });
  assert.equal(await count(f.local.db.sql), 0);
});

Deno.test("SELECT on the central meters revoked: one line naming meters, readings delivered once, local meters untouched", async () => {
  await using f = await fleet(120);
  await f.remote
    .owner`INSERT INTO meters (id, serial_number, name) VALUES (1000, 'SN-1000', 'new')`;
  await f.remote.owner.unsafe(`REVOKE SELECT ON meters FROM ${quoteIdent(f.remote.agentRole)}`);
  const meters = async () =>
    (await f.local.db.sql`SELECT * FROM meters ORDER BY id`).map((m) => ({ ...m }));
  const before = await meters();
  const r = await runCli(["sync"], { env: f.env });
  assertRefused(
    r,
    /download failed: permission denied for table meters \(SQLSTATE 42501\); nothing was changed locally/,
    f.remote.agentPassword,
  );
  assert.deepEqual(await countDistinct(f.remote.db.sql), { rows: 120, ids: 120 });
  assert.equal(await count(f.local.db.sql), 0, "the upload half had finished");
  assert.deepEqual(await meters(), before);
});

Deno.test("running a role script again keeps the password and takes back privileges granted by hand", async () => {
  await using s = await site("local", crypto.randomUUID().slice(0, 8));
  const role = quoteIdent(s.agentRole);
  await s.owner.unsafe(`GRANT INSERT, TRUNCATE ON meter_readings TO ${role}`);
  await s.owner.unsafe(`GRANT SELECT ON meter_sync_migrations TO ${role}`);
  await runRoleScript(s.owner, "local", { agent_role: s.agentRole });
  const agent = s.agent();
  assert.match(await attempt(agent, "INSERT INTO meter_readings (meter_id) VALUES (1)"), DENIED);
  assert.match(await attempt(agent, "SELECT * FROM meter_sync_migrations"), DENIED);
  assert.equal(await attempt(agent, "SELECT count(*) FROM meter_readings"), "ok");
  // Refusals that name the fix.
  await assert.rejects(
    runRoleScript(s.owner, "local", { agent_role: s.ownerRole }),
    /the agent needs a role of its own/,
  );
  await assert.rejects(
    runRoleScript(s.owner, "local", { agent_role: s.agentRole, readings_table: "readings" }),
    /table public\.readings does not exist; run as the owner first: meter-sync migrate --target local/,
  );
});

async function psqlAvailable(): Promise<boolean> {
  try {
    return (await new Deno.Command("psql", { args: ["--version"], stdout: "null" }).output())
      .success;
  } catch {
    return false;
  }
}

Deno.test({
  name: "the scripts run with psql exactly as their headers say",
  ignore: !(await psqlAvailable()),
  fn: async () => {
    for (const side of ["local", "remote"] as const) {
      await using s = await site(side, crypto.randomUUID().slice(0, 8));
      const role = `meter_sync_agent_${crypto.randomUUID().slice(0, 8)}`;
      const password = "from psql";
      const out = await new Deno.Command("psql", {
        args: [
          s.ownerUrl,
          "-X",
          "-q",
          "-v",
          `agent_role=${role}`,
          "-v",
          `agent_password=${password}`,
          "-f",
          scriptPath(side),
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      const agent = connectAs(s.db, role, password);
      try {
        const table = side === "local" ? "meter_sync_runs" : "meters";
        assert.equal(await attempt(agent, `SELECT * FROM ${table}`), "ok");
      } finally {
        await agent.end({ timeout: 1 });
        await s.db.sql.unsafe(`DROP OWNED BY ${role}`);
        await s.db.sql.unsafe(`DROP ROLE ${role}`);
      }
    }
  },
});
