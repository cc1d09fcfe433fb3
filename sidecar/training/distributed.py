"""The sidecar as supervisor of a distributed training job (``train`` with ``distributed`` set).

The sidecar never trains a distributed job itself and never imports torch for it (so it does not
initialise CUDA before its workers do). It starts a worker group with torch's elastic launcher,

    python -m sidecar.training.distributed --parent <sidecar pid> -- <torchrun arguments>
        └─ torch.distributed.run (the elastic agent: rendezvous, one process per rank, monitoring)
             └─ python -m sidecar.training.worker --connect <socket>   × processes

and talks to the ranks over a Unix socket in a private temporary directory (training/group.py runs
the group, training/worker.py describes the messages). Rank 0 streams progress, which becomes the
usual ``progress`` notifications; its result is the job's result.

- A warm group: after a job the workers wait for the next one with their base model loaded, so a
  second job on the same group pays neither process start nor model load. A job that needs another
  group (processes, strategy, backend, device, threads) stops the old one first.
- ``cancel`` (and shutdown) stop the group: SIGKILL to every worker's process group, then the
  launcher; nothing survives, and a temporary adapter directory is removed. The next job starts a
  new group.
- A worker that dies (its connection ends without an answer) fails the job with WorkerDied naming
  its rank, pid, exit status (from the launcher's report) and the last lines of its stderr; the
  group is stopped and the sidecar keeps serving.
- Orphans: the launcher gets SIGKILL when the sidecar dies, and each worker gets SIGKILL when the
  launcher dies (PR_SET_PDEATHSIG, Linux). SIGKILL, not torchrun's SIGTERM handler: that handler
  stops the workers, waits for them (up to 30 s) and tears down its store in Python, and once, in
  CI, the group was still alive 15 s after the sidecar's kill -9 (0.6-0.9 s here). Nothing the
  handler would do is needed: the workers die with the launcher, and the sidecar is gone.

What a distributed job cannot do is refused at the door (training/checks.py ``check_distributed``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

import msgspec

from .. import data, models, wire
from ..procs import die_with_parent
from . import publish
from .group import GroupKey, WorkerGroup, worker_threads

log = logging.getLogger("sidecar.distributed")

LAUNCHER_PID_ENV = "LORA_SIDECAR_LAUNCHER_PID"


class Supervisor:
    """The sidecar's distributed jobs: keeps at most one warm worker group."""

    def __init__(self) -> None:
        self.group: Optional[WorkerGroup] = None
        self._lock = threading.Lock()

    def train(self, params: wire.TrainParams, *, job_id: str, report: Callable[[wire.Progress], None],
              should_stop: Callable[[], bool], received_at: float) -> wire.TrainResult:
        """Run a distributed job (its request checked at the door) on the warm group, or a new one."""
        spec = params.distributed
        assert spec is not None
        # Fail fast, before any process starts: dataset structure, the model's name, the output.
        data.load_train_and_validation(params)
        models.resolve_model(params.base_model, convert=False)  # the ranks convert (under a file lock)
        target = publish.resolve_output_dir(params, job_id, time.time())
        params = msgspec.structs.replace(params, output_path=str(target))
        temp_output = publish.temp_dir(target, job_id)  # where rank 0 writes before the rename

        key = GroupKey(processes=spec.processes, strategy=spec.strategy, backend=spec.backend,
                       device=params.device, threads=worker_threads(spec.processes))
        group = self._group_for(key)
        if group.proc is None:
            report(wire.Progress(job_id=job_id, phase="loading",
                                 message=f"starting {spec.processes} worker processes ({spec.strategy})"))
            try:
                group.start(job_id, report, should_stop)
            except BaseException:
                self._forget(group)
                raise
        else:
            log.info("job %s on the warm worker group: launcher pid %d, worker pids %s", job_id, group.proc.pid,
                     json.dumps(group.pids()))
        try:
            return group.run(params, job_id=job_id, received_at=received_at, report=report,
                             should_stop=should_stop, temp_output=temp_output)
        finally:
            if group.stopped:
                self._forget(group)

    def _group_for(self, key: GroupKey) -> WorkerGroup:
        """The warm group when it fits ``key`` and is healthy; otherwise a new (not yet started) one."""
        with self._lock:
            group = self.group
            if group is not None and (group.key != key or not group.healthy()):
                log.info("stopping the warm worker group (%s)",
                         "another configuration" if group.key != key else "no longer healthy")
                group.close()
                group = self.group = None
            if group is None:
                group = self.group = WorkerGroup(key)
            return group

    def _forget(self, group: WorkerGroup) -> None:
        group.kill()
        with self._lock:
            if self.group is group:
                self.group = None

    def close(self) -> None:
        """Stop the warm group (sidecar shutdown)."""
        with self._lock:
            group, self.group = self.group, None
        if group is not None:
            group.close()


def main(argv: Optional[list[str]] = None) -> None:
    """The launcher process: ``--parent PID -- <torchrun arguments>``. Dies with the sidecar."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--parent" or argv[2] != "--":
        raise SystemExit("usage: python -m sidecar.training.distributed --parent PID -- <torchrun arguments>")
    die_with_parent(int(argv[1]), signal.SIGKILL)  # the module docstring says why not SIGTERM
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    from torch.distributed.run import main as torchrun

    torchrun(argv[3:])


if __name__ == "__main__":
    main()
