/**
 * SidecarClient: the JSON-RPC layer over one supervised sidecar process.
 *
 * Pending requests live in a map keyed by id. Each may carry a timeout (reset by the job's
 * progress for `train`) and an AbortSignal (cancels the job on the sidecar, rejects at once).
 * When the process dies every pending call rejects at once with SidecarExitedError.
 */

import { randomUUID } from "node:crypto";
import { EventEmitter } from "node:events";

import { findRepoRoot, wrapperPath } from "./env.js";
import {
  SidecarCancelledError,
  SidecarDisposedError,
  SidecarError,
  SidecarExitedError,
  SidecarTimeoutError,
  type ExitInfo,
} from "./errors.js";
import { StdioTransport } from "./transport.js";
import type {
  AdaptersComposeParams,
  AdaptersComposeResult,
  AdaptersListResult,
  AdaptersLoadParams,
  AdaptersLoadResult,
  AdaptersUnloadResult,
  CancelResult,
  EstimateResult,
  ExportParams,
  ExportResult,
  GenerateParams,
  GenerateResult,
  JobInfo,
  Methods,
  ModelsUnloadResult,
  PauseResult,
  Progress,
  ResumeResult,
  ShutdownResult,
  StatusResult,
  SupportsParams,
  SupportsResult,
  TrainParams,
  TrainResult,
} from "./wire.js";

export interface Logger {
  debug?(message: string): void;
  warn?(message: string, error?: unknown): void;
}

export interface SidecarClientOptions {
  /** Repository holding bootstrap/train-wrapper.sh. Default: found above this package, then the cwd. */
  repoRoot?: string;
  /** Program to run. Default: `<repoRoot>/bootstrap/train-wrapper.sh`. */
  command?: string;
  /** Default: `["-m", "sidecar"]`. */
  args?: readonly string[];
  /** Default: the repository root. */
  cwd?: string;
  /** Variables added to (and overriding) `process.env` for the child. */
  env?: NodeJS.ProcessEnv;
  /** Replace the child's environment instead of extending `process.env`. Default false. */
  replaceEnv?: boolean;
  /** After the process died, start a new one for the next call. Default false. */
  autoRestart?: boolean;
  /** Timeout for calls that do not pass `timeoutMs`. Default: none. */
  defaultTimeoutMs?: number;
  /** Cap on one incoming message. Default 64 MiB (the sidecar's own limit). */
  maxMessageBytes?: number;
  /** Bytes of stderr kept for SidecarExitedError and `stderrTail()`. Default 64 KiB. */
  stderrBufferBytes?: number;
  /** Every stderr line of the sidecar (its logs). stderr is drained whether or not this is set. */
  onStderr?: (line: string) => void;
  logger?: Logger;
  /** Kill the sidecar's process group when this Node process exits. Default true. */
  killOnParentExit?: boolean;
  /**
   * While no call is pending, do not keep the Node event loop alive for the sidecar (it is killed
   * when the parent exits). Default true.
   */
  unrefWhenIdle?: boolean;
  /** dispose(): how long `shutdown` may take before the process is stopped. Default 5000. */
  shutdownTimeoutMs?: number;
  /** dispose(): after `exit` and EOF, how long before SIGTERM. Default 3000. */
  exitTimeoutMs?: number;
  /** dispose(): after SIGTERM, how long before SIGKILL. Default 3000. */
  termTimeoutMs?: number;
}

export interface CallOptions {
  /** Reject with SidecarTimeoutError after this long without an answer. */
  timeoutMs?: number;
  /** Abort: for `train` the job is cancelled on the sidecar; the call rejects with SidecarCancelledError. */
  signal?: AbortSignal;
}

export interface ShutdownOptions extends CallOptions {
  /** Let the jobs sent before the shutdown finish instead of cancelling them (`shutdown {drain: true}`). */
  drain?: boolean;
}

export interface TrainOptions extends CallOptions {
  /** Each progress notification of this job, in order. Exceptions thrown here are logged, not raised. */
  onProgress?: (progress: Progress) => void;
  /**
   * For `train`, an idle timeout: it counts from the latest progress notification (of this job, or
   * of the job it waits behind), not from the start.
   */
  timeoutMs?: number;
}

