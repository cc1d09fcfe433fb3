/** The drop-in LoRATrainer adapter against the real sidecar, and without an environment. */

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { createRequire, syncBuiltinESMExports } from "node:module";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { NOT_BOOTSTRAPPED_MESSAGE } from "../../src/errors.js";
import { LoRATrainer, type LoRATrainingRequest } from "../../src/trainer.js";
import type { Progress } from "../../src/wire.js";
import { chatExamples, requireEnvironment, tempDir, tinyModel } from "./helpers.js";

/**
 * Counts the synchronous `supports` probes: LoRATrainer runs each one with child_process.spawnSync
 * (and nothing else does), so "answers from the cache" / "no process" are checked by count, not by
 * how fast the call returned. The builtin is wrapped and syncBuiltinESMExports() makes the
 * trainer's ESM import see the wrapper.
 */
function countSyncProbes<T>(fn: () => T): { value: T; probes: number } {
  const cp = createRequire(import.meta.url)("node:child_process") as typeof import("node:child_process");
  const original = cp.spawnSync;
  let probes = 0;
  cp.spawnSync = ((...args: Parameters<typeof original>) => {
    probes++;
    return original(...args);
  }) as typeof original;
  syncBuiltinESMExports();
  try {
    return { value: fn(), probes };
  } finally {
    cp.spawnSync = original;
    syncBuiltinESMExports();
  }
}

function request(baseModel: string, outputPath?: string): LoRATrainingRequest {
  return {
    personaId: "0b6f3c3e-persona",
    personaName: "Helper",
    traitType: "tone",
    baseModel,
    // Shaped like the application's TrainingDataset, extras included: they are passed as metadata.
    dataset: {
      examples: chatExamples(6).map((e, i) => ({
        messages: e.messages!.map((m) => ({ role: m.role as "user" | "assistant", content: m.content! })),
        metadata: { timestamp: 1700000000 + i, confidence: 0.9 },
      })),
      metadata: { personaId: "0b6f3c3e-persona", personaName: "Helper", traitType: "tone", createdAt: 1700000000, source: "corrections", totalExamples: 6 },
    },
    rank: 4,
    alpha: 8,
    epochs: 1,
    learningRate: 1e-3,
    batchSize: 2,
    outputPath,
  };
}

describe("LoRATrainer without an environment", () => {
  const env = { LORA_SIDECAR_ENV: "/nonexistent/lora-sidecar-env" };

  it("trainLoRA resolves success:false with the bootstrap message (never throws)", async () => {
    const trainer = new LoRATrainer({ env });
    try {
      const result = await trainer.trainLoRA(request("default"));
      assert.equal(result.success, false);
      assert.ok(result.error?.includes(NOT_BOOTSTRAPPED_MESSAGE), result.error);
      assert.equal(result.errorDetails?.name, "SidecarNotBootstrappedError");
      assert.equal(result.errorDetails?.code, 3);
    } finally {
      await trainer.dispose();
    }
  });

  it("supportsFineTuning() is false (sync, no process), and capabilities say why", async () => {
    const trainer = new LoRATrainer({ env });
    const { value: caps, probes } = countSyncProbes(() => {
      assert.equal(trainer.supportsFineTuning(), false);
      return trainer.getFineTuningCapabilities();
    });
    assert.equal(probes, 0, "the missing environment is seen on disk; no process is run");
    assert.equal(trainer.sidecar.running, false);
    assert.equal(caps.supportsFineTuning, false);
    assert.equal(caps.reason, NOT_BOOTSTRAPPED_MESSAGE);
    // The async path agrees (it asks the wrapper, which exits 3).
    const asyncCaps = await new LoRATrainer({ env }).initialize();
    assert.equal(asyncCaps.supportsFineTuning, false);
    assert.ok(asyncCaps.reason?.includes(NOT_BOOTSTRAPPED_MESSAGE), asyncCaps.reason);
  });
});

describe("LoRATrainer with the real sidecar", () => {
  let model: string;
  let out: string;
  let trainer: LoRATrainer;

  before(() => {
    requireEnvironment();
    model = tinyModel();
    out = tempDir("trainer");
    trainer = new LoRATrainer({ defaults: { baseModel: model, maxSteps: 2, maxSeqLength: 64, progressInterval: 0 } });
  });

  after(async () => {
    await trainer.dispose();
  });

  it("initialize() caches supports; the synchronous methods then answer without a process", async () => {
    const caps = await trainer.initialize();
    assert.equal(caps.supportsFineTuning, true, caps.reason);
    assert.equal(caps.strategy, "local-pytorch");
    assert.equal(caps.maxRank, caps.sidecar?.limits.maxRank);
    assert.equal(caps.sidecar?.model?.resolvable, true);
    const pid = trainer.sidecar.pid;
    const { probes } = countSyncProbes(() => {
      assert.equal(trainer.supportsFineTuning(), true);
      assert.deepEqual(trainer.getFineTuningCapabilities(), caps);
    });
    assert.equal(probes, 0, "answered from initialize()'s cached supports: no probe process");
    assert.equal(trainer.sidecar.pid, pid, "and no new warm sidecar either");
  });

  it("trainLoRA twice on one warm sidecar: success, adapter files, manifest and metrics", async () => {
    const pid = trainer.sidecar.pid;
    assert.ok(pid, "initialize() started the warm sidecar");
    const phases: string[] = [];
    const first = await trainer.trainLoRA(request(model, join(out, "a")), { onProgress: (p: Progress) => phases.push(p.phase) });
    assert.equal(first.success, true, first.error);
    assert.ok(first.modelPath && existsSync(join(first.modelPath, "adapter_model.safetensors")));
    assert.equal(typeof first.manifest, "object");
    const m = first.metrics!;
    for (const k of ["trainLoss", "finalLoss", "epochs", "trainingTime", "examplesProcessed"] as const) {
      assert.equal(typeof m[k], "number", k);
      assert.ok(Number.isFinite(m[k]), k);
    }
    assert.equal(m.steps, 2);
    assert.ok(m.examplesProcessed > 0);
    assert.equal(phases.at(-1), "completed");

    const second = await trainer.trainLoRA(request(model, join(out, "b")));
    assert.equal(second.success, true, second.error);
    assert.equal(trainer.sidecar.pid, pid, "the same sidecar served both calls");
  });

  it("a request the sidecar rejects comes back as success:false with the field in the text", async () => {
    const bad = { ...request(model, join(out, "bad")), rank: 0 };
    const result = await trainer.trainLoRA(bad);
    assert.equal(result.success, false);
    assert.match(result.error!, /rank/);
    assert.equal(result.errorDetails?.code, -32602);
    assert.equal(result.errorDetails?.data?.["field"], "$.rank");
  });

  it("supportsFineTuning() without initialize() probes synchronously once and caches", () => {
    const fresh = new LoRATrainer({ defaults: { baseModel: model } });
    const first = countSyncProbes(() => fresh.supportsFineTuning());
    assert.equal(first.value, true);
    assert.equal(first.probes, 1, "the first call runs one short-lived probe process");
    const again = countSyncProbes(() => {
      assert.equal(fresh.supportsFineTuning(), true);
      return fresh.getFineTuningCapabilities();
    });
    assert.equal(again.probes, 0, "later calls answer from the cached probe");
    assert.equal(again.value.sidecar?.model?.resolvable, true, "the probe asked about the default base model");
    assert.equal(fresh.sidecar.running, false, "the probe used a short-lived process, not the warm one");
  });
});
