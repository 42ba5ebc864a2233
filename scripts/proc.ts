/** What /proc says about a process: its peak memory and its CPU time (the bench, the G8 test). */

/** Reads a process's peak resident set size (VmHWM) in KiB, or undefined once it is gone. */
export async function peakRssKib(pid: number): Promise<number | undefined> {
  try {
    const status = await Deno.readTextFile(`/proc/${pid}/status`);
    const m = /^VmHWM:\s+(\d+) kB/m.exec(status);
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

/** Clock ticks per second of /proc/PID/stat (USER_HZ: 100 on every Linux we ship to). */
const TICKS = 100;

export interface ProcStat {
  ppid: number;
  /** utime + stime: CPU seconds of the process itself (all its threads). */
  cpu: number;
  /** cutime + cstime: CPU seconds of its children that have exited and been reaped. */
  childrenCpu: number;
}

/** /proc/PID/stat, or undefined once the process is gone. */
export async function procStat(pid: number): Promise<ProcStat | undefined> {
  try {
    const text = await Deno.readTextFile(`/proc/${pid}/stat`);
    // Fields after the command name, which may hold spaces and parentheses.
    const f = text.slice(text.lastIndexOf(")") + 2).split(" ");
    return {
      ppid: Number(f[1]),
      cpu: (Number(f[11]) + Number(f[12])) / TICKS,
      childrenCpu: (Number(f[13]) + Number(f[14])) / TICKS,
    };
  } catch {
    return undefined;
  }
}
