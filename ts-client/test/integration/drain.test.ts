/**
 * `shutdown({ drain: true })` against the REAL sidecar and a tiny model: the jobs sent before it
 * finish (their results settle first), later jobs are refused, and the process exits 0.
 */

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { SidecarClient } from "../../src/client.js";
import { ErrorCodes, SidecarError } from "../../src/errors.js";
import { chatExamples, requireEnvironment, tempDir, tinyModel } from "./helpers.js";

describe("shutdown({ drain: true }) with the real sidecar", () => {
  let model: string;
  let out: string;
  let client: SidecarClient;

  before(() => {
    const envDir = requireEnvironment();
    model = tinyModel();
    out = tempDir("drain");
    client = new SidecarClient({ env: { LORA_SIDECAR_ENV: envDir, LORA_SIDECAR_DATA: join(out, "data") } });
  });

  after(async () => {
    await client.dispose();
  });

  it("lets the earlier train and generate finish, answers after them, then refuses new jobs", async () => {
    const settled: string[] = [];
    const outputPath = join(out, "adapter");
    const job = client.startTrain({ baseModel: model, dataset: { examples: chatExamples(6) }, batchSize: 2,
      maxSteps: 8, outputPath });
    job.result.then(() => settled.push("train"), () => settled.push("train failed"));
    // The adapter does not exist yet: the train job ahead of this generate writes it.
    const answer = client.request("generate", { baseModel: model, adapterPath: outputPath,
      messages: [{ role: "user", content: "Hi" }], maxNewTokens: 2 });
    answer.then(() => settled.push("generate"), () => settled.push("generate failed"));
    const shutdown = await client.shutdown({ drain: true, timeoutMs: 120_000 });
    settled.push("shutdown");

    assert.deepEqual(settled, ["train", "generate", "shutdown"]);
    assert.deepEqual(shutdown, { ok: true, cancelledJobs: [] });
    const result = await job.result;
    assert.equal(result.status, "completed");
    assert.equal(result.metrics.steps, 8);
    assert.ok(existsSync(join(outputPath, "adapter_model.safetensors")));
    assert.equal((await answer).adapterPath, outputPath);

    await assert.rejects(client.train({ baseModel: model, dataset: { examples: chatExamples(2) }, maxSteps: 1,
      outputPath: join(out, "late") }), (err: unknown) => err instanceof SidecarError && err.code === ErrorCodes.ShuttingDown);
    const info = await client.dispose();
    assert.equal(info?.code, 0, client.stderrTail());
  });
});
