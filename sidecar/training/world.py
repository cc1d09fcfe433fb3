"""The world a training job runs in: one process (the default), or one rank of a worker group.

The recipe's loop is the same in both; it asks its world what differs:

- ``global_batch(batch_size)``: rows of one micro-step over all ranks (``batchSize × processes``);
- ``micro_batches(group, ...)``: this rank's rows of an optimizer step, split to the token budget;
- ``wrap(lm, selective)``: the forward that returns a loss sum (DDP/FSDP-wrapped when distributed);
- ``sync_gradients(part)``: gradients are synchronised in the backward of a step's last micro-batch;
- ``sum(...)``: figures of the step over every rank (loss sum, tokens, examples) for progress;
- ``adapter_state(peft_model)`` and ``is_main``: who writes the adapter and reports progress.

A distributed step takes exactly the examples of the single-process step with
``batchSize × processes``: every global micro-batch of ``data.epoch_batches`` is dealt out row by
row (rank r takes rows r, r+N, …), so rank r runs at most ``batchSize`` rows of it. Every rank
tokenizes the whole dataset, so the step's label count — the loss's denominator — is known on every
rank without communication. Each rank backpropagates ``N × (its loss sum) / (step label count)``;
DDP's (and FSDP's) gradient reduction averages over N ranks, which leaves exactly the gradient of
(summed loss of the step) / (step label count), the single-process objective.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

from .loss import loss_sum, split_by_tokens


@dataclass(frozen=True)
class Part:
    """One micro-batch of a step on this rank."""

    indices: list[int]
    scale: float
    """Multiplies the loss sum before backward: the world size (undoes the reducer's averaging), or
    0 for the stand-in row of a rank that has no row in this step."""
    last: bool
    """The step's last micro-batch on this rank: its backward synchronises the gradients."""


class World:
    """A single process: every row is ours, nothing to synchronise."""

    size = 1
    rank = 0
    is_main = True
    strategy: Optional[str] = None
    selective_logits = True
    """False where the loss must go through the model's own forward (FSDP unshards there)."""
    lockstep = False
    """Every rank must run as many micro-batches in a step (FSDP gathers parameters in each forward)."""

    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.size

    def micro_batches(self, group: list[list[int]], lengths: list[int], budget: int) -> list[Part]:
        parts = self._share(self.rank, group, lengths, budget)
        # A rank may have fewer micro-batches than another (a short last step can even leave it no
        # row at all); it still takes part in the step's collectives by running the step's first
        # row with weight 0: its loss counts nothing and its gradient is exactly zero.
        most = max(len(self._share(r, group, lengths, budget)) for r in range(self.size)) if self.lockstep else 1
        parts += [Part([group[0][0]], 0.0, False)] * (most - len(parts))
        parts[-1] = Part(parts[-1].indices, parts[-1].scale, True)
        return parts

    def _share(self, rank: int, group: list[list[int]], lengths: list[int], budget: int) -> list[Part]:
        """``rank``'s rows of each batch of the step (rows rank, rank + size, …), split to ``budget``."""
        return [Part(ix, self.size, False) for batch in group if (mine := batch[rank::self.size])
                for ix in split_by_tokens(mine, lengths, budget)]

    def wrap(self, lm: Any, selective: bool) -> Callable[[Any], Any]:
        return functools.partial(loss_sum, lm, selective=selective)

    def sync_gradients(self, part: Part) -> ContextManager[None]:
        return contextlib.nullcontext()

    def sum(self, *values: float) -> list[float]:
        return list(values)

    def adapter_state(self, peft_model: Any) -> Optional[dict[str, Any]]:
        """The adapter's weights for ``save_pretrained(state_dict=...)``; None: let peft read them."""
        return None

    def reset(self) -> None:
        """Forget the job's wrapped model (called after each job)."""

    def describe(self) -> Optional[dict[str, Any]]:
        """What the manifest records about the world (None for a single process)."""
        return None


SINGLE_PROCESS = World()


def _loss_module(lm: Any, selective: bool) -> Any:
    """``module(batch) → loss sum`` as an nn.Module, so DDP's forward hooks see the whole forward."""
    import torch.nn as nn

    class LossOf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, batch: Any) -> Any:
            return loss_sum(self.lm, batch, selective=selective)

    return LossOf()


class DistributedWorld(World):
    """One rank of a torch.distributed process group (already initialised) running ``strategy``.

    ``ddp``: DistributedDataParallel over the model with its LoRA layers; only trainable parameters
    are in the reducer. ``fsdp``: FSDP2 ``fully_shard`` on each transformer block and on the model
    (PEFT's and torch's documented recipe); the loss then goes through the model's own forward.
    """

    def __init__(self, strategy: str, *, device: str = "cpu") -> None:
        import torch.distributed as dist

        self.dist = dist
        self.size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_main = self.rank == 0
        self.strategy = strategy
        self.device = device
        self.selective_logits = strategy != "fsdp"
        self.lockstep = strategy == "fsdp"
        self._ddp: Any = None
        self._fsdp: Any = None

    def wrap(self, lm: Any, selective: bool) -> Callable[[Any], Any]:
        if self.strategy == "fsdp":
            return self._wrap_fsdp(lm, selective)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # init_sync would broadcast every frozen base weight at each job; every rank loaded the same
        # base from the same files, so only the LoRA weights are broadcast from rank 0, below.
        device_ids = [self.device] if self.device.startswith("cuda") else None
        self._ddp = DDP(_loss_module(lm, selective), device_ids=device_ids, init_sync=False,
                        forward_sync_buffers=False)
        for p in lm.parameters():
            if p.requires_grad:
                self.dist.broadcast(p.data, src=0)
        return self._ddp

    def _wrap_fsdp(self, lm: Any, selective: bool) -> Callable[[Any], Any]:
        from torch.distributed.fsdp import fully_shard

        # Shard each transformer block, then the rest (embeddings, norm, head) at the root: the
        # auto-wrap policy accelerate and PEFT use, read from the model's _no_split_modules.
        block_names = set(getattr(lm, "_no_split_modules", None) or [])
        blocks = [m for m in lm.modules() if type(m).__name__ in block_names]
        for block in blocks:
            fully_shard(block)
        fully_shard(lm)
        self._fsdp = lm
        return functools.partial(loss_sum, lm, selective=False)

    def sync_gradients(self, part: Part) -> ContextManager[None]:
        if self._ddp is not None:
            return contextlib.nullcontext() if part.last else self._ddp.no_sync()
        if self._fsdp is not None:
            self._fsdp.set_requires_gradient_sync(part.last)
        return contextlib.nullcontext()

    def sum(self, *values: float) -> list[float]:
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def adapter_state(self, peft_model: Any) -> Optional[dict[str, Any]]:
        if self._fsdp is None:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank takes part, rank 0 gets the full (unsharded) LoRA weights.
        return get_model_state_dict(peft_model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))

    def reset(self) -> None:
        self._ddp = self._fsdp = None

    def describe(self) -> Optional[dict[str, Any]]:
        return {"processes": self.size, "strategy": self.strategy,
                "backend": self.dist.get_backend(), "device": self.device}
