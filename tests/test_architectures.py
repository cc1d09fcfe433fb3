"""Training, residency, stacking, exams and composition on every architecture the sidecar serves (issue 20).

Tiny random checkpoints of qwen3_5 (linear + full attention), qwen3, gemma3 (text), phi3, mistral,
llama and qwen2 from ``tests/archmodels.py`` (each with its architecture's chat template), and the
image-text shape of the released Qwen3.5 checkpoints. Everything runs through the real sidecar
process; results are checked against independent computations: the adapter merged by hand into a
copy of the base (W + Σ s·c·B·A, no PEFT), stock PEFT/transformers in a fresh process, and single
``generate`` calls for exam rows.

The engine's levers (fused LoRA branch, micro-batches, bf16 matmuls) are checked per architecture
against a reference job in a second process that takes none of them (``LORA_SIDECAR_PEFT_LORA=1``,
``dtype: float32``, ``microBatchTokens: 0``).

Adapter module names, for the GGUF exporter (helper A, adapters/gguf_arch.py): an adapter trained on a
Qwen3.5 image-text checkpoint (``Qwen3_5ForConditionalGeneration``, text weights under
``model.language_model.``) is trained on the text model ``AutoModelForCausalLM`` picks for it
(``Qwen3_5ForCausalLM``; transformers drops the ``language_model`` prefix and skips ``model.visual``),
so its keys are exactly those of a text-only checkpoint:
    base_model.model.model.layers.<i>.linear_attn.{in_proj_qkv,in_proj_z,in_proj_b,in_proj_a,out_proj}.lora_{A,B}.weight
    base_model.model.model.layers.<i>.self_attn.{q_proj,k_proj,v_proj,o_proj}.lora_{A,B}.weight
    base_model.model.model.layers.<i>.mlp.{gate_proj,up_proj,down_proj}.lora_{A,B}.weight
Stock PEFT reloads these on ``AutoModelForCausalLM`` of the same checkpoint. It does not map them onto
``Qwen3_5ForConditionalGeneration`` (``AutoModelForImageTextToText``), where the modules are named
``model.language_model.layers.<i>...``: there PEFT warns "missing adapter keys" and applies nothing
(measured with peft 0.21 / transformers 5; and the reverse for keys under ``model.language_model.``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import archmodels
from tests.handmerge import assert_same_answer, max_diff, own_logprobs
from tests.sidecar_proc import Sidecar, chat_dataset

ARCHS = archmodels.ARCHS
QUESTIONS = ["Hi there", "What is the capital of France? Answer in one word, please.", "Name three colours."]
FACT_X = "The capital of Zorbania is Quillport."
FACT_Y = "Zorbania's national bird is the crested lark."
LINEAR_ATTENTION = {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"}

# Tolerances (float32 on CPU):
# - resident stack vs the hand merge, exam rows vs single calls: 1e-4 in log-probability, as test_genome
#   (float rounding of a merged W against PEFT's separate branches; measured below 1e-5).
# - resident vs stock PEFT in a fresh process: 1e-5 (the same maths in the same order).
# - fused LoRA + micro-batches against peft's path on whole batches (float32): the trained change
#   scale·B·A within 1e-3 relative (float rounding through 6 AdamW steps; measured ~1e-5).
# - bf16 matmuls against float32: 10 % of the trained change (test_bf16's tolerance) and 0.01 nat a
#   step over the first BF16_STEPS steps (twice test_bf16's 0.005). Measured on an AVX512_BF16 EPYC:
#   change within 8.6 % on all seven; step gaps over steps 1-4 at most 0.0051 (gemma3 at step 4; qwen3_5
#   0.0004, llama 0.0014); later steps are left to the
#   change check, since at lr 1e-2 these random tiny models leave the smooth regime by step 5-6 (phi3's
#   loss rises again at step 6) and rounding compounds there (0.038 nat). The planted 1.25x LoRA scale
#   misses by 0.064 nat over steps 1-4.
STACK_TOL = 1e-4
PEFT_TOL = 1e-5
FUSED_TOL = 1e-3
BF16_CHANGE_TOL = 0.10
BF16_STEP_TOL = 0.01
BF16_STEPS = 4


# ---------------------------------------------------------------------------------------------
# Fixtures: the models, two processes, the adapters each architecture trains (once, lazily)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    made = {arch: archmodels.cached(tmp_path_factory, arch) for arch in ARCHS}
    made["qwen3_5-vision"] = archmodels.cached(tmp_path_factory, "qwen3_5", vision=True)
    return made


@pytest.fixture(scope="module")
def proc():
    with Sidecar(env={"LORA_SIDECAR_MAX_MODELS": "10"}) as p:
        yield p
        assert p.bad_output == []


@pytest.fixture(scope="module")
def reference():
    """A sidecar on peft's own LoRA forward (no fused branch); its jobs ask for float32 and whole batches."""
    with Sidecar(env={"LORA_SIDECAR_MAX_MODELS": "10", "LORA_SIDECAR_PEFT_LORA": "1"}) as p:
        yield p
        assert p.bad_output == []


