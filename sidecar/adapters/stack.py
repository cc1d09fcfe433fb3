"""Stacking resident adapters on the warm base: W + Σ scaleᵢ·cᵢ·Bᵢ·Aᵢ for one forward.

cᵢ is the adapter's own scaling: αᵢ/rᵢ, or αᵢ/√rᵢ for rsLoRA adapters (``use_rslora``), per module when
the adapter has rank or alpha patterns — exactly what PEFT applies for it alone.

**Residents stay on the base.** The first time a resident is used on a warm base it is injected into
that base as a named PEFT LoRA adapter whose A/B parameters *are* the registry's tensors (no copy), and
it stays there for later requests. Measured on SmolLM2-135M (2 CPU threads, r16 on the seven
projections): PEFT's injection costs ~160 ms per adapter and taking LoRA layers off ~50 ms, against
~225 ms for ``PeftModel.from_pretrained`` from disk and ~0.5 s for a short greedy answer — injecting per
request would have kept most of the disk path's cost. Switching between residents is PEFT's
``set_adapter`` / ``set_scale`` (about a millisecond).

Around everything that needs the bare base the layers come off (``strip``, which restores the base
exactly, surgery.detach_lora): before a training job (so training never sees a resident: the same
adapter as on a fresh sidecar) and before the legacy ``adapterPath`` generate. They go back on lazily at
the next use. An unloaded or evicted resident is deleted from every base it is on.

**Mixed batches.** PEFT runs rows with different adapters in one forward through ``adapter_names``
(one adapter name per row, ``"__base__"`` for the bare base). It sums several *active* adapters, but
cannot give one row a set of them, and an adapter has one scale per layer. So ``plan`` groups the
variants of a request: every variant with at most one adapter goes into one mixed forward (split only
when the same adapter is asked at two scales), and each variant that stacks two or more adapters gets
its own forward with those adapters active.

Everything here runs on the job worker.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .. import errors
from .resident import AdapterRegistry, Resident
from .surgery import BaseState, detach_lora, snapshot

log = logging.getLogger(__name__)

BASE = "__base__"
"""PEFT's name for "no adapter" in ``adapter_names``."""

Variant = list[tuple[Resident, float]]


@dataclass
class _State:
    """The LoRA layers injected into one warm base model."""

    model: Any
    peft_model: Any
    before: BaseState
    injected: dict[str, Resident] = field(default_factory=dict)
    """PEFT adapter name → resident."""
    layers: list[Any] = field(default_factory=list)
    """Every LoRA layer of the model (refreshed after each change)."""

    def refresh(self) -> None:
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]


@dataclass
class Group:
    """Variants that run in the same forward (indices into the request's variants)."""

    variants: list[int]


def plan(variants: list[Variant]) -> list[Group]:
    """Group variants for forwards (see the module doc): mixed groups first, then one per stacked variant."""
    mixed: list[tuple[Group, dict[str, float]]] = []
    stacked: list[Group] = []
    for index, variant in enumerate(variants):
        if len(variant) >= 2:
            stacked.append(Group([index]))
            continue
        for group, scales in mixed:
            if not variant or scales.get(variant[0][0].peft_name, variant[0][1]) == variant[0][1]:
                break
        else:
            group, scales = Group([]), {}
            mixed.append((group, scales))
        group.variants.append(index)
        if variant:
            scales[variant[0][0].peft_name] = variant[0][1]
    return [g for g, _ in mixed] + stacked


