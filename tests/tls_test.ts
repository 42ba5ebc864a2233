/** TLS to PostgreSQL (issue #6 point 1): every sslmode against a real server, with a throwaway CA. */
import assert from "node:assert/strict";
import { connect, type Sql, TlsError } from "../lib/db.ts";
import { parseDatabaseUrl } from "../lib/db_url.ts";
import type { EmbeddedServer } from "../lib/embedded.ts";
import { classifyError, ConfigError } from "../lib/errors.ts";
import { loadMigrations, migrate, migrationsDir } from "../lib/migrate.ts";
import { connectTo, freshDb, runCli, server, type TestDb } from "./_harness.ts";

// ---------------------------------------------------------------------------------------------
// A throwaway PKI, made with openssl once per file.

/** Certificates and keys of the test: a CA, a CA nobody uses, a server and a client. */
interface Pki {
  dir: string;
  ca: string;
  otherCa: string;
  serverCert: string;
  serverKey: string;
  /** For the role meter_cert (CN=meter_cert), signed by the CA. */
  clientCert: string;
  clientKey: string;
}

async function openssl(dir: string, args: string[]): Promise<void> {
  const out = await new Deno.Command("openssl", { args, cwd: dir, stdout: "null", stderr: "piped" })
    .output();
  if (!out.success) {
    throw new Error(`openssl ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

const EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/** A CA, then certificates it signs; the server's names only localhost (no IP address). */
async function makePki(): Promise<Pki> {
  const dir = await Deno.makeTempDir({ prefix: "meter-sync-pki-" });
  const ca = (name: string) =>
    openssl(dir, [
      "req",
      "-x509",
      ...EC,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.crt`,
      "-days",
      "2",
      "-subj",
      `/CN=meter-sync test ${name}`,
    ]);
  const signed = async (name: string, subject: string, ext: string) => {
    await openssl(dir, [
      "req",
      "-new",
      ...EC,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
      "-subj",
      subject,
    ]);
    await Deno.writeTextFile(`${dir}/${name}.ext`, ext);
    await openssl(dir, [
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.crt",
      "-CAkey",
      "ca.key",
      "-set_serial",
      String(Math.floor(Math.random() * 1e9) + 1),
      "-days",
      "2",
      "-out",
      `${name}.crt`,
      "-extfile",
      `${name}.ext`,
    ]);
    await Deno.chmod(`${dir}/${name}.key`, 0o600);
  };
  await Promise.all([ca("ca"), ca("other-ca")]);
  await signed(
    "server",
    "/CN=localhost",
    "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
  );
  await signed("client", "/CN=meter_cert", "extendedKeyUsage=clientAuth\n");
  return {
    dir,
    ca: `${dir}/ca.crt`,
    otherCa: `${dir}/other-ca.crt`,
    serverCert: `${dir}/server.crt`,
    serverKey: `${dir}/server.key`,
    clientCert: `${dir}/client.crt`,
    clientKey: `${dir}/client.key`,
  };
}

let pkiPromise: Promise<Pki> | undefined;
const pki = () => (pkiPromise ??= makePki());

Deno.test.afterAll(async () => {
  if (pkiPromise) await Deno.remove((await pkiPromise).dir, { recursive: true });
});

// ---------------------------------------------------------------------------------------------
// The file's one server, whose ssl setting each test chooses (a reload, not a restart).

let prepared: Promise<EmbeddedServer> | undefined;

/**
 * The harness server with the test certificate, the CA for client certificates, and a
 * role meter_cert that logs in by certificate only. PostgreSQL reads the key only when
 * it is owned by the server's user with mode 0600: as root that user is `postgres`.
 */
function prepare(): Promise<EmbeddedServer> {
  prepared ??= (async () => {
    const [s, p] = await Promise.all([server(), pki()]);
    const owner = await Deno.stat(`${s.dir}/data`);
    for (
      const [from, to] of [[p.serverCert, "server.crt"], [p.serverKey, "server.key"], [
        p.ca,
        "ca.crt",
      ]]
    ) {
      const path = `${s.dir}/${to}`;
      await Deno.copyFile(from, path);
      await Deno.chown(path, owner.uid, owner.gid);
      await Deno.chmod(path, 0o600);
    }
    const hba = `${s.dir}/data/pg_hba.conf`;
    const rules = await Deno.readTextFile(hba);
    // First match wins: the certificate rule goes on top.
    await Deno.writeTextFile(hba, `hostssl all meter_cert 127.0.0.1/32 cert\n${rules}`);
    const admin = connectTo(s.url());
    try {
      await admin.unsafe(`ALTER SYSTEM SET ssl_cert_file = '${s.dir}/server.crt'`);
      await admin.unsafe(`ALTER SYSTEM SET ssl_key_file = '${s.dir}/server.key'`);
      await admin.unsafe(`ALTER SYSTEM SET ssl_ca_file = '${s.dir}/ca.crt'`);
      await admin.unsafe("CREATE ROLE meter_cert LOGIN SUPERUSER");
    } finally {
      await admin.end();
    }
    return s;
  })();
  return prepared;
}

