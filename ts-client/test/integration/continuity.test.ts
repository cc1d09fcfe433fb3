/**
 * resumeInterrupted() against the REAL sidecar: a job killed with SIGKILL mid-run is listed as
 * interrupted by the restarted sidecar and finishes from its checkpoint with the uninterrupted
 * job's losses. Equal losses alone would also come from a silent rerun from step 0 (the run is
 * deterministic), so the resumed job's progress notifications must begin at the checkpoint's step
 * and cover only the remaining steps.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { SidecarClient } from "../../src/client.js";
import { SidecarExitedError } from "../../src/errors.js";
import type { Progress, TrainParams } from "../../src/wire.js";
import { chatExamples, requireEnvironment, tempDir, tinyModel } from "./helpers.js";

describe("resumeInterrupted with the real sidecar", () => {
  let model: string;
  let out: string;
  let client: SidecarClient;

  before(() => {
    const envDir = requireEnvironment();
    model = tinyModel();
    out = tempDir("continuity");
    // Its own data directory (journal, checkpoints); one compute thread keeps the tiny model fast
    // on a shared machine and the two processes on the same arithmetic. The environment is named
    // explicitly: by default the wrapper looks for it under the data directory.
    const env = { LORA_SIDECAR_DATA: join(out, "data"), LORA_SIDECAR_ENV: envDir, LORA_SIDECAR_THREADS: "1" };
    client = new SidecarClient({ autoRestart: true, env });
  });

  after(async () => {
    await client.dispose();
  });

  function params(extra: Partial<TrainParams>): TrainParams {
    return {
      baseModel: model,
      dataset: { examples: chatExamples(6) },
      batchSize: 2,
      maxSteps: 30,
      learningRate: 1e-3,
      progressInterval: 0,
      ...extra,
    };
  }

  it("a job killed mid-run is resumed from its checkpoint after the client restarts the sidecar", async () => {
    const jobId = "ts-resume-me";
    let checkpointStep = 0;
    const job = client.startTrain(params({ jobId, checkpointEvery: 5, outputPath: join(out, "resumed") }), {
      onProgress: (p) => {
        if (p.checkpoint && p.checkpoint.step >= 10 && !checkpointStep) {
          checkpointStep = p.checkpoint.step;
          client.kill("SIGKILL");
        }
      },
    });
    await assert.rejects(job.result, SidecarExitedError);
    assert.ok(checkpointStep >= 10);

    // The next call starts a new sidecar (autoRestart); its journal lists the job as interrupted.
    const status = await client.status();
    const listed = status.recent.find((j) => j.jobId === jobId);
    assert.equal(listed?.state, "interrupted");
    assert.ok(listed?.lastCheckpoint && listed.lastCheckpoint.step >= checkpointStep, JSON.stringify(listed));

    // progressInterval 0 (kept from the interrupted job's params): one `training` notification when
    // training begins (the step it starts from), one after every step, one more after a checkpoint.
    const trainingSteps: number[] = [];
    const resumed = await client.resumeInterrupted({
      onProgress: (p: Progress) => {
        if (p.jobId === jobId && p.phase === "training") trainingSteps.push(p.step);
      },
    });
    assert.deepEqual(resumed.map((j) => j.jobId), [jobId]);
    const result = await resumed[0]!.result;
    assert.equal(result.status, "completed");
    assert.equal(result.adapterPath, join(out, "resumed"), "same output path as the interrupted job");
    assert.equal(result.metrics.steps, 30);
    const from = listed!.lastCheckpoint!.step;
    assert.equal(result.metrics.resumedFromStep, from);
    // It really continued: training began at the checkpoint's step and ran only steps from+1 … 30
    // (a resume that silently restarted from step 0 would notify step 0 and steps 1 … from again).
    assert.equal(trainingSteps[0], from, `training began at step ${trainingSteps[0]}, not ${from}`);
    assert.deepEqual(trainingSteps, [...trainingSteps].sort((a, b) => a - b));
    const executed = [...new Set(trainingSteps)].filter((s) => s !== from);
    assert.deepEqual(executed, Array.from({ length: 30 - from }, (_, i) => from + 1 + i));

    // The same job without interruption: the same losses.
    const plain = await client.train(params({ outputPath: join(out, "plain"), checkpointEvery: 0, checkpointSeconds: 0 }));
    assert.ok(Math.abs(plain.metrics.trainLoss - result.metrics.trainLoss) < 1e-6, `${plain.metrics.trainLoss} vs ${result.metrics.trainLoss}`);
    assert.ok(Math.abs(plain.metrics.finalLoss - result.metrics.finalLoss) < 1e-6);

    // Nothing is left to resume.
    assert.deepEqual(await client.resumeInterrupted(), []);
    const after = await client.status();
    assert.equal(after.recent.find((j) => j.jobId === jobId)?.state, "completed");
  });
});