def call(proc: Sidecar, method: str, params: dict, timeout: float = 300) -> dict:
    response = proc.call(method, params, timeout=timeout)
    assert "result" in response, response
    return response["result"]


def train_job(model: Path, out: Path, fact: str = FACT_X, **extra) -> dict:
    """6 steps of 3 rows at lr 1e-2 (the default 2e-4 barely moves a tiny model), dropout 0 (so that the
    fused branch and peft's draw no different masks), rank 8, α 16."""
    return {"baseModel": str(model), "dataset": chat_dataset(6, fact), "outputPath": str(out), "maxSteps": 6,
            "batchSize": 3, "learningRate": 1e-2, "dropout": 0.0, "rank": 8, "alpha": 16, **extra}


class Trained:
    """Per architecture: X (float32, fused branch, micro-batches of 64 tokens, resident), its reference E
    (other process: peft's path, whole batches), B (dtype auto: bf16 matmuls where the CPU has native
    bf16) and Y (another fact, rank 4 α 8, resident)."""

    def __init__(self, proc: Sidecar, reference: Sidecar, models: dict[str, Path], root: Path) -> None:
        self.proc, self.reference, self.models, self.root = proc, reference, models, root
        self.done: dict[str, dict[str, dict]] = {}

    def __call__(self, arch: str) -> dict[str, dict]:
        if arch not in self.done:
            model, out = self.models[arch], self.root / arch
            jobs = {
                "X": (self.proc, train_job(model, out / "X", dtype="float32", microBatchTokens=64, load=True)),
                "E": (self.reference, train_job(model, out / "E", dtype="float32", microBatchTokens=0)),
                "B": (self.proc, train_job(model, out / "B", microBatchTokens=64)),
                "Y": (self.proc, train_job(model, out / "Y", FACT_Y, seed=1, rank=4, alpha=8, load=True)),
            }
            self.done[arch] = {name: call(p, "train", params, timeout=600) for name, (p, params) in jobs.items()}
        return self.done[arch]


@pytest.fixture(scope="module")
def trained(proc, reference, models, tmp_path_factory) -> Trained:
    return Trained(proc, reference, models, tmp_path_factory.mktemp("arch-adapters"))


def manifest(result: dict) -> dict:
    return json.loads(Path(result["manifestPath"]).read_text())


def lora_tensors(result_or_dir) -> dict:
    from safetensors.torch import load_file

    path = Path(result_or_dir["adapterPath"] if isinstance(result_or_dir, dict) else result_or_dir)
    return load_file(str(path / "adapter_model.safetensors"))


def trained_change(tensors: dict, scale: float):
    """Every adapted module's scale·B·A, flattened (test_bf16's measure): what training added to the base."""
    import torch

    return torch.cat([(tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()).flatten() * scale
                      for k in sorted(tensors) if "lora_A" in k])


