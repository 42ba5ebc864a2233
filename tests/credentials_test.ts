/** Passwords (issue #6 point 2): the URL, --password-file / --local-password-file, pgpass; never printed. */
import assert from "node:assert/strict";
import { rememberSecret } from "../lib/connections.ts";
import { type ConnectOptions, resolvePassword } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import { ConfigError } from "../lib/errors.ts";
import { readPasswordFile } from "../lib/password_file.ts";
import { redactText } from "../lib/redact.ts";
import {
  compileFlags,
  connectTo,
  freshDb,
  runCli,
  server,
  silentServer,
  type TestDb,
} from "./_harness.ts";

/** A folder of password files for one test, removed when it ends. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "meter-sync-credentials-" });
  return {
    path,
    [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }),
  };
}

async function writeSecret(path: string, text: string, mode = 0o600): Promise<string> {
  await Deno.writeTextFile(path, text, { mode });
  await Deno.chmod(path, mode); // the umask may have taken bits off
  return path;
}

const SETTING = { setting: "--password-file or METER_SYNC_PASSWORD_FILE", side: "remote" };

// ---------------------------------------------------------------------------------------------
// lib/password_file.ts and the order of password sources in lib/db.ts.

Deno.test("readPasswordFile() returns the content minus one trailing newline", async () => {
  await using dir = await tempDir();
  const cases: [string, string][] = [
    ["s3cret", "s3cret"],
    ["s3cret\n", "s3cret"],
    ["s3cret\r\n", "s3cret"],
    ["s3cret\n\n", "s3cret\n"],
    [" spaced pass ", " spaced pass "],
    ["pa:ss@wo%rd#\n", "pa:ss@wo%rd#"],
  ];
  for (const [i, [text, want]] of cases.entries()) {
    const path = await writeSecret(`${dir.path}/pw${i}`, text);
    assert.equal(await readPasswordFile(path, SETTING), want, JSON.stringify(text));
  }
  const readOnly = await writeSecret(`${dir.path}/ro`, "ro-pass\n", 0o400);
  assert.equal(await readPasswordFile(readOnly, SETTING), "ro-pass");
});

Deno.test("readPasswordFile() refuses a file open to others or writable by group, saying chmod 600 FILE", async () => {
  await using dir = await tempDir();
  for (const mode of [0o604, 0o644, 0o660, 0o620, 0o601, 0o444]) {
    const path = await writeSecret(`${dir.path}/pw-${mode.toString(8)}`, "Zebra-open-pw\n", mode);
    await assert.rejects(readPasswordFile(path, SETTING), (err: Error) => {
      assert.ok(err instanceof ConfigError, `${err.name}: ${err.message}`);
      assert.equal(
        err.message,
        `the remote database password file ${path} (--password-file or METER_SYNC_PASSWORD_FILE) is open to group or others (mode 0${
          mode.toString(8)
        }); run chmod 600 ${path}`,
      );
      assert.ok(!err.message.includes("Zebra-open-pw"));
      return true;
    });
  }
});

Deno.test("readPasswordFile() refuses a group-readable file that root does not own", async () => {
  await using dir = await tempDir();
  const path = await writeSecret(`${dir.path}/pw`, "Zebra-group-pw\n", 0o640);
  // As root, hand the file to nobody; as anyone else, the file is that user's already.
  if (Deno.uid() === 0) await Deno.chown(path, 65534, 65534);
  await assert.rejects(readPasswordFile(path, SETTING), /is open to group or others \(mode 0640\)/);
});

Deno.test({
  name:
    "readPasswordFile() accepts a root-owned file that its group may read, as systemd's LoadCredential= hands it over",
  // systemd writes the credential as root, mode 0400, plus an ACL for the service's user:
  // stat then shows 0440. The root-owned 0640 file of group meter-sync is the same case.
  ignore: Deno.uid() !== 0,
  async fn() {
    await using dir = await tempDir();
    for (const mode of [0o440, 0o640]) {
      const path = await writeSecret(`${dir.path}/pw-${mode.toString(8)}`, "cred-pass\n", mode);
      assert.equal((await Deno.stat(path)).uid, 0);
      assert.equal(await readPasswordFile(path, SETTING), "cred-pass");
    }
  },
});

Deno.test("readPasswordFile() names a missing file, a directory and an empty file in one line each", async () => {
  await using dir = await tempDir();
  const what = (path: string) =>
    `the remote database password file ${path} (--password-file or METER_SYNC_PASSWORD_FILE)`;
  const missing = `${dir.path}/nope`;
  const empty = await writeSecret(`${dir.path}/empty`, "\n");
  const cases: [string, string][] = [
    [missing, `${what(missing)} does not exist`],
    [dir.path, `${what(dir.path)} is not a regular file; point it at a file holding the password`],
    [empty, `${what(empty)} is empty; write the password into it (one line)`],
  ];
  for (const [path, message] of cases) {
    await assert.rejects(readPasswordFile(path, SETTING), (err: Error) => {
      assert.ok(err instanceof ConfigError, `${err.name}: ${err.message}`);
      assert.equal(err.message, message);
      return true;
    });
  }
});

Deno.test("resolvePassword() takes the URL's password, then the password file, then pgpass", async () => {
  await using dir = await tempDir();
  const file = await writeSecret(`${dir.path}/pw`, "from-file\n");
  const pgpass = await writeSecret(`${dir.path}/pgpass`, "*:*:*:*:from-pgpass\n");
  const withUrl = parseDatabaseUrl("postgres://meter:from-url@db.example/central", "X");
  const bare = parseDatabaseUrl("postgres://meter@db.example/central", "X");
  const secrets: string[] = [];
  const warnings: string[] = [];
  const options = (withFile: boolean): ConnectOptions => ({
    pgpassFile: pgpass,
    passwordFile: withFile ? { path: file, ...SETTING } : undefined,
    warn: (m) => warnings.push(m),
    onSecret: (s) => secrets.push(s),
  });
  assert.equal(await resolvePassword(withUrl, options(true)), "from-url");
  assert.equal(warnings.length, 1);
  assert.match(
    warnings[0],
    /^--password-file or METER_SYNC_PASSWORD_FILE is ignored for the remote database: its URL carries a password/,
  );
  assert.deepEqual(secrets, [], "a URL's password is in config.secrets already");
  assert.equal(await resolvePassword(bare, options(true)), "from-file");
  assert.equal(await resolvePassword(bare, options(false)), "from-pgpass");
  assert.deepEqual(secrets, ["from-file", "from-pgpass"]);
  assert.equal(await resolvePassword(bare, { pgpassFile: `${dir.path}/none` }), undefined);
});

Deno.test("rememberSecret() adds a password in every printed form to the array main.ts masks with", () => {
  const secrets = ["short", "a-much-longer-url-secret"];
  rememberSecret(secrets, 'fi"le/pw');
  rememberSecret(secrets, 'fi"le/pw');
  assert.deepEqual(secrets, [
    "a-much-longer-url-secret",
    "fi%22le%2Fpw",
    'fi\\"le/pw',
    'fi"le/pw',
    "short",
  ]);
  const line = `auth failed: fi"le/pw, in JSON ${JSON.stringify({ p: 'fi"le/pw' })}`;
  assert.equal(redactText(line, secrets), 'auth failed: ***, in JSON {"p":"***"}');
});

// ---------------------------------------------------------------------------------------------
// The CLI against a server with password (SCRAM) authentication: the harness server.

/** Two roles with passwords of their own: the gateway's and the central database's. */
interface Roles {
  local: { user: string; password: string };
  remote: { user: string; password: string };
}

