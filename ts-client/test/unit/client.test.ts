/**
 * The JSON-RPC layer against a scripted fake sidecar (test/fixtures/fake-sidecar.ts): pending
 * map, timeouts, aborts, crashes, stderr draining, restart, dispose escalation, parent exit.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { after, describe, it } from "node:test";

import { SidecarClient, type SidecarClientOptions } from "../../src/client.js";
import {
  SidecarCancelledError,
  SidecarDisposedError,
  SidecarError,
  SidecarExitedError,
  SidecarTimeoutError,
} from "../../src/errors.js";
import type { Progress, TrainParams } from "../../src/wire.js";

const FAKE = fileURLToPath(new URL("../fixtures/fake-sidecar.js", import.meta.url));

const clients: SidecarClient[] = [];
after(async () => {
  await Promise.all(clients.map((c) => c.dispose()));
});

function fake(modes: string[] = [], options: SidecarClientOptions = {}): SidecarClient {
  const c = new SidecarClient({ command: process.execPath, args: [FAKE, ...modes], cwd: process.cwd(), ...options });
  clients.push(c);
  return c;
}

/** Untyped access for the fake's extra methods. */
function raw(c: SidecarClient, method: string, params: unknown, options?: { timeoutMs?: number; signal?: AbortSignal }): Promise<any> {
  return (c.request as (m: string, p: unknown, o?: unknown) => Promise<unknown>)(method, params, options);
}