let sslIsOn: boolean | undefined;

/** The server with ssl on or off, waiting until a new connection sees the setting. */
async function tlsServer(on: boolean): Promise<EmbeddedServer> {
  const s = await prepare();
  if (sslIsOn === on) return s;
  const admin = connectTo(s.url());
  try {
    await admin.unsafe(`ALTER SYSTEM SET ssl = ${on ? "on" : "off"}`);
    await admin`SELECT pg_reload_conf()`;
  } finally {
    await admin.end();
  }
  const want = on ? "on" : "off";
  for (let i = 0;; i++) {
    const probe = connectTo(s.url());
    try {
      const [{ ssl }] = await probe<{ ssl: string }[]>`SHOW ssl`;
      if (ssl === want) break;
    } finally {
      await probe.end();
    }
    if (i > 100) throw new Error(`the server did not turn ssl ${want}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  sslIsOn = on;
  return s;
}

/** A fresh database on the TLS server, with ssl as the test needs it. */
async function tlsDb(ssl: boolean): Promise<TestDb & AsyncDisposable> {
  await tlsServer(ssl);
  return await freshDb();
}

interface UrlOptions {
  host?: string;
  sslmode: string;
  sslrootcert?: string;
  sslcert?: string;
  sslkey?: string;
  user?: string;
  /** @default the server's password; null: none in the URL */
  password?: string | null;
}

function urlOf(db: TestDb, o: UrlOptions): string {
  const password = o.password === undefined ? db.server.password : o.password;
  const auth = `${o.user ?? db.server.user}${password === null ? "" : `:${password}`}`;
  const q = new URLSearchParams({ sslmode: o.sslmode });
  for (const k of ["sslrootcert", "sslcert", "sslkey"] as const) if (o[k]) q.set(k, o[k]!);
  return `postgres://${auth}@${o.host ?? "localhost"}:${db.server.port}/${db.name}?${q}`;
}

/** Connects as the agent does and says whether the session is encrypted. */
async function sessionUsesTls(url: string): Promise<boolean> {
  const sql = await connect(parseDatabaseUrl(url, "LOCAL_DATABASE_URL"));
  try {
    const [row] = await sql<{ ssl: boolean }[]>`
      SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`;
    return row.ssl;
  } finally {
    await sql.end({ timeout: 1 });
  }
}

/** The error a first query gets, checked to be one line without the password. */
async function connectFailure(url: string, password: string): Promise<Error> {
  let sql: Sql | undefined;
  try {
    sql = await connect(parseDatabaseUrl(url, "LOCAL_DATABASE_URL"));
    await sql`SELECT 1`;
  } catch (err) {
    assert.ok(err instanceof Error, String(err));
    assert.ok(!err.message.includes("\n"), `not one line: ${err.message}`);
    assert.ok(!err.message.includes(password), `the password leaked: ${err.message}`);
    return err;
  } finally {
    await sql?.end({ timeout: 1 });
  }
  assert.fail(`connecting to ${url} succeeded`);
}

/** One line on stderr, no stack trace, no password. */
function assertOneCleanLine(stderr: string, password: string): string {
  const lines = stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line on stderr, got:\n${stderr}`);
  assert.ok(!/\bat .*:\d+:\d+/.test(stderr), `a stack trace:\n${stderr}`);
  assert.ok(!stderr.includes(password), `the password leaked:\n${stderr}`);
  return lines[0];
}

// ---------------------------------------------------------------------------------------------
// The library: lib/db.ts connect() and a query.

Deno.test("connect() with verify-full, the right CA and the certificate's host name talks TLS", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  assert.equal(
    await sessionUsesTls(urlOf(db, { sslmode: "verify-full", sslrootcert: p.ca })),
    true,
  );
});

Deno.test("connect() with verify-full refuses a server whose certificate another CA signed, naming sslrootcert", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { sslmode: "verify-full", sslrootcert: p.otherCa });
  const err = await connectFailure(url, db.server.password);
  assert.ok(err instanceof TlsError, `${err.name}: ${err.message}`);
  assert.equal(err.code, "TLS_UNTRUSTED");
  assert.match(
    err.message,
    /^TLS: the server certificate of localhost:\d+ \(LOCAL_DATABASE_URL\) is not trusted by/,
  );
  assert.ok(err.message.includes(`sslrootcert ${p.otherCa}`), err.message);
  assert.match(err.message, /sslmode=verify-full/);
  // Retrying cannot help: the agent must not treat it as a transient fault.
  assert.equal(classifyError(err), "permanent");
});

Deno.test("connect() with verify-full refuses 127.0.0.1 when the certificate names only localhost", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { host: "127.0.0.1", sslmode: "verify-full", sslrootcert: p.ca });
  const err = await connectFailure(url, db.server.password);
  assert.ok(err instanceof TlsError, `${err.name}: ${err.message}`);
  assert.equal(err.code, "TLS_HOST_MISMATCH");
  assert.match(
    err.message,
    /^TLS: host name mismatch: the certificate of 127\.0\.0\.1:\d+ \(LOCAL_DATABASE_URL\) is for DNS:localhost, but the URL connects to 127\.0\.0\.1/,
  );
  assert.equal(classifyError(err), "permanent");
});

Deno.test("connect() with verify-ca accepts the right CA although the host name differs", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { host: "127.0.0.1", sslmode: "verify-ca", sslrootcert: p.ca });
  assert.equal(await sessionUsesTls(url), true);
});

Deno.test("connect() with verify-ca still refuses a certificate of another CA", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { host: "127.0.0.1", sslmode: "verify-ca", sslrootcert: p.otherCa });
  const err = await connectFailure(url, db.server.password);
  assert.ok(err instanceof TlsError && err.code === "TLS_UNTRUSTED", err.message);
});

Deno.test("connect() with verify-full and no sslrootcert checks the default CA store, and says how to name a private CA", async () => {
  await using db = await tlsDb(true);
  const err = await connectFailure(urlOf(db, { sslmode: "verify-full" }), db.server.password);
  assert.ok(err instanceof TlsError && err.code === "TLS_UNTRUSTED", err.message);
  assert.match(err.message, /default CA store/);
  assert.match(err.message, /sslrootcert=/);
});

Deno.test("connect() with require encrypts without checking the certificate", async () => {
  await using db = await tlsDb(true);
  assert.equal(await sessionUsesTls(urlOf(db, { host: "127.0.0.1", sslmode: "require" })), true);
});

Deno.test("connect() with require and an sslrootcert checks the chain, as libpq does", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { sslmode: "require", sslrootcert: p.otherCa });
  const err = await connectFailure(url, db.server.password);
  assert.ok(err instanceof TlsError && err.code === "TLS_UNTRUSTED", err.message);
  assert.equal(await sessionUsesTls(urlOf(db, { sslmode: "require", sslrootcert: p.ca })), true);
});

Deno.test("connect() with require refuses a server without TLS in one line", async () => {
  await using db = await tlsDb(false);
  const err = await connectFailure(urlOf(db, { sslmode: "require" }), db.server.password);
  assert.ok(err instanceof TlsError, `${err.name}: ${err.message}`);
  assert.equal(err.code, "TLS_UNAVAILABLE");
  assert.match(
    err.message,
    /^TLS: the server localhost:\d+ \(LOCAL_DATABASE_URL\) does not offer TLS, and sslmode=require requires it/,
  );
  assert.equal(classifyError(err), "permanent");
});

Deno.test("connect() with verify-full refuses a server without TLS too", async () => {
  await using db = await tlsDb(false);
  const p = await pki();
  const url = urlOf(db, { sslmode: "verify-full", sslrootcert: p.ca });
  const err = await connectFailure(url, db.server.password);
  assert.ok(err instanceof TlsError && err.code === "TLS_UNAVAILABLE", err.message);
  assert.match(err.message, /sslmode=verify-full requires it/);
});

Deno.test("connect() with disable talks plain TCP to a server without TLS", async () => {
  await using db = await tlsDb(false);
  assert.equal(await sessionUsesTls(urlOf(db, { sslmode: "disable" })), false);
});

Deno.test("connect() with disable stays plain even when the server offers TLS", async () => {
  await using db = await tlsDb(true);
  assert.equal(await sessionUsesTls(urlOf(db, { sslmode: "disable" })), false);
});

Deno.test("connect() with prefer uses TLS when offered and plain TCP when not", async () => {
  {
    await using db = await tlsDb(true);
    assert.equal(await sessionUsesTls(urlOf(db, { sslmode: "prefer" })), true);
  }
  await using db = await tlsDb(false);
  assert.equal(await sessionUsesTls(urlOf(db, { sslmode: "prefer" })), false);
});

Deno.test("connect() logs in with a client certificate from sslcert and sslkey", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, {
    user: "meter_cert",
    password: null,
    sslmode: "verify-full",
    sslrootcert: p.ca,
    sslcert: p.clientCert,
    sslkey: p.clientKey,
  });
  const sql = await connect(parseDatabaseUrl(url, "LOCAL_DATABASE_URL"));
  try {
    const [row] = await sql<{ user: string; ssl: boolean; client_dn: string }[]>`
      SELECT current_user AS user, ssl, client_dn
      FROM pg_stat_ssl WHERE pid = pg_backend_pid()`;
    assert.deepEqual(row, { user: "meter_cert", ssl: true, client_dn: "/CN=meter_cert" });
  } finally {
    await sql.end({ timeout: 1 });
  }
});

Deno.test("connect() refuses an sslkey that group or others can read, saying chmod 600", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const key = `${p.dir}/open-client.key`;
  await Deno.copyFile(p.clientKey, key);
  await Deno.chmod(key, 0o644);
  const url = urlOf(db, {
    user: "meter_cert",
    password: null,
    sslmode: "verify-full",
    sslrootcert: p.ca,
    sslcert: p.clientCert,
    sslkey: key,
  });
  await assert.rejects(connect(parseDatabaseUrl(url, "LOCAL_DATABASE_URL")), (err: Error) => {
    assert.ok(err instanceof ConfigError, `${err.name}: ${err.message}`);
    assert.equal(
      err.message,
      `LOCAL_DATABASE_URL: sslkey ${key} is open to group or others (mode 0644); run chmod 600 ${key}`,
    );
    return true;
  });
});

Deno.test("connect() names a missing sslrootcert file before any connection", async () => {
  await using db = await tlsDb(true);
  const missing = `/nonexistent-${crypto.randomUUID()}/ca.pem`;
  const url = urlOf(db, { sslmode: "verify-full", sslrootcert: missing });
  await assert.rejects(connect(parseDatabaseUrl(url, "--local-url")), (err: Error) => {
    assert.ok(err instanceof ConfigError, `${err.name}: ${err.message}`);
    assert.equal(err.message, `--local-url: sslrootcert ${missing} does not exist`);
    return true;
  });
});

Deno.test("a pool whose TLS handshake failed fails the next query too, instead of hanging", async () => {
  // postgres.js leaves a connection whose socket factory failed in its connecting state:
  // without the failed-socket stand-in in lib/db.ts the second query waits forever.
  await using db = await tlsDb(true);
  const p = await pki();
  const url = urlOf(db, { sslmode: "verify-full", sslrootcert: p.otherCa });
  const sql = await connect(parseDatabaseUrl(url, "LOCAL_DATABASE_URL"));
  try {
    for (let i = 0; i < 3; i++) {
      const outcome = await Promise.race([
        sql`SELECT 1`.then(() => "connected", (err: Error) => err.message),
        new Promise<string>((r) => setTimeout(() => r("hung"), 10_000)),
      ]);
      assert.match(outcome, /not trusted/, `attempt ${i + 1}: ${outcome}`);
    }
  } finally {
    await sql.end({ timeout: 1 });
  }
});

// ---------------------------------------------------------------------------------------------
// The CLI: main.ts with the shipped permission flags.

Deno.test("CLI: migrate, seed and sync over verify-full on both sides", async () => {
  await tlsServer(true);
  await using local = await freshDb();
  await using remote = await freshDb();
  const p = await pki();
  const tlsUrl = (db: TestDb) => urlOf(db, { sslmode: "verify-full", sslrootcert: p.ca });
  const urls = ["--local-url", tlsUrl(local), "--remote-url", tlsUrl(remote)];
  for (const args of [["migrate", "--target", "both"], ["seed", "--count", "250"]]) {
    const r = await runCli([...args, ...urls]);
    assert.equal(r.code, 0, `${args[0]}: ${r.stderr}`);
  }
  const r = await runCli(["sync", "--batch-size", "100", ...urls]);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(!(r.stdout + r.stderr).includes(local.server.password), "the password leaked");
  const [{ n: left }] = await local.sql<{ n: number }[]>`
    SELECT count(*)::int AS n FROM meter_readings`;
  const [{ n: arrived }] = await remote.sql<{ n: number }[]>`
    SELECT count(*)::int AS n FROM meter_readings`;
  assert.deepEqual({ left, arrived }, { left: 0, arrived: 250 });
});

Deno.test("CLI: status with a wrong CA exits 2 (a setting to fix) with one line naming sslrootcert", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const r = await runCli([
    "status",
    "--local-url",
    urlOf(db, { sslmode: "verify-full", sslrootcert: p.otherCa }),
  ]);
  assert.equal(r.code, 2, r.stderr);
  const line = assertOneCleanLine(r.stderr, db.server.password);
  assert.match(line, /^meter-sync: cannot reach the local database postgres:\/\/postgres:\*\*\*@/);
  assert.ok(line.includes(`is not trusted by sslrootcert ${p.otherCa}`), line);
});

Deno.test("CLI: status through 127.0.0.1 with verify-full exits 2 (a setting to fix) with a host name mismatch", async () => {
  await using db = await tlsDb(true);
  const p = await pki();
  const r = await runCli([
    "status",
    "--local-url",
    urlOf(db, { host: "127.0.0.1", sslmode: "verify-full", sslrootcert: p.ca }),
  ]);
  assert.equal(r.code, 2, r.stderr);
  const line = assertOneCleanLine(r.stderr, db.server.password);
  assert.match(
    line,
    /host name mismatch: the certificate of 127\.0\.0\.1:\d+ \(--local-url\) is for DNS:localhost/,
  );
});

Deno.test("CLI: status with require against a server without TLS exits 2 (a setting to fix) in one line", async () => {
  await using db = await tlsDb(false);
  const r = await runCli(["status", "--local-url", urlOf(db, { sslmode: "require" })]);
  assert.equal(r.code, 2, r.stderr);
  const line = assertOneCleanLine(r.stderr, db.server.password);
  assert.match(line, /does not offer TLS, and sslmode=require requires it/);
});

Deno.test("CLI: migrate with disable works against a server without TLS", async () => {
  await using db = await tlsDb(false);
  const r = await runCli([
    "migrate",
    "--target",
    "local",
    "--local-url",
    urlOf(db, { sslmode: "disable" }),
  ]);
  assert.equal(r.code, 0, r.stderr);
});

Deno.test("CLI: a wrong CA on the remote side fails the sync with exit 2 and one line that names TLS", async () => {
  await tlsServer(true);
  await using local = await freshDb();
  await using remote = await freshDb();
  await migrate(local.sql, await loadMigrations(migrationsDir("local")));
  const p = await pki();
  const r = await runCli([
    "sync",
    "--max-retries",
    "0",
    "--local-url",
    urlOf(local, { sslmode: "verify-full", sslrootcert: p.ca }),
    "--remote-url",
    urlOf(remote, { sslmode: "verify-full", sslrootcert: p.otherCa }),
  ]);
  assert.equal(r.code, 2, r.stderr);
  const line = assertOneCleanLine(r.stderr, local.server.password);
  assert.match(
    line,
    /^meter-sync: failed: TLS: the server certificate of localhost:\d+ \(--remote-url\)/,
  );
  assert.ok(line.includes(`not trusted by sslrootcert ${p.otherCa}`), line);
});

Deno.test("CLI: a missing sslrootcert file is a configuration error: exit 2, one line", async () => {
  await using db = await tlsDb(true);
  const missing = `/nonexistent-${crypto.randomUUID()}/ca.pem`;
  const r = await runCli([
    "status",
    "--local-url",
    urlOf(db, { sslmode: "verify-full", sslrootcert: missing }),
  ]);
  assert.equal(r.code, 2, r.stderr);
  const line = assertOneCleanLine(r.stderr, db.server.password);
  assert.equal(line, `meter-sync: --local-url: sslrootcert ${missing} does not exist`);
});
