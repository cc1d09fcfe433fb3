"""Ray Train: the sidecar's recipe as the ``train_loop_per_worker`` of a ``TorchTrainer`` (docs/SCALING.md).

Ray starts the workers on its cluster and initialises the torch process group (gloo on CPU, nccl
with GPUs); each worker runs ``worker.train_in_process_group`` with its device. Rank 0 writes the
adapter (``outputPath`` must be on storage every node can reach) and sends its messages to the
driver through a ``ray.util.queue.Queue``: ``{"type": "progress", "progress": {...}}`` for each
progress (the ``params`` of the sidecar's ``progress`` notification) and, last,
``{"type": "result", "result": {...}}`` (the ``train`` result): the shapes the worker sends its
supervisor over the socket in a sidecar-run group (worker.py). Ray Train keeps only metrics that come
with a checkpoint, and ``ray.train.report`` is a barrier every rank must call as often, so progress,
which rank 0 alone reports, takes the queue.

``fit`` is the driver's side: it builds the trainer and the queue, hands each message to
``on_progress`` while the job runs, and returns the result. ray is imported only when used (it is
not a dependency of the sidecar; ``bootstrap.sh --dev`` installs it for the test).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker. ``config``: ``params`` (the TrainParams JSON object), ``strategy``
    (``ddp`` | ``fsdp``, default ``ddp``), ``messages`` (a ``ray.util.queue.Queue``, optional)."""
    import msgspec
    import ray.train.torch

    from .worker import train_in_process_group

    messages = config.get("messages")

    def report(progress: Any) -> None:
        if messages is not None:
            messages.put({"type": "progress", "progress": msgspec.to_builtins(progress)})

    result = train_in_process_group(config["params"], strategy=config.get("strategy", "ddp"),
                                    device=str(ray.train.torch.get_device()), report=report)
    if result is not None and messages is not None:
        messages.put({"type": "result", "result": msgspec.to_builtins(result)})


def fit(params: dict[str, Any], *, num_workers: int, use_gpu: bool = False, strategy: str = "ddp",
        on_progress: Optional[Callable[[dict[str, Any]], None]] = None, run_config: Any = None,
        resources_per_worker: Optional[dict[str, float]] = None) -> Optional[dict[str, Any]]:
    """Run ``params`` (TrainParams JSON) on ``num_workers`` Ray Train workers; return rank 0's result
    (the ``train`` result as JSON). ``on_progress`` gets each progress object as rank 0 reports it,
    on a thread of the driver. Raises Ray's ``TrainingFailedError`` when a worker fails."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    messages = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params, "strategy": strategy, "messages": messages},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=run_config)
    received: dict[str, Any] = {}
    finished = threading.Event()

    def drain() -> None:
        while True:
            try:
                message = messages.get(timeout=0.2)
            except Empty:
                if finished.is_set():
                    return
                continue
            if message["type"] == "result":
                received["result"] = message["result"]
            elif on_progress is not None:
                on_progress(message["progress"])

    reader = threading.Thread(target=drain, name="ray-progress", daemon=True)
    reader.start()
    try:
        trainer.fit()
    finally:
        finished.set()  # the reader empties the queue, then stops
        reader.join()
        messages.shutdown()
    return received.get("result")
