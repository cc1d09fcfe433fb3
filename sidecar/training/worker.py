"""One rank of a distributed training job: ``python -m sidecar.training.worker``, started by torchrun.

torch's elastic launcher (``torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; the worker joins the process group and runs the sidecar's own
recipe (``training.recipe.train``) with a ``DistributedWorld``. Two ways to get jobs:

``--connect SOCKET``
    the sidecar supervises (training/distributed.py): every rank connects to the supervisor's Unix
    socket, says hello (rank, pid), and then runs each job it is sent until told to exit, keeping its
    base model warm between jobs. Rank 0 streams progress; rank 0 answers with the result, the
    others with ``done``; an error is sent as ``{code, message, data}``.
``--job FILE``
    one job (TrainParams JSON, as sent to ``train``) and exit: the same job under torchrun or Ray
    Train on several nodes, without a sidecar (docs/SCALING.md). Progress goes to stderr; rank 0
    writes the result as JSON to ``--result FILE`` when given. Exit code 1 on failure.

Messages on the socket are JSON, one per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional

import msgspec

from .. import errors, wire

log = logging.getLogger("sidecar.worker")


class Channel:
    """Newline-delimited JSON over a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(msgspec.json.encode(message) + b"\n")

    def receive(self) -> Optional[dict[str, Any]]:
        line = self.reader.readline()
        return json.loads(line) if line else None


def error_message(exc: BaseException, prefix: str = "Training failed: ") -> dict[str, Any]:
    if isinstance(exc, errors.SidecarError):
        return {"type": "error", "code": exc.CODE, "message": exc.message, "data": exc.data}
    return {"type": "error", "code": errors.TrainingFailed.CODE,
            "message": f"{prefix}{type(exc).__name__}: {exc}", "data": {}}


def _device(requested: str) -> tuple[str, str]:
    """(device of this rank, default backend): cuda:LOCAL_RANK with nccl, or cpu with gloo."""
    from ..models import select_device

    device = select_device(requested)
    if device.startswith("cuda"):
        import torch

        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return f"cuda:{local}", "nccl"
    if device != "cpu":
        raise errors.Unsupported(f"Distributed training runs on cpu or cuda, not {device}", field="$.device")
    return "cpu", "gloo"


def run_job(params: wire.TrainParams, *, job_id: str, received_at: float, world: Any, models: Any,
            report: Callable[[wire.Progress], None]) -> Optional[wire.TrainResult]:
    from .recipe import train

    try:
        return train(params, job_id=job_id, models=models, report=report if world.is_main else _ignore,
                     should_stop=_never, received_at=received_at, world=world)
    finally:
        world.reset()
        if world.strategy == "fsdp":
            # fully_shard rewrote the cached model's modules and parameters in place: load it
            # again for the next job rather than reuse it.
            models.evict_all()


def _ignore(progress: wire.Progress) -> None:
    pass


def _never() -> bool:
    # The supervisor cancels by stopping the whole group; ranks never stop on their own.
    return False


def serve(channel: Channel, world: Any, models: Any) -> int:
    while (message := channel.receive()) is not None:
        if message["type"] == "exit":
            return 0
        params = msgspec.convert(message["params"], wire.TrainParams)
        job_id = message["jobId"]
        log.info("rank %d: job %s", world.rank, job_id)

        def report(progress: wire.Progress) -> None:
            channel.send({"type": "progress", "progress": msgspec.to_builtins(progress)})

        try:
            result = run_job(params, job_id=job_id, received_at=message["receivedAt"], world=world,
                             models=models, report=report)
        except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, which decides
            if not isinstance(exc, errors.SidecarError):
                log.error("rank %d: job %s crashed:\n%s", world.rank, job_id, traceback.format_exc())
            channel.send(error_message(exc))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            continue
        if result is not None:
            channel.send({"type": "result", "result": msgspec.to_builtins(result)})
        else:
            channel.send({"type": "done"})
    return 0  # the supervisor went away


def _log_progress(progress: wire.Progress) -> None:
    log.info("progress %s", msgspec.json.encode(progress).decode())


