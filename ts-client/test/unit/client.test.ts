/**
 * The JSON-RPC layer against a scripted fake sidecar (test/fixtures/fake-sidecar.ts): pending
 * map, timeouts, aborts, crashes, stderr draining, restart, dispose escalation, parent exit.
 *
 * No test here depends on how loaded the machine is. Timeouts are driven by node:test's mock
 * clock (the client's timers are the global setTimeout) and the fake's progress by explicit
 * `step` requests; "has the fake received X" is settled by asking it (`status`), whose answer
 * comes after X on the same ordered pipe. The few wall-clock bounds left (a dead child, dispose
 * escalation, reaping) say what they separate and keep a margin that holds at load 4.
 */

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, describe, it as nodeIt, type TestContext } from "node:test";

import { SidecarClient, type SidecarClientOptions } from "../../src/client.js";
import {
  SidecarCancelledError,
  SidecarDisposedError,
  SidecarError,
  SidecarExitedError,
  SidecarTimeoutError,
} from "../../src/errors.js";
import type { Progress, TrainParams } from "../../src/wire.js";

/**
 * Every test gets a time limit, so a broken client that leaves a call pending forever fails its
 * test instead of hanging the run. Each takes well under a second; 60 s holds at any sane load.
 */
function it(name: string, fn: (t: TestContext) => Promise<void> | void): void {
  nodeIt(name, { timeout: 60_000 }, fn);
}

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

/** How a promise has settled so far; read it after `flush()`. */
function track<T>(p: Promise<T>): { state: "pending" | "resolved" | "rejected"; value?: T; error?: unknown } {
  const o: { state: "pending" | "resolved" | "rejected"; value?: T; error?: unknown } = { state: "pending" };
  p.then(
    (value) => Object.assign(o, { state: "resolved", value }),
    (error) => Object.assign(o, { state: "rejected", error }),
  );
  return o;
}

