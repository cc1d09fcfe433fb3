"""``generate``: chat completions from the warm base model, with stacked resident adapters, as exams.

A request holds one conversation (``messages``) or several (``prompts``), and one adapter set
(``adapters``; the legacy ``adapterPath``; neither: the bare base) or several (``variants``). Every
prompt × variant is one row. Rows are generated in batches: left-padded, with an attention mask, so
that transformers derives each row's positions from the mask (``cumsum - 1``) and a padded row computes
what it would alone; rows of different variants share a forward where PEFT allows it (see
adapters/stack.py). With greedy decoding each answer is the one a single call gives, token for token
(per-token log-probabilities agree to float rounding, ~1e-6 in float32). With sampling the draws of a
row depend on the batch it is in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from . import data, errors, wire
from .adapters.surgery import attached_adapter
from .models import apply_thread_setting


def check_params(params: wire.GenerateParams) -> None:
    """The combinations the types cannot express; InvalidParams naming the field. No model needed."""
    wire.one_of(params, "messages", "prompts", field="$.messages",
                message="Give exactly one of messages (one conversation) and prompts (several)")
    wire.one_of(params, "adapter_path", "adapters", "variants", at_most=True,
                message="Give at most one of adapterPath, adapters and variants (got {given})")
    if params.adapter_path is not None and not (Path(params.adapter_path).expanduser() / "adapter_config.json").is_file():
        raise errors.AdapterNotFound(f"Adapter {params.adapter_path} not found (no adapter_config.json there)",
                                     path=params.adapter_path, field="$.adapterPath")
    for where, refs in _adapter_sets(params):
        seen: set[str] = set()
        for k, ref in enumerate(refs):
            wire.one_of(ref, "id", "path", message="Each adapter needs exactly one of id and path", field=f"{where}[{k}]")
            key = ref.id or str(Path(ref.path).expanduser().absolute())
            if key in seen:
                raise errors.InvalidParams(f"Adapter {key} appears twice in one set; give it once with the sum of "
                                           "the scales", field=f"{where}[{k}]")
            seen.add(key)


def _adapter_sets(params: wire.GenerateParams) -> list[tuple[str, list[wire.AdapterRef]]]:
    if params.variants is not None:
        return [(f"$.variants[{j}].adapters", v.adapters) for j, v in enumerate(params.variants)]
    return [("$.adapters", params.adapters or [])]


def generate(params: wire.GenerateParams, *, models: Any, registry: Any = None, stack: Any = None,
             should_stop: Optional[Callable[[], bool]] = None) -> wire.GenerateResult:
    """Answer every prompt × variant of ``params`` (see the module doc). ``registry`` / ``stack`` are the
    server's resident adapters; without them only the bare base and ``adapterPath`` are available.
    ``should_stop`` is polled at every generated token; when it turns True the request ends with
    RequestCancelled (a long exam can be cancelled like a training job). ``params`` passed
    ``check_params`` at the door (methods/generate.py); they are not checked again here."""
    import torch

    assert (params.messages is None) != (params.prompts is None), "generate() runs on checked params"
    apply_thread_setting()
    loaded = models.get(params.base_model, device=params.device, dtype=params.dtype,
                        trust_remote_code=params.trust_remote_code)
    tok = loaded.tokenizer
    conversations = [(p.id, p.messages) for p in params.prompts] if params.prompts is not None \
        else [(None, params.messages)]
    prompt_ids = [_prompt_ids(tok, messages) for _, messages in conversations]
    config, eos = _generation_config(params, loaded)
    batch = _Batch(prompt_ids, config, eos, params, loaded.device, should_stop or (lambda: False))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(params.seed)
        if loaded.device.startswith("cuda"):
            torch.cuda.manual_seed(params.seed)
        outputs, used, evicted = _run(params, loaded, models, registry, stack, batch)

    variant_ids: list[Optional[str]] = [v.id for v in params.variants] if params.variants is not None else [None]
    answers = []
    for i, (prompt_id, _) in enumerate(conversations):
        for j, variant_id in enumerate(variant_ids):
            ids, logprobs = outputs[(i, j)]
            answers.append(wire.Answer(
                prompt=i, variant=j, prompt_id=prompt_id, variant_id=variant_id,
                text=tok.decode(ids, skip_special_tokens=True), tokens=len(ids), token_ids=ids, logprobs=logprobs,
                finish_reason="stop" if ids and ids[-1] in batch.eos else "length"))
    first = answers[0]
    return wire.GenerateResult(text=first.text, tokens=first.tokens, base_model=params.base_model,
                               adapter_path=params.adapter_path, token_ids=first.token_ids, logprobs=first.logprobs,
                               answers=answers, adapters=sorted({r.id for r in used}), evicted=evicted)


def _prompt_ids(tok: Any, messages: list[wire.Message]) -> list[int]:
    text = data.render_chat(tok, [{"role": m.role, "content": m.content or ""} for m in messages],
                            add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _generation_config(params: wire.GenerateParams, loaded: Any) -> tuple[Any, set[int]]:
    """transformers' GenerationConfig for ``params``, and the set of end-of-sequence ids."""
    from transformers import GenerationConfig

    tok = loaded.tokenizer
    generation = loaded.model.generation_config
    eos = generation.eos_token_id if generation.eos_token_id is not None else tok.eos_token_id
    sampling = params.temperature > 0
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens, do_sample=sampling,
        temperature=params.temperature if sampling else None, top_p=None, top_k=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else _first(eos), eos_token_id=eos,
        output_scores=params.logprobs, return_dict_in_generate=True,
    )
    return config, set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _run(params: wire.GenerateParams, loaded: Any, models: Any, registry: Any, stack: Any,
         batch: "_Batch") -> tuple[dict[tuple[int, int], tuple[list[int], Optional[list[float]]]], list, list[str]]:
    """Every row (prompt, variant) generated with its adapters on; returns (outputs by row, residents
    used, ids evicted)."""
    every_prompt = [(i, 0) for i in range(len(batch.prompt_ids))]
    if params.adapter_path is not None:
        if stack is not None:
            stack.strip(loaded)  # stock PEFT on the bare base, as before residents existed
        with attached_adapter(loaded, params.adapter_path) as model:
            return batch.run(model, every_prompt, None), [], []
    variants, used, evicted = _resolve(params, loaded, models, registry)
    if stack is None:  # no residents in this process: only the bare base
        return batch.run(loaded.model, every_prompt, None), used, evicted
    from .adapters.stack import plan

    registry.touch(used)
    outputs: dict[tuple[int, int], tuple[list[int], Optional[list[float]]]] = {}
    for group in plan(variants):
        with stack.activate(loaded, [variants[j] for j in group.variants]) as (model, names):
            rows = [(i, j) for j in group.variants for i in range(len(batch.prompt_ids))]
            by_variant = None if names is None else dict(zip(group.variants, names))
            outputs.update(batch.run(model, rows, by_variant))
    return outputs, used, evicted


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _resolve(params: wire.GenerateParams, loaded: Any, models: Any, registry: Any) -> tuple[list, list, list[str]]:
    """Each variant as [(Resident, scale)]; ``path`` references are loaded under the budget, never evicting
    an adapter this request uses. Returns (variants, residents used, ids evicted)."""
    sets = _adapter_sets(params)
    if registry is None:
        if any(refs for _, refs in sets):
            raise errors.Unsupported("Resident adapters are not available in this process")
        return [[] for _ in sets], [], []
    protect = {ref.id for _, refs in sets for ref in refs if ref.id is not None}
    variants, used, evicted = [], [], []
    for where, refs in sets:
        variant = []
        for k, ref in enumerate(refs):
            if ref.id is not None:
                resident = registry.get(ref.id, field_name=f"{where}[{k}].id")
            else:
                outcome = registry.load(ref.path, models=models, base_model=params.base_model, device=params.device,
                                        dtype=params.dtype, trust_remote_code=params.trust_remote_code,
                                        protect=protect, field_name=f"{where}[{k}].path")
                resident = outcome.resident
                evicted += outcome.evicted
                protect.add(resident.id)
            if resident.base_key != loaded.key:
                raise errors.AdapterBaseMismatch(
                    f"Adapter {resident.id} is resident on base {resident.base_name} ({resident.base_path}, "
                    f"{resident.device}), not on this request's base {params.base_model} ({loaded.resolved.path}, "
                    f"{loaded.device}, {str(loaded.dtype).removeprefix('torch.')}); pass baseModel "
                    f"{resident.base_name!r}", id=resident.id, field="$.baseModel", baseModel=params.base_model,
                    adapterBase=resident.base_name)
            if any(r is resident for r, _ in variant):
                raise errors.InvalidParams(f"Adapter {resident.id} appears twice in one set (by id and by path); "
                                           "give it once with the sum of the scales", field=f"{where}[{k}]")
            variant.append((resident, ref.scale))
            used.append(resident)
        variants.append(variant)
    return variants, list({r.id: r for r in used}.values()), evicted