let rolesPromise: Promise<Roles> | undefined;

function roles(): Promise<Roles> {
  rolesPromise ??= (async () => {
    const s = await server();
    const tag = crypto.randomUUID().slice(0, 8);
    const r: Roles = {
      local: { user: `gw_${tag}`, password: `GwPw-${crypto.randomUUID()}` },
      remote: { user: `central_${tag}`, password: `CentralPw-${crypto.randomUUID()}` },
    };
    const admin = connectTo(s.url());
    try {
      for (const { user, password } of [r.local, r.remote]) {
        // Superusers, so that migrate may create what it needs in a fresh database.
        await admin.unsafe(`CREATE ROLE ${user} LOGIN SUPERUSER PASSWORD '${password}'`);
      }
    } finally {
      await admin.end();
    }
    return r;
  })();
  return rolesPromise;
}

/** A URL without a password for the role, or with the one given. */
function urlFor(db: TestDb, user: string, password?: string): string {
  const auth = password === undefined ? user : `${user}:${encodeURIComponent(password)}`;
  return `postgres://${auth}@127.0.0.1:${db.server.port}/${db.name}?sslmode=disable`;
}

/** Both sides: fresh databases, the roles, and their password files (mode 0600). */
async function setup() {
  const r = await roles();
  const local = await freshDb();
  const remote = await freshDb();
  const dir = await tempDir();
  const localFile = await writeSecret(`${dir.path}/local.pw`, `${r.local.password}\n`);
  const remoteFile = await writeSecret(`${dir.path}/remote.pw`, `${r.remote.password}\n`);
  return {
    roles: r,
    local,
    remote,
    dir: dir.path,
    localFile,
    remoteFile,
    localUrl: urlFor(local, r.local.user),
    remoteUrl: urlFor(remote, r.remote.user),
    /** Every password of the file, which no output may show. */
    passwords: [r.local.password, r.remote.password, local.server.password],
    async [Symbol.asyncDispose]() {
      await local[Symbol.asyncDispose]();
      await remote[Symbol.asyncDispose]();
      await dir[Symbol.asyncDispose]();
    },
  };
}

