"""The process of ``priority: "background"`` jobs: ``python -m sidecar.training.solo --fd N --parent PID``.

Started by the sidecar (training/background.py) with passive OpenMP waiting in its environment, it
lowers itself first — before torch is imported, before any other thread exists — so every thread it
ever has runs at the background priority (training/priority.py). Then it serves jobs over the
socket ``--fd`` (JSON, one message a line), keeping its own warm model cache between them:

    sidecar → here   {"type": "job", "jobId", "params", "receivedAt"}   run one job
                     {"type": "pause", "release"} | {"type": "resume"} | {"type": "cancel"}
                     {"type": "unload", "path"}                         drop that model (between jobs)
                     {"type": "exit"}
    here → sidecar   {"type": "ready", "pid", "applied"}                 once, at start
                     {"type": "progress", "progress"}                    the job's progress
                     {"type": "paused", "reason", "released", "checkpoint"} | {"type": "resumed"}
                     {"type": "models", "models"}                        its warm models (wire.WarmModel)
                     {"type": "result", "result"} | {"type": "error", "code", "message", "data"}
                     {"type": "unloaded", "unloaded", "bytesFreed", "models"}

``models`` is sent at each phase change of a job, and just before ``paused`` (a ``release`` drops the
bf16 weight copies, training/pause.py), ``resumed`` and the job's result or error, so the sidecar's ``status``
shows this cache as it is without asking. Jobs and unloads run on the main thread; a reader thread
applies pause, resume and cancel to the job's gate at once. The process dies with the sidecar
(PR_SET_PDEATHSIG) and exits at EOF.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
from typing import Any, Optional

import msgspec

from .. import wire
from . import priority, yielding
from .pause import PauseGate
from .worker import Channel, error_message

log = logging.getLogger("sidecar.background")


class _Control:
    """Messages from the sidecar: jobs to the main thread, the rest to the running job's gate."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.jobs: queue.Queue = queue.Queue()
        self.gate: Optional[PauseGate] = None
        self.lock = threading.Lock()

    def read(self) -> None:
        while True:
            try:
                message = self.channel.receive()
            except (OSError, ValueError):
                message = None
            if message is None or message["type"] == "exit":
                with self.lock:
                    if self.gate is not None:
                        self.gate.cancel()
                self.jobs.put(None)
                return
            if message["type"] in ("job", "unload"):
                self.jobs.put(message)
                continue
            with self.lock:
                gate = self.gate
            if gate is None:
                continue
            if message["type"] == "pause":
                gate.pause("client", bool(message.get("release")))
            elif message["type"] == "resume":
                gate.resume("client")
            elif message["type"] == "cancel":
                gate.cancel()


def serve(channel: Channel, models: Any) -> int:
    control = _Control(channel)
    threading.Thread(target=control.read, name="sidecar-control", daemon=True).start()
    while (message := control.jobs.get()) is not None:
        if message["type"] == "unload":
            channel.send(unload(models, message["path"]))
            continue
        params = msgspec.convert(message["params"], wire.TrainParams)
        gate = PauseGate()
        # The models first: when the sidecar answers the pause (or the job), its status shows them.
        gate.on_paused = lambda reason, released, ckpt: (send_models(channel, models), channel.send(
            {"type": "paused", "reason": reason, "released": released, "checkpoint": msgspec.to_builtins(ckpt)}))
        gate.on_resumed = lambda: (send_models(channel, models), channel.send({"type": "resumed"}))
        with control.lock:
            control.gate = gate
        try:
            result = run_job(params, message, gate, channel, models)
        except BaseException as exc:  # noqa: BLE001 - reported to the sidecar, which decides
            send_models(channel, models)
            channel.send(error_message(exc))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            send_models(channel, models)
            channel.send({"type": "result", "result": msgspec.to_builtins(result)})
        finally:
            with control.lock:
                control.gate = None
    return 0


def warm(models: Any) -> list[Any]:
    from ..models.cache import warm_model

    return [msgspec.to_builtins(warm_model(e, held_by="background")) for e in models.entries()]


def send_models(channel: Channel, models: Any) -> None:
    channel.send({"type": "models", "models": warm(models)})


def unload(models: Any, path: str) -> dict[str, Any]:
    """Drop every warm entry of the model at ``path`` and give its memory back to the OS."""
    from ..models.cache import warm_model
    from .pause import free_memory

    entries = [e for e in models.entries() if e.resolved.path == path]
    gone = [msgspec.to_builtins(warm_model(e, held_by="background")) for e in entries]
    del entries
    freed = models.unload({m.key for m in models.entries() if m.resolved.path == path})
    free_memory()
    return {"type": "unloaded", "unloaded": gone, "bytesFreed": freed, "models": warm(models)}


def run_job(params: wire.TrainParams, message: dict[str, Any], gate: PauseGate, channel: Channel,
            models: Any) -> wire.TrainResult:
    from .recipe import train

    phase = [None]

    def report(progress: wire.Progress) -> None:
        channel.send({"type": "progress", "progress": msgspec.to_builtins(progress)})
        if progress.phase != phase[0]:  # a model loaded, bf16 copies made: the sidecar's status sees them
            phase[0] = progress.phase
            send_models(channel, models)

    with priority.job_threads(params.threads), yielding.monitor(params.yield_, gate):
        return train(params, job_id=message["jobId"], models=models, report=report, should_stop=gate,
                     received_at=message["receivedAt"])


def main(argv: Optional[list[str]] = None) -> int:
    # First of all, while this is the only thread: every thread created from here on inherits it.
    applied = priority.lower_this_process()
    parser = argparse.ArgumentParser(prog="python -m sidecar.training.solo")
    parser.add_argument("--fd", type=int, required=True, help="the connected socket to the sidecar")
    parser.add_argument("--parent", type=int, required=True, help="the sidecar's pid (die with it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LORA_SIDECAR_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s background %(name)s: %(message)s")
    from ..procs import die_with_parent

    die_with_parent(args.parent)
    channel = Channel(socket.socket(fileno=args.fd))
    channel.send({"type": "ready", "pid": os.getpid(), "applied": applied})
    log.info("background job process %d ready (%s)", os.getpid(), applied)
    from ..models import ModelCache

    return serve(channel, ModelCache())


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch
