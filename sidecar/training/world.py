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

    # --- checkpoints (training/checkpointer.py): every rank calls these at the same point ----------

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is true on any: one decision for the whole group."""
        return flag

    def main_value(self, value: float) -> float:
        """The main rank's ``value`` on every rank (validation loss: one early-stopping decision)."""
        return value

    def training_state(self, peft_model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(LoRA weights by parameter name, optimizer state_dict in torch's indexed form), whole, on
        the main rank; the same form in every world, so a checkpoint resumes on another one."""
        from .checkpoint import trainable_tensors

        weights = {n: p.detach().to("cpu").contiguous() for n, p in trainable_tensors(peft_model).items()}
        return weights, optimizer.state_dict()

    def load_training_state(self, peft_model: Any, optimizer: Any, weights: dict[str, Any],
                            optimizer_state: Optional[dict[str, Any]], path: Any) -> None:
        """Put the whole weights (and optimizer state, unless None) of the checkpoint at ``path`` into
        this rank's model; CheckpointInvalid when they do not fit it."""
        from .checkpoint import copy_weights

        copy_weights(peft_model, weights, path)
        if optimizer_state is not None:
            with _own_kernels(optimizer):
                optimizer.load_state_dict(optimizer_state)

    def gather_rng(self, rng: dict[str, Any]) -> dict[str, Any]:
        """The generator states to checkpoint: this process's, or every rank's (``{"ranks": [...]}``)."""
        return rng

    def rng_for_rank(self, saved: dict[str, Any], dropout: float) -> tuple[dict[str, Any], list[str]]:
        """(the states this rank restores, warnings) from a checkpoint written by any world."""
        if "ranks" not in saved:
            return saved, []
        ranks = saved["ranks"]
        if len(ranks) == self.size:
            return ranks[self.rank], []
        notes = [f"The checkpoint was written by {len(ranks)} processes and resumes on {self.size}: every "
                 "process takes rank 0's generator states, so dropout masks after the resume differ from "
                 "the uninterrupted run."] if dropout > 0 else []
        return ranks[0], notes

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
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        # A collective: every rank takes part, rank 0 gets the full (unsharded) LoRA weights.
        return get_model_state_dict(peft_model, options=self._full_options())

    def agree(self, flag: bool) -> bool:
        import torch

        t = torch.tensor([float(flag)], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def main_value(self, value: float) -> float:
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self.dist.broadcast(t, src=0)
        return float(t.item())

    def training_state(self, peft_model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._fsdp is None:  # DDP: every rank holds the same whole state; rank 0's is written
            return super().training_state(peft_model, optimizer) if self.is_main else ({}, {})
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from .checkpoint import trainable_tensors

        # Collectives: the shards gathered whole (on rank 0, on the CPU) by torch's distributed
        # checkpoint API, then the optimizer state put in the indexed form a single process saves.
        options = self._full_options()
        weights = get_model_state_dict(peft_model, options=options)
        keyed = get_optimizer_state_dict(peft_model, optimizer, options=options)
        if not self.is_main:  # cpu_offload: the whole state lands on rank 0 only
            return {}, {}
        names = list(trainable_tensors(peft_model))
        # ignore_frozen_params still lets a tied frozen weight through (lm_head tied to the embeddings).
        return {n: weights[n] for n in names}, _indexed(keyed, names)

    def load_training_state(self, peft_model: Any, optimizer: Any, weights: dict[str, Any],
                            optimizer_state: Optional[dict[str, Any]], path: Any) -> None:
        if self._fsdp is None:
            return super().load_training_state(peft_model, optimizer, weights, optimizer_state, path)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from .checkpoint import check_weights, trainable_tensors

        # Every rank read the same whole state; each keeps its own shards of it. Only the LoRA weights
        # are in it (the frozen base is not), hence strict=False after checking them by name and shape.
        params = trainable_tensors(peft_model)  # in the optimizer's order (setup.setup_optimizer's list)
        names = list(params)
        check_weights(params, weights, path)
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(peft_model, weights, options=options)
        if optimizer_state is not None:
            with _own_kernels(optimizer):
                set_optimizer_state_dict(peft_model, optimizer, _keyed(optimizer_state, names), options=options)

    def gather_rng(self, rng: dict[str, Any]) -> dict[str, Any]:
        ranks: list[Any] = [None] * self.size
        self.dist.all_gather_object(ranks, rng)
        return {"ranks": ranks}

    def _full_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    def reset(self) -> None:
        self._ddp = self._fsdp = None

    def describe(self) -> Optional[dict[str, Any]]:
        return {"processes": self.size, "strategy": self.strategy,
                "backend": self.dist.get_backend(), "device": self.device}


def _indexed(keyed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (torch.distributed.checkpoint's form) in
    ``optimizer.state_dict()``'s form, where parameters are numbered in the optimizer's order."""
    index = {n: i for i, n in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in keyed["param_groups"]]
    return {"state": {index[n]: s for n, s in keyed["state"].items()}, "param_groups": groups}


def _keyed(indexed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``_indexed``."""
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in indexed["param_groups"]]
    return {"state": {names[int(i)]: s for i, s in indexed["state"].items()}, "param_groups": groups}


@contextlib.contextmanager
def _own_kernels(optimizer: Any) -> Any:
    """Loading a state dict also loads its param groups' kernel choices (``fused``: a single process
    on CPU, not a worker group's DTensors); the optimizer keeps its own."""
    kept = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    yield
    for group, flags in zip(optimizer.param_groups, kept):
        group.update(flags)
