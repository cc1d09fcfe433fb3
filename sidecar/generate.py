"""``generate``: chat completions from the warm base model, optionally with an adapter applied."""

from __future__ import annotations

from pathlib import Path

from . import data, errors, wire
from .adapters.surgery import attached_adapter
from .models import apply_thread_setting


def generate(params: wire.GenerateParams, *, models: Any) -> wire.GenerateResult:
    """Answer ``messages`` with the warm base model, with the adapter at ``adapterPath`` applied for
    this call only. Greedy when ``temperature == 0``, else seeded sampling. Returns only new text."""
    import torch
    from transformers import GenerationConfig

    if params.adapter_path is not None and not (Path(params.adapter_path).expanduser() / "adapter_config.json").is_file():
        raise errors.AdapterNotFound(f"Adapter {params.adapter_path} not found (no adapter_config.json there)",
                                     path=params.adapter_path)
    apply_thread_setting()
    loaded = models.get(params.base_model, device=params.device, dtype=params.dtype,
                        trust_remote_code=params.trust_remote_code)
    tok = loaded.tokenizer
    messages = [{"role": m.role, "content": m.content or ""} for m in params.messages]
    text = data.render_chat(tok, messages, add_generation_prompt=True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    input_ids = enc["input_ids"].to(loaded.device)
    generation = loaded.model.generation_config
    eos = generation.eos_token_id if generation.eos_token_id is not None else tok.eos_token_id
    sampling = params.temperature > 0
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens, do_sample=sampling,
        temperature=params.temperature if sampling else None, top_p=None, top_k=None,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos, eos_token_id=eos,
    )
    with attached_adapter(loaded, params.adapter_path) as model, torch.random.fork_rng(devices=[]), \
            torch.no_grad():
        torch.manual_seed(params.seed)
        if loaded.device.startswith("cuda"):
            torch.cuda.manual_seed(params.seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, output_scores=params.logprobs,
                             return_dict_in_generate=True)
    new = out.sequences[0, input_ids.shape[1]:]
    logprobs = None
    if params.logprobs:
        # Scores are the processed logits of each step; with greedy decoding nothing processes them,
        # so these are the model's own log-probabilities of the tokens it produced.
        logprobs = [float(torch.log_softmax(score[0].float(), -1)[token]) for score, token in zip(out.scores, new)]
    return wire.GenerateResult(text=tok.decode(new, skip_special_tokens=True), tokens=int(new.numel()),
                               base_model=params.base_model, adapter_path=params.adapter_path,
                               token_ids=new.tolist(), logprobs=logprobs)
