"""LoRA on the cached base model, and taking it off again.

Every job that puts LoRA layers on a warm base model goes through here: ``attach_lora`` for training,
``attached_adapter`` for generating with an adapter read from disk, and ``detach_lora``, which removes
every LoRA layer without merging and restores the base model exactly (attributes, config, flags,
gradients), whatever happened in between.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .. import errors, wire
from .fit import locate


def default_target_modules(model: Any) -> list[str]:
    """Every linear projection inside the transformer blocks, per architecture (training/targets.py:
    the table ``supports`` reports, and the generic finder for other architectures)."""
    from ..training.targets import default_targets

    return default_targets(model)


@dataclass
class BaseState:
    """What attaching LoRA (and gradient checkpointing) may change on the cached model, to put back."""

    attrs: set[str]
    config: dict[str, Any]
    training: bool


def snapshot(model: Any) -> BaseState:
    return BaseState(set(vars(model)), dict(vars(model.config)), model.training)


def detach_lora(model: Any, peft_model: Any, before: BaseState) -> None:
    """Remove every LoRA layer without merging and restore the base model's state exactly."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if peft_model is not None:
        peft_model.unload()
    # Whatever peft could not unload (e.g. it failed half-way through injection): swap back by hand.
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        model.gradient_checkpointing_disable()
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    for attr in set(vars(model)) - before.attrs:
        delattr(model, attr)
    for key in set(vars(model.config)) - set(before.config):
        delattr(model.config, key)
    for key, value in before.config.items():
        if key not in vars(model.config) or vars(model.config)[key] != value:
            setattr(model.config, key, value)
    model.requires_grad_(False)
    model.train(before.training)
    for p in model.parameters():
        p.grad = None


def attach_lora(model: Any, params: wire.TrainParams, base_path: str) -> Any:
    """Inject LoRA layers into ``model`` in place and return the PeftModel wrapping it."""
    from peft import LoraConfig, get_peft_model

    targets = params.target_modules or default_target_modules(model)
    config = LoraConfig(
        r=params.rank, lora_alpha=params.alpha, lora_dropout=params.dropout, target_modules=targets,
        use_rslora=params.use_rslora, use_dora=params.use_dora, bias="none", task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # peft probes the deprecated `is_gradient_checkpointing`; the FutureWarning is noise.
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise errors.InvalidParams(f"Cannot attach LoRA: {exc}", field="targetModules") from None
    # The adapter must name a base that stock from_pretrained can open (the converted cache for the
    # embedded model), not whatever name_or_path the cached instance happens to carry.
    peft_model.peft_config["default"].base_model_name_or_path = base_path
    return peft_model


@contextlib.contextmanager
def attached_adapter(loaded: Any, adapter_path: Optional[str]) -> Iterator[Any]:
    """Yield the cached model with the adapter at ``adapter_path`` applied (or the plain base model);
    on exit the adapter is removed and the base model is exactly as before."""
    if adapter_path is None:
        yield loaded.model
        return
    # Stock PEFT reads the directory (DoRA and every other kind, adapter_model.bin too); fit.py says
    # when it is not an adapter directory at all.
    adapter_dir = locate(adapter_path, pickle_ok=True)
    from peft import PeftModel

    before = snapshot(loaded.model)
    peft_model = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # see attach_lora
                peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=False)
        except Exception as exc:
            raise errors.ModelLoadFailed(f"Adapter {adapter_path} cannot be applied to {loaded.name}: "
                                         f"{type(exc).__name__}: {exc}", path=str(adapter_path)) from exc
        peft_model.eval()
        yield peft_model
    finally:
        detach_lora(loaded.model, peft_model, before)

