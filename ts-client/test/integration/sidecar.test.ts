/**
 * SidecarClient against the REAL sidecar (bootstrap/train-wrapper.sh -m sidecar) and a tiny
 * model: one warm process serves the tests in order, as an application would use it.
 *
 * Nothing here depends on the machine's load: "at once" is checked as an ordering within the
 * event loop, and the one wall-clock bound left (kill -9) says what it separates and holds at load 4.
 */

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { SidecarClient } from "../../src/client.js";
import { ErrorCodes, SidecarCancelledError, SidecarError, SidecarExitedError } from "../../src/errors.js";
import type { Example, Progress, TrainParams } from "../../src/wire.js";
import { PHASE_ORDER, chatExamples, requireEnvironment, tempDir, tinyModel } from "./helpers.js";

describe("SidecarClient with the real sidecar", () => {
  let model: string;
  let out: string;
  let client: SidecarClient;
  const stderr: string[] = [];

  before(() => {
    requireEnvironment();
    model = tinyModel();
    out = tempDir("sidecar");
    client = new SidecarClient({ autoRestart: true, onStderr: (l) => stderr.push(l) });
  });

  after(async () => {
    const info = await client.dispose();
    assert.equal(info?.code, 0, `graceful dispose exits 0; stderr tail:\n${client.stderrTail()}`);
  });

  function params(extra: Partial<TrainParams>): TrainParams {
    return {
      baseModel: model,
      dataset: { examples: chatExamples(6) },
      batchSize: 2,
      maxSeqLength: 64,
      progressInterval: 0,
      ...extra,
    };
  }

  it("supports: the tiny model resolves and fine-tuning is supported", async () => {
    const s = await client.supports({ baseModel: model });
    assert.equal(s.supportsFineTuning, true, s.reason ?? "");
    assert.equal(s.model?.resolvable, true);
    assert.equal(s.model?.kind, "directory");
    assert.ok(s.methods.includes("train"));
    // stderr is a separate pipe from the answer's stdout, so its "ready" line may be read after
    // the answer: wait for it (the bound only turns "never" into a failure).
    const deadline = Date.now() + 30_000;
    while (!stderr.some((l) => l.includes("ready")) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(stderr.some((l) => l.includes("ready")), `the sidecar's log lines reach onStderr: ${stderr.slice(-5).join(" | ")}`);
  });

  it("train: progress arrives in order, then the adapter files exist where the result says", async () => {
    const progress: Progress[] = [];
    const outputPath = join(out, "first");
    const job = client.startTrain(params({ maxSteps: 3, outputPath }), { onProgress: (p) => progress.push(p) });
    const iterated: Progress[] = [];
    for await (const p of job.progress) iterated.push(p);
    const result = await job.result;

    assert.equal(result.status, "completed");
    assert.equal(result.jobId, job.jobId);
    assert.deepEqual(iterated, progress, "the iterator and the callback see the same sequence");
    assert.ok(progress.length >= 4, `${progress.length} progress notifications`);
    assert.ok(progress.every((p) => p.jobId === job.jobId));
    const ranks = progress.map((p) => PHASE_ORDER.indexOf(p.phase));
    assert.deepEqual(ranks, [...ranks].sort((a, b) => a - b), `phases in order: ${progress.map((p) => p.phase)}`);
    const steps = progress.map((p) => p.step);
    assert.deepEqual(steps, [...steps].sort((a, b) => a - b), `steps never go back: ${steps}`);
    assert.ok(progress.some((p) => p.phase === "training" && p.step > 0 && typeof p.loss === "number"));
    assert.equal(progress.at(-1)!.phase, "completed");
    assert.equal(result.metrics.steps, 3);

    assert.ok(existsSync(join(result.adapterPath, "adapter_config.json")), "adapter_config.json");
    assert.ok(existsSync(join(result.adapterPath, "adapter_model.safetensors")), "adapter_model.safetensors");
    assert.ok(existsSync(result.manifestPath));
    assert.equal(typeof JSON.parse(readFileSync(result.manifestPath, "utf8")), "object");
  });

  it("generate: an adapter taught one answer moves the greedy answer onto that answer's words; the base model, asked before and after, answers as the base", async () => {
    // The tiny model is random with tied embeddings of std 0.02, so its loss cannot fall far below
    // ~8 nats and no adapter makes it say the answer verbatim. What an adapter trained hard on one
    // answer reliably does is move greedy decoding onto that answer's words. Measured with these
    // settings (1 and 2 torch threads alike): base "\n\n\n\n\n\n\n\n", adapter "23  plus 3 3".
    const question = "What is 2 plus one?";
    const answer = "2 plus one is 3.";
    const taughtExample: Example = { messages: [{ role: "user", content: question }, { role: "assistant", content: answer }] };
    const taught = await client.train(
      params({
        dataset: { examples: [taughtExample, taughtExample, taughtExample, taughtExample] },
        batchSize: 4,
        maxSteps: 30,
        learningRate: 2e-2,
        rank: 8,
        alpha: 16,
        scheduler: "constant",
        warmupRatio: 0,
        dropout: 0,
        outputPath: join(out, "taught"),
      }),
    );
    const ask = (adapterPath?: string) =>
      client.generate({
        baseModel: model,
        ...(adapterPath ? { adapterPath } : {}),
        messages: [{ role: "user", content: question }],
        maxNewTokens: 8,
        temperature: 0,
        logprobs: true,
      });
    const base = await ask();
    const adapted = await ask(taught.adapterPath);
    const baseAgain = await ask();

    const words = (text: string) => text.split(/[^A-Za-z0-9]+/).filter(Boolean);
    const taughtWords = new Set(words(answer));
    const fromAnswer = (text: string) => words(text).filter((w) => taughtWords.has(w));
    // Control: greedy decoding of the base is repeatable, and an adapter used in between does not
    // stay applied to it.
    assert.deepEqual(baseAgain.tokenIds, base.tokenIds, "the base answers the same before and after the adapter");
    assert.deepEqual(baseAgain.logprobs, base.logprobs);
    assert.deepEqual(fromAnswer(base.text), [], `the base does not already say the answer's words: ${JSON.stringify(base.text)}`);
    // The adapter is applied, and it is the taught one.
    assert.ok(adapted.tokens > 0 && adapted.tokens <= 8);
    assert.notDeepEqual(adapted.tokenIds, base.tokenIds, `with the adapter the answer changes: ${JSON.stringify(adapted.text)}`);
    assert.ok(
      fromAnswer(adapted.text).length > 0,
      `the adapted answer ${JSON.stringify(adapted.text)} uses words of the taught answer ${JSON.stringify(answer)}; the base said ${JSON.stringify(base.text)}`,
    );
  });

  it("exportAdapter: a GGUF LoRA file is written and recorded; a format the adapter cannot take is refused", async () => {
    const adapterPath = join(out, "first");
    const r = await client.exportAdapter({ adapterPath, format: "gguf-lora", outputPath: join(out, "first.gguf") });
    assert.equal(r.format, "gguf-lora");
    assert.equal(r.outType, "f16");
    assert.ok(existsSync(r.outputPath) && r.bytes > 0 && r.sha256.length === 64);
    assert.equal(r.manifestUpdated, true);
    const manifest = JSON.parse(readFileSync(join(adapterPath, "training_manifest.json"), "utf8"));
    assert.equal(manifest.exports.at(-1).sha256, r.sha256);

    const err = await client.exportAdapter({ adapterPath, format: "merged-gguf" }).catch((e) => e);
    assert.ok(err instanceof SidecarError, String(err));
    assert.equal(err.code, ErrorCodes.ExportRefused);
    assert.equal((err.data as { reason?: string }).reason, "base-not-gguf");
  });

  it("genome: train with load, exam, stack, compose, unload — typed methods", async () => {
    const trained = await client.train(params({ maxSteps: 2, outputPath: join(out, "genome-a"), load: true }));
    assert.ok(trained.adapterId, "train {load: true} returns the resident id");
    const second = await client.loadAdapter({ path: join(out, "first"), id: "first" });
    assert.equal(second.id, "first");
    assert.equal((await client.loadAdapter({ path: join(out, "first") })).alreadyLoaded, true);
    const listed = await client.listAdapters();
    assert.deepEqual(listed.adapters.map((a) => a.id).sort(), [trained.adapterId!, "first"].sort());
    assert.ok(listed.usedBytes > 0 && listed.usedBytes <= listed.budgetBytes);

    const exam = await client.generate({
      baseModel: model,
      prompts: [{ id: "q1", messages: [{ role: "user", content: "Hi" }] }, { messages: [{ role: "user", content: "Bye" }] }],
      variants: [{ id: "base" }, { id: "both", adapters: [{ id: "first", scale: 0.5 }, { id: trained.adapterId!, scale: 0.5 }] }],
      maxNewTokens: 3,
    });
    assert.deepEqual(exam.answers.map((a) => [a.prompt, a.variant]), [[0, 0], [0, 1], [1, 0], [1, 1]]);
    assert.equal(exam.answers[0]!.promptId, "q1");
    assert.equal(exam.answers[1]!.variantId, "both");

    const composed = await client.composeAdapters({
      sources: [{ id: "first", weight: 0.5 }, { id: trained.adapterId!, weight: 0.5 }],
      method: "cat",
      outputPath: join(out, "composed"),
      load: true,
      name: "composed",
    });
    assert.equal(composed.adapterId, "composed");
    assert.equal(composed.parents.length, 2);
    assert.ok(existsSync(composed.manifestPath));

    const unloaded = await client.unloadAdapter("composed");
    assert.equal(unloaded.id, "composed");
    const err = await client.unloadAdapter("composed").catch((e) => e);
    assert.ok(err instanceof SidecarError, String(err));
    assert.equal(err.code, -32018);
    const status = await client.status();
    assert.equal(status.adapters?.adapters.length, 2);
  });

  it("abort mid-training releases the caller at once (same event-loop turn) with SidecarCancelledError; the sidecar records the job as cancelled and the next train succeeds", async () => {
    const ac = new AbortController();
    const outputPath = join(out, "aborted");
    let aborted = false;
    const order: string[] = [];
    const job = client.startTrain(params({ maxSteps: 500, outputPath }), {
      signal: ac.signal,
      onProgress: (p) => {
        if (p.phase === "training" && p.step >= 1 && !aborted) {
          aborted = true;
          ac.abort(new Error("stop from the test"));
          // The next event-loop turn: before the sidecar could possibly have answered the cancel.
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
    assert.equal(err.data?.["reason"], "stop from the test", "the client's own rejection, not the sidecar's answer");
    assert.equal(order[0], "rejected", `the caller is released at once, not when the sidecar answers (${order})`);

    // The sidecar really stops the job: the next one runs to completion after it.
    const next = await client.train(params({ maxSteps: 2, outputPath: join(out, "after-abort") }));
    assert.equal(next.status, "completed");
    assert.ok(existsSync(join(next.adapterPath, "adapter_model.safetensors")));
    const status = await client.status();
    const recorded = status.recent.find((j) => j.jobId === job.jobId);
    assert.equal(recorded?.state, "cancelled", `the aborted job is recorded as cancelled: ${JSON.stringify(status.recent)}`);
    assert.equal(existsSync(join(outputPath, "adapter_model.safetensors")), false, "a cancelled job leaves no adapter");
  });

  it("a bad request (rank as a string) is a SidecarError -32602 naming the field", async () => {
    const bad = { ...params({ maxSteps: 1 }), rank: "8" } as unknown as TrainParams;
    const err = await client.train(bad).catch((e) => e);
    assert.ok(err instanceof SidecarError, String(err));
    assert.equal(err.code, -32602);
    assert.equal(err.field, "$.rank");
    assert.match(err.message, /rank/);
  });

  it("kill -9 of the child mid-job rejects the pending call with SidecarExitedError (signal SIGKILL) promptly; the next call restarts it", async () => {
    const pid = client.pid!;
    assert.ok(pid > 0);
    let killedAt = 0;
    const pending = client.train(params({ maxSteps: 500, outputPath: join(out, "killed") }), {
      onProgress: (p) => {
        if (p.phase === "training" && !killedAt) {
          killedAt = Date.now();
          process.kill(pid, "SIGKILL");
        }
      },
    });
    const err = await pending.catch((e) => e);
    const latency = Date.now() - killedAt;
    assert.ok(err instanceof SidecarExitedError, String(err));
    assert.equal(err.signal, "SIGKILL");
    // The call has no timeout and a dead child never answers, so only the exit handling can settle
    // it; the client waits at most 250 ms for the pipes after the exit. 5 s holds at load 4.
    assert.ok(latency < 5000, `rejected ${latency} ms after the kill`);

    const s = await client.supports();
    assert.equal(s.supportsFineTuning, true);
    assert.notEqual(client.pid, pid, "a fresh sidecar serves the next call");
  });
});
