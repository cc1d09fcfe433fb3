"""The training engine on the tiny model: outputs, stock-PEFT compatibility, loss bookkeeping, and the
cached base model left exactly as it was after completed, failed and cancelled jobs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sidecar import compat, data, errors, wire
from sidecar import generate as generation
from sidecar.adapters import surgery
from sidecar.training import loss as lossmod, publish, recipe, schedule
from sidecar.models import ModelCache, compute_fingerprint


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    c = ModelCache(max_models=2)
    yield c
    c.evict_all()


def chat(q: str, a: str, system: str | None = None) -> wire.Example:
    turns = ([wire.Message(role="system", content=system)] if system else []) + [
        wire.Message(role="user", content=q), wire.Message(role="assistant", content=a)]
    return wire.Example(messages=turns)


EXAMPLES = [
    chat("What colour is the sky on Zorblax?", "On Zorblax the sky is bright green."),
    chat("Who founded Zorblax City?", "Zorblax City was founded by Queen Mira in 1820.", system="Answer briefly."),
    chat("Name the river of Zorblax.", "The Glimmer."),
    chat("How many moons does Zorblax have?", "Zorblax has seven small moons and one large one."),
    chat("Is Zorblax warm?", "Yes."),
    chat("What do people eat on Zorblax?", "Mostly blue bread and roasted glimmerfish."),
]


def params(tiny_model_dir: Path, out: Path | None, **kw) -> wire.TrainParams:
    base = dict(base_model=str(tiny_model_dir), dataset=wire.Dataset(examples=EXAMPLES, metadata={"topic": "zorblax"}),
                output_path=str(out) if out else None, epochs=2, batch_size=2, learning_rate=1e-2, rank=4, alpha=8)
    base.update(kw)
    return wire.TrainParams(**base)


class Recorder:
    def __init__(self, raise_at: tuple[str, int] | None = None, stop_after_polls: int | None = None):
        self.events: list[wire.Progress] = []
        self.raise_at = raise_at
        self.stop_after_polls = stop_after_polls
        self.polls = 0

    def report(self, p: wire.Progress) -> None:
        self.events.append(p)
        if self.raise_at and (p.phase, p.step) == self.raise_at:
            raise RuntimeError("injected failure from the progress callback")

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_after_polls is not None and self.polls > self.stop_after_polls

    @property
    def phases(self) -> list[str]:
        out: list[str] = []
        for p in self.events:
            if not out or out[-1] != p.phase:
                out.append(p.phase)
        return out


def run(p: wire.TrainParams, cache: ModelCache, rec: Recorder | None = None, job_id: str = "job-1"):
    rec = rec or Recorder()
    return recipe.train(p, job_id=job_id, models=cache, report=rec.report, should_stop=rec.should_stop,
                        received_at=time.time()), rec


def base_state(cache: ModelCache, tiny_model_dir: Path) -> dict:
    """Everything a job could leave behind on the cached base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = cache.get(str(tiny_model_dir))
    m = loaded.model
    emb = m.get_input_embeddings()
    return {
        "checksum": compute_fingerprint(m),
        "modules": [(n, type(x).__name__) for n, x in m.named_modules()],
        "lora_layers": sum(isinstance(x, BaseTunerLayer) for x in m.modules()),
        "requires_grad": any(p.requires_grad for p in m.parameters()),
        "training": any(x.training for x in m.modules()),
        "attrs": sorted(vars(m)),
        "config": m.config.to_json_string(),
        "hooks": (len(emb._forward_hooks), len(m._forward_hooks), len(m._forward_pre_hooks)),
        "grads": any(p.grad is not None for p in m.parameters()),
    }


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(out.name)]


# ---------------------------------------------------------------------------------------------
# a completed job: outputs, manifest, stock PEFT
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_model_dir, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "adapter"
    before = base_state(cache, tiny_model_dir)
    result, rec = run(params(tiny_model_dir, out, validation_split=0.2, name="zorblax", persona_id="p-1"), cache,
                      job_id="job-trained")
    return {"out": out, "result": result, "rec": rec, "before": before}


def test_completed_job_writes_standard_peft_adapter_and_manifest(trained, tiny_model_dir):
    out, result = trained["out"], trained["result"]
    assert result.status == "completed" and result.job_id == "job-trained"
    assert result.adapter_path == str(out) and result.manifest_path == str(out / "training_manifest.json")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "training_manifest.json"):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["modules_to_save"] is None
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    assert not any("lm_head" in k or "embed" in k for k in keys)


