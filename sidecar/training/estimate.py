"""``estimate``: a train request's peak memory, from the model's config and the dataset's token
lengths — no weights loaded, nothing trained — and the memory guard's verdict on it.

What it counts (bytes), for the process the job runs in:

- ``base``: every parameter and buffer of the model built from its config on the meta device (so tied
  weights count once), in the load dtype; quantized (CUDA) linears at 4 or 8 bits. Where the job takes
  bf16 matmuls on CPU (training/bf16.py) the bf16 copies of the decoder's frozen linears are added;
- ``lora``: r·(in + out) per adapted linear, weights and gradients, in the adapter's dtype;
- ``optimizer``: AdamW's two moments per LoRA weight (fp32);
- ``activationPeak``: the largest micro-batch the job can run (the ``batchSize`` longest examples,
  split to ``microBatchTokens`` as the loop splits them), as padded tokens × what one token keeps for
  the backward pass in every layer (or only the layer inputs plus one layer, with gradient
  checkpointing), plus its label tokens × the vocabulary for the LM head's logits and their
  gradients; the coefficients below are counted from the layers and measured (docs/PERFORMANCE.md,
  "Memory estimate");
- ``workspace``: the runtime — on CPU the interpreter, torch, transformers, peft and the tokenizer
  as resident memory (measured); on CUDA the kernels' workspace beside the allocator's tensors.

``total`` is their sum: on CPU the peak RSS of a process that runs this job alone, on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated``). ``available`` is what the OS says is free
(Linux ``MemAvailable``, capped by a cgroup limit; CUDA ``mem_get_info``) plus what the job's process
already holds of the total (a warm base model, the runtime).
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Optional

import msgspec

from .. import data, errors, wire
from .loss import split_by_tokens

MARGIN_ENV = "LORA_SIDECAR_MEMORY_MARGIN_MB"
GUARD_ENV = "LORA_SIDECAR_MEMORY_GUARD"
DEFAULT_MARGIN_MB = 256
MIB = 2**20

# Per token and decoder layer, in bytes of the activation dtype: what autograd keeps for the backward
# pass of a Llama-shaped block with LoRA on its projections (fastlora: a 1-byte dropout mask and the
# rank-r intermediate per adapted input, never a dropped-out copy): HIDDEN × hidden_size + KV × (kv
# heads × head_dim) + INTER × intermediate_size. Counted from the block (about 14, 4, 6), then fitted
# to measured peaks (docs/PERFORMANCE.md "Memory estimate": SmolLM2-135M fp32 and bf16-matmul runs at
# 338-1352 tokens, and two tiny Llamas; every fit within 5 %).
HIDDEN, KV, INTER = 12.7, 3.6, 5.5
BF16_BODY = 0.72
"""With bf16 matmuls (training/bf16.py) the linears keep bf16 copies of their inputs: measured 0.69
(SmolLM2) and 0.75 (the 8-layer tiny Llama) of the fp32 path's per-token bytes."""
CHECKPOINTED_HIDDEN = 6.0
"""With gradient checkpointing, per layer and token: the block's input and what the checkpoint keeps
with it (measured on SmolLM2: 6 × hidden_size), plus one block's activations while it is recomputed."""
HEAD = 2.7
"""LM-head logits per label token, × vocabulary × 4 bytes: the fp32 logits, their log-softmax and,
during the backward pass, their gradient (counted 3; measured 2.7 on the tiny Llama, whose step is
almost all LM head)."""
CPU_RUNTIME_BYTES = 490 * MIB
"""Resident memory of the runtime in a job's process on CPU (Linux x86-64, torch 2.x, transformers 5):
the interpreter and the sidecar, torch, transformers, peft, a tokenizer, oneDNN's code and buffers —
the intercept of peak RSS against tokens on SmolLM2 and the 8-layer tiny Llama, less the weights."""
SPLIT_SLACK = 1.3
"""CPU, a step split into micro-batches of different shapes: the heap holds more than the largest
micro-batch's activations (freed chunks of the earlier shapes are not reused whole). Fitted on
tests/test_memory.py's split runs (measured 1.19-1.48 × the largest micro-batch's activations)."""
CUDA_WORKSPACE_BYTES = 64 * MIB
"""cuBLAS workspaces and the allocator's rounding beside the tensors (the CUDA context itself is not
in the allocator's count). Not measured yet (no GPU run of the estimate)."""