/** Running (not gone, not a zombie waiting for a reaper that a container may not have). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return true; // no procfs: trust kill(0)
  }
}

async function waitFor(cond: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return cond();
}

describe("SidecarClient (fake sidecar)", () => {
  it("correlates answers by id when they arrive out of order", async () => {
    const c = fake();
    const slow = raw(c, "slow", { ms: 300, value: "slow" });
    const fast = raw(c, "slow", { ms: 10, value: "fast" });
    const order: string[] = [];
    await Promise.all([slow.then((v) => order.push(v)), fast.then((v) => order.push(v))]);
    assert.deepEqual(order, ["fast", "slow"]);
  });

  it("round-trips U+2028/U+2029 and non-ASCII text", async () => {
    const c = fake();
    const params = { s: "line\u2028sep\u2029para 😀 ünï", nested: { arr: ["\u2028"] } };
    assert.deepEqual(await raw(c, "echo", params), params);
  });

  it("turns an error answer into a typed SidecarError with code, message, data and field", async () => {
    const c = fake();
    const err = await raw(c, "invalid", {}).catch((e) => e);
    assert.ok(err instanceof SidecarError);
    assert.equal(err.code, -32602);
    assert.equal(err.field, "$.rank");
    assert.match(err.message, /Expected `int`/);
  });

  it("delivers progress in order to the callback, the event and the job's async iterator", async () => {
    const c = fake();
    const events: Progress[] = [];
    c.on("progress", (p) => events.push(p));
    const callback: number[] = [];
    const job = c.startTrain({ maxSteps: 5, seed: 10 } as TrainParams, { onProgress: (p) => callback.push(p.step) });
    const iterated: number[] = [];
    for await (const p of job.progress) iterated.push(p.step);
    const result = await job.result;
    assert.equal(result.jobId, job.jobId);
    assert.deepEqual(callback, [0, 1, 2, 3, 4, 5]);
    assert.deepEqual(iterated, callback);
    assert.deepEqual(
      events.filter((e) => e.jobId === job.jobId).map((e) => e.step),
      callback,
    );
    assert.match(job.jobId, /^[0-9a-f-]{36}$/, "a UUID job id is set by the client");
  });

  it("rejects at once with SidecarCancelledError on abort, and cancels the job on the sidecar", async () => {
    const c = fake();
    const ac = new AbortController();
    const steps: number[] = [];
    const job = c.startTrain({ maxSteps: 1000, seed: 20 } as TrainParams, {
      signal: ac.signal,
      onProgress: (p) => {
        steps.push(p.step);
        if (p.step === 3) ac.abort(new Error("user pressed stop"));
      },
    });
    const t0 = Date.now();
    const err = await job.result.catch((e) => e);
    assert.ok(err instanceof SidecarCancelledError, String(err));
    assert.equal(err.code, -32800);
    assert.equal(err.jobId, job.jobId);
    assert.equal(err.data?.["reason"], "user pressed stop");
    assert.ok(Date.now() - t0 < 1000);
    const { received } = await raw(c, "status", {});
    assert.ok(received.includes("cancel"), `the sidecar got a cancel: ${received}`);
    // Nothing more is delivered for the aborted job.
    const n = steps.length;
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(steps.length, n);
  });

  it("an already-aborted signal rejects without sending anything", async () => {
    const c = fake();
    const err = await c.supports({}, { signal: AbortSignal.abort() }).catch((e) => e);
    assert.ok(err instanceof SidecarCancelledError);
    assert.equal(c.running, false, "no process was started for it");
  });

  it("times out a silent call with SidecarTimeoutError", async () => {
    const c = fake();
    const t0 = Date.now();
    const err = await raw(c, "slow", { ms: 5000, value: 1 }, { timeoutMs: 200 }).catch((e) => e);
    assert.ok(err instanceof SidecarTimeoutError);
    assert.ok(Date.now() - t0 < 2000);
    // The connection is still usable; the late answer is ignored.
    assert.deepEqual(await raw(c, "echo", { x: 1 }), { x: 1 });
  });

  it("progress resets the train timeout; silence trips it and cancels the job", async () => {
    const c = fake();
    await c.supports();
    // 10 steps × 60 ms = 600 ms of training, never 250 ms without progress.
    const ok = await c.train({ maxSteps: 10, seed: 60 } as TrainParams, { timeoutMs: 250 });
    assert.equal(ok.status, "completed");
    const err = await c.train({ maxSteps: 3, seed: 1000 } as TrainParams, { timeoutMs: 250 }).catch((e) => e);
    assert.ok(err instanceof SidecarTimeoutError, String(err));
    assert.equal(err.method, "train");
    await new Promise((r) => setTimeout(r, 50));
    const { received } = await raw(c, "status", {});
    assert.equal(received.filter((m: string) => m === "cancel").length, 1);
  });

  it("a job queued behind a progressing one does not time out while the other makes progress", async () => {
    const c = fake();
    await c.supports();
    const t0 = Date.now();
    const queued = c.train({ name: "queued" } as TrainParams, { timeoutMs: 250 }).catch((e) => e);
    const running = await c.train({ maxSteps: 10, seed: 60 } as TrainParams);
    assert.equal(running.status, "completed");
    const err = await queued;
    assert.ok(err instanceof SidecarTimeoutError);
    assert.ok(Date.now() - t0 >= 600, "it timed out only after the other job stopped reporting");
  });

  it("rejects every pending call at once with SidecarExitedError when the child dies", async () => {
    const c = fake();
    await c.start();
    const a = raw(c, "slow", { ms: 10_000, value: 1 });
    const b = c.train({ maxSteps: 1000, seed: 50 } as TrainParams);
    await new Promise((r) => setTimeout(r, 100));
    const t0 = Date.now();
    void raw(c, "crash", { code: 7 }).catch(() => undefined);
    const [ea, eb] = await Promise.all([a.catch((e) => e), b.catch((e) => e)]);
    assert.ok(Date.now() - t0 < 1000, `rejected after ${Date.now() - t0} ms`);
    for (const e of [ea, eb]) {
      assert.ok(e instanceof SidecarExitedError, String(e));
      assert.equal(e.code, 7);
      assert.equal(e.signal, null);
      assert.match(e.stderrTail, /fatal: crashing on request/);
      assert.match(e.message, /exited with code 7/);
    }
    // Without autoRestart the next call fails fast with the same cause.
    const next = await c.supports().catch((e) => e);
    assert.ok(next instanceof SidecarExitedError);
  });

  it("reports a signal death (kill -9) with the signal", async () => {
    const c = fake();
    await c.start();
    const pending = raw(c, "slow", { ms: 10_000, value: 1 });
    process.kill(c.pid!, "SIGKILL");
    const err = await pending.catch((e) => e);
    assert.ok(err instanceof SidecarExitedError);
    assert.equal(err.signal, "SIGKILL");
  });

  it("autoRestart starts a fresh process for the next call", async () => {
    const c = fake([], { autoRestart: true });
    const first = await c.supports();
    await raw(c, "crash", {}).catch(() => undefined);
    const second = await c.supports();
    assert.notEqual((second as any).pid, (first as any).pid);
  });

  it("keeps draining a flooded stderr (the child never blocks), bounded, with every line forwarded", async () => {
    const lines: string[] = [];
    const c = fake(["stderr-flood"], { stderrBufferBytes: 4096, onStderr: (l) => lines.push(l) });
    // The fake writes 2 MiB to stderr (32 pipe buffers) before it reads stdin: it can only answer
    // if the client keeps reading stderr.
    const result = await raw(c, "echo", { ok: 1 }, { timeoutMs: 10_000 });
    assert.deepEqual(result, { ok: 1 });
    assert.ok(await waitFor(() => lines.length >= 2049, 5000), `got ${lines.length} lines`);
    assert.ok(c.stderrTail().length <= 4096);
    assert.match(c.stderrTail(), /fake sidecar ready/);
  });

  it("survives garbage lines on stdout and reports them", async () => {
    const c = fake(["garbage"]);
    const problems: Error[] = [];
    c.on("protocolError", (e) => problems.push(e));
    assert.deepEqual(await raw(c, "echo", { a: 1 }), { a: 1 });
    assert.ok(problems.length >= 1);
  });

  it("dispose() is graceful: shutdown answers, exit ends the process with code 0", async () => {
    const c = fake();
    await c.supports();
    const pid = c.pid!;
    const info = await c.dispose();
    assert.equal(info?.code, 0);
    assert.equal(alive(pid), false);
    const err = await c.supports().catch((e) => e);
    assert.ok(err instanceof SidecarDisposedError);
  });

  it("dispose() escalates to SIGKILL when the process ignores shutdown, EOF and SIGTERM", async () => {
    const c = fake(["stubborn"], { shutdownTimeoutMs: 200, exitTimeoutMs: 200, termTimeoutMs: 200 });
    await c.supports();
    const pid = c.pid!;
    const t0 = Date.now();
    const info = await c.dispose();
    assert.equal(info?.signal, "SIGKILL");
    assert.ok(Date.now() - t0 < 2000);
    assert.equal(alive(pid), false);
    assert.match(c.stderrTail(), /ignoring SIGTERM/);
  });

  it("kills the whole process group, grandchildren included", async () => {
    const c = fake();
    const { pid } = await raw(c, "spawnGrandchild", {});
    assert.ok(alive(pid));
    c.kill("SIGKILL");
    assert.ok(await waitFor(() => !alive(pid), 2000), "the grandchild died with the group");
  });

  it("a command that does not exist rejects with SidecarExitedError carrying the spawn error", async () => {
    const c = new SidecarClient({ command: "/nonexistent/sidecar", cwd: process.cwd() });
    const err = await c.supports().catch((e) => e);
    assert.ok(err instanceof SidecarExitedError, String(err));
    assert.match(err.message, /could not be started/);
  });

  for (const how of ["exit", "SIGTERM"] as const) {
    it(`the sidecar does not outlive its parent (parent ends by ${how})`, async () => {
      const script = `
        import { SidecarClient } from ${JSON.stringify(new URL("../../src/client.js", import.meta.url).href)};
        const c = new SidecarClient({ command: process.execPath, args: [${JSON.stringify(FAKE)}], cwd: process.cwd(), unrefWhenIdle: false });
        await c.start();
        process.stdout.write(String(c.pid) + "\\n");
        setInterval(() => {}, 1000);
        process.stdin.once("data", () => process.exit(0));
      `;
      const parent = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["pipe", "pipe", "inherit"] });
      const [chunk] = (await once(parent.stdout!, "data")) as [Buffer];
      const childPid = Number(chunk.toString().trim());
      assert.ok(childPid > 0 && alive(childPid), "the sidecar runs while its parent does");
      if (how === "SIGTERM") parent.kill("SIGTERM");
      else parent.stdin!.write("exit now\n");
      const [code, signal] = (await once(parent, "exit")) as [number | null, NodeJS.Signals | null];
      if (how === "SIGTERM") assert.equal(signal, "SIGTERM", "default signal behaviour is kept");
      else assert.equal(code, 0);
      assert.ok(await waitFor(() => !alive(childPid), 2000), `sidecar ${childPid} still alive after its parent ended`);
    });
  }
});
