/** Whether the running agent is healthy, for /healthz: a pure function of what the run loop knows. */

/** What {@link healthOf} judges. */
export interface HealthInputs {
  nowMs: number;
  /** End of the last successful cycle, this process or before it (status' last_success_at). */
  lastSuccessAtMs: number | null;
  /** When this process started its run loop. */
  startedAtMs: number;
  /** The last success older than this is stale (--stale-after). */
  staleAfterMs: number;
  /** Whether the local database answered just now. */
  localReachable: boolean;
  /** Whether the remote database answered just now; null when not checked. */
  remoteReachable: boolean | null;
  /** The last cycle's error, if the last cycle failed; added to the stale reason. */
  lastError: string | null;
}

/** The verdict: `reasons` says what is wrong, empty when ok. */
export interface Health {
  ok: boolean;
  status: 200 | 503;
  reasons: string[];
}

/** "45 s", "12 min", "3.5 h", "2.0 days". */
export function formatAge(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} days`;
}

/**
 * 503 when a database is unreachable, or when no cycle has succeeded for longer than
 * `staleAfterMs`. The clock for staleness starts at the later of the last success and this
 * process' start: an agent that was just (re)started gets `staleAfterMs` to succeed before it
 * is called stale, even when its last success, before the restart, is older. An unreachable
 * database is unhealthy at once, grace or not.
 */
export function healthOf(inputs: HealthInputs): Health {
  const reasons: string[] = [];
  if (!inputs.localReachable) reasons.push("local database unreachable");
  if (inputs.remoteReachable === false) reasons.push("remote database unreachable");

  const since = Math.max(inputs.lastSuccessAtMs ?? -Infinity, inputs.startedAtMs);
  const quiet = inputs.nowMs - since;
  if (quiet > inputs.staleAfterMs) {
    const what = inputs.lastSuccessAtMs === null || inputs.lastSuccessAtMs < inputs.startedAtMs
      ? `no successful cycle since the agent started ${formatAge(quiet)} ago`
      : `last successful cycle ${formatAge(quiet)} ago`;
    const error = inputs.lastError ? `; last error: ${inputs.lastError.split("\n")[0]}` : "";
    reasons.push(`${what} (stale after ${formatAge(inputs.staleAfterMs)})${error}`);
  }
  const ok = reasons.length === 0;
  return { ok, status: ok ? 200 : 503, reasons };
}