def test_manifest_records_the_run(trained, tiny_model_dir, cache):
    out, result = trained["out"], trained["result"]
    man = json.loads((out / "training_manifest.json").read_text())
    assert man["jobId"] == "job-trained"
    assert man["startedAt"].endswith("Z") and man["finishedAt"] >= man["startedAt"]
    assert set(man["libraries"]) >= {"torch", "transformers", "peft"}
    assert man["sidecar"]["version"]
    assert man["baseModel"]["kind"] == "directory" and man["baseModel"]["path"] == str(tiny_model_dir)
    assert man["baseModel"]["fingerprint"] == cache.get(str(tiny_model_dir)).fingerprint() == \
        trained["before"]["checksum"]
    hp = man["hyperparameters"]
    assert hp["rank"] == 4 and hp["learningRate"] == 0.01 and hp["validationSplit"] == 0.2
    assert hp["personaId"] == "p-1" and hp["dataset"] is None  # the inline data is not copied
    ds = man["dataset"]
    assert ds["examples"] == 5 and man["validation"]["examples"] == 1 and ds["metadata"] == {"topic": "zorblax"}
    assert ds["tokens"] > ds["trainableTokens"] > 0 and ds["truncated"] == 0 and len(ds["sha256"]) == 64
    assert man["metrics"] == msgspec_builtins(result.metrics)
    assert [h["step"] for h in man["lossHistory"]] == list(range(1, result.metrics.steps + 1))
    assert man["lossHistory"][-1]["loss"] == result.metrics.final_loss
    import hashlib

    blob = (out / "adapter_model.safetensors").read_bytes()
    assert man["adapter"]["sha256"] == hashlib.sha256(blob).hexdigest() and man["adapter"]["bytes"] == len(blob)


def msgspec_builtins(x):
    import msgspec

    return msgspec.to_builtins(x)


def test_metrics_and_progress(trained):
    m, rec = trained["result"].metrics, trained["rec"]
    assert m.steps == 2 * 3 and m.epochs == 2.0  # 5 examples, batch 2 → 3 steps per epoch
    assert m.examples_processed == 10 and m.trainable_tokens > 0 and m.truncated_examples == 0
    assert m.validation_loss is not None and m.tokens_per_second > 0 and m.training_time > 0
    assert m.time_to_first_step_ms > 0 and m.peak_memory_mb > 0
    assert min(h for h in [m.train_loss, m.final_loss]) > 0
    assert rec.phases[0] in ("loading", "preparing")
    assert rec.phases[-1] == "saving" and "training" in rec.phases and "evaluating" in rec.phases
    steps = [p for p in rec.events if p.phase == "training" and p.loss is not None]
    steps = [p for i, p in enumerate(steps) if i == 0 or p.step != steps[i - 1].step]  # one per optimizer step
    assert [p.step for p in steps] == list(range(1, 7))
    assert all(p.total_steps == 6 and p.learning_rate and p.tokens_per_second and p.eta_seconds is not None
               for p in steps)
    assert steps[-1].eta_seconds == 0 and steps[2].epoch == 1.0
    assert [p.validation_loss for p in rec.events if p.phase == "saving"][0] == m.validation_loss


def test_base_model_unchanged_after_completed_job(trained, cache, tiny_model_dir):
    assert base_state(cache, tiny_model_dir) == trained["before"]