def change_error(got: dict, want: dict, got_scale: float = 2.0, want_scale: float = 2.0) -> float:
    a, b = trained_change(lora_tensors(got), got_scale), trained_change(lora_tensors(want), want_scale)
    return ((a - b).norm() / b.norm()).item()


def step_gap(got: dict, want: dict, steps: int = 6) -> tuple[float, float]:
    """(largest training-loss gap over the first ``steps`` steps, how far training moved the reference's loss)."""
    losses = [[h["loss"] for h in manifest(r)["lossHistory"]] for r in (got, want)]
    assert len(losses[0]) == len(losses[1]) == 6, losses
    losses = [x[:steps] for x in losses]
    moved = max(abs(x - losses[1][0]) for x in losses[1])
    return max(abs(x - y) for x, y in zip(*losses)), moved


def ask(proc: Sidecar, model: Path, question: str = QUESTIONS[0], tokens: int = 8, **extra) -> dict:
    return call(proc, "generate", {"baseModel": str(model), "messages": [{"role": "user", "content": question}],
                                   "maxNewTokens": tokens, "logprobs": True, **extra})


# ---------------------------------------------------------------------------------------------
# In process: the target table and assistant-only masking with each architecture's own template
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [*ARCHS, "qwen3_5-vision"])
def test_default_targets_are_every_linear_projection_in_the_blocks(arch, models):
    """The table (what ``supports`` reports) is what the generic finder sees in each architecture's blocks,
    so neither can drift from transformers' modules; no conv1d, A_log, dt_bias or norm is ever a target."""
    import torch
    from transformers import AutoModelForCausalLM

    from sidecar.training import targets

    model = AutoModelForCausalLM.from_pretrained(str(models[arch]), dtype=torch.float32)
    model_type = model.config.model_type
    assert model_type in targets.DEFAULT_TARGETS, model_type
    assert set(targets.linear_leaves(model)) == set(targets.DEFAULT_TARGETS[model_type])
    assert targets.default_targets(model) == list(targets.DEFAULT_TARGETS[model_type])
    if arch.startswith("qwen3_5"):
        assert type(model).__name__ == "Qwen3_5ForCausalLM" and not any("visual" in n for n, _ in model.named_modules())
        assert LINEAR_ATTENTION <= set(targets.default_targets(model))
        params = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()}
        assert {"A_log", "dt_bias"} <= params  # present in the model, and no target reaches them:
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets.default_targets(model):
            assert isinstance(module, torch.nn.Linear) and ".layers." in name, name
    # Planted: a model whose blocks gain a projection the table lacks still gets it by default.
    model.model.layers[0].extra_proj = torch.nn.Linear(4, 4)
    assert targets.default_targets(model)[-1] == "extra_proj"


# The span each assistant turn trains on, per template: the content and the end-of-turn token, i.e. what
# the model generates after the template's generation prompt. Qwen3 and Qwen3.5 render an empty thinking
# block in the last assistant turn; Qwen3.5's generation prompt already opens it ("<think>\n").
EXPECTED_SPANS = {
    "qwen3_5": ["Hello friend<|im_end|>", "\n</think>\n\nBlue<|im_end|>"],
    "qwen3": ["Hello friend<|im_end|>", "<think>\n\n</think>\n\nBlue<|im_end|>"],
    "qwen2": ["Hello friend<|im_end|>", "Blue<|im_end|>"],
    "gemma3": ["Hello friend<end_of_turn>", "Blue<end_of_turn>"],
    "phi3": ["Hello friend<|end|>", "Blue<|end|>"],
    "mistral": ["Hello friend</s>", "Blue</s>"],
    "llama": ["Hello friend<|eot_id|>", "Blue<|eot_id|>"],
}
END_OF_TURN = {"qwen3_5": "<|im_end|>", "qwen3": "<|im_end|>", "qwen2": "<|im_end|>", "gemma3": "<end_of_turn>",
               "phi3": "<|end|>", "mistral": "</s>", "llama": "<|eot_id|>"}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello friend"}, {"role": "user", "content": "Name a color"},
        {"role": "assistant", "content": "Blue"}]