/** A running `train` call: its id, its result, and its progress as an async iterable. */
export interface TrainJob {
  readonly jobId: string;
  readonly result: Promise<TrainResult>;
  /**
   * Progress notifications of this job, in order, ending when the job ends (whatever the
   * outcome; the outcome is `result`). Buffered from the start, so it may be iterated late. One
   * consumer.
   */
  readonly progress: AsyncIterable<Progress>;
  /** Ask the sidecar to cancel this job; `result` then rejects with SidecarCancelledError. */
  cancel(): Promise<CancelResult>;
}

export interface SidecarClientEvents {
  /** Every progress notification, whichever call it belongs to. */
  progress: [Progress];
  stderr: [string];
  spawn: [number];
  exit: [ExitInfo];
  /** A framing/parse/pipe problem that did not end the connection. */
  protocolError: [Error];
}

interface Pending {
  id: number;
  method: string;
  jobId?: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
  timeoutMs?: number;
  timer?: NodeJS.Timeout;
  onProgress?: (p: Progress) => void;
  queue?: ProgressQueue;
  settle(): void;
}

const DEFAULT_ARGS = ["-m", "sidecar"] as const;
/** Progress items buffered per job for a consumer that iterates late; older ones are dropped. */
const MAX_BUFFERED_PROGRESS = 10_000;

export class SidecarClient extends EventEmitter<SidecarClientEvents> {
  private readonly options: SidecarClientOptions;
  private transport: StdioTransport | undefined;
  private starting: Promise<void> | undefined;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** jobId → pending `train` call, for routing progress. */
  private readonly jobs = new Map<string, Pending>();
  private lastExit: ExitInfo | undefined;
  private everStarted = false;
  private disposing: Promise<ExitInfo | undefined> | undefined;

  constructor(options: SidecarClientOptions = {}) {
    super();
    this.options = options;
  }

  /** Create a client and start its process. */
  static async spawn(options: SidecarClientOptions = {}): Promise<SidecarClient> {
    const client = new SidecarClient(options);
    await client.start();
    return client;
  }

  /** The sidecar's pid while it runs. */
  get pid(): number | undefined {
    return this.transport?.alive ? this.transport.pid : undefined;
  }

  get running(): boolean {
    return this.transport?.alive === true;
  }

  get disposed(): boolean {
    return this.disposing !== undefined;
  }

  /** How the last process ended, if one has. */
  get exitInfo(): ExitInfo | undefined {
    return this.lastExit;
  }

  /** Last bytes of the current (or last) process's stderr. */
  stderrTail(): string {
    return this.transport?.stderrTail() ?? this.lastExit?.stderrTail ?? "";
  }

  /**
   * Start the process (no-op while one runs). Rejects with SidecarExitedError when it cannot be
   * spawned. A wrapper that exits at once (not bootstrapped) is reported by the first call.
   */
  start(): Promise<void> {
    if (this.disposing) return Promise.reject(new SidecarDisposedError());
    if (this.transport?.alive) return Promise.resolve();
    this.starting ??= this.spawnTransport().finally(() => {
      this.starting = undefined;
    });
    return this.starting;
  }

  // ----------------------------------------------------------------------------------------
  // Typed methods
  // ----------------------------------------------------------------------------------------

  supports(params: SupportsParams = {}, options?: CallOptions): Promise<SupportsResult> {
    return this.request("supports", params, options);
  }

  status(options?: CallOptions): Promise<StatusResult> {
    return this.request("status", {}, options);
  }

  cancel(jobId: string, options?: CallOptions): Promise<CancelResult> {
    return this.request("cancel", { jobId }, options);
  }

  /**
   * Pause a train job: a queued one is held in the queue (answers at once), a running one parks at
   * its next micro-batch boundary and answers then (`{state: "paused", step}`), using no CPU until
   * `resume`. `release: true` first checkpoints the last whole step and frees what memory it can.
   * Unknown job: -32050 (`ErrorCodes.JobNotFound`); ended job: -32051 (`ErrorCodes.JobNotActive`).
   */
  pause(jobId: string, opts: { release?: boolean } = {}, options?: CallOptions): Promise<PauseResult> {
    return this.request("pause", { jobId, ...opts }, options);
  }

