export { SidecarClient } from "./client.js";
export type { CallOptions, Logger, ShutdownOptions, SidecarClientEvents, SidecarClientOptions, TrainJob, TrainOptions } from "./client.js";
export {
  ErrorCodes,
  NOT_BOOTSTRAPPED_EXIT_CODE,
  NOT_BOOTSTRAPPED_MESSAGE,
  SidecarCancelledError,
  SidecarDisposedError,
  SidecarError,
  SidecarExitedError,
  SidecarNotBootstrappedError,
  SidecarTimeoutError,
} from "./errors.js";
export type { ErrorCode, ExitInfo } from "./errors.js";
export { findRepoRoot, resolveEnvironment, wrapperPath } from "./env.js";
export type { SidecarEnvironment } from "./env.js";
export { DEFAULT_MAX_MESSAGE_BYTES, MessageParseError, MessageTooLargeError, ReadBuffer, serializeMessage } from "./framing.js";
export { StdioTransport } from "./transport.js";
export type { CloseOptions, TransportOptions } from "./transport.js";
export { LoRATrainer, PACKAGE_MANIFEST_FILE } from "./trainer.js";
export type {
  AdapterPackageManifest,
  AdapterTrainingMetadata,
  FineTuningCapabilities,
  FineTuningStrategy,
  LoRATrainerOptions,
  LoRATrainingMetrics,
  LoRATrainingRequest,
  LoRATrainingResult,
  QuantizationInfo,
  TrainLoRAOptions,
  TrainingMetricsFile,
  TrainingDataset,
  TrainingExample,
  TrainingMessage,
} from "./trainer.js";
export type * from "./wire.js";
export { METHOD_NAMES, NOTIFICATION_NAMES } from "./wire.js";
