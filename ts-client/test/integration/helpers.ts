/** Shared set-up for the tests that run the real sidecar. */

import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { findRepoRoot, resolveEnvironment, wrapperPath } from "../../src/env.js";
import type { Example } from "../../src/wire.js";

export const repoRoot = findRepoRoot();

/**
 * The Python environment, found exactly as the wrapper finds it (LORA_SIDECAR_ENV, else the
 * bootstrapped default). Missing → the test fails with the fix, never skips silently.
 */
export function requireEnvironment(): string {
  const env = resolveEnvironment(repoRoot);
  if (!env.bootstrapped) {
    throw new Error(`No bootstrapped environment at ${env.dir}. Run: bash bootstrap/bootstrap.sh --dev (or set LORA_SIDECAR_ENV)`);
  }
  return env.dir;
}

/**
 * A tiny random Llama with the real tokenizer (sidecar.testing), built once per machine and
 * reused by every test file and run; built in a temp dir and renamed so concurrent files never
 * see a half-written model.
 */
export function tinyModel(): string {
  requireEnvironment();
  // Keyed by the builder's source, so a changed tiny model is rebuilt rather than reused.
  const key = createHash("sha256").update(readFileSync(join(repoRoot, "sidecar", "testing.py"))).digest("hex").slice(0, 12);
  const dir = join(tmpdir(), `lora-sidecar-ts-client-tiny-model-${key}`);
  if (existsSync(join(dir, "config.json")) && existsSync(join(dir, "model.safetensors"))) return dir;
  const staging = mkdtempSync(join(tmpdir(), "tiny-model-build-"));
  execFileSync(wrapperPath(repoRoot), ["-m", "sidecar.testing", "tiny-model", staging], { cwd: repoRoot, stdio: ["ignore", "ignore", "pipe"] });
  try {
    renameSync(staging, dir);
  } catch {
    // Another test file finished first; its model is identical (seeded).
    rmSync(staging, { recursive: true, force: true });
  }
  return dir;
}

export function tempDir(prefix: string): string {
  return mkdtempSync(join(tmpdir(), `lora-sidecar-ts-${prefix}-`));
}

export function chatExamples(n: number): Example[] {
  return Array.from({ length: n }, (_, i) => ({
    messages: [
      { role: "user", content: `What is ${i} plus one?` },
      { role: "assistant", content: `${i} plus one is ${i + 1}.` },
    ],
  }));
}

/** The order phases may appear in; a job never goes back. */
export const PHASE_ORDER = ["queued", "loading", "preparing", "training", "evaluating", "saving", "completed", "failed", "cancelled"];