  /** Continue a paused job where it stopped (`{state: "running" | "queued" | "paused"}`). */
  resume(jobId: string, options?: CallOptions): Promise<ResumeResult> {
    return this.request("resume", { jobId }, options);
  }

  /**
   * The memory a `train` request would take, answered without loading or training: `{baseBytes,
   * loraBytes, optimizerBytes, activationBytesPeak, workspaceBytes, totalBytes, availableBytes, fits,
   * suggestions}`. `train` runs the same estimate at its door and refuses a job that does not fit with
   * -32055 (`ErrorCodes.MemoryInsufficient`, `data.suggestions`: settings that would).
   */
  estimate(params: TrainParams, options?: CallOptions): Promise<EstimateResult> {
    return this.request("estimate", params, options);
  }

  /**
   * Free a warm base model (`models/unload`). Refused with -32056 (`ErrorCodes.ModelInUse`) while a
   * queued or running job needs it, or resident adapters are loaded on it unless `force: true`
   * (which unloads them too).
   */
  unloadModel(baseModel: string, opts: { force?: boolean } = {}, options?: CallOptions): Promise<ModelsUnloadResult> {
    return this.request("models/unload", { baseModel, ...opts }, options);
  }

  generate(params: GenerateParams, options?: CallOptions): Promise<GenerateResult> {
    return this.request("generate", params, options);
  }

  /**
   * Export an adapter (`adapters/export`): `gguf-lora` for llama.cpp / Ollama, `merged` (a
   * transformers checkpoint) or `merged-gguf`. Refusals reject with code -32030
   * (`ErrorCodes.ExportRefused`) and a message saying which format to use instead.
   */
  exportAdapter(params: ExportParams, options?: CallOptions): Promise<ExportResult> {
    return this.request("adapters/export", params, options);
  }

  // --- the adapter genome: resident adapters, stacks, exams, composition ---------------------

  /**
   * Make the adapter at `params.path` resident on its base model (`adapters/load`). Loading the same
   * content again returns the same id; `result.evicted` lists the adapters evicted to make room.
   */
  loadAdapter(params: AdaptersLoadParams, options?: CallOptions): Promise<AdaptersLoadResult> {
    return this.request("adapters/load", params, options);
  }

  /** Drop a resident adapter (`adapters/unload`); rejects with code -32018 for an unknown id. */
  unloadAdapter(id: string, options?: CallOptions): Promise<AdaptersUnloadResult> {
    return this.request("adapters/unload", { id }, options);
  }

  /** Resident adapters, least recently used first, and the budget (`adapters/list`; answers at once). */
  listAdapters(options?: CallOptions): Promise<AdaptersListResult> {
    return this.request("adapters/list", {}, options);
  }

  /** Combine adapters into a new PEFT adapter directory (`adapters/compose`). */
  composeAdapters(params: AdaptersComposeParams, options?: CallOptions): Promise<AdaptersComposeResult> {
    return this.request("adapters/compose", params, options);
  }

  /**
   * Ask the sidecar to stop. By default it cancels its queued and running jobs; with
   * `{ drain: true }` it lets every job sent before the shutdown run to its end (their results
   * settle first) and then answers — set `timeoutMs` to cover those jobs, or leave it unset. New
   * jobs are refused from then on either way. Follow with dispose(), which also sends `exit`.
   */
  shutdown(options: ShutdownOptions = {}): Promise<ShutdownResult> {
    const { drain, ...callOptions } = options;
    return this.request("shutdown", drain === undefined ? {} : { drain }, callOptions);
  }

  /** Train an adapter; resolves when the job completes. */
  train(params: TrainParams, options?: TrainOptions): Promise<TrainResult> {
    return this.startTrain(params, options).result;
  }

  /**
   * Start a `train` call and return its handle at once. `params.jobId` is set to a fresh UUID
   * when absent, so progress and cancel can be correlated before the sidecar answers.
   */
  startTrain(params: TrainParams, options: TrainOptions = {}): TrainJob {
    const jobId = params.jobId ?? randomUUID();
    const queue = new ProgressQueue();
    const result = this.call<TrainResult>("train", { ...params, jobId }, options, { jobId, queue });
    // The caller may only ever look at `progress`; an unobserved rejection must not crash them.
    result.catch(() => undefined);
    return {
      jobId,
      result,
      progress: queue,
      cancel: () => this.cancel(jobId),
    };
  }