class _Batch:
    """Runs rows (prompt index, variant index) in left-padded batches of ``batchSize``."""

    def __init__(self, prompt_ids: list[list[int]], config: Any, eos: set[int], params: wire.GenerateParams,
                 device: str, should_stop: Callable[[], bool]) -> None:
        self.prompt_ids, self.config, self.eos = prompt_ids, config, eos
        self.params, self.device, self.should_stop = params, device, should_stop
        self.rows_done = 0

    def _stop_criteria(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        should_stop = self.should_stop

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Cancelled()])

    def _check_cancelled(self) -> None:
        if self.should_stop():
            raise errors.RequestCancelled("Generate request cancelled", stepsCompleted=self.rows_done)

    def run(self, model: Any, rows: list[tuple[int, int]],
            names: Optional[dict[int, str]]) -> dict[tuple[int, int], tuple[list[int], Optional[list[float]]]]:
        import torch

        pad = self.config.pad_token_id
        # Similar lengths together: less padding. The answers do not depend on the batch they are in.
        rows = sorted(rows, key=lambda row: len(self.prompt_ids[row[0]]))
        out: dict[tuple[int, int], tuple[list[int], Optional[list[float]]]] = {}
        for start in range(0, len(rows), self.params.batch_size):
            self._check_cancelled()
            chunk = rows[start:start + self.params.batch_size]
            width = max(len(self.prompt_ids[i]) for i, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, (i, _) in enumerate(chunk):
                ids = self.prompt_ids[i]
                input_ids[b, width - len(ids):] = torch.tensor(ids)
                mask[b, width - len(ids):] = 1
            extra = {} if names is None else {"adapter_names": [names[j] for _, j in chunk]}
            result = model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                    generation_config=self.config, stopping_criteria=self._stop_criteria(), **extra)
            self._check_cancelled()
            self.rows_done += len(chunk)
            new = result.sequences[:, width:].tolist()
            logprobs = None
            if self.params.logprobs:
                # Scores are the processed logits of each step; with greedy decoding nothing processes them,
                # so these are the model's own log-probabilities of the tokens it produced.
                tokens = result.sequences[:, width:]
                picked = torch.stack([torch.log_softmax(score.float(), -1).gather(-1, tokens[:, t, None])[:, 0]
                                      for t, score in enumerate(result.scores)], 1).tolist()
            for b, row in enumerate(chunk):
                ids = new[b]
                end = next((t + 1 for t, token in enumerate(ids) if token in self.eos), len(ids))
                ids = ids[:end]
                if self.params.logprobs:
                    logprobs = picked[b][:end]
                out[row] = (ids, logprobs)
        return out
