/** The short chaos run (scripts/chaos.ts): every fault kind at least once, nothing lost or doubled. */
import assert from "node:assert/strict";
import { FAULT_KINDS, formatSummary, runChaos } from "../scripts/chaos.ts";

Deno.test({
  name:
    "the agent loses and duplicates no reading under kill -9, SIGTERM, terminated backends, server restarts, poison rows and bursts",
  // Child processes and server restarts outlive single ops; runChaos stops them all itself.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const logPath = await Deno.makeTempFile({ prefix: "meter-sync-chaos-test-", suffix: ".log" });
    const summary = await runChaos({
      durationMs: 15_000,
      seed: 20261125,
      meanGapMs: 1500,
      rate: 200,
      burstRows: 3000,
      drainTimeoutMs: 60_000,
      logPath,
    });
    const line = formatSummary(summary);
    const context = `${line}\nfindings: ${JSON.stringify(summary.findings)}\nlog: ${logPath}`;
    assert.equal(summary.lost, 0, context);
    assert.equal(summary.duplicated, 0, context);
    assert.ok(summary.drained, context);
    assert.equal(summary.stillQueued, 0, context);
    assert.equal(summary.unknownOnRemote, 0, context);
    for (const kind of FAULT_KINDS) assert.ok(summary.faults[kind] >= 1, `${kind}: ${context}`);
    assert.ok(summary.poisonInserted >= 1, context);
    assert.equal(summary.quarantined, summary.poisonInserted, "every poison row, and only those");
    assert.equal(summary.delivered + summary.quarantined, summary.inserted, context);
    assert.equal(summary.unexpectedQuarantined, 0, context);
    // The agent never dies of the driver's unhandled rejections (lib/db.ts guardDriverBug).
    const crashes = summary.findings.filter((f) => /unhandled/.test(f.what));
    assert.deepEqual(crashes, [], context);
    // Other findings (a non-zero SIGTERM exit) are timing-dependent: reported, not asserted
    // here (the loss and duplication checks above hold whatever the agent's exits).
    for (const f of summary.findings) console.warn(`chaos finding: ${f.what}: ${f.detail}`);
    if (summary.findings.length === 0) await Deno.remove(logPath);
    else console.warn(`chaos log kept: ${logPath}`);
  },
});