  /**
   * After (re)starting the sidecar: resume every train job its journal lists as `interrupted` (the
   * process before it died, was killed or was shut down while the job ran). Each job continues from its
   * last checkpoint with its own stored params — or runs again from step 0 if it had none — under its
   * own id, so the result equals the uninterrupted job's. Returns the started jobs; `filter` picks which.
   * A job cancelled by `cancel` is not interrupted and is not resumed (resume it explicitly with
   * `train({resumeFrom: jobId})`).
   */
  async resumeInterrupted(
    options: TrainOptions & { filter?: (job: JobInfo) => boolean } = {},
  ): Promise<TrainJob[]> {
    const { filter, ...trainOptions } = options;
    const status = await this.status({ timeoutMs: trainOptions.timeoutMs, signal: trainOptions.signal });
    return status.recent
      .filter((job) => job.kind === "train" && job.state === "interrupted" && (filter?.(job) ?? true))
      .map((job) => this.startTrain({ resumeFrom: job.jobId, jobId: job.jobId }, trainOptions));
  }

  /** A typed request by method name. */
  request<M extends keyof Methods>(method: M, params: Methods[M]["params"], options?: CallOptions): Promise<Methods[M]["result"]> {
    return this.call(method, params, options ?? {}, {});
  }

  /** Send a notification (no answer). */
  async notify(method: string, params?: unknown): Promise<void> {
    await this.ensureStarted(false);
    await this.transport!.send(params === undefined ? { jsonrpc: "2.0", method } : { jsonrpc: "2.0", method, params });
  }

  // ----------------------------------------------------------------------------------------
  // Lifecycle
  // ----------------------------------------------------------------------------------------

  /**
   * Stop gracefully: `shutdown` → `exit` and EOF → SIGTERM → SIGKILL, each step with a timeout.
   * Pending calls reject (SidecarCancelledError from the sidecar, or SidecarExitedError).
   * Idempotent; resolves with how the process ended (undefined when none ran).
   */
  dispose(): Promise<ExitInfo | undefined> {
    this.disposing ??= this.doDispose();
    return this.disposing;
  }

  private async doDispose(): Promise<ExitInfo | undefined> {
    if (this.starting) await this.starting.catch(() => undefined);
    const transport = this.transport;
    if (!transport?.alive) return this.lastExit;
    transport.setRef(true);
    const o = this.options;
    try {
      await this.call("shutdown", {}, { timeoutMs: o.shutdownTimeoutMs ?? 5000 }, { internal: true });
    } catch (err) {
      this.options.logger?.warn?.("sidecar did not answer shutdown; stopping it", err);
    }
    if (transport.alive) {
      await transport.send({ jsonrpc: "2.0", method: "exit" }).catch(() => undefined);
    }
    return transport.close({ graceMs: o.exitTimeoutMs ?? 3000, termMs: o.termTimeoutMs ?? 3000 });
  }

  /** Kill the process group now (tests, emergencies). Pending calls reject with SidecarExitedError. */
  kill(signal: NodeJS.Signals = "SIGKILL"): boolean {
    return this.transport?.kill(signal) ?? false;
  }

  // ----------------------------------------------------------------------------------------
  // Internals
  // ----------------------------------------------------------------------------------------

  private async spawnTransport(): Promise<void> {
    const o = this.options;
    let command = o.command;
    let cwd = o.cwd;
    if (command === undefined || cwd === undefined) {
      const root = o.repoRoot ?? findRepoRoot();
      command ??= wrapperPath(root);
      cwd ??= root;
    }
    const transport = new StdioTransport({
      command,
      args: o.args ?? DEFAULT_ARGS,
      cwd,
      env: o.replaceEnv ? o.env : { ...process.env, ...o.env },
      maxMessageBytes: o.maxMessageBytes,
      stderrBufferBytes: o.stderrBufferBytes,
      killOnParentExit: o.killOnParentExit,
    });
    transport.onmessage = (m) => this.onMessage(m);
    transport.onerror = (e) => this.onTransportError(e);
    transport.onstderr = (line) => {
      o.onStderr?.(line);
      if (this.listenerCount("stderr")) this.emit("stderr", line);
    };
    transport.onclose = (info) => this.onClose(transport, info);
    this.transport = transport;
    this.everStarted = true;
    try {
      await transport.start();
    } catch (err) {
      throw SidecarExitedError.from({ code: null, signal: null, stderrTail: transport.stderrTail(), spawnError: err as Error });
    }
    this.updateRef();
    this.emit("spawn", transport.pid!);
  }