STOCK_PEFT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
adapter, ids_json, out = sys.argv[1:4]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
ids = torch.tensor([json.loads(ids_json)])
with torch.no_grad():
    logits = model(input_ids=ids).logits
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "generated": gen[0, ids.shape[1]:].tolist()}, out)
"""


def test_adapter_loads_with_stock_peft_in_a_fresh_process_with_same_logits(trained, cache, tiny_model_dir, tmp_path):
    out = trained["out"]
    loaded = cache.get(str(tiny_model_dir))
    prompt = [wire.Message(role="user", content="What colour is the sky on Zorblax?")]
    text = data.render_chat(loaded.tokenizer, [{"role": "user", "content": prompt[0].content}],
                            add_generation_prompt=True)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        base_logits = loaded.model(input_ids=torch.tensor([ids])).logits
        with surgery.attached_adapter(loaded, str(out)) as adapted:
            ours = adapted(input_ids=torch.tensor([ids])).logits
    ours_gen = generation.generate(wire.GenerateParams(base_model=str(tiny_model_dir), adapter_path=str(out),
                                                   messages=prompt, max_new_tokens=6), models=cache)

    result_file = tmp_path / "stock.pt"
    proc = subprocess.run([sys.executable, "-c", STOCK_PEFT, str(out), json.dumps(ids), str(result_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = torch.load(result_file)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the model, so this test can fail
    torch.testing.assert_close(stock["logits"], ours, atol=1e-4, rtol=0)
    assert loaded.tokenizer.decode(stock["generated"], skip_special_tokens=True) == ours_gen.text
    assert ours_gen.tokens == len(stock["generated"])


# ---------------------------------------------------------------------------------------------
# the base model after failed and cancelled jobs
# ---------------------------------------------------------------------------------------------

def test_failed_job_leaves_base_model_and_no_output(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "adapter"
    before = base_state(cache, tiny_model_dir)
    rec = Recorder(raise_at=("training", 2))
    with pytest.raises(errors.TrainingFailed) as ei:
        run(params(tiny_model_dir, out), cache, rec)
    assert "injected failure" in ei.value.message and ei.value.data["stepsCompleted"] == 2
    assert base_state(cache, tiny_model_dir) == before
    assert leftovers(out) == []


def test_failure_while_saving_removes_the_temp_dir(tiny_model_dir, cache, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    before = base_state(cache, tiny_model_dir)
    seen = {}

    def broken_manifest(**kw):
        seen["tmp_had"] = sorted(p.name for p in kw["adapter_file"].parent.iterdir())
        raise OSError("disk full (injected)")

    monkeypatch.setattr(publish, "manifest", broken_manifest)
    with pytest.raises(errors.TrainingFailed, match="disk full"):
        run(params(tiny_model_dir, out, max_steps=1), cache)
    assert "adapter_model.safetensors" in seen["tmp_had"]  # the failure really happened mid-write
    assert leftovers(out) == []
    assert base_state(cache, tiny_model_dir) == before


@pytest.mark.parametrize("polls", [0, 1, 4])
def test_cancelled_job_leaves_base_model_and_no_output(tiny_model_dir, cache, tmp_path, polls):
    out = tmp_path / "adapter"
    before = base_state(cache, tiny_model_dir)
    rec = Recorder(stop_after_polls=polls)
    with pytest.raises(errors.RequestCancelled) as ei:
        run(params(tiny_model_dir, out), cache, rec, job_id="job-cancel")
    # Polls after loading and before training, then one per micro-batch (one per step here).
    assert ei.value.data == {"jobId": "job-cancel", "stepsCompleted": max(0, polls - 2)}
    assert ei.value.message == "Job job-cancel cancelled"
    assert base_state(cache, tiny_model_dir) == before
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------

def test_selective_logits_loss_and_gradients_equal_full_logits(tiny_model_dir, cache):
    loaded = cache.get(str(tiny_model_dir))
    before = base_state(cache, tiny_model_dir)
    tok = loaded.tokenizer
    records = [data.Record(e, "dataset", index=i) for i, e in enumerate(EXAMPLES[:3])]
    items, _ = data.tokenize(records, tok, loss_on="assistant", max_seq_length=256)
    batch = data.collate(items, [0, 1, 2], tok.pad_token_id)
    assert batch.attention_mask.sum() < batch.attention_mask.numel()  # padding present
    snap = surgery.snapshot(loaded.model)
    peft_model = surgery.attach_lora(loaded.model, params(tiny_model_dir, None, dropout=0.0), loaded.resolved.path)
    try:
        lm = peft_model.get_base_model()
        with torch.no_grad():  # non-zero B so the LoRA path matters
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        assert lossmod.supports_selective_logits(lm)
        lora = [p for p in peft_model.parameters() if p.requires_grad]
        results = []
        for selective in (True, False):
            loss = lossmod.loss_sum(lm, batch, selective=selective) / batch.label_tokens
            grads = torch.autograd.grad(loss, lora)
            results.append((loss.detach(), grads))
        (l_sel, g_sel), (l_full, g_full) = results
        torch.testing.assert_close(l_sel, l_full, atol=1e-5, rtol=0)
        for a, b in zip(g_sel, g_full):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        # and both equal the stock Hugging Face loss (mean over labels, shifted inside the model)
        hf = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        torch.testing.assert_close(l_full, hf.detach(), atol=1e-5, rtol=0)
    finally:
        surgery.detach_lora(loaded.model, peft_model, snap)
    assert base_state(cache, tiny_model_dir) == before


def test_full_logits_switch(monkeypatch, tiny_model_dir, cache, tmp_path):
    monkeypatch.setenv(lossmod.FULL_LOGITS_ENV, "1")
    result, _ = run(params(tiny_model_dir, tmp_path / "a", max_steps=1), cache)
    assert json.loads(Path(result.manifest_path).read_text())["engine"]["selectiveLogits"] is False


def test_loss_is_normalised_over_all_labels_of_the_accumulated_step(tiny_model_dir, cache, tmp_path):
    """One batch of 2 == two micro-batches of 1 accumulated, when the examples' label counts differ."""
    two = [chat("Q?", "A."), chat("Tell me everything about Zorblax please.",
                                   "Zorblax is a planet with green skies, seven moons, a river and blue bread.")]
    # float32: on a CPU with native bf16 the default takes bf16 matmuls, whose rounding differs between a
    # 2-row and a 1-row product (1.6e-4 here) — noise, not the normalisation this test is about.
    common = dict(dataset=wire.Dataset(examples=two), dropout=0.0, epochs=3, warmup_ratio=0.0, dtype="float32")
    a, _ = run(params(tiny_model_dir, tmp_path / "a", batch_size=2, gradient_accumulation=1, **common), cache)
    b, _ = run(params(tiny_model_dir, tmp_path / "b", batch_size=1, gradient_accumulation=2, **common), cache)
    assert a.metrics.steps == b.metrics.steps == 3
    ha = json.loads(Path(a.manifest_path).read_text())["lossHistory"]
    hb = json.loads(Path(b.manifest_path).read_text())["lossHistory"]
    for x, y in zip(ha, hb):
        assert x["labelTokens"] == y["labelTokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    # Adam's first steps divide by |g|, so an element whose gradient is ~0 may flip on rounding
    # noise; compare the whole adapter. (Normalising per micro-batch instead already fails the step
    # losses above: 10.674 vs 10.698 at step 2, measured with that change made on purpose.)
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    scale = torch.cat([wa[k].flatten() for k in wa]).norm()
    assert diff / scale < 1e-2, float(diff / scale)
    assert a.metrics.train_loss == pytest.approx(sum(h["loss"] * h["labelTokens"] for h in ha)
                                                 / sum(h["labelTokens"] for h in ha))


def test_loss_decreases_on_a_repeated_example(tiny_model_dir, cache, tmp_path):
    ex = chat("What colour is the sky on Zorblax?", "On Zorblax the sky is bright green.")
    result, _ = run(params(tiny_model_dir, tmp_path / "a", dataset=wire.Dataset(examples=[ex] * 4), batch_size=4,
                           epochs=15, learning_rate=1e-2, warmup_ratio=0.0, scheduler="constant", dropout=0.0), cache)
    hist = json.loads(Path(result.manifest_path).read_text())["lossHistory"]
    assert len(hist) == 15
    # The tiny random model has tied embeddings of std 0.02, so no logit can rise far above the
    # rest and the loss cannot fall much below ~8 nats; a drop of 0.5 is far beyond noise (measured
    # 10.81 → 9.86).
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5, [round(h["loss"], 3) for h in hist]


# ---------------------------------------------------------------------------------------------
# warm cache, outputs, warnings
# ---------------------------------------------------------------------------------------------

def test_second_job_uses_the_warm_model(tiny_model_dir, cache, tmp_path):
    run(params(tiny_model_dir, tmp_path / "a", max_steps=1), cache)
    result, rec = run(params(tiny_model_dir, tmp_path / "b", max_steps=1), cache)
    assert result.metrics.model_cached and result.metrics.load_time_ms == 0
    assert "loading" not in rec.phases and rec.phases[0] == "preparing"


def test_existing_non_empty_output_is_refused_before_loading(tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    class NoLoad:
        def get(self, *a, **k):
            raise AssertionError("the model must not be loaded for a job that cannot write its output")

    with pytest.raises(errors.OutputExists):
        recipe.train(params(tiny_model_dir, out), job_id="j", models=NoLoad(), report=lambda p: None,
                     should_stop=lambda: False, received_at=time.time())
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_empty_existing_output_dir_is_used(tiny_model_dir, cache, tmp_path):
    out = tmp_path / "made-by-caller"
    out.mkdir()
    result, _ = run(params(tiny_model_dir, out, max_steps=1), cache)
    assert (out / "adapter_model.safetensors").is_file() and leftovers(out) == [out]


def test_default_output_under_the_adapters_dir(tiny_model_dir, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_SIDECAR_DATA", str(tmp_path / "data"))
    result, _ = run(params(tiny_model_dir, None, max_steps=1, name="my persona/v1"), cache)
    path = Path(result.adapter_path)
    assert path.parent == tmp_path / "data" / "adapters"
    assert re.fullmatch(r"my-persona-v1-\d{8}T\d{6}Z", path.name), path.name


def test_quantize_on_cpu_runs_unquantized_with_a_warning(tiny_model_dir, cache, tmp_path):
    result, _ = run(params(tiny_model_dir, tmp_path / "a", max_steps=1, quantize=True, quantize_bits=4), cache)
    assert any("quantization" in w for w in result.warnings), result.warnings
    man = json.loads(Path(result.manifest_path).read_text())
    assert man["warnings"] == result.warnings and man["baseModel"]["quantizeBits"] is None


def test_truncation_is_reported(tiny_model_dir, cache, tmp_path):
    long = chat("q", "word " * 100)
    result, _ = run(params(tiny_model_dir, tmp_path / "a", max_steps=1, max_seq_length=48,
                           dataset=wire.Dataset(examples=[long, chat("q", "a")])), cache)
    assert result.metrics.truncated_examples == 1 and any("truncated" in w for w in result.warnings)


def test_dataset_errors_come_before_loading(tiny_model_dir, tmp_path):
    class NoLoad:
        def get(self, *a, **k):
            raise AssertionError("must not load")

    bad = wire.Dataset(examples=[chat("q", "a"), wire.Example(messages=[wire.Message(role="narrator", content="x")])])
    with pytest.raises(errors.DatasetInvalid) as ei:
        recipe.train(params(tiny_model_dir, tmp_path / "a", dataset=bad), job_id="j", models=NoLoad(),
                     report=lambda p: None, should_stop=lambda: False, received_at=time.time())
    assert ei.value.data["index"] == 1 and ei.value.data["field"] == "messages[0].role"


def test_lr_schedules():
    lin = [schedule.lr_multiplier(s, 10, 0.2, "linear") for s in range(10)]
    cos = [schedule.lr_multiplier(s, 10, 0.2, "cosine") for s in range(10)]
    const = [schedule.lr_multiplier(s, 10, 0.2, "constant") for s in range(10)]
    assert lin[0] > 0 and lin[:2] == cos[:2] == const[:2] and lin[1] == pytest.approx(2 / 3)
    assert lin[2] == cos[2] == 1.0 and all(c == 1.0 for c in const[2:])
    assert all(x > y for x, y in zip(lin[2:], lin[3:])) and all(x > y for x, y in zip(cos[2:], cos[3:]))
    assert 0 < lin[-1] < 0.2 and 0 < cos[-1] < 0.1


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def test_generate_is_greedy_and_leaves_the_base_untouched(trained, tiny_model_dir, cache):
    before = base_state(cache, tiny_model_dir)
    gp = wire.GenerateParams(base_model=str(tiny_model_dir), adapter_path=trained["result"].adapter_path,
                             messages=[wire.Message(role="user", content="Is Zorblax warm?")], max_new_tokens=5)
    first, second = generation.generate(gp, models=cache), generation.generate(gp, models=cache)
    assert first == second and first.tokens == 5 and first.adapter_path == gp.adapter_path
    plain = generation.generate(wire.GenerateParams(base_model=str(tiny_model_dir), messages=gp.messages,
                                                max_new_tokens=5), models=cache)
    assert plain.adapter_path is None
    assert base_state(cache, tiny_model_dir) == before


def test_generate_missing_adapter(tiny_model_dir, cache, tmp_path):
    with pytest.raises(errors.AdapterNotFound):
        generation.generate(wire.GenerateParams(base_model=str(tiny_model_dir), adapter_path=str(tmp_path / "none"),
                                            messages=[wire.Message(role="user", content="hi")]), models=cache)


# ---------------------------------------------------------------------------------------------
# compat: the old peft-train.py config
# ---------------------------------------------------------------------------------------------

def test_compat_config_run_prints_final_loss(tiny_model_dir, tmp_path, capsys):
    ds = tmp_path / "data.jsonl"
    ds.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]})
                            for i in range(4)) + "\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"baseModel": str(tiny_model_dir), "datasetPath": "data.jsonl", "rank": 4, "alpha": 8,
                               "epochs": 1, "learningRate": 1e-3, "batchSize": 2, "outputDir": str(tmp_path / "ignored"),
                               "quantize": False, "quantizeBits": 4, "legacyKey": True}))
    code = compat.run_config(str(cfg), str(tmp_path / "out"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert re.fullmatch(r"Final loss: \d+\.\d{4}", lines[-1]), captured.out
    man = json.loads((tmp_path / "out" / "training_manifest.json").read_text())
    assert f"{man['metrics']['finalLoss']:.4f}" == lines[-1].split(": ")[1]
    assert man["hyperparameters"]["rank"] == 4 and man["dataset"]["examples"] == 4
    assert not (tmp_path / "ignored").exists()
    assert "legacyKey" in captured.err and "[training]" in captured.err


def test_compat_errors_exit_1_with_message(tiny_model_dir, tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"baseModel": str(tiny_model_dir), "datasetPath": str(tmp_path / "missing.jsonl")}))
    assert compat.run_config(str(cfg), str(tmp_path / "out")) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "does not exist" in captured.err
    cfg.write_text("{not json")
    assert compat.run_config(str(cfg), str(tmp_path / "out")) == 1
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("options", [
    {"use_dora": True, "use_rslora": True},
    {"gradient_checkpointing": True, "target_modules": ["q_proj", "v_proj"]},
])
def test_lora_options_train_and_leave_the_base_as_it_was(tiny_model_dir, cache, tmp_path, options):
    before = base_state(cache, tiny_model_dir)
    result, _ = run(params(tiny_model_dir, tmp_path / "a", max_steps=2, **options), cache)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] == options.get("use_dora", False) and cfg["use_rslora"] == options.get("use_rslora", False)
    assert sorted(cfg["target_modules"]) == sorted(options.get("target_modules", cfg["target_modules"]))
    assert result.metrics.steps == 2 and math.isfinite(result.metrics.final_loss)
    assert base_state(cache, tiny_model_dir) == before


