"""Ask real llama.cpp (llama-cpp-python) about a GGUF model, in a process of its own.

Reads a JSON list of jobs on stdin, prints one JSON list of answers on stdout's last line:

    {"model": PATH, "lora": PATH|null, "loraScale": 1.0, "ids": [...], "f32Cache": false}
        → {"logprobs": [...]}: teacher-forced log-probability of ids[i+1] after ids[:i+1]
          (``f32Cache``: keep the KV cache in float32 instead of llama.cpp's default f16)
    {"model": PATH, "lora": PATH|null, "chat": QUESTION, "maxTokens": 24}
        → {"text": ...}: greedy chat completion with the model file's own chat template

Run as a separate process so that llama.cpp's native state (and its noisy teardown) never
touches the pytest process.
"""

from __future__ import annotations

import json
import os
import sys


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


def main() -> int:
    jobs = json.load(sys.stdin)
    answers = [run(job) for job in jobs]
    sys.stdout.write(json.dumps(answers) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
