"""Test hooks for the real sidecar process, switched on by environment variables.

Run the sidecar as ``HOOKED_ARGV`` (tests/sidecar_proc.py) to install them. They wrap the app's
job runner (``App.run_job``, for train and generate jobs), never the training code, so they hold
whatever the runners call:

- ``LORA_SIDECAR_TEST_HOLD=<phase>:<seconds>`` — when a train job reports ``<phase>`` (``loading``,
  ``preparing``, ``training``, ``saving``) for the first time, or before a ``generate`` job starts
  (phase ``generating``), sleep that long without looking at cancellation: an operation that
  cannot be interrupted, like loading a large model.
- ``LORA_SIDECAR_TEST_HOLD_MARKER=<file>`` — touched when the hold begins, so a test knows.
- ``LORA_SIDECAR_TEST_NATIVE_BF16=1`` — the CPU counts as having native bf16 (training/bf16.py's
  matmuls are taken with ``dtype: auto`` on any host; torch computes bf16 without the instructions too).
- ``LORA_SIDECAR_TEST_NO_LLAMA_CPP=1`` — ``import llama_cpp`` fails in the sidecar (an environment
  without llama-cpp-python: merged-gguf's llama.cpp-quantized out types are refused).
- ``LORA_SIDECAR_TEST_FREE_BYTES=<n>`` — every file system reports ``n`` bytes free to the export's
  disk-space check (sidecar/adapters/diskspace.py).
- ``LORA_SIDECAR_TEST_BREAK=handle`` — handling a message whose bytes contain ``BOOM`` raises (a bug
  in the server); ``=reader`` — reading the second message raises (the input stream breaks).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _hold(phase: str) -> bool:
    spec = os.environ.get("LORA_SIDECAR_TEST_HOLD", "")
    want, _, seconds = spec.partition(":")
    if want != phase:
        return False
    marker = os.environ.get("LORA_SIDECAR_TEST_HOLD_MARKER")
    if marker:
        Path(marker).touch()
    time.sleep(float(seconds or 60))
    return True


def install() -> None:
    from sidecar.app import App
    from sidecar.rpc import Dispatcher

    real_run_job = App.run_job

    def run_job(self, job, report, should_stop):
        if job.kind == "generate":
            _hold("generating")
        elif job.kind == "train":
            held, real_report = [], report

            def report(progress):
                real_report(progress)
                if not held and _hold(progress.phase):
                    held.append(progress.phase)

        return real_run_job(self, job, report, should_stop)

    App.run_job = run_job

    if os.environ.get("LORA_SIDECAR_TEST_NATIVE_BF16") == "1":
        from sidecar.training import bf16

        bf16.cpu_has_native_bf16 = lambda: True

    if os.environ.get("LORA_SIDECAR_TEST_NO_LLAMA_CPP") == "1":
        import sys

        sys.modules["llama_cpp"] = None  # type: ignore[assignment]  # import llama_cpp raises ImportError

    free = os.environ.get("LORA_SIDECAR_TEST_FREE_BYTES")
    if free is not None:
        from sidecar.adapters import diskspace

        diskspace.free_bytes = lambda directory: int(free)

    broken = os.environ.get("LORA_SIDECAR_TEST_BREAK")
    if broken == "handle":
        real_handle = Dispatcher.handle

        def handle(self, body, framing, received_at):
            if b"BOOM" in body:
                raise RuntimeError("test hook: handling this message fails")
            return real_handle(self, body, framing, received_at)

        Dispatcher.handle = handle
    elif broken == "reader":
        from sidecar.stdio import FrameReader

        real_read, reads = FrameReader.read, []

        def read(self):
            reads.append(1)
            if len(reads) == 2:
                raise OSError("test hook: the input stream broke")
            return real_read(self)

        FrameReader.read = read