/** Run every callback and microtask already queued (setImmediate is not mocked). */
function flush(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

/** Polls until cond holds; `ms` only turns a never into a failure, so it is generous. */
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
    // The fake holds both calls and answers them newest first when flushed: the answer to the
    // second call arrives before the answer to the first, whatever the load.
    const first = raw(c, "later", { value: "answer to the first call" });
    const second = raw(c, "later", { value: "answer to the second call" });
    const order: string[] = [];
    void first.then(() => order.push("first"));
    void second.then(() => order.push("second"));
    assert.deepEqual(await raw(c, "flush", {}), { flushed: 2 });
    // Each call gets its own answer (a client that paired answers with calls in sending order
    // would give each the other's) ...
    assert.equal(await first, "answer to the first call");
    assert.equal(await second, "answer to the second call");
    // ... and the answers really did come out of order.
    assert.deepEqual(order, ["second", "first"]);
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

  it("abort rejects with SidecarCancelledError in the same event-loop turn (before any sidecar answer), cancels the job on the sidecar, and delivers no later progress", async () => {
    const c = fake();
    const ac = new AbortController();
    const steps: number[] = [];
    const order: string[] = [];
    const job = c.startTrain({ maxSteps: 1000, seed: 20 } as TrainParams, {
      signal: ac.signal,
      onProgress: (p) => {
        steps.push(p.step);
        if (p.step === 3) {
          ac.abort(new Error("user pressed stop"));
          // Runs in the next turn of the event loop: after this turn's microtasks, and before
          // anything the sidecar could send in answer to the cancel.
          setImmediate(() => order.push("next turn"));
        }
      },
    });
    const err = await job.result.catch((e) => {
      order.push("rejected");
      return e;
    });
    assert.ok(err instanceof SidecarCancelledError, String(err));
    assert.equal(err.code, -32800);
    assert.equal(err.jobId, job.jobId);
    // The caller's reason: the client's own rejection, not the sidecar's -32800 answer.
    assert.equal(err.data?.["reason"], "user pressed stop");
    assert.equal(order[0], "rejected", `"at once": rejected before the next event-loop turn (${order})`);
    const stepsAtAbort = steps.length;
    // The fake answers `status` after it has handled the cancel, which sends the job's last progress
    // (phase cancelled) and its -32800 answer: both have been read when `status` resolves.
    const { received } = await raw(c, "status", {});
    assert.ok(received.includes("cancel"), `the sidecar got a cancel: ${received}`);
    assert.equal(steps.length, stepsAtAbort, `nothing is delivered for the aborted job after the abort: ${steps}`);
  });

  it("an already-aborted signal rejects without sending anything", async () => {
    const c = fake();
    const err = await c.supports({}, { signal: AbortSignal.abort() }).catch((e) => e);
    assert.ok(err instanceof SidecarCancelledError);
    assert.equal(c.running, false, "no process was started for it");
  });

  it("a silent call times out with SidecarTimeoutError exactly at timeoutMs (mock clock), sends $/cancelRequest, and ignores the late answer", async (t) => {
    const c = fake();
    await c.supports();
    t.mock.timers.enable({ apis: ["setTimeout"] });
    const problems: Error[] = [];
    c.on("protocolError", (e) => problems.push(e));
    const call = track(raw(c, "later", { value: "late" }, { timeoutMs: 200 }));
    await raw(c, "status", {}); // answered after the fake got `later`: the call is sent and its clock runs
    t.mock.timers.tick(199);
    await flush();
    assert.equal(call.state, "pending", "not before timeoutMs");
    t.mock.timers.tick(1);
    await flush();
    assert.equal(call.state, "rejected", "at timeoutMs");
    assert.ok(call.error instanceof SidecarTimeoutError, String(call.error));
    // The late answer arrives (flush answers it before itself) and changes nothing.
    assert.deepEqual(await raw(c, "flush", {}), { flushed: 1 });
    const { received } = await raw(c, "status", {});
    assert.ok(received.includes("$/cancelRequest"), `the sidecar was told: ${received}`);
    assert.deepEqual(problems, [], "a late answer is not a protocol error");
    assert.deepEqual(await raw(c, "echo", { x: 1 }), { x: 1 }, "the connection is still usable");
  });

  it("train's idle timeout restarts at every progress notification, then trips after timeoutMs of silence and cancels the job (mock clock)", async (t) => {
    const c = fake();
    await c.supports();
    t.mock.timers.enable({ apis: ["setTimeout"] });
    // A manual job: progress only when the test sends `step`; the clock only moves by tick().
    const job = c.startTrain({ name: "manual" } as TrainParams, { timeoutMs: 1000 });
    const result = track(job.result);
    await raw(c, "status", {}); // the train call is sent and its clock runs
    for (let i = 1; i <= 3; i++) {
      t.mock.timers.tick(900);
      await flush();
      assert.equal(result.state, "pending", `${i * 900} ms since the call, 900 ms since the last progress`);
      // The step's notification is read before its answer: the clock has restarted when this resolves.
      await raw(c, "step", { jobId: job.jobId });
    }
    // 2700 ms since the call, far past timeoutMs: only the restarts kept it alive. Now silence.
    t.mock.timers.tick(999);
    await flush();
    assert.equal(result.state, "pending", "999 ms of silence");
    t.mock.timers.tick(1);
    await flush();
    assert.equal(result.state, "rejected", "1000 ms of silence");
    const err = result.error as SidecarTimeoutError;
    assert.ok(err instanceof SidecarTimeoutError, String(err));
    assert.equal(err.method, "train");
    assert.equal(err.jobId, job.jobId);
    const { received } = await raw(c, "status", {}); // sent after the cancel, so answered after it
    assert.equal(received.filter((m: string) => m === "cancel").length, 1, `one cancel: ${received}`);
  });

  it("a job queued behind another restarts its idle clock on the other job's progress, and times out once that progress stops (mock clock)", async (t) => {
    const c = fake();
    await c.supports();
    t.mock.timers.enable({ apis: ["setTimeout"] });
    // "queued" never reports anything itself, like a job waiting behind another on the sidecar.
    const queued = track(c.train({ name: "queued" } as TrainParams, { timeoutMs: 1000 }));
    const running = c.startTrain({ name: "manual" } as TrainParams);
    await raw(c, "status", {}); // both calls are sent and the queued one's clock runs
    for (let i = 1; i <= 3; i++) {
      t.mock.timers.tick(900);
      await flush();
      assert.equal(queued.state, "pending", `${i * 900} ms, 900 ms since the other job's last progress`);
      await raw(c, "step", { jobId: running.jobId });
    }
    assert.deepEqual(await raw(c, "finish", { jobId: running.jobId }), { ok: true });
    assert.equal((await running.result).status, "completed");
    t.mock.timers.tick(999);
    await flush();
    assert.equal(queued.state, "pending", "999 ms after the other job's last progress");
    t.mock.timers.tick(1);
    await flush();
    assert.equal(queued.state, "rejected", "1000 ms after the other job's last progress");
    assert.ok(queued.error instanceof SidecarTimeoutError, String(queued.error));
  });

  it("rejects every pending call with SidecarExitedError when the child dies, without waiting for their answers", async () => {
    const c = fake();
    await c.start();
    const a = raw(c, "later", { value: 1 }); // answered only on flush, which never comes
    const b = c.train({ maxSteps: 1000, seed: 50 } as TrainParams);
    await raw(c, "status", {}); // both are on the sidecar
    const t0 = Date.now();
    void raw(c, "crash", { code: 7 }).catch(() => undefined);
    const [ea, eb] = await Promise.all([a.catch((e) => e), b.catch((e) => e)]);
    // Neither call has a timeout and neither can be answered any more, so only the exit handling
    // can settle them; the bound turns a hang into a failure. The client waits at most 250 ms for
    // the pipes after the exit; 5 s holds at load 4.
    assert.ok(Date.now() - t0 < 5000, `rejected after ${Date.now() - t0} ms`);
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
    // A client that stopped reading stderr would never get the answer: the timeout turns that
    // deadlock into a failure (the fake needs well under a second at load 4).
    const result = await raw(c, "echo", { ok: 1 }, { timeoutMs: 30_000 });
    assert.deepEqual(result, { ok: 1 });
    assert.ok(await waitFor(() => lines.length >= 2049, 30_000), `got ${lines.length} lines`);
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

  it("dispose() is graceful: the sidecar gets shutdown, then the exit notification, and ends by it with code 0", async () => {
    const record = join(mkdtempSync(join(tmpdir(), "fake-sidecar-")), "record");
    const c = fake([`record=${record}`]);
    await c.supports();
    const pid = c.pid!;
    const info = await c.dispose();
    assert.equal(info?.code, 0);
    assert.equal(alive(pid), false);
    // The fake also ends with code 0 on EOF: its record says what it got and why it ended.
    assert.equal(readFileSync(record, "utf8"), "exiting (exit notification) after: supports,shutdown,exit\n");
    const err = await c.supports().catch((e) => e);
    assert.ok(err instanceof SidecarDisposedError);
  });

  it("dispose() escalates to SIGKILL when the process ignores shutdown, EOF and SIGTERM, after the configured waits", async () => {
    const c = fake(["stubborn"], { shutdownTimeoutMs: 200, exitTimeoutMs: 200, termTimeoutMs: 200 });
    await c.supports();
    const pid = c.pid!;
    const t0 = Date.now();
    const info = await c.dispose();
    assert.equal(info?.signal, "SIGKILL");
    // The configured waits total 600 ms, the defaults 11 s: 6 s tells them apart and holds at load 4.
    assert.ok(Date.now() - t0 < 6000, `took ${Date.now() - t0} ms`);
    assert.equal(alive(pid), false);
    assert.match(c.stderrTail(), /ignoring SIGTERM/);
  });

  it("kills the whole process group, grandchildren included", async () => {
    const c = fake();
    const { pid } = await raw(c, "spawnGrandchild", {});
    assert.ok(alive(pid));
    c.kill("SIGKILL");
    assert.ok(await waitFor(() => !alive(pid), 10_000), "the grandchild died with the group");
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
      assert.ok(await waitFor(() => !alive(childPid), 10_000), `sidecar ${childPid} still alive after its parent ended`);
    });
  }
});
