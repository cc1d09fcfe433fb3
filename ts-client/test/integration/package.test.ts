/**
 * The adapter package a freshly trained adapter directory holds, read the way the application reads it
 * (its AdapterPackage: readManifest = JSON.parse of manifest.json, calculateContentHash = "sha256:" + the
 * hex sha256 of adapter_model.safetensors, toGenomeLayerEntity), through the drop-in LoRATrainer.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cpSync, readFileSync, writeFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";

import { LoRATrainer, type AdapterPackageManifest, type LoRATrainingResult, type TrainingMetricsFile } from "../../src/trainer.js";
import { chatExamples, requireEnvironment, tempDir, tinyModel } from "./helpers.js";

// --- a reader mirroring the application's adapter package parsing ------------------------------

async function readManifest(adapterPath: string): Promise<AdapterPackageManifest> {
  return JSON.parse(await readFile(join(adapterPath, "manifest.json"), "utf-8")) as AdapterPackageManifest;
}

function hashFile(path: string): string {
  return `sha256:${createHash("sha256").update(readFileSync(path)).digest("hex")}`;
}

function calculateContentHash(adapterPath: string): string {
  return hashFile(join(adapterPath, "adapter_model.safetensors"));
}

/** What the application's toGenomeLayerEntity takes from a manifest (it calls personaName.toLowerCase()). */
function toGenomeLayer(manifest: AdapterPackageManifest, adapterPath: string) {
  const createdAt = new Date(manifest.createdAt);
  return {
    id: manifest.id,
    name: manifest.name,
    description: `LoRA adapter for ${manifest.personaName} (${manifest.traitType}), base model: ${manifest.baseModel}`,
    traitType: manifest.traitType,
    source: manifest.source,
    modelPath: adapterPath,
    sizeMB: manifest.sizeMB,
    rank: manifest.rank,
    creatorId: manifest.personaId,
    trainingMetadata: manifest.trainingMetadata,
    quantization: manifest.quantization,
    contentHash: manifest.contentHash,
    tags: [manifest.traitType, manifest.baseModel, manifest.personaName.toLowerCase()],
    createdAt,
  };
}

// -----------------------------------------------------------------------------------------------

describe("the adapter package of a freshly trained adapter", () => {
  let trainer: LoRATrainer;
  let out: string;
  let result: LoRATrainingResult;

  before(async () => {
    requireEnvironment();
    const model = tinyModel();
    out = tempDir("package");
    trainer = new LoRATrainer({ defaults: { baseModel: model, maxSteps: 2, maxSeqLength: 64, progressInterval: 0 } });
    result = await trainer.trainLoRA({
      personaId: "6f1c2b1e-6d3a-4c55-9a51-0d7f3b1f4e21",
      personaName: "Helper",
      traitType: "tone",
      baseModel: model,
      dataset: { examples: chatExamples(6).map((e) => ({ messages: e.messages!.map((m) => ({ role: m.role, content: m.content! })) })) },
      rank: 4,
      alpha: 8,
      batchSize: 2,
      learningRate: 1e-3,
      outputPath: join(out, "adapter"),
    });
  });

  after(async () => {
    await trainer.dispose();
  });

  it("is read as the application reads it: id, name, source, sizeMB and contentHash defined and right", async () => {
    assert.equal(result.success, true, result.error);
    const dir = result.modelPath!;
    const manifest = await readManifest(dir);
    for (const key of ["id", "name", "source", "sizeMB", "contentHash"] as const) {
      assert.notEqual(manifest[key], undefined, key);
      assert.notEqual(manifest[key], null, key);
    }
    assert.match(manifest.id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    assert.equal(manifest.contentHash, calculateContentHash(dir));
    assert.equal(manifest.name, "helper-tone");
    assert.equal(manifest.source, "trained");
    assert.equal(manifest.version, 1);
    assert.ok(manifest.sizeMB > 0);

    const layer = toGenomeLayer(manifest, dir);
    assert.ok(!Number.isNaN(layer.createdAt.getTime()), manifest.createdAt);
    assert.deepEqual(layer.tags, ["tone", manifest.baseModel, "helper"]);
    assert.equal(layer.creatorId, "6f1c2b1e-6d3a-4c55-9a51-0d7f3b1f4e21");
  });

  it("LoRATrainer returns that manifest, its id as modelId, and the metrics file agrees", async () => {
    const dir = result.modelPath!;
    assert.deepEqual(result.manifest, await readManifest(dir));
    assert.equal(result.modelId, result.manifest!.id);
    assert.equal(result.manifestPath, join(dir, "manifest.json"));
    assert.equal(result.trainingManifestPath, join(dir, "training_manifest.json"));
    const metrics = JSON.parse(readFileSync(join(dir, "training_metrics.json"), "utf8")) as TrainingMetricsFile;
    const history = result.manifest!.trainingMetadata.lossHistory!;
    assert.equal(history.length, result.metrics!.steps);
    assert.deepEqual(metrics.lossHistory, history);
    assert.equal(metrics.finalLoss, result.metrics!.finalLoss);
    assert.equal(metrics.examplesProcessed, result.metrics!.examplesProcessed);
  });

  it("a tampered weights file fails the same content-hash check (planted error)", async () => {
    const copy = join(out, "tampered");
    cpSync(result.modelPath!, copy, { recursive: true });
    const manifest = await readManifest(copy);
    assert.equal(manifest.contentHash, calculateContentHash(copy));
    const weights = join(copy, "adapter_model.safetensors");
    const bytes = readFileSync(weights);
    bytes[bytes.length - 1] = bytes[bytes.length - 1]! ^ 0x01;
    writeFileSync(weights, bytes);
    assert.notEqual(manifest.contentHash, calculateContentHash(copy));
  });
});