function assertNoPassword(text: string, passwords: string[]): void {
  for (const p of passwords) {
    assert.ok(!text.includes(p), `a password shows in the output:\n${text}`);
    assert.ok(!text.includes(encodeURIComponent(p)), `a password shows encoded:\n${text}`);
  }
}

/** One line on stderr, no stack trace. */
function oneLine(stderr: string): string {
  const lines = stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${stderr}`);
  assert.ok(!/\bat .*:\d+:\d+/.test(stderr), `a stack trace:\n${stderr}`);
  return lines[0];
}

Deno.test("CLI: --password-file and --local-password-file give each side its own password", async () => {
  await using t = await setup();
  const args = [
    "--local-url",
    t.localUrl,
    "--remote-url",
    t.remoteUrl,
    "--local-password-file",
    t.localFile,
    "--password-file",
    t.remoteFile,
    "--log-level",
    "debug",
  ];
  const migrated = await runCli(["migrate", "--target", "both", ...args]);
  assert.equal(migrated.code, 0, migrated.stderr);
  const checked = await runCli(["check-schema", ...args]);
  assert.equal(checked.code, 0, checked.stderr);
  assertNoPassword(
    migrated.stdout + migrated.stderr + checked.stdout + checked.stderr,
    t.passwords,
  );
  // The tables belong to each side's own role: each password went to its own database.
  const [{ owner: localOwner }] = await t.local.sql<{ owner: string }[]>`
    SELECT tableowner AS owner FROM pg_tables WHERE tablename = 'meter_readings'`;
  const [{ owner: remoteOwner }] = await t.remote.sql<{ owner: string }[]>`
    SELECT tableowner AS owner FROM pg_tables WHERE tablename = 'meter_readings'`;
  assert.deepEqual([localOwner, remoteOwner], [t.roles.local.user, t.roles.remote.user]);
});

Deno.test("CLI: METER_SYNC_PASSWORD_FILE and METER_SYNC_LOCAL_PASSWORD_FILE work as the flags do", async () => {
  await using t = await setup();
  const r = await runCli(["migrate", "--target", "both"], {
    env: {
      LOCAL_DATABASE_URL: t.localUrl,
      REMOTE_DATABASE_URL: t.remoteUrl,
      METER_SYNC_LOCAL_PASSWORD_FILE: t.localFile,
      METER_SYNC_PASSWORD_FILE: t.remoteFile,
    },
  });
  assert.equal(r.code, 0, r.stderr);
  assertNoPassword(r.stdout + r.stderr, t.passwords);
});

Deno.test("CLI: swapped password files fail authentication (exit 2: a setting to fix) without showing either password", async () => {
  await using t = await setup();
  const r = await runCli([
    "status",
    "--local-url",
    t.localUrl,
    "--local-password-file",
    t.remoteFile,
  ]);
  assert.equal(r.code, 2, r.stderr);
  const line = oneLine(r.stderr);
  assert.match(line, /password authentication failed/);
  assert.match(line, /fix the user or password/);
  assertNoPassword(r.stdout + r.stderr, t.passwords);
});

Deno.test("CLI: a password file open to others is refused: exit 2, one line saying chmod 600", async () => {
  await using t = await setup();
  await Deno.chmod(t.remoteFile, 0o644);
  await Deno.chmod(t.localFile, 0o604);
  const remote = await runCli([
    "check-schema",
    "--local-url",
    t.localUrl,
    "--remote-url",
    t.remoteUrl,
    "--password-file",
    t.remoteFile,
  ]);
  assert.equal(remote.code, 2, remote.stderr);
  assert.equal(
    oneLine(remote.stderr),
    `meter-sync: the remote database password file ${t.remoteFile} (--password-file or METER_SYNC_PASSWORD_FILE) is open to group or others (mode 0644); run chmod 600 ${t.remoteFile}`,
  );
  const local = await runCli(["status", "--local-url", t.localUrl], {
    env: { METER_SYNC_LOCAL_PASSWORD_FILE: t.localFile },
  });
  assert.equal(local.code, 2, local.stderr);
  assert.match(
    oneLine(local.stderr),
    /^meter-sync: the local database password file .* is open to group or others \(mode 0604\); run chmod 600 /,
  );
  assertNoPassword(remote.stdout + remote.stderr + local.stdout + local.stderr, t.passwords);
});

Deno.test("CLI: a missing password file: exit 2, one line naming the file", async () => {
  await using t = await setup();
  const missing = `${t.dir}/not-there.pw`;
  const r = await runCli(["status", "--local-url", t.localUrl, "--local-password-file", missing]);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(
    oneLine(r.stderr),
    `meter-sync: the local database password file ${missing} (--local-password-file or METER_SYNC_LOCAL_PASSWORD_FILE) does not exist`,
  );
  assertNoPassword(r.stdout + r.stderr, t.passwords);
});

Deno.test("CLI: the URL's password wins over the password file, with a warning that the file is ignored", async () => {
  await using t = await setup();
  const wrong = await writeSecret(`${t.dir}/wrong.pw`, "Wrong-Password-123\n");
  const r = await runCli([
    "migrate",
    "--target",
    "local",
    "--local-url",
    urlFor(t.local, t.roles.local.user, t.roles.local.password),
    "--local-password-file",
    wrong,
  ]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(
    r.stderr,
    /--local-password-file or METER_SYNC_LOCAL_PASSWORD_FILE is ignored for the local database: its URL carries a password/,
  );
  assertNoPassword(r.stdout + r.stderr, [...t.passwords, "Wrong-Password-123"]);
});

Deno.test("CLI: PGPASSFILE gives the password when there is no password file, and the password file beats it", async () => {
  await using t = await setup();
  const pgpass = await writeSecret(
    `${t.dir}/pgpass`,
    `127.0.0.1:${t.local.server.port}:*:${t.roles.local.user}:${t.roles.local.password}\n`,
  );
  const viaPgpass = await runCli(["migrate", "--target", "local", "--local-url", t.localUrl], {
    env: { PGPASSFILE: pgpass },
  });
  assert.equal(viaPgpass.code, 0, viaPgpass.stderr);
  const wrongPgpass = await writeSecret(
    `${t.dir}/pgpass-wrong`,
    `*:*:*:*:Wrong-Pgpass-Password\n`,
  );
  const viaFile = await runCli([
    "migrate",
    "--target",
    "local",
    "--local-url",
    t.localUrl,
    "--local-password-file",
    t.localFile,
  ], { env: { PGPASSFILE: wrongPgpass } });
  assert.equal(viaFile.code, 0, viaFile.stderr);
  assertNoPassword(
    viaPgpass.stdout + viaPgpass.stderr + viaFile.stdout + viaFile.stderr,
    [...t.passwords, "Wrong-Pgpass-Password"],
  );
});

Deno.test("CLI: a password read from a file is masked wherever it would show, in text and JSON logs", async () => {
  // The file holds the role's own name, a wrong password that the server's error message
  // then repeats: the mask must cover a secret that only the file knew.
  await using t = await setup();
  const name = t.roles.local.user;
  const file = await writeSecret(`${t.dir}/name.pw`, `${name}\n`);
  for (const format of ["pretty", "json"]) {
    const r = await runCli([
      "status",
      "--local-url",
      t.localUrl,
      "--local-password-file",
      file,
      "--log-format",
      format,
    ]);
    assert.equal(r.code, 2, r.stderr);
    const line = oneLine(r.stderr);
    assert.ok(!line.includes(name), `the password from the file shows: ${line}`);
    assert.match(line, /password authentication failed for user \\?"\*\*\*\\?"/);
    if (format === "json") assert.equal(typeof JSON.parse(line), "object");
  }
});

/** The command line of a process as `ps` and /proc show it to every user of the machine. */
async function processListOf(pid: number): Promise<{ proc: string; ps: string }> {
  const proc = (await Deno.readTextFile(`/proc/${pid}/cmdline`)).replaceAll("\0", " ");
  const out = await new Deno.Command("ps", { args: ["-ww", "-eo", "pid=,args="], stdout: "piped" })
    .output();
  const ps = new TextDecoder().decode(out.stdout).split("\n")
    .filter((l) => l.trim().startsWith(`${pid} `)).join("\n");
  return { proc, ps };
}

/** main.ts, as runCli starts it, left waiting on a server that never answers; its command line. */
async function commandLineWhileRunning(args: string[]): Promise<{ proc: string; ps: string }> {
  // Accepts and then stays silent: the agent waits for its connect timeout, long enough to look.
  await using silent = silentServer();
  const port = silent.port;
  const main = new URL("../main.ts", import.meta.url).pathname;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--quiet",
      ...(await compileFlags()),
      main,
      ...args.map((a) => a.replace("PORT", String(port))),
    ],
    env: { PATH: Deno.env.get("PATH") ?? "", HOME: Deno.env.get("HOME") ?? "/" },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  try {
    // Once the agent has connected it is surely past start-up, with its arguments in place.
    for (let i = 0; silent.accepted === 0; i++) {
      if (i > 600) throw new Error("main.ts never connected");
      await new Promise((r) => setTimeout(r, 50));
    }
    return await processListOf(child.pid);
  } finally {
    child.kill("SIGKILL");
    const out = await child.output();
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    assert.ok(!text.includes("Ps-Secret"), `the password shows in the output:\n${text}`);
  }
}

Deno.test("ps: a password from --password-file stays out of the process list; one in the URL is in it", async () => {
  await using dir = await tempDir();
  const password = `Ps-Secret-${crypto.randomUUID()}`;
  const file = await writeSecret(`${dir.path}/pw`, `${password}\n`);
  const base = "postgres://meter@127.0.0.1:PORT/gateway?connect_timeout=60";
  const withFile = await commandLineWhileRunning([
    "status",
    "--local-url",
    base,
    "--local-password-file",
    file,
  ]);
  for (const seen of [withFile.proc, withFile.ps]) {
    // The process was found, arguments and all...
    assert.ok(
      seen.includes(`--local-password-file ${file}`),
      `not the agent's command line: ${seen}`,
    );
    // ...and what it shows is the file's name, not what is in it.
    assert.ok(!seen.includes(password), `the password is in the process list: ${seen}`);
  }
  const inUrl = await commandLineWhileRunning([
    "status",
    "--local-url",
    base.replace("meter@", `meter:${password}@`),
  ]);
  for (const seen of [inUrl.proc, inUrl.ps]) {
    assert.ok(seen.includes(password), `expected the URL's password in: ${seen}`);
  }
});
