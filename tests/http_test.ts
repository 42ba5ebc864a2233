/** Tests of lib/http.ts (the run mode's endpoint, on a real socket) and lib/health.ts healthOf(). */
import assert from "node:assert/strict";
import { ConfigError } from "../lib/errors.ts";
import { type HealthInputs, healthOf } from "../lib/health.ts";
import { type HttpServerOptions, METRICS_CONTENT_TYPE, startHttpServer } from "../lib/http.ts";
import { Metrics } from "../lib/metrics.ts";

const MIN = 60_000;
const T0 = Date.UTC(2025, 5, 1, 12, 0, 0);

function inputs(over: Partial<HealthInputs> = {}): HealthInputs {
  return {
    nowMs: T0 + 60 * MIN,
    lastSuccessAtMs: T0 + 59 * MIN,
    startedAtMs: T0,
    staleAfterMs: 15 * MIN,
    localReachable: true,
    remoteReachable: true,
    lastError: null,
    ...over,
  };
}

const STATUS = {
  queue_size: 4,
  oldest_pending_at: "2025-06-01T11:59:29.000000Z",
  oldest_pending_age_s: 31,
  quarantined: 0,
  top_errors: [],
  last_success_at: "2025-06-01T11:59:00.000Z",
  last_failure_at: null,
  last_error: null,
  last_run: null,
};

type Started = { base: string; port: number; stop: () => Promise<void> };

/** Starts the server on a free loopback port with fake callbacks, overridable. */
function serve(over: Partial<HttpServerOptions> = {}): Started {
  const controller = new AbortController();
  const server = startHttpServer({
    hostname: "127.0.0.1",
    port: 0,
    signal: controller.signal,
    metrics: () => new Metrics({ version: "0.1.0" }).render(),
    health: () => {
      const h = healthOf(inputs());
      return Promise.resolve({ status: h.status, body: { ok: h.ok, reasons: h.reasons } });
    },
    status: () => Promise.resolve(STATUS),
    ...over,
  });
  return {
    base: `http://127.0.0.1:${server.addr.port}`,
    port: server.addr.port,
    stop: async () => {
      controller.abort();
      await server.finished;
    },
  };
}

async function get(url: string, init?: RequestInit) {
  const res = await fetch(url, init);
  return { status: res.status, headers: res.headers, text: await res.text() };
}

// healthOf()

Deno.test("healthOf() is 200 with no reasons when a cycle succeeded recently and both databases answer", () => {
  assert.deepEqual(healthOf(inputs()), { ok: true, status: 200, reasons: [] });
});

Deno.test("healthOf() is 503 when the last success is older than the stale threshold, with the last error", () => {
  const h = healthOf(
    inputs({ lastSuccessAtMs: T0 + 40 * MIN, lastError: "connection refused\nat foo" }),
  );
  assert.equal(h.status, 503);
  assert.equal(h.ok, false);
  assert.deepEqual(h.reasons, [
    "last successful cycle 20 min ago (stale after 15 min); last error: connection refused",
  ]);
});

Deno.test("healthOf() is still 200 exactly at the threshold", () => {
  assert.equal(healthOf(inputs({ lastSuccessAtMs: T0 + 45 * MIN })).status, 200);
  assert.equal(healthOf(inputs({ lastSuccessAtMs: T0 + 45 * MIN - 1 })).status, 503);
});

Deno.test("healthOf() gives a freshly started agent the stale threshold to succeed", () => {
  const justStarted = { startedAtMs: T0, lastSuccessAtMs: null, nowMs: T0 + 10 * MIN };
  assert.equal(healthOf(inputs(justStarted)).status, 200);
  const h = healthOf(inputs({ ...justStarted, nowMs: T0 + 16 * MIN }));
  assert.equal(h.status, 503);
  assert.match(h.reasons[0], /no successful cycle since the agent started 16 min ago/);
});

Deno.test("healthOf() grants the grace after a restart even when the last success before it is old", () => {
  const restarted = { startedAtMs: T0, lastSuccessAtMs: T0 - 48 * 60 * MIN };
  assert.equal(healthOf(inputs({ ...restarted, nowMs: T0 + 5 * MIN })).status, 200);
  const h = healthOf(inputs({ ...restarted, nowMs: T0 + 20 * MIN }));
  assert.equal(h.status, 503);
  assert.match(h.reasons[0], /since the agent started 20 min ago/);
});

Deno.test("healthOf() is 503 at once when a database is unreachable, grace or not", () => {
  const local = healthOf(inputs({ localReachable: false, lastSuccessAtMs: null, nowMs: T0 + 1 }));
  assert.deepEqual(local, { ok: false, status: 503, reasons: ["local database unreachable"] });
  const remote = healthOf(inputs({ remoteReachable: false }));
  assert.deepEqual(remote.reasons, ["remote database unreachable"]);
  const both = healthOf(
    inputs({ localReachable: false, remoteReachable: false, lastSuccessAtMs: T0 }),
  );
  assert.equal(both.reasons.length, 3);
});

Deno.test("healthOf() ignores a remote that was not checked", () => {
  assert.equal(healthOf(inputs({ remoteReachable: null })).status, 200);
});

// startHttpServer()

Deno.test("GET /metrics answers the registry's text with the Prometheus 0.0.4 content type", async () => {
  const metrics = new Metrics({ version: "0.1.0" });
  metrics.cycleFinished("ok", { uploaded: 7, downloaded: 0, finishedAtMs: T0 });
  const server = serve({ metrics: () => metrics.render() });
  try {
    const res = await get(`${server.base}/metrics`);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), METRICS_CONTENT_TYPE);
    assert.equal(res.text, metrics.render());
    assert.match(res.text, /^meter_sync_rows_uploaded_total 7$/m);
  } finally {
    await server.stop();
  }
});