@pytest.mark.parametrize("arch", [*ARCHS, "qwen3_5-vision"])
def test_assistant_only_labels_with_the_shipped_template(arch, models):
    """Labels cover exactly what the model generates after the generation prompt (content + end of turn),
    nothing of the system or user turns, and the end-of-turn token labelled is one generation stops at."""
    import msgspec
    from transformers import AutoTokenizer, GenerationConfig

    from sidecar import chat, datasets, wire
    from sidecar.models.tokenizer import ensure_pad_and_template

    tok = AutoTokenizer.from_pretrained(str(models[arch]))
    assert ensure_pad_and_template(tok) == []  # the shipped template is used, not the ChatML fallback
    text, spans = chat.assistant_char_spans(tok, CHAT)
    assert [text[a:b] for a, b in spans] == EXPECTED_SPANS[arch.split("-")[0]]
    # Mistral's shipped template renders the system message only inside the *last* user turn, so a
    # conversation that ends with the assistant carries none; its generation prompt for the same history
    # does. Compare like with like there: the history without the system turn.
    history = CHAT[1:-1] if arch == "mistral" else CHAT[:-1]
    prompt = chat.render_chat(tok, history, add_generation_prompt=True)
    assert text.startswith(prompt) and spans[-1][0] == len(prompt)  # the last reply starts where generation does
    example = msgspec.convert({"messages": CHAT}, wire.Example)
    item = chat.encode_example(datasets.Record(example, "dataset", index=0), tok, loss_on="assistant", max_seq_length=4096)
    labelled = [t for t in item.labels if t != chat.IGNORE]
    decoded = tok.decode(labelled)
    for word in ("Hello", "friend", "Blue"):
        assert word in decoded
    for word in ("Be brief", "Hi there", "Name a color", "user", "system"):
        assert word not in decoded, decoded
    eot = tok.convert_tokens_to_ids(END_OF_TURN[arch.split("-")[0]])
    stops = GenerationConfig.from_pretrained(str(models[arch])).eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    assert labelled.count(eot) == 2 and eot in stops, (eot, stops)
    # Planted: the same example with loss on every token labels the prompt too.
    everything = chat.encode_example(datasets.Record(example, "dataset", index=0), tok, loss_on="all", max_seq_length=4096)
    assert "Hi there" in tok.decode([t for t in everything.labels if t != chat.IGNORE])