def train_in_process_group(params: Any, *, strategy: str = "ddp", device: Optional[str] = None,
                           report: Callable[[wire.Progress], None] = _log_progress,
                           models: Any = None) -> Optional[wire.TrainResult]:
    """Run one job as this rank of an already initialised process group: torchrun's ranks, or Ray
    Train's ``TorchTrainer`` workers (``train_loop_per_worker``; docs/SCALING.md).

    ``params``: TrainParams or its JSON object; ``device``: this rank's device (``cuda:N`` or
    ``cpu``; default from ``params.device`` and ``LOCAL_RANK``). Rank 0 writes the adapter and
    returns the result; other ranks return None. Raises the request checks' and the recipe's errors.
    """
    from ..models import ModelCache
    from .checks import check_distributed, check_request
    from .world import DistributedWorld

    raw = params if isinstance(params, dict) else None
    if not isinstance(params, wire.TrainParams):
        params = msgspec.convert(params, wire.TrainParams)
    # This is a door of its own (no sidecar checked the request): what a distributed job cannot do,
    # then every other request check.
    check_distributed(params, strategy)
    params = check_request(params, raw)
    if device is None:
        device, _ = _device(params.device)
    elif device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
    job_id = params.job_id or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_job(params, job_id=job_id, received_at=time.time(), world=DistributedWorld(strategy, device=device),
                     models=models or ModelCache(), report=report)
    if result is not None:  # no journal keeps this job: its directory (params.json) goes with success
        from .. import jobdir, paths

        jobdir.discard_job_dir(paths.job_dir(job_id))
    return result


def run_once(path: str, result_path: Optional[str], strategy: str, device: str) -> int:
    params = msgspec.json.decode(open(path, "rb").read(), type=wire.TrainParams)
    try:
        result = train_in_process_group(params, strategy=strategy, device=device)
    except Exception as exc:  # noqa: BLE001
        log.error("rank %s: %s", os.environ.get("RANK", 0), json.dumps(error_message(exc)))
        return 1
    if result is not None and result_path:
        from ..files import atomic_write_bytes

        atomic_write_bytes(result_path, msgspec.json.encode(result) + b"\n")
    return 0


PG_TIMEOUT_ENV = "LORA_SIDECAR_PG_TIMEOUT"


def _collective_timeout() -> dict[str, Any]:
    """``LORA_SIDECAR_PG_TIMEOUT=<seconds>``: how long a collective waits for a peer that went silent
    (a node lost without closing its sockets) before the rank fails; unset: torch's defaults (30 min
    gloo, 10 min nccl). It must exceed the longest gap between two collectives (loading, saving)."""
    value = os.environ.get(PG_TIMEOUT_ENV, "").strip()
    if not value:
        return {}
    from datetime import timedelta

    return {"timeout": timedelta(seconds=float(value))}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.training.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--connect", help="the supervisor's Unix socket")
    source.add_argument("--job", help="a TrainParams JSON file: run it once and exit")
    parser.add_argument("--result", help="with --job: rank 0 writes the TrainResult JSON here")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--backend", default=None, help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=os.environ.get("LORA_SIDECAR_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from ..procs import die_with_parent
    from .distributed import LAUNCHER_PID_ENV

    # Never outlive the launcher (torchrun's agent, which the sidecar may have started).
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    die_with_parent(int(launcher) if launcher else os.getppid())

    channel = None
    if args.connect:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(args.connect)
        channel = Channel(sock)
        channel.send({"type": "hello", "rank": rank, "pid": os.getpid(),
                      "worldSize": int(os.environ.get("WORLD_SIZE", 1))})
    try:
        import torch.distributed as dist

        device, backend = _device(args.device)
        dist.init_process_group(args.backend or backend, **_collective_timeout())
    except BaseException as exc:
        if channel is not None:
            channel.send(error_message(exc, prefix=""))
        raise
    try:
        if channel is None:
            return run_once(args.job, args.result, args.strategy, device)
        from ..models import ModelCache
        from .world import DistributedWorld

        world, models = DistributedWorld(args.strategy, device=device), ModelCache()
        channel.send({"type": "ready", "rank": rank})
        return serve(channel, world, models)
    finally:
        dist.destroy_process_group()
        log.info("rank %d: leaving the process group", rank)

if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)  # skip the interpreter's slow teardown of torch: nothing is left to write
