"""Reading one base model and its tokenizer from disk (or the hub), with failures as sidecar errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import errors
from .loaded import LoadedModel, ModelKey
from .resolve import ResolvedModel
from .tokenizer import ensure_pad_and_template

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def load_model(resolved: ResolvedModel, name: str, key: ModelKey, *, trust_remote_code: bool,
               warnings: list[str]) -> LoadedModel:
    """Load what ``key`` names (on ``key.device``, in ``key.dtype``, quantized to ``key.quantize_bits``).

    The model comes back in eval mode with every parameter frozen; ``warnings`` gets what the caller
    should hear about. Raises ModelLoadFailed or OutOfMemory.
    """
    if resolved.kind == "gguf":
        warnings.append("Loading a .gguf file dequantizes it on every load (slow); the embedded default "
                        "is converted once instead.")
    model, tokenizer = _read(resolved, name, key, trust_remote_code)
    warnings.extend(ensure_pad_and_template(tokenizer))
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters())
    nbytes += sum(t.numel() * t.element_size() for t in model.buffers())
    return LoadedModel(key=key, name=name, model=model, tokenizer=tokenizer, resolved=resolved, device=key.device,
                       dtype=key.dtype, load_seconds=0.0, cached=False, warnings=warnings, nbytes=nbytes)


def _model_kwargs(resolved: ResolvedModel, key: ModelKey, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": key.dtype, "trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if key.quantize_bits is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=key.dtype)
            if key.quantize_bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": key.device}
    return kwargs


def _read(resolved: ResolvedModel, name: str, key: ModelKey,
          trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _model_kwargs(resolved, key, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        if key.quantize_bits is None:
            model.to(key.device)
        model.eval()
        model.requires_grad_(False)
        tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if resolved.gguf_file:
            tok_kwargs["gguf_file"] = resolved.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **tok_kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise errors.OutOfMemory(f"Out of memory while loading {name} on {key.device}: {exc}",
                                 name=name, device=key.device) from exc
    except errors.SidecarError:
        raise
    except Exception as exc:
        raise _load_error(exc, resolved, name, key.device) from exc
    return model, tokenizer


def _load_error(exc: Exception, resolved: ResolvedModel, name: str, device: str) -> errors.SidecarError:
    """The sidecar error for a load that raised ``exc``: OutOfMemory when it reads like one."""
    text = f"{type(exc).__name__}: {exc}"
    if "out of memory" in text.lower() or "can't allocate memory" in text.lower():
        return errors.OutOfMemory(f"Out of memory while loading {name} on {device}: {text}", name=name, device=device)
    hint = ""
    if resolved.kind == "hub":
        hint = (" The model is not in the local Hugging Face cache and could not be downloaded; "
                "download it on a connected machine or pass a local directory (set HF_HUB_OFFLINE=1 "
                "to skip download attempts).")
    where = f"{resolved.path}" + (f" ({resolved.gguf_file})" if resolved.gguf_file else "")
    return errors.ModelLoadFailed(f"Could not load model {name!r} from {where}: {text.rstrip('.')}.{hint}",
                                  name=name, path=resolved.path, kind=resolved.kind, cause=text)
