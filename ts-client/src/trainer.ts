/**
 * LoRATrainer: the drop-in adapter with the interface the application already calls
 * (`supportsFineTuning()`, `getFineTuningCapabilities()`, `trainLoRA()`), backed by one warm
 * sidecar that serves every call.
 *
 * Contract kept from the old Python-per-job adapter: `trainLoRA` never throws — every failure is
 * `{success: false, error}` with readable text. What changed: the dataset goes inline over the
 * protocol (no temp files), metrics come from the trainer (no log scraping), and calls can be
 * cancelled and timed out.
 */

import { spawnSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";

import { SidecarClient, type SidecarClientOptions, type TrainOptions } from "./client.js";
import { findRepoRoot, resolveEnvironment, wrapperPath } from "./env.js";
import {
  NOT_BOOTSTRAPPED_MESSAGE,
  SidecarError,
  SidecarExitedError,
  SidecarNotBootstrappedError,
  isNotBootstrapped,
} from "./errors.js";
import { ReadBuffer, serializeMessage } from "./framing.js";
import type { Dataset, Example, Message, Progress, SupportsResult, TrainParams, TrainResult } from "./wire.js";

// ---------------------------------------------------------------------------------------------
// The application's types (structurally compatible with its FineTuningTypes)
// ---------------------------------------------------------------------------------------------

export interface TrainingMessage {
  role: "system" | "user" | "assistant" | (string & {});
  content: string;
}

export interface TrainingExample {
  messages: TrainingMessage[];
  metadata?: Record<string, unknown>;
}

export interface TrainingDataset {
  examples: TrainingExample[];
  metadata?: Record<string, unknown>;
}

export interface LoRATrainingRequest {
  personaId?: string;
  personaName?: string;
  traitType?: string;
  /** A model name the sidecar resolves ("default" = the embedded SmolLM2-135M), a directory or a .gguf. */
  baseModel: string;
  dataset: TrainingDataset;
  rank?: number;
  alpha?: number;
  epochs?: number;
  learningRate?: number;
  batchSize?: number;
  quantize?: boolean;
  quantizeBits?: 4 | 8;
  outputPath?: string;
  validationDataset?: TrainingDataset;
  /** Any other sidecar `train` parameter (maxSteps, maxSeqLength, device, ...); applied last. */
  trainParams?: Partial<TrainParams>;
}

export interface LoRATrainingMetrics {
  trainLoss: number;
  finalLoss: number;
  validationLoss?: number;
  epochs: number;
  /** Milliseconds. */
  trainingTime: number;
  examplesProcessed: number;
  steps?: number;
  tokensPerSecond?: number;
}

/** QLoRA metadata of an adapter package (`quantization_info.json`, `manifest.quantization`). */
export interface QuantizationInfo {
  /** Whether the base model really was quantized during training (false where QLoRA was unavailable). */
  enabled: boolean;
  bits: 4 | 8;
  type: "nf4" | "int4" | "int8" | "fp8";
  doubleQuant: boolean;
  /** The compute dtype used ("float32" when the base was not quantized on CPU). */
  computeDtype: "bfloat16" | "float16" | (string & {});
}

/** `manifest.trainingMetadata` of an adapter package (the application's TrainingMetadata). */
export interface AdapterTrainingMetadata {
  /** Epochs the run covered (fractional with maxSteps); 0 for a composed adapter. */
  epochs: number;
  /** Loss of the last optimizer step; null for a composed adapter. */
  loss: number | null;
  performance?: number;
  /** Milliseconds of training (of composing, for a composed adapter). */
  trainingDuration: number;
  /** "sha256:" + the sha256 of the training examples. */
  datasetHash?: string;
  /** The loss of every optimizer step, in order. */
  lossHistory?: number[];
  /** Examples the trainer went through, repeats over epochs counted. */
  examplesProcessed?: number;
}

/** The application's adapter package manifest: `manifest.json` in every adapter directory. */
export interface AdapterPackageManifest {
  /** A UUID, new for every adapter. */
  id: string;
  /** "{persona slug}-{traitType}" (the output folder's name, or the request's name, without them). */
  name: string;
  traitType: string;
  source: "trained" | "refined" | "composed" | "downloaded" | "inherited" | "system";
  baseModel: string;
  rank: number;
  /** Bytes of the adapter directory (manifest.json excluded) in MiB, 2 decimals. */
  sizeMB: number;
  personaId: string;
  personaName: string;
  trainingMetadata: AdapterTrainingMetadata;
  /** "sha256:" + the hex sha256 of adapter_model.safetensors. */
  contentHash?: string;
  /** ISO 8601. */
  createdAt: string;
  version: number;
  quantization?: QuantizationInfo;
}

/** `training_metrics.json` in every adapter directory. */
export interface TrainingMetricsFile {
  finalLoss: number | null;
  lossHistory: number[];
  /** Seconds. */
  trainRuntime: number;
  examplesProcessed: number;
}

export const PACKAGE_MANIFEST_FILE = "manifest.json";

export interface LoRATrainingResult {
  success: boolean;
  /** The adapter directory (adapter_config.json, adapter_model.safetensors, manifest.json, ...). */
  modelPath?: string;
  /** The adapter package's id (`manifest.id`, a UUID). */
  modelId?: string;
  trainedModelName?: string;
  metrics?: LoRATrainingMetrics;
  /** The adapter package manifest (parsed from `manifestPath`, the directory's `manifest.json`). */
  manifest?: AdapterPackageManifest;
  /** `<modelPath>/manifest.json`. */
  manifestPath?: string;
  /** `<modelPath>/training_manifest.json`: the sidecar's full record of the job. */
  trainingManifestPath?: string;
  jobId?: string;
  warnings?: string[];
  error?: string;
  errorDetails?: { name: string; code?: number | null; data?: Record<string, unknown>; signal?: string | null };
}

export type FineTuningStrategy = "local-llama-cpp" | "local-pytorch" | "remote-api";

export interface FineTuningCapabilities {
  supportsFineTuning: boolean;
  strategy: FineTuningStrategy;
  /** Why fine-tuning is unsupported, when it is. */
  reason?: string;
  supportedBaseModels?: string[];
  minRank?: number;
  maxRank?: number;
  defaultRank?: number;
  minAlpha?: number;
  defaultAlpha?: number;
  minEpochs?: number;
  maxEpochs?: number;
  defaultEpochs?: number;
  minLearningRate?: number;
  maxLearningRate?: number;
  defaultLearningRate?: number;
  minBatchSize?: number;
  maxBatchSize?: number;
  defaultBatchSize?: number;
  requiresGPU?: boolean;
  requiresInternet?: boolean;
  costPerExample?: number;
  /** The sidecar's full `supports` answer. */
  sidecar?: SupportsResult;
}

export interface LoRATrainerOptions extends SidecarClientOptions {
  /** Sidecar `train` parameters applied under every request (e.g. `{maxSteps: 50}`). */
  defaults?: Partial<TrainParams>;
  /** Idle timeout of a training call (reset by every progress notification). Default: none. */
  trainTimeoutMs?: number;
  /** `supports` probe limit, including the sidecar's start. Default 120000. */
  probeTimeoutMs?: number;
}

export interface TrainLoRAOptions extends Pick<TrainOptions, "signal" | "timeoutMs"> {
  onProgress?: (progress: Progress) => void;
}

type Probe = { supports: SupportsResult } | { supports?: undefined; reason: string };

export class LoRATrainer {
  readonly providerId = "lora-sidecar";
  private readonly options: LoRATrainerOptions;
  private client: SidecarClient | undefined;
  private probe: Probe | undefined;

  constructor(options: LoRATrainerOptions = {}) {
    this.options = options;
  }

  /** The warm sidecar client (created on first use, restarted after a crash). */
  get sidecar(): SidecarClient {
    this.client ??= new SidecarClient({ autoRestart: true, ...this.options });
    return this.client;
  }

  /**
   * Start the warm sidecar and ask it `supports` (the answer is cached). Call at application
   * start so the synchronous `supportsFineTuning()` never has to probe on its own. Never throws.
   */
  async initialize({ refresh = false } = {}): Promise<FineTuningCapabilities> {
    if (refresh || !this.probe) this.probe = await this.probeAsync();
    return this.capabilitiesFrom(this.probe);
  }

  /**
   * True only when the environment is bootstrapped and the sidecar's `supports` says so.
   * Synchronous, as callers expect; cached. Without a prior `initialize()` the first call checks
   * the environment on disk and, if bootstrapped, runs one short-lived sidecar synchronously
   * (a few seconds) to ask `supports`.
   */
  supportsFineTuning(): boolean {
    return this.capabilitiesFrom(this.probeSyncCached()).supportsFineTuning;
  }

  getFineTuningCapabilities(): FineTuningCapabilities {
    return this.capabilitiesFrom(this.probeSyncCached());
  }

  getFineTuningStrategy(): FineTuningStrategy {
    return "local-pytorch";
  }

  /** Local training costs nothing per example. */
  estimateTrainingCost(_exampleCount: number): number {
    return 0;
  }

  /** Train an adapter. Never throws: failures are `{success: false, error}`. */
  async trainLoRA(request: LoRATrainingRequest, options: TrainLoRAOptions = {}): Promise<LoRATrainingResult> {
    let params: TrainParams;
    try {
      params = this.toTrainParams(request);
    } catch (err) {
      return failure(err);
    }
    let result: TrainResult;
    try {
      result = await this.sidecar.train(params, {
        onProgress: options.onProgress,
        signal: options.signal,
        timeoutMs: options.timeoutMs ?? this.options.trainTimeoutMs,
      });
    } catch (err) {
      return failure(err);
    }
    const warnings = [...result.warnings];
    const manifestPath = join(result.adapterPath, PACKAGE_MANIFEST_FILE);
    let manifest: AdapterPackageManifest | undefined;
    try {
      manifest = JSON.parse(await readFile(manifestPath, "utf8")) as AdapterPackageManifest;
    } catch (err) {
      warnings.push(`Could not read the adapter package manifest ${manifestPath}: ${(err as Error).message}`);
    }
    const m = result.metrics;
    return {
      success: true,
      modelPath: result.adapterPath,
      ...(manifest ? { modelId: manifest.id } : {}),
      manifest,
      manifestPath,
      trainingManifestPath: result.manifestPath,
      jobId: result.jobId,
      warnings,
      metrics: {
        trainLoss: m.trainLoss,
        finalLoss: m.finalLoss,
        ...(m.validationLoss !== null && m.validationLoss !== undefined ? { validationLoss: m.validationLoss } : {}),
        epochs: m.epochs,
        trainingTime: m.trainingTime,
        examplesProcessed: m.examplesProcessed,
        steps: m.steps,
        tokensPerSecond: m.tokensPerSecond,
      },
    };
  }

  /** Stop the warm sidecar gracefully. */
  async dispose(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    await client?.dispose();
  }

  // -------------------------------------------------------------------------------------------

  private toTrainParams(r: LoRATrainingRequest): TrainParams {
    if (!r.dataset || !Array.isArray(r.dataset.examples)) throw new Error("LoRATrainingRequest.dataset.examples must be an array");
    // Only known fields are sent: the sidecar rejects unknown ones, and application objects
    // carry extras (timestamps, ids) that are not training parameters.
    const fromRequest: Partial<TrainParams> = {
      baseModel: r.baseModel,
      dataset: toWireDataset(r.dataset),
      validationDataset: r.validationDataset ? toWireDataset(r.validationDataset) : undefined,
      rank: r.rank,
      alpha: r.alpha,
      epochs: r.epochs,
      learningRate: r.learningRate,
      batchSize: r.batchSize,
      quantize: r.quantize,
      quantizeBits: r.quantizeBits,
      outputPath: r.outputPath,
      personaId: r.personaId,
      personaName: r.personaName,
      traitType: r.traitType,
    };
    return { ...this.options.defaults, ...dropUndefined(fromRequest), ...r.trainParams };
  }

  private capabilitiesFrom(probe: Probe): FineTuningCapabilities {
    if (!probe.supports) return { supportsFineTuning: false, strategy: "local-pytorch", reason: probe.reason };
    const s = probe.supports;
    const modelOk = s.model ? s.model.resolvable : true;
    const supported = s.supportsFineTuning && modelOk;
    return {
      supportsFineTuning: supported,
      strategy: "local-pytorch",
      ...(supported ? {} : { reason: s.reason ?? s.model?.error ?? "The sidecar reports no fine-tuning support" }),
      // Any model the sidecar can resolve (names, directories, .gguf files) is accepted.
      supportedBaseModels: undefined,
      minRank: 1,
      maxRank: s.limits.maxRank,
      defaultRank: s.defaults.rank,
      defaultAlpha: s.defaults.alpha,
      minEpochs: 1,
      maxEpochs: 1000,
      defaultEpochs: s.defaults.epochs,
      maxLearningRate: 1,
      defaultLearningRate: s.defaults.learningRate,
      minBatchSize: 1,
      maxBatchSize: 4096,
      defaultBatchSize: s.defaults.batchSize,
      requiresGPU: false,
      requiresInternet: false,
      costPerExample: 0,
      sidecar: s,
    };
  }

  private probeBaseModel(): string | undefined {
    return this.options.defaults?.baseModel;
  }

  private async probeAsync(): Promise<Probe> {
    try {
      const baseModel = this.probeBaseModel();
      const supports = await this.sidecar.supports(baseModel ? { baseModel } : {}, {
        timeoutMs: this.options.probeTimeoutMs ?? 120_000,
      });
      return { supports };
    } catch (err) {
      return { reason: errorText(err) };
    }
  }

  private probeSyncCached(): Probe {
    this.probe ??= this.probeSync();
    return this.probe;
  }

  /** One short-lived sidecar, run synchronously: supports → shutdown → exit. */
  private probeSync(): Probe {
    const o = this.options;
    let root: string;
    try {
      root = o.repoRoot ?? findRepoRoot();
    } catch (err) {
      if (o.command === undefined) return { reason: errorText(err) };
      root = o.cwd ?? process.cwd();
    }
    const env = o.replaceEnv ? (o.env ?? {}) : { ...process.env, ...o.env };
    // A custom command may find its Python elsewhere; only the wrapper's rules can be checked here.
    if (o.command === undefined && !resolveEnvironment(root, env).bootstrapped) return { reason: NOT_BOOTSTRAPPED_MESSAGE };
    const baseModel = this.probeBaseModel();
    const input =
      serializeMessage({ jsonrpc: "2.0", id: 1, method: "supports", params: baseModel ? { baseModel } : {} }) +
      serializeMessage({ jsonrpc: "2.0", id: 2, method: "shutdown", params: {} }) +
      serializeMessage({ jsonrpc: "2.0", method: "exit" });
    const run = spawnSync(o.command ?? wrapperPath(root), o.args ?? ["-m", "sidecar"], {
      cwd: o.cwd ?? root,
      env,
      input,
      timeout: o.probeTimeoutMs ?? 120_000,
      killSignal: "SIGKILL",
      maxBuffer: 64 * 1024 * 1024,
    });
    const stderr = run.stderr?.toString("utf8") ?? "";
    if (run.error && !run.stdout?.length) return { reason: `Sidecar probe failed: ${run.error.message}` };
    if (isNotBootstrapped({ code: run.status, stderrTail: stderr })) return { reason: NOT_BOOTSTRAPPED_MESSAGE };
    const buffer = new ReadBuffer();
    buffer.append(run.stdout ?? Buffer.alloc(0));
    buffer.append(Buffer.from("\n"));
    for (;;) {
      let message: unknown;
      try {
        message = buffer.readMessage();
      } catch {
        continue;
      }
      if (message === undefined) break;
      const m = message as { id?: unknown; result?: SupportsResult; error?: { message?: string } };
      if (m.id !== 1) continue;
      if (m.result) return { supports: m.result };
      return { reason: `Sidecar supports failed: ${m.error?.message ?? "unknown error"}` };
    }
    const how = run.signal ? `was killed by ${run.signal}` : `exited with code ${run.status}`;
    return { reason: `Sidecar ${how} before answering supports${stderr.trim() ? `: ${stderr.trim().split("\n").slice(-5).join("\n")}` : ""}` };
  }
}

function toWireDataset(d: TrainingDataset): Dataset {
  return dropUndefined({
    examples: d.examples.map(
      (e): Example =>
        dropUndefined({
          messages: e.messages?.map((m): Message => ({ role: m.role, content: m.content })),
          // Plain-text formats the sidecar also accepts, for callers that have them.
          prompt: (e as { prompt?: string }).prompt,
          completion: (e as { completion?: string }).completion,
          text: (e as { text?: string }).text,
          metadata: e.metadata,
        }),
    ),
    metadata: d.metadata,
  });
}

function dropUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

function errorText(err: unknown): string {
  if (err instanceof SidecarNotBootstrappedError) return err.message;
  if (err instanceof Error) return err.message;
  return String(err);
}

function failure(err: unknown): LoRATrainingResult {
  const details: NonNullable<LoRATrainingResult["errorDetails"]> = { name: err instanceof Error ? err.name : "Error" };
  if (err instanceof SidecarError) {
    details.code = err.code;
    if (err.data) details.data = err.data;
  } else if (err instanceof SidecarExitedError) {
    details.code = err.code;
    details.signal = err.signal;
  }
  return { success: false, error: errorText(err), errorDetails: details };
}