class Stack:
    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self._states: dict[int, _State] = {}
        registry.on_drop.append(self.remove)

    # --- keeping the base models' LoRA layers in step with the registry ---------------------

    def strip(self, loaded: Any = None) -> None:
        """Take every resident off ``loaded``'s base model (or off every base): the base is exactly as loaded."""
        keys = list(self._states) if loaded is None else [id(loaded.model)]
        for key in keys:
            state = self._states.pop(key, None)
            if state is not None:
                detach_lora(state.model, state.peft_model, state.before)
                log.debug("took %d resident adapter(s) off a base model", len(state.injected))

    def forget(self, loaded: Any) -> None:
        """The model cache evicted ``loaded``: drop its state (the model is being freed, nothing to restore)."""
        self._states.pop(id(loaded.model), None)

    def remove(self, resident: Resident) -> None:
        """A resident was unloaded or evicted: delete it from every base it is on."""
        for key, state in list(self._states.items()):
            if resident.peft_name not in state.injected:
                continue
            if len(state.injected) == 1:
                self.strip(_Loaded(state.model))
            else:
                state.peft_model.delete_adapter(resident.peft_name)
                del state.injected[resident.peft_name]
                state.refresh()

    def ensure(self, loaded: Any, residents: list[Resident]) -> _State:
        """Inject the residents that are not on ``loaded``'s base yet; return its state."""
        state = self._states.get(id(loaded.model))
        for resident in residents:
            if state is None or resident.peft_name not in state.injected:
                state = self._inject(loaded, state, resident)
        if state is None:
            raise ValueError("ensure() needs at least one resident")
        return state

    def _inject(self, loaded: Any, state: Optional[_State], resident: Resident) -> _State:
        import torch
        from peft import PeftModel

        # The resident's own config, aimed at exactly the modules its file holds (the load checked that
        # these are all the modules the config targets in this base).
        config = copy.copy(resident.config)
        config.target_modules = set(resident.tensors)
        config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
        config.inference_mode = True
        name = resident.peft_name
        first = state is None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft: deprecated is_gradient_checkpointing probe
                if first:
                    before = snapshot(loaded.model)
                    # low_cpu_mem_usage: the new LoRA weights are created on the meta device, then the
                    # registry's tensors are assigned as the parameters (shared storage, no copy).
                    peft_model = PeftModel(loaded.model, config, adapter_name=name, low_cpu_mem_usage=True)
                    state = _State(loaded.model, peft_model, before)
                    self._states[id(loaded.model)] = state
                else:
                    state.peft_model.add_adapter(name, config, low_cpu_mem_usage=True)
            for module, (a, b) in resident.tensors.items():
                layer = loaded.model.get_submodule(module)
                layer.lora_A[name].weight = torch.nn.Parameter(a, requires_grad=False)
                layer.lora_B[name].weight = torch.nn.Parameter(b, requires_grad=False)
            state.injected[name] = resident
            state.refresh()
            left = [layer for layer in state.layers if name in layer.lora_A
                    and (layer.lora_A[name].weight.is_meta or layer.lora_B[name].weight.is_meta)]
            if left:
                raise RuntimeError(f"{len(left)} LoRA layers got no weights")
            state.peft_model.eval()  # the new dropout modules start in training mode
            return state
        except Exception as exc:
            # Never half on: take this adapter off again (everything, when it was the first).
            if state is not None and first:
                self.strip(loaded)
            elif state is not None:
                with contextlib.suppress(Exception):
                    state.peft_model.delete_adapter(name)
                state.injected.pop(name, None)
                state.refresh()
            raise errors.AdapterInvalid(f"Adapter {resident.id} could not be put on {resident.base_name}: "
                                        f"{type(exc).__name__}: {exc}", id=resident.id) from exc

    # --- one forward's adapter set --------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self, loaded: Any, variants: list[Variant]) -> Iterator[tuple[Any, Optional[list[str]]]]:
        """Yield ``(model, names)`` for one group of ``plan``: call ``model.generate``; when ``names`` is
        not None pass ``adapter_names=[names[v] for each row's variant v]``. Scales are set for the group
        and reset to 1 afterwards."""
        residents = list({r.peft_name: r for variant in variants for r, _ in variant}.values())
        state = self._states.get(id(loaded.model))
        if not residents:
            if state is None:
                yield loaded.model, None
            else:  # residents are on this base: switch their layers off for a bare-base forward
                state.peft_model.base_model.disable_adapter_layers()
                yield loaded.model, None
            return
        state = self.ensure(loaded, residents)
        scales = {r.peft_name: s for variant in variants for r, s in variant}
        tuner = state.peft_model.base_model
        tuner.enable_adapter_layers()
        tuner.set_adapter(list(scales), inference_mode=True)
        try:
            for layer in state.layers:
                for name, scale in scales.items():
                    layer.set_scale(name, scale)  # scaling = scale · α/r (α/√r for rsLoRA)
            if len(variants) == 1:
                yield state.peft_model, None
            else:
                yield state.peft_model, [variant[0][0].peft_name if variant else BASE for variant in variants]
        finally:
            for layer in state.layers:
                for name in scales:
                    layer.set_scale(name, 1.0)


class _Loaded:
    """Just enough of a LoadedModel for ``strip``."""

    def __init__(self, model: Any) -> None:
        self.model = model