Deno.test("GET /status answers the status JSON", async () => {
  const server = serve();
  try {
    const res = await get(`${server.base}/status`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type")!, /^application\/json/);
    assert.deepEqual(JSON.parse(res.text), STATUS);
  } finally {
    await server.stop();
  }
});

Deno.test("GET /healthz flips from 200 to 503 when the last success goes stale", async () => {
  let now = T0 + 10 * MIN;
  const server = serve({
    health: () => {
      const h = healthOf(inputs({ nowMs: now, lastSuccessAtMs: T0 + 5 * MIN }));
      return Promise.resolve({ status: h.status, body: { ok: h.ok, reasons: h.reasons } });
    },
  });
  try {
    const fresh = await get(`${server.base}/healthz`);
    assert.equal(fresh.status, 200);
    assert.match(fresh.headers.get("content-type")!, /^application\/json/);
    assert.deepEqual(JSON.parse(fresh.text), { ok: true, reasons: [] });
    now = T0 + 30 * MIN;
    const stale = await get(`${server.base}/healthz`);
    assert.equal(stale.status, 503);
    const body = JSON.parse(stale.text);
    assert.equal(body.ok, false);
    assert.match(body.reasons[0], /last successful cycle 25 min ago \(stale after 15 min\)/);
  } finally {
    await server.stop();
  }
});

Deno.test("an unknown path is 404 and another method than GET is 405 with Allow", async () => {
  const server = serve();
  try {
    const missing = await get(`${server.base}/nope`);
    assert.equal(missing.status, 404);
    assert.deepEqual(JSON.parse(missing.text).routes, ["/metrics", "/healthz", "/status"]);
    for (const method of ["POST", "PUT", "DELETE"]) {
      const res = await get(`${server.base}/metrics`, { method, body: "x" });
      assert.equal(res.status, 405, method);
      assert.equal(res.headers.get("allow"), "GET, HEAD");
    }
    const head = await get(`${server.base}/healthz`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(head.text, "");
  } finally {
    await server.stop();
  }
});

Deno.test("a throwing handler gives a one-line JSON 500 without the password, and the server keeps serving", async () => {
  const server = serve({
    secrets: ["hunter2"],
    status: () =>
      Promise.reject(
        Object.assign(
          new Error(
            "connect to postgres://meter:hunter2@db.example.com/central failed\n    at stack",
          ),
          { code: "08006" },
        ),
      ),
    metrics: () => {
      throw new Error("password=hunter2 rejected");
    },
  });
  try {
    const status = await get(`${server.base}/status`);
    assert.equal(status.status, 500);
    assert.match(status.headers.get("content-type")!, /^application\/json/);
    assert.equal(status.text.trimEnd().split("\n").length, 1);
    assert.ok(!status.text.includes("hunter2"), status.text);
    assert.ok(!status.text.includes("at stack"), status.text);
    assert.match(JSON.parse(status.text).error, /^\/status: connect to .*SQLSTATE 08006/);
    const metrics = await get(`${server.base}/metrics`);
    assert.equal(metrics.status, 500);
    assert.ok(!metrics.text.includes("hunter2"), metrics.text);
    assert.equal((await get(`${server.base}/healthz`)).status, 200);
  } finally {
    await server.stop();
  }
});

Deno.test("secrets are masked in ordinary JSON bodies too", async () => {
  const server = serve({
    secrets: ["hunter2"],
    status: () => Promise.resolve({ ...STATUS, last_error: "auth failed for hunter2" }),
  });
  try {
    const res = await get(`${server.base}/status`);
    assert.equal(JSON.parse(res.text).last_error, "auth failed for ***");
  } finally {
    await server.stop();
  }
});

Deno.test("a handler that hangs gets a 503 after the timeout", async () => {
  const server = serve({ timeoutMs: 50, health: () => new Promise(() => {}) });
  try {
    const res = await get(`${server.base}/healthz`);
    assert.equal(res.status, 503);
    assert.match(JSON.parse(res.text).error, /no answer within 50 ms/);
  } finally {
    await server.stop();
  }
});

Deno.test("the server listens where told, reports the real port, and stops when aborted", async () => {
  const controller = new AbortController();
  let listened: { hostname: string; port: number } | undefined;
  const server = startHttpServer({
    hostname: "127.0.0.1",
    port: 0,
    signal: controller.signal,
    metrics: () => "",
    health: () => Promise.resolve({ status: 200, body: {} }),
    status: () => Promise.resolve({}),
    onListen: (addr) => listened = addr,
  });
  assert.equal(server.addr.hostname, "127.0.0.1");
  assert.ok(server.addr.port > 0);
  assert.deepEqual(listened, server.addr);
  assert.equal((await get(`http://127.0.0.1:${server.addr.port}/healthz`)).status, 200);
  controller.abort();
  await server.finished;
  await assert.rejects(fetch(`http://127.0.0.1:${server.addr.port}/healthz`));
});

Deno.test("a port in use is a one-line ConfigError naming the address", async () => {
  const first = serve();
  try {
    assert.throws(
      () => serve({ port: first.port }),
      (err: unknown) => {
        assert.ok(err instanceof ConfigError);
        assert.ok(
          err.message.startsWith(`cannot listen on 127.0.0.1:${first.port}: address in use`),
          err.message,
        );
        assert.ok(!err.message.includes("\n"));
        return true;
      },
    );
  } finally {
    await first.stop();
  }
});