# ---------------------------------------------------------------------------------------------
# Through the process: training and the engine's levers, per architecture
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_trains_with_the_default_targets_and_every_engine_lever(arch, trained, models):
    """X (fused LoRA branch + micro-batches, float32) equals the reference E (peft's path, whole batches)
    to float rounding; B (dtype auto: bf16 matmuls where the CPU has native bf16) is within bf16's
    tolerances of E. None of the levers is switched off on any of these architectures."""
    from sidecar.models import cpu_has_native_bf16
    from sidecar.training.targets import DEFAULT_TARGETS

    jobs = trained(arch)
    model_type = json.loads((models[arch] / "config.json").read_text())["model_type"]
    wanted = sorted(DEFAULT_TARGETS.get(model_type) or DEFAULT_TARGETS[f"{model_type}_text"])
    keys = set(lora_tensors(jobs["X"]))
    modules = {k.removesuffix(".lora_A.weight") for k in keys if k.endswith(".lora_A.weight")}
    for name, result in jobs.items():
        m = manifest(result)
        assert m["lora"]["targetModules"] == wanted, (name, m["lora"])
        assert result["warnings"] == [], (name, result["warnings"])
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(wanted)
    assert all(k.startswith("base_model.model.model.layers.") for k in keys), sorted(keys)[:4]
    assert not any(bad in k for k in keys for bad in ("conv1d", "A_log", "dt_bias", "norm", "embed", "lm_head"))

    engine = {name: manifest(r)["engine"] for name, r in jobs.items()}
    assert engine["X"]["fusedLoraLayers"] == len(modules) and engine["E"]["fusedLoraLayers"] == 0
    assert engine["X"]["microBatchTokens"] == 64 and engine["E"]["microBatchTokens"] == 0
    assert engine["X"]["bf16MatmulLayers"] == 0
    # bf16 patches every frozen linear layer of the decoder: here the adapted ones (the head stays fp32).
    assert engine["B"]["bf16MatmulLayers"] == (len(modules) if cpu_has_native_bf16() else 0)
    assert engine["X"]["selectiveLogits"] is True

    fused = change_error(jobs["X"], jobs["E"])
    assert fused < FUSED_TOL, fused
    gap, moved = step_gap(jobs["X"], jobs["E"])
    assert gap < BF16_STEP_TOL / 10 and moved > 10 * BF16_STEP_TOL, (gap, moved)
    bf16 = change_error(jobs["B"], jobs["E"])
    gap, moved = step_gap(jobs["B"], jobs["E"], BF16_STEPS)
    print(f"{arch}: fused change {fused:.2e}, bf16 change {bf16:.3f}, bf16 step gap {gap:.4f}, moved {moved:.3f}",
          [[round(h["loss"], 4) for h in manifest(jobs[j])["lossHistory"]] for j in "BEX"])
    assert bf16 < BF16_CHANGE_TOL and gap < BF16_STEP_TOL, (bf16, gap)


def test_the_engine_comparison_catches_a_wrong_lora_scale(reference, trained, models, tmp_path):
    """Planted error on qwen3_5: the reference job with a 1.25× LoRA scale (α 20 for 16) fails both the
    fused and the bf16 comparison."""
    jobs = trained("qwen3_5")
    wrong = call(reference, "train", train_job(models["qwen3_5"], tmp_path / "wrong", dtype="float32",
                                               microBatchTokens=0, alpha=20), timeout=600)
    assert change_error(wrong, jobs["E"], got_scale=2.5) > BF16_CHANGE_TOL
    planted = step_gap(wrong, jobs["E"], BF16_STEPS)[0]
    print(f"planted: step gap {planted:.4f}")
    assert planted > BF16_STEP_TOL


