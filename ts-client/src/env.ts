/**
 * Where the sidecar lives and whether its Python environment is bootstrapped — the same rules as
 * bootstrap/train-wrapper.sh (and sidecar/paths.py), so a check here agrees with the wrapper.
 */

import { accessSync, constants, existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const WRAPPER_RELATIVE_PATH = join("bootstrap", "train-wrapper.sh");

/**
 * The repository root: the nearest directory at or above `start` (default: this package's
 * location, then the working directory) that holds bootstrap/train-wrapper.sh.
 */
export function findRepoRoot(start?: string): string {
  const starts = start ? [start] : [dirname(fileURLToPath(import.meta.url)), process.cwd()];
  for (const s of starts) {
    let dir = resolve(s);
    for (;;) {
      if (existsSync(join(dir, WRAPPER_RELATIVE_PATH))) return dir;
      const parent = dirname(dir);
      if (parent === dir) break;
      dir = parent;
    }
  }
  throw new Error(
    `Cannot find ${WRAPPER_RELATIVE_PATH} above ${starts.join(" or ")}; pass repoRoot (or command) to the client`,
  );
}

export function wrapperPath(repoRoot: string): string {
  return join(repoRoot, WRAPPER_RELATIVE_PATH);
}

export interface SidecarEnvironment {
  /** The Python environment directory (LORA_SIDECAR_ENV, else <data>/python). */
  dir: string;
  python: string;
  /** bin/python is executable and the bootstrap marker exists. */
  bootstrapped: boolean;
}

/** Resolve the environment exactly as the wrapper does (empty variables count as unset). */
export function resolveEnvironment(repoRoot: string, env: NodeJS.ProcessEnv = process.env): SidecarEnvironment {
  const data = env["LORA_SIDECAR_DATA"] || join(repoRoot, ".continuum", "genome");
  const dir = env["LORA_SIDECAR_ENV"] || join(data, "python");
  const python = join(dir, "bin", "python");
  let bootstrapped = existsSync(join(dir, ".bootstrap-ok"));
  if (bootstrapped) {
    try {
      accessSync(python, constants.X_OK);
    } catch {
      bootstrapped = false;
    }
  }
  return { dir, python, bootstrapped };
}