  private async ensureStarted(internal: boolean): Promise<void> {
    if (this.disposing && !internal) throw new SidecarDisposedError();
    if (this.starting) return this.starting;
    if (this.transport?.alive) return;
    if (this.everStarted && !this.options.autoRestart && this.lastExit) throw SidecarExitedError.from(this.lastExit);
    return this.start();
  }

  private call<R>(
    method: string,
    params: unknown,
    options: TrainOptions,
    extra: { jobId?: string; queue?: ProgressQueue; internal?: boolean },
  ): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      const { signal, onProgress } = options;
      const timeoutMs = options.timeoutMs ?? this.options.defaultTimeoutMs;
      const { jobId, queue } = extra;
      const id = this.nextId++;
      let done = false;
      let sent = false;

      const onAbort = () => {
        const reason = signal?.reason;
        const err = new SidecarCancelledError(
          jobId ? `Job ${jobId} cancelled by the caller` : `Request '${method}' cancelled by the caller`,
          { jobId, reason: reason instanceof Error ? reason.message : reason === undefined ? undefined : String(reason) },
          { cause: reason },
        );
        if (sent) this.cancelOnSidecar(method, id, jobId);
        entry.reject(err);
      };

      const entry: Pending = {
        id,
        method,
        jobId,
        timeoutMs,
        onProgress,
        queue,
        resolve: (value) => {
          if (done) return;
          entry.settle();
          resolve(value as R);
        },
        reject: (error) => {
          if (done) return;
          entry.settle();
          reject(error);
        },
        settle: () => {
          done = true;
          if (entry.timer) clearTimeout(entry.timer);
          signal?.removeEventListener("abort", onAbort);
          this.pending.delete(id);
          if (jobId && this.jobs.get(jobId) === entry) this.jobs.delete(jobId);
          queue?.end();
          this.updateRef();
        },
      };

      if (signal?.aborted) {
        onAbort();
        return;
      }
      signal?.addEventListener("abort", onAbort, { once: true });
      this.pending.set(id, entry);
      if (jobId) this.jobs.set(jobId, entry);
      this.updateRef();