_LOCK = threading.Lock()
_SHAPES: dict[tuple, "Shape"] = {}  # (path, gguf file, dtype, rank, targets) -> Shape: a meta build costs ~1 s
_TOKENIZERS: dict[tuple, Any] = {}  # (path, gguf file) -> tokenizer


@dataclass
class Held:
    """What the job's process already holds of the job's peak."""

    base: int = 0  # the warm base model's bytes (weights + bf16 copies), 0 when not warm
    runtime: bool = False  # torch and the libraries are loaded in that process


@dataclass
class Shape:
    """The model, as its config and a meta-device build tell it."""

    params_bytes: int
    linear_params: int  # elements of the decoder's linears (what bf16 copies and quantization touch)
    lora_params: int  # elements of the LoRA weights on the targets
    layers: int
    hidden: int
    kv: int
    inter: int
    vocab: int


def guard_enabled() -> bool:
    return os.environ.get(GUARD_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def margin_bytes() -> int:
    text = os.environ.get(MARGIN_ENV, "").strip()
    try:
        return int(float(text) * MIB) if text else DEFAULT_MARGIN_MB * MIB
    except ValueError:
        raise errors.InvalidParams(f"{MARGIN_ENV} must be a number of MiB, not {text!r}", field=MARGIN_ENV) from None


def estimate(params: wire.TrainParams, *, held: Optional[Held] = None, suggest: bool = False) -> wire.EstimateResult:
    """The job's peak (see the module doc). ``suggest``: when it does not fit, also try smaller settings
    and name those that would. Raises ModelNotFound, DatasetInvalid, Unsupported (an architecture
    without a decoder config)."""
    import torch

    from ..models import resolve_model, select_device, select_dtype
    from . import bf16

    held = held or Held()
    resolved = resolve_model(params.base_model)
    device = select_device(params.device)
    dtype = select_dtype(device, params.dtype)
    quant = params.quantize_bits if params.quantize and device.startswith("cuda") else None
    with _LOCK:  # one estimate at a time; the shape and the tokenizer are kept for the next request
        key = (resolved.path, resolved.gguf_file, str(dtype), params.rank, tuple(params.target_modules or ()))
        if key not in _SHAPES:
            _SHAPES[key] = _shape(_config(resolved, params.trust_remote_code), params, dtype)
        shape = _SHAPES[key]
        lengths, labels = _lengths(params, resolved)
    takes_bf16 = bf16.wanted(params.dtype, device, dtype, quant is not None, 1)
    act_bytes = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return _result(params, shape, lengths, labels, held=held, device=device, dtype_bytes=dtype.itemsize,
                   act_bytes=act_bytes, quant=quant, takes_bf16=takes_bf16, suggest=suggest)


def _result(params: wire.TrainParams, shape: Shape, lengths: list[int], labels: list[int], *, held: Held,
            device: str, dtype_bytes: int, act_bytes: int, quant: Optional[int], takes_bf16: bool,
            suggest: bool) -> wire.EstimateResult:
    base = shape.params_bytes
    if quant is not None:  # the linears at 4 or 8 bits (plus bitsandbytes' absmax per 64: ~3 %)
        base -= int(shape.linear_params * (dtype_bytes - quant / 8 * 1.03))
    if takes_bf16:
        base += 2 * shape.linear_params
    lora = 2 * shape.lora_params * 4  # fp32 (PEFT upcasts LoRA weights of a bf16/fp16 base), with gradients
    optimizer = 2 * shape.lora_params * 4
    tokens, label_tokens, split = peak_micro_batch(params, lengths, labels, device)
    activations = activation_bytes(shape, tokens, label_tokens, act_bytes, params.gradient_checkpointing,
                                   bf16_matmuls=takes_bf16)
    on_cuda = device.startswith("cuda")
    if split and not on_cuda:
        activations = int(activations * SPLIT_SLACK)
    workspace = CUDA_WORKSPACE_BYTES if on_cuda else CPU_RUNTIME_BYTES
    total = base + lora + optimizer + activations + workspace
    held_bytes = min(held.base, base) + (workspace if held.runtime and not on_cuda else 0)
    available = available_bytes(device) + held_bytes
    margin = margin_bytes()
    fits = total <= available - margin
    result = wire.EstimateResult(
        device=device, base_model=params.base_model, base_bytes=base, lora_bytes=lora, optimizer_bytes=optimizer,
        activation_bytes_peak=activations, workspace_bytes=workspace, total_bytes=total, available_bytes=available,
        held_bytes=held_bytes, margin_bytes=margin, fits=fits, peak_tokens=tokens, peak_label_tokens=label_tokens)
    if fits or not suggest:
        return result
    budget = available - margin
    tries = _smaller(params, device)
    found = []
    for text, smaller in tries:
        r = _result(smaller, shape, lengths, labels, held=held, device=device, dtype_bytes=dtype_bytes,
                    act_bytes=act_bytes, quant=smaller.quantize_bits if smaller.quantize and on_cuda else None,
                    takes_bf16=takes_bf16, suggest=False)
        if r.total_bytes <= budget:
            found.append(f"{text} (estimate {r.total_bytes / MIB:.0f} MiB)")
    return msgspec.structs.replace(result, suggestions=found)


def _smaller(params: wire.TrainParams, device: str) -> list[tuple[str, wire.TrainParams]]:
    """Settings to try when a job does not fit, one change each, then all together."""
    rep = msgspec.structs.replace
    out = []
    if params.batch_size > 1:
        b = max(1, params.batch_size // 2)
        out.append((f"batchSize {b} with gradientAccumulation {params.gradient_accumulation * 2}",
                    rep(params, batch_size=b, gradient_accumulation=params.gradient_accumulation * 2)))
    for budget in (512, 256):
        if params.micro_batch_tokens in (None, 0) or params.micro_batch_tokens > budget:
            out.append((f"microBatchTokens {budget}", rep(params, micro_batch_tokens=budget)))
    if not params.gradient_checkpointing:
        out.append(("gradientCheckpointing true", rep(params, gradient_checkpointing=True)))
    if device.startswith("cuda") and not params.quantize:
        out.append(("quantize true (4-bit)", rep(params, quantize=True, quantize_bits=4)))
    out.append(("microBatchTokens 256 with gradientCheckpointing true",
                rep(params, micro_batch_tokens=256, gradient_checkpointing=True)))
    return out


def activation_bytes(shape: Shape, tokens: int, label_tokens: int, act_bytes: int, checkpointing: bool, *,
                     bf16_matmuls: bool = False) -> int:
    """Bytes the largest micro-batch keeps at its peak (see the coefficients above)."""
    per_layer = (HIDDEN * shape.hidden + KV * shape.kv + INTER * shape.inter) * (BF16_BODY if bf16_matmuls else 1.0)
    if checkpointing:  # what each block's checkpoint keeps, plus one block recomputed during the backward pass
        body = tokens * act_bytes * (shape.layers * CHECKPOINTED_HIDDEN * shape.hidden + per_layer)
    else:
        body = tokens * act_bytes * shape.layers * per_layer
    head = label_tokens * shape.vocab * 4 * HEAD
    return int(body + head)


def peak_micro_batch(params: wire.TrainParams, lengths: list[int], labels: list[int],
                     device: str) -> tuple[int, int, bool]:
    """Padded tokens and label tokens of the largest micro-batch: the ``batchSize`` longest examples
    split as the loop splits them (``microBatchTokens``; default 512 on CPU, no split on GPU); and
    whether that batch is split."""
    from .setup import CPU_MICRO_BATCH_TOKENS

    budget = params.micro_batch_tokens
    if budget is None:
        budget = CPU_MICRO_BATCH_TOKENS if device == "cpu" else 0
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)[:params.batch_size]
    best = (0, 0)
    parts = split_by_tokens(order, lengths, budget)
    for part in parts:
        padded = len(part) * max(lengths[i] for i in part)
        best = max(best, (padded, sum(labels[i] for i in part)))
    return best[0], best[1], len(parts) > 1


def available_bytes(device: str) -> int:
    """Free memory now: CUDA ``mem_get_info``; CPU ``MemAvailable`` (Linux, capped by the cgroup's
    limit), else the free physical pages."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free + torch.cuda.memory_reserved(torch.device(device)) - torch.cuda.memory_allocated(
            torch.device(device)))
    avail = _meminfo_available()
    limit = _cgroup_free()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 0
    return min(avail, limit) if limit is not None else avail


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_free() -> Optional[int]:
    """cgroup v2: memory.max − memory.current of this process's group, when it has a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.strip().split("::", 1)[1] for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        root = "/sys/fs/cgroup" + rel.rstrip("/")
        with open(root + "/memory.max") as f:
            text = f.read().strip()
        if text == "max":
            return None
        with open(root + "/memory.current") as f:
            return max(0, int(text) - int(f.read().strip()))
    except (OSError, ValueError, StopIteration):
        return None


def refusal(result: wire.EstimateResult) -> errors.MemoryInsufficient:
    """The guard's error: both numbers, and what would fit."""
    need, avail, margin = (round(x / MIB) for x in (result.total_bytes, result.available_bytes, result.margin_bytes))
    fix = ("; would fit: " + "; ".join(result.suggestions)) if result.suggestions else \
        "; no smaller setting tried fits: free memory, or train on a smaller model"
    return errors.MemoryInsufficient(
        f"This job needs about {need} MiB on {result.device} (estimate) but {avail} MiB are available, less the "
        f"{margin} MiB margin ({MARGIN_ENV}){fix}", device=result.device, totalBytes=result.total_bytes,
        availableBytes=result.available_bytes, marginBytes=result.margin_bytes,
        estimate=msgspec.to_builtins(result), suggestions=list(result.suggestions))


# ---------------------------------------------------------------------------------------------
# The model's shape and the dataset's lengths
# ---------------------------------------------------------------------------------------------

def _config(resolved: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    return AutoConfig.from_pretrained(resolved.path, **kwargs)


def _shape(config: Any, params: wire.TrainParams, dtype: Any) -> Shape:
    import torch
    from transformers import AutoModelForCausalLM

    from ..adapters.surgery import default_target_modules

    text = getattr(config, "text_config", None) or config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=params.trust_remote_code)
    params_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    params_bytes += sum(t.numel() * t.element_size() for t in model.buffers())
    targets = params.target_modules or default_target_modules(model)
    head = model.get_output_embeddings()
    linear_params = lora_params = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        linear_params += module.weight.numel()
        if any(_matches(name, t) for t in targets):
            lora_params += params.rank * (module.in_features + module.out_features)
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    inter = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return Shape(params_bytes=params_bytes, linear_params=linear_params, lora_params=lora_params,
                 layers=text.num_hidden_layers, hidden=text.hidden_size, kv=kv, inter=inter,
                 vocab=text.vocab_size)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's full name, or its last components."""
    return name == target or name.endswith("." + target) or bool(re.fullmatch(target, name))


def _lengths(params: wire.TrainParams, resolved: Any) -> tuple[list[int], list[int]]:
    """Token lengths and label counts of the training examples, tokenized as the job will."""
    from transformers import AutoTokenizer

    from ..models import ensure_pad_and_template

    kwargs: dict[str, Any] = {"trust_remote_code": params.trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    tokenizer = _TOKENIZERS.get((resolved.path, resolved.gguf_file))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
        ensure_pad_and_template(tokenizer)
        _TOKENIZERS[(resolved.path, resolved.gguf_file)] = tokenizer
    sources = data.load_train_and_validation(params)
    items, _ = data.tokenize(sources.train, tokenizer, loss_on=params.loss_on, max_seq_length=params.max_seq_length,
                             metadata=sources.metadata)
    return [len(t.input_ids) for t in items], [t.trainable for t in items]


def ceil_mib(n: int) -> int:
    return math.ceil(n / MIB)