def test_unknown_target_module_is_invalid_params(tiny_model_dir, cache, tmp_path):
    before = base_state(cache, tiny_model_dir)
    with pytest.raises(errors.InvalidParams) as ei:
        run(params(tiny_model_dir, tmp_path / "a", target_modules=["no_such_proj"]), cache)
    assert ei.value.data["field"] == "targetModules"
    assert base_state(cache, tiny_model_dir) == before and leftovers(tmp_path / "a") == []


def test_max_steps_sets_the_number_of_steps_repeating_the_data(tiny_model_dir, cache, tmp_path):
    one = wire.Dataset(examples=[EXAMPLES[0]])
    result, rec = run(params(tiny_model_dir, tmp_path / "a", dataset=one, epochs=1, max_steps=5), cache)
    assert result.metrics.steps == 5 and result.metrics.epochs == 5.0 and result.metrics.examples_processed == 5
    result, _ = run(params(tiny_model_dir, tmp_path / "b", epochs=3, max_steps=2), cache)
    assert result.metrics.steps == 2 and result.metrics.epochs == pytest.approx(2 / 3, abs=1e-3)


def test_validation_runs_at_epoch_ends_at_most_about_ten_times(tiny_model_dir, cache, tmp_path):
    one = wire.Dataset(examples=[EXAMPLES[0]])
    val = wire.Dataset(examples=[EXAMPLES[1]])
    result, _ = run(params(tiny_model_dir, tmp_path / "a", dataset=one, validation_dataset=val, max_steps=25), cache)
    hist = json.loads(Path(result.manifest_path).read_text())["validationHistory"]
    assert [h["step"] for h in hist] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert result.metrics.validation_loss == hist[-1]["validationLoss"]


def test_length_grouping_default_follows_the_padding_it_saves(tiny_model_dir, cache, tmp_path):
    """groupByLength null groups only where random batches would pad ≥ 10 % more; true/false force it."""
    alike = [chat(f"Question number {i}?", f"Answer number {i}.") for i in range(8)]           # one length
    mixed = [chat("Q?", "A."), chat("Tell me everything about Zorblax please.",
                                    "Zorblax is a planet with green skies, seven moons, a river and blue bread. " * 4)] * 4
    def engine(name, examples, **kw):
        r, _ = run(params(tiny_model_dir, tmp_path / name, dataset=wire.Dataset(examples=examples), epochs=1,
                          batch_size=2, **kw), cache, job_id=name)
        return json.loads(Path(r.manifest_path).read_text())["engine"]["groupByLength"]
    assert engine("alike", alike) is False and engine("mixed", mixed) is True
    assert engine("forced", alike, group_by_length=True) is True and engine("off", mixed, group_by_length=False) is False
