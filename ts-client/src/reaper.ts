/**
 * Makes sure no sidecar outlives this Node process.
 *
 * Each sidecar is spawned `detached` (its own process group) so that a terminal's Ctrl-C does not
 * reach it behind the client's back, and so that one `kill(-pgid)` also reaches anything it
 * started. The price is that nothing kills the group for us: this module does, synchronously, on
 * the parent's 'exit' and on SIGINT/SIGTERM/SIGHUP when nobody else handles those signals.
 * (A parent killed with SIGKILL cannot run code; the sidecar then sees EOF on stdin and exits.)
 */

const groups = new Set<number>();
let installed = false;

const SIGNALS: NodeJS.Signals[] = ["SIGINT", "SIGTERM", "SIGHUP"];

/** Kill a whole process group; ESRCH (already gone) is not an error. */
export function killGroup(pid: number, signal: NodeJS.Signals): boolean {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    // ESRCH: every member has exited. Never fall back to kill(pid): that pid may be reused.
    return false;
  }
}

function killAll(): void {
  for (const pid of groups) killGroup(pid, "SIGKILL");
  groups.clear();
}

function onSignal(signal: NodeJS.Signals): void {
  // Only act as the default handler would: if the application installed its own handler it owns
  // the shutdown (and should call dispose()); the 'exit' hook still covers it.
  if (process.listenerCount(signal) > 1) return;
  killAll();
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  process.removeListener("exit", killAll);
  installed = false;
  process.kill(process.pid, signal);
}

function install(): void {
  if (installed) return;
  installed = true;
  process.on("exit", killAll);
  for (const s of SIGNALS) process.on(s, onSignal);
}

function uninstall(): void {
  if (!installed) return;
  installed = false;
  process.removeListener("exit", killAll);
  for (const s of SIGNALS) process.removeListener(s, onSignal);
}

export function registerGroup(pid: number): void {
  groups.add(pid);
  install();
}

export function unregisterGroup(pid: number): void {
  groups.delete(pid);
  // Leave no listeners behind when no sidecar runs, so an idle application keeps default signal
  // behaviour exactly.
  if (groups.size === 0) uninstall();
}