      this.ensureStarted(extra.internal === true)
        .then(() => {
          if (done) return;
          const transport = this.transport!;
          sent = true;
          // The clock starts when the request is on its way: spawning is not the call's time.
          this.armTimer(entry);
          return transport.send({ jsonrpc: "2.0", id, method, params }).catch((err: Error) => {
            // A write fails when the child is going away; its exit rejects this call with the
            // real cause. Should it somehow stay alive, it cannot be used: stop it.
            this.options.logger?.warn?.(`failed to send '${method}' to the sidecar; stopping it`, err);
            void transport.close({ graceMs: 0, termMs: 1000 });
          });
        })
        .catch((err: Error) => entry.reject(err));
    });
  }

  private armTimer(entry: Pending): void {
    if (entry.timeoutMs === undefined) return;
    if (entry.timer) clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      if (!this.pending.has(entry.id)) return;
      this.cancelOnSidecar(entry.method, entry.id, entry.jobId);
      entry.reject(new SidecarTimeoutError(entry.method, entry.timeoutMs!, entry.jobId));
    }, entry.timeoutMs);
    // The timer must not keep the loop alive by itself; the pending call already does (updateRef).
    entry.timer.unref();
  }

  /** Best effort: the caller has already been answered, so failures here are only logged. */
  private cancelOnSidecar(method: string, id: number, jobId: string | undefined): void {
    if (!this.transport?.alive) return;
    const transport = this.transport;
    if (method === "train" && jobId) {
      const cid = this.nextId++;
      // Sent raw (not through call()) so it works during dispose and never rejects anyone.
      transport
        .send({ jsonrpc: "2.0", id: cid, method: "cancel", params: { jobId } })
        .catch((err) => this.options.logger?.debug?.(`cancel of job ${jobId} not sent: ${String(err)}`));
    } else {
      transport
        .send({ jsonrpc: "2.0", method: "$/cancelRequest", params: { id } })
        .catch((err) => this.options.logger?.debug?.(`$/cancelRequest ${id} not sent: ${String(err)}`));
    }
  }

  private onMessage(message: unknown): void {
    if (typeof message !== "object" || message === null || Array.isArray(message)) {
      this.onTransportError(new Error(`Unexpected message from sidecar: ${JSON.stringify(message)}`));
      return;
    }
    const m = message as { id?: unknown; method?: unknown; params?: unknown; result?: unknown; error?: unknown };
    if (typeof m.method === "string") {
      if (m.method === "progress" && m.id === undefined) this.onProgress(m.params as Progress);
      else this.options.logger?.debug?.(`ignoring '${m.method}' from the sidecar`);
      return;
    }
    if (typeof m.id !== "number") {
      // id null: the sidecar could not parse something we sent.
      if (m.error) this.onTransportError(SidecarError.fromResponse(m.error as { code: number; message: string }));
      return;
    }
    const entry = this.pending.get(m.id);
    if (!entry) {
      // Answers to aborted/timed-out calls and to internal cancels land here.
      this.options.logger?.debug?.(`answer for id ${m.id} with no pending call`);
      return;
    }
    if (m.error !== undefined && m.error !== null) {
      const e = m.error as { code?: unknown; message?: unknown; data?: unknown };
      entry.reject(
        SidecarError.fromResponse({
          code: typeof e.code === "number" ? e.code : -32603,
          message: typeof e.message === "string" ? e.message : "Unknown error",
          data: e.data,
        }),
      );
    } else {
      entry.resolve(m.result);
    }
  }

  private onProgress(progress: Progress): void {
    if (this.listenerCount("progress")) this.emit("progress", progress);
    // Any job's progress shows the sidecar is working, so every pending train call's idle clock
    // restarts: a job queued behind another gets no progress of its own until it starts.
    for (const job of this.jobs.values()) if (job.timer) this.armTimer(job);
    const entry = progress && this.jobs.get(progress.jobId);
    if (!entry) return;
    entry.queue?.push(progress);
    if (entry.onProgress) {
      try {
        entry.onProgress(progress);
      } catch (err) {
        this.options.logger?.warn?.("onProgress callback threw", err);
      }
    }
  }

  private onTransportError(error: Error): void {
    this.options.logger?.warn?.(`sidecar connection: ${error.message}`, error);
    if (this.listenerCount("protocolError")) this.emit("protocolError", error);
  }

  private onClose(transport: StdioTransport, info: ExitInfo): void {
    if (this.transport !== transport) return;
    this.lastExit = info;
    const error = SidecarExitedError.from(info);
    for (const entry of [...this.pending.values()]) entry.reject(error);
    this.emit("exit", info);
  }

  /** Hold the event loop open only while calls are pending (see `unrefWhenIdle`). */
  private updateRef(): void {
    if (this.options.unrefWhenIdle === false || !this.transport?.alive) return;
    this.transport.setRef(this.pending.size > 0 || this.disposing !== undefined);
  }
}

/** Single-consumer async queue of one job's progress. */
class ProgressQueue implements AsyncIterable<Progress> {
  private items: Progress[] = [];
  private waiting: ((r: IteratorResult<Progress>) => void) | undefined;
  private ended = false;

  push(p: Progress): void {
    if (this.ended) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: p, done: false });
      return;
    }
    this.items.push(p);
    if (this.items.length > MAX_BUFFERED_PROGRESS) this.items.shift();
  }

  end(): void {
    this.ended = true;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      w({ value: undefined, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<Progress> {
    return {
      next: () => {
        const item = this.items.shift();
        if (item) return Promise.resolve({ value: item, done: false });
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => {
          this.waiting = resolve;
        });
      },
      return: () => {
        this.items = [];
        this.ended = true;
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
