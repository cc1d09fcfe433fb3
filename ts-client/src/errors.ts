/**
 * Every way a call can fail, as classes a caller can `instanceof`:
 *
 * - `SidecarError`: the sidecar answered with a JSON-RPC error (`code`, `message`, `data`).
 *   `SidecarCancelledError` is the one for code -32800 (and for a caller's AbortSignal).
 * - `SidecarExitedError`: the process died (or could not start) while the call was pending.
 *   `SidecarNotBootstrappedError` is the one for the wrapper's "not bootstrapped" exit.
 * - `SidecarTimeoutError`: no answer (and, for `train`, no progress) within `timeoutMs`.
 * - `SidecarDisposedError`: the client was disposed.
 */

/** JSON-RPC codes the sidecar uses (sidecar/errors.py). */
export const ErrorCodes = {
  ParseError: -32700,
  InvalidRequest: -32600,
  MethodNotFound: -32601,
  InvalidParams: -32602,
  InternalError: -32603,
  RequestCancelled: -32800,
  DatasetInvalid: -32010,
  ModelNotFound: -32011,
  ModelLoadFailed: -32012,
  OutOfMemory: -32013,
  QueueFull: -32014,
  ShuttingDown: -32015,
  Unsupported: -32016,
  TrainingFailed: -32017,
  AdapterNotFound: -32018,
  OutputExists: -32019,
  DuplicateJob: -32020,
  PathError: -32040,
  ExportRefused: -32030,
  ExportFailed: -32031,
  AdapterBaseMismatch: -32021,
  AdapterIdInUse: -32022,
  AdapterBudgetFull: -32023,
  AdapterUnsupported: -32024,
  AdapterInvalid: -32025,
  ComposeInvalid: -32026,
  CheckpointNotFound: -32035,
  ResumeMismatch: -32036,
  CheckpointInvalid: -32037,
  AdapterMismatch: -32038,
  WorkerDied: -32045,
  WorkerStartFailed: -32046,
  JobNotFound: -32050,
  JobNotActive: -32051,
  BackgroundProcessDied: -32052,
  MemoryInsufficient: -32055,
  ModelInUse: -32056,
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** The wrapper's exit status and message when the Python environment is missing. */
export const NOT_BOOTSTRAPPED_EXIT_CODE = 3;
export const NOT_BOOTSTRAPPED_MESSAGE = "Training environment not bootstrapped. Run: bash bootstrap/bootstrap.sh";

/** An error object sent by the sidecar. */
export class SidecarError extends Error {
  override name = "SidecarError";
  constructor(
    readonly code: number,
    message: string,
    readonly data?: Record<string, unknown>,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  /** The field path for -32602 (`"$.rank"`), when the sidecar named one. */
  get field(): string | undefined {
    const f = this.data?.["field"];
    return typeof f === "string" ? f : undefined;
  }

  /** Build the most specific class for a JSON-RPC error object. */
  static fromResponse(error: { code: number; message: string; data?: unknown }): SidecarError {
    const data = isRecord(error.data) ? error.data : error.data === undefined || error.data === null ? undefined : { value: error.data };
    if (error.code === ErrorCodes.RequestCancelled) return new SidecarCancelledError(error.message, data);
    return new SidecarError(error.code, error.message, data);
  }
}

/**
 * The request was cancelled: by the caller's AbortSignal (`data.reason` is set, the rejection is
 * immediate) or on the sidecar (its -32800 answer, `data: {jobId, stepsCompleted}`).
 */
export class SidecarCancelledError extends SidecarError {
  override name = "SidecarCancelledError";
  constructor(message: string, data?: Record<string, unknown>, options?: { cause?: unknown }) {
    super(ErrorCodes.RequestCancelled, message, data, options);
  }
  get jobId(): string | undefined {
    const v = this.data?.["jobId"];
    return typeof v === "string" ? v : undefined;
  }
}

export interface ExitInfo {
  /** Exit status, or null when killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  /** Last bytes of stderr (bounded), for the message and for logs. */
  stderrTail: string;
  /** Set when the process could not be started at all (e.g. ENOENT). */
  spawnError?: Error;
}

/** The sidecar process exited, was killed, or never started while this call was pending. */
export class SidecarExitedError extends Error {
  override name = "SidecarExitedError";
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stderrTail: string;
  constructor(info: ExitInfo, message?: string) {
    super(message ?? describeExit(info), info.spawnError ? { cause: info.spawnError } : undefined);
    this.code = info.code;
    this.signal = info.signal;
    this.stderrTail = info.stderrTail;
  }

  static from(info: ExitInfo): SidecarExitedError {
    if (isNotBootstrapped(info)) return new SidecarNotBootstrappedError(info);
    return new SidecarExitedError(info);
  }
}

/** The wrapper found no bootstrapped Python environment (exit status 3). */
export class SidecarNotBootstrappedError extends SidecarExitedError {
  override name = "SidecarNotBootstrappedError";
  constructor(info: ExitInfo) {
    const detail = info.stderrTail.trim().split("\n").filter((l) => !l.includes(NOT_BOOTSTRAPPED_MESSAGE)).join("\n");
    super(info, detail ? `${NOT_BOOTSTRAPPED_MESSAGE}\n${detail}` : NOT_BOOTSTRAPPED_MESSAGE);
  }
}

export class SidecarTimeoutError extends Error {
  override name = "SidecarTimeoutError";
  constructor(
    readonly method: string,
    readonly timeoutMs: number,
    readonly jobId?: string,
  ) {
    super(`Sidecar request '${method}'${jobId ? ` (job ${jobId})` : ""} timed out after ${timeoutMs} ms without an answer${method === "train" ? " or progress" : ""}`);
  }
}

export class SidecarDisposedError extends Error {
  override name = "SidecarDisposedError";
  constructor() {
    super("SidecarClient has been disposed");
  }
}

export function isNotBootstrapped(info: Pick<ExitInfo, "code" | "stderrTail">): boolean {
  return info.code === NOT_BOOTSTRAPPED_EXIT_CODE && info.stderrTail.includes("not bootstrapped");
}

function describeExit(info: ExitInfo): string {
  if (info.spawnError) return `Sidecar could not be started: ${info.spawnError.message}`;
  const how = info.signal ? `was killed by ${info.signal}` : `exited with code ${info.code}`;
  const tail = info.stderrTail.trim();
  return `Sidecar process ${how}${tail ? `; stderr tail:\n${lastLines(tail, 20)}` : ""}`;
}

function lastLines(s: string, n: number): string {
  const lines = s.split("\n");
  return lines.slice(-n).join("\n");
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}