# ---------------------------------------------------------------------------------------------
# Residency, stacking, exams, composition, stock PEFT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_two_resident_adapters_stack_as_w_plus_scaled_deltas(arch, proc, trained, models):
    jobs = trained(arch)
    x, y = jobs["X"], jobs["Y"]
    assert x["adapterId"] and y["adapterId"]
    stacked = ask(proc, models[arch], adapters=[{"id": x["adapterId"], "scale": 0.7}, {"id": y["adapterId"], "scale": 0.3}])
    tokens = stacked["tokenIds"]
    assert tokens
    own = own_logprobs(models[arch], [(Path(x["adapterPath"]), 0.7), (Path(y["adapterPath"]), 0.3)], QUESTIONS[0], tokens)
    assert max_diff(own, stacked["logprobs"]) < STACK_TOL
    # Planted: without Y, or with the bare base, the same tokens score >= 10x the tolerance differently.
    alone = own_logprobs(models[arch], [(Path(x["adapterPath"]), 0.7)], QUESTIONS[0], tokens)
    bare = own_logprobs(models[arch], [], QUESTIONS[0], tokens)
    assert max_diff(alone, stacked["logprobs"]) > 10 * STACK_TOL and max_diff(bare, stacked["logprobs"]) > 10 * STACK_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_exam_rows_are_the_answers_of_single_calls(arch, proc, trained, models):
    """Prompts of different lengths in left-padded batches of 4, rows of three adapter sets sharing
    forwards: each row is what a single call answers (for Qwen3.5: padding through the linear-attention
    recurrence and its convolution changes nothing)."""
    jobs = trained(arch)
    x, y = jobs["X"]["adapterId"], jobs["Y"]["adapterId"]
    variants = [{"adapters": []}, {"adapters": [{"id": x}]}, {"adapters": [{"id": x, "scale": 0.7}, {"id": y, "scale": 0.3}]}]
    prompts = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    exam = call(proc, "generate", {"baseModel": str(models[arch]), "prompts": prompts, "variants": variants,
                                   "maxNewTokens": 8, "logprobs": True, "batchSize": 4})
    assert len(exam["answers"]) == 9
    for answer in exam["answers"]:
        single = ask(proc, models[arch], QUESTIONS[answer["prompt"]], adapters=variants[answer["variant"]]["adapters"])
        assert_same_answer(answer, single)
    assert len({tuple(a["tokenIds"]) + tuple(a["logprobs"]) for a in exam["answers"] if a["prompt"] == 0}) == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_cat_composition_reloads_as_the_stack(arch, proc, trained, models, tmp_path):
    jobs = trained(arch)
    x, y = jobs["X"]["adapterId"], jobs["Y"]["adapterId"]
    stacked = ask(proc, models[arch], adapters=[{"id": x, "scale": 0.7}, {"id": y, "scale": 0.3}])
    made = call(proc, "adapters/compose", {"sources": [{"id": x, "weight": 0.7}, {"id": y, "weight": 0.3}],
                                           "method": "cat", "outputPath": str(tmp_path / "cat"), "load": True})
    assert made["rank"] == 12
    assert sorted(json.loads((tmp_path / "cat" / "adapter_config.json").read_text())["target_modules"]) == \
        manifest(jobs["X"])["lora"]["targetModules"]
    from_disk = ask(proc, models[arch], adapterPath=made["adapterPath"])  # stock PEFT loading in the sidecar
    resident = ask(proc, models[arch], adapters=[{"id": made["adapterId"]}])
    for got in (from_disk, resident):
        assert got["tokenIds"] == stacked["tokenIds"] and max_diff(got["logprobs"], stacked["logprobs"]) < STACK_TOL
    call(proc, "adapters/unload", {"id": made["adapterId"]})


STOCK_PEFT = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
out = []
for case in json.loads(sys.argv[1]):
    base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, case["adapter"]).eval()
    tok = AutoTokenizer.from_pretrained(case["base"])
    text = tok.apply_chat_template([{"role": "user", "content": case["question"]}], add_generation_prompt=True,
                                   tokenize=False)
    prompt, ids = list(tok(text, add_special_tokens=False)["input_ids"]), case["ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
    out.append({"class": type(base).__name__,
                "logprobs": torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()})
print(json.dumps(out))
"""


def stock_peft(cases: list[dict]) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", STOCK_PEFT, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stock_peft_reloads_every_architecture(proc, trained, models):
    """Each architecture's X, reloaded by stock PEFT/transformers in a fresh process, scores the resident's
    answer as the sidecar does (1e-5); the bare base does not (effect floor)."""
    cases, answers = [], {}
    for arch in ARCHS:
        x = trained(arch)["X"]
        answers[arch] = ask(proc, models[arch], QUESTIONS[1], adapters=[{"id": x["adapterId"]}])
        cases.append({"base": str(models[arch]), "adapter": x["adapterPath"], "question": QUESTIONS[1],
                      "ids": answers[arch]["tokenIds"]})
    for arch, got in zip(ARCHS, stock_peft(cases)):
        assert max_diff(got["logprobs"], answers[arch]["logprobs"]) < PEFT_TOL, arch
        bare = own_logprobs(models[arch], [], QUESTIONS[1], answers[arch]["tokenIds"])
        assert max_diff(bare, answers[arch]["logprobs"]) > 10 * PEFT_TOL, arch


# ---------------------------------------------------------------------------------------------
# The Qwen3.5 image-text checkpoint: trained as its text model, reloaded by stock PEFT
# ---------------------------------------------------------------------------------------------

VISION_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
ckpt, ids = sys.argv[1], torch.tensor([json.loads(sys.argv[2])])
text = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
whole = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
with torch.no_grad():
    gap = (text(ids).logits - whole(ids).logits).abs().max().item()
print(json.dumps({"text": type(text).__name__, "whole": type(whole).__name__, "gap": gap,
                  "visual": sum(p.numel() for n, p in whole.named_parameters() if "visual" in n),
                  "textVisual": sum(1 for n, _ in text.named_parameters() if "visual" in n)}))
"""


def test_qwen3_5_image_text_checkpoint_trains_as_its_text_model(proc, models, tmp_path):
    """The released Qwen3.5 shape (``Qwen3_5ForConditionalGeneration``, a vision tower beside the text
    weights under ``model.language_model.``) trains through the sidecar as the text model transformers'
    AutoModelForCausalLM picks; the vision tower is not loaded and its weights on disk are untouched; the
    adapter's module names are those stock PEFT reloads on the same checkpoint (1e-5), and a copy of the
    adapter under the image-text prefix (the planted error) is not applied by PEFT."""
    import hashlib

    ckpt = models["qwen3_5-vision"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"] and "vision_config" in config
    weights = sorted(ckpt.glob("*.safetensors"))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}
    result = call(proc, "train", train_job(ckpt, tmp_path / "v", load=True), timeout=600)
    assert result["warnings"] == []
    m = manifest(result)
    assert set(m["lora"]["targetModules"]) >= LINEAR_ATTENTION | {"q_proj", "gate_proj"}
    keys = sorted(lora_tensors(result))
    assert len(keys) == 2 * 31  # 3 linear-attention layers × 8 projections + 1 full-attention layer × 7
    assert all(k.startswith("base_model.model.model.layers.") for k in keys), keys[:4]
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weights}

    answer = ask(proc, ckpt, QUESTIONS[1], adapters=[{"id": result["adapterId"]}])
    planted = tmp_path / "language-model-prefix"
    shutil.copytree(result["adapterPath"], planted)
    from safetensors.torch import save_file

    save_file({k.replace("base_model.model.model.", "base_model.model.model.language_model."): v
               for k, v in lora_tensors(result).items()}, str(planted / "adapter_model.safetensors"))
    case = {"base": str(ckpt), "question": QUESTIONS[1], "ids": answer["tokenIds"]}
    good, wrong = stock_peft([{**case, "adapter": result["adapterPath"]}, {**case, "adapter": str(planted)}])
    assert good["class"] == "Qwen3_5ForCausalLM"
    assert max_diff(good["logprobs"], answer["logprobs"]) < PEFT_TOL
    assert max_diff(wrong["logprobs"], answer["logprobs"]) > 10 * PEFT_TOL

    # The text model is the checkpoint's language model exactly: its logits are the image-text model's.
    out = subprocess.run([sys.executable, "-c", VISION_CHECK, str(ckpt), json.dumps(answer["tokenIds"][:6] or [1])],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    check = json.loads(out.stdout.strip().splitlines()[-1])
    assert check["text"] == "Qwen3_5ForCausalLM" and check["whole"] == "Qwen3_5ForConditionalGeneration"
    assert check["gap"] < PEFT_TOL and check["visual"] > 0 and check["textVisual"] == 0, check
    call(proc, "adapters/unload", {"id": result["adapterId"]})


def test_supports_reports_the_target_table(proc):
    from sidecar.training.targets import table

    reported = call(proc, "supports", {})["defaultTargetModules"]
    assert reported == table()
    assert set(reported["qwen3_5"]) == LINEAR_ATTENTION | {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}
    assert reported["phi3"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
