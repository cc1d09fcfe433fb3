"""The adapter genome through the real process on the tiny model: residency under a budget, stacked
generation against our own W + Σ s·(α/r)·B·A, exam batches against single calls, composition, training
with residents, and every new error path.

Adapters are made with stock PEFT in this process (random non-zero B, so every adapter changes the
model), except where a test trains one through the sidecar.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.handmerge import assert_same_answer, max_diff, own_logprobs
from tests.sidecar_proc import Sidecar, chat_dataset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["Hi there", "What is the capital of France?", "Name three colours.", "Tell me a joke",
             "How are you today, my friend?", "2+2=?", "Write a haiku about the sea.", "Who are you?",
             "Why is the sky blue? Explain briefly please.", "Say yes."]
# Fits five rank-8 adapters of the tiny model (65 536 bytes each in float32), not six.
BUDGET_MB = 5.5 * 65536 / 2**20


def make_adapter(base: Path, out: Path, *, rank: int = 4, alpha: float = 8, seed: int = 0, targets=None,
                 rslora: bool = False, dora: bool = False, std: float = 0.05, model_dir: Path | None = None) -> Path:
    """A PEFT LoRA adapter for ``base`` with random A and B (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir or base), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS, use_rslora=rslora,
                        use_dora=dora, lora_dropout=0.0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("genome-adapters")
    made = {
        "A": make_adapter(tiny_model_dir, root / "A", rank=4, alpha=8, seed=1),
        "B": make_adapter(tiny_model_dir, root / "B", rank=8, alpha=8, seed=2, rslora=True),
        "C": make_adapter(tiny_model_dir, root / "C", rank=4, alpha=8, seed=3, targets=["q_proj", "v_proj"]),
        "dora": make_adapter(tiny_model_dir, root / "dora", rank=4, seed=4, dora=True),
    }
    for i in range(12):
        made[f"r{i}"] = make_adapter(tiny_model_dir, root / f"r{i}", rank=8, alpha=16, seed=100 + i)
    made["wide16"] = make_adapter(tiny_model_dir, root / "wide16", rank=16, alpha=16, seed=200)  # two rank-8 slots
    # An adapter for another architecture (hidden 96, 3 layers): a different base.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    wide_dir = root / "wide-base"
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(wide_dir))
    made["wide"] = make_adapter(tiny_model_dir, root / "wide", model_dir=wide_dir)
    return made


def ask(proc: Sidecar, model: Path, *, question: str = QUESTIONS[0], tokens: int = 8, **extra) -> dict:
    params = {"baseModel": str(model), "messages": [{"role": "user", "content": question}], "maxNewTokens": tokens,
              "logprobs": True, **extra}
    response = proc.call("generate", params, timeout=120)
    assert "result" in response, response
    return response["result"]


def call(proc: Sidecar, method: str, params: dict, timeout: float = 120) -> dict:
    response = proc.call(method, params, timeout=timeout)
    assert "result" in response, response
    return response["result"]


# ---------------------------------------------------------------------------------------------
# Residency: identity, budget, LRU, pins, errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def budget_proc():
    with Sidecar(env={"LORA_SIDECAR_ADAPTER_BUDGET_MB": str(BUDGET_MB)}) as proc:
        yield proc
        assert proc.bad_output == []


@pytest.fixture(scope="module")
def proc():
    with Sidecar() as proc:
        yield proc
        assert proc.bad_output == []


class TestResidency:
    @pytest.fixture
    def proc(self, budget_proc):
        return budget_proc

    def test_load_is_identified_by_content(self, proc, adapters, tiny_model_dir, tmp_path):
        first = call(proc, "adapters/load", {"path": str(adapters["r0"]), "pin": True})
        weights = adapters["r0"] / "adapter_model.safetensors"
        assert first["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert first["id"] == f"r0-{first['sha256'][:8]}" and first["alreadyLoaded"] is False
        assert first["bytes"] == 8 * 1024 * 2 * 4  # rank 8 × Σ(in + out) of a layer's 7 projections × 2 layers × fp32
        assert abs(first["bytes"] - weights.stat().st_size) < 0.1 * weights.stat().st_size
        assert (first["rank"], first["alpha"], first["targetModules"]) == (8, 16.0, sorted(TARGETS))
        assert first["baseModel"] == str(tiny_model_dir) and first["device"] == "cpu" and first["pinned"]
        again = call(proc, "adapters/load", {"path": str(adapters["r0"])})
        assert again["id"] == first["id"] and again["alreadyLoaded"] is True and again["pinned"] is True
        # The same content under another id is refused; another content under a taken id too.
        err = proc.call("adapters/load", {"path": str(adapters["r0"]), "id": "other"})["error"]
        assert err["code"] == -32022 and err["data"]["residentId"] == first["id"]
        err = proc.call("adapters/load", {"path": str(adapters["r1"]), "id": first["id"]})["error"]
        assert err["code"] == -32022
        # A file changed on disk at the same path is a new version with a new id.
        import shutil

        copy = tmp_path / "r0"
        shutil.copytree(adapters["r0"], copy)
        assert call(proc, "adapters/load", {"path": str(copy)})["id"] == first["id"]
        shutil.copy(adapters["r1"] / "adapter_model.safetensors", copy / "adapter_model.safetensors")
        changed = call(proc, "adapters/load", {"path": str(copy), "id": "changed"})
        assert changed["sha256"] != first["sha256"] and changed["id"] == "changed"
        assert call(proc, "adapters/unload", {"id": "changed"})["bytesFreed"] == changed["bytes"]
        listed = call(proc, "adapters/list", {})
        assert [a["id"] for a in listed["adapters"]] == [first["id"]]
        assert listed["budgetBytes"] == int(BUDGET_MB * 2**20) and listed["usedBytes"] == first["bytes"]

    def test_twelve_adapters_under_a_budget_of_five(self, proc, adapters, tiny_model_dir):
        ids = {}
        ids["r0"] = call(proc, "adapters/load", {"path": str(adapters["r0"]), "pin": True})["id"]
        ids["r1"] = call(proc, "adapters/load", {"path": str(adapters["r1"]), "pin": True})["id"]
        for name in ("r2", "r3", "r4"):
            result = call(proc, "adapters/load", {"path": str(adapters[name])})
            assert result["evicted"] == []
            ids[name] = result["id"]
        ask(proc, tiny_model_dir, adapters=[{"id": ids["r2"]}])  # r2 becomes the most recently used
        expected_evictions = {"r5": ["r3"], "r6": ["r4"], "r7": ["r2"], "r8": ["r5"], "r9": ["r6"], "r10": ["r7"],
                              "r11": ["r8"]}
        for name, victims in expected_evictions.items():
            result = call(proc, "adapters/load", {"path": str(adapters[name])})
            ids[name] = result["id"]
            assert result["evicted"] == [ids[v] for v in victims], name
            listed = call(proc, "adapters/list", {})
            assert len(listed["adapters"]) <= 5 and listed["usedBytes"] <= listed["budgetBytes"]
            assert {ids["r0"], ids["r1"]} <= {a["id"] for a in listed["adapters"]}
        listed = call(proc, "adapters/list", {})
        assert [a["id"] for a in listed["adapters"]] == [ids[n] for n in ("r0", "r1", "r9", "r10", "r11")]
        info = {a["id"]: a for a in listed["adapters"]}
        assert info[ids["r0"]]["pinned"] and not info[ids["r9"]]["pinned"]
        assert call(proc, "status", {})["adapters"] == listed
        assert call(proc, "supports", {})["limits"]["adapterBudgetBytes"] == listed["budgetBytes"]

        # Pin everything: a sixth adapter cannot fit, and the failed load changes nothing (same residents,
        # pins, bytes and use times as before it).
        for name in ("r9", "r10", "r11"):
            assert call(proc, "adapters/load", {"path": str(adapters[name]), "pin": True})["pinned"]
        before = call(proc, "adapters/list", {})
        err = proc.call("adapters/load", {"path": str(adapters["r2"])})["error"]
        assert err["code"] == -32023 and "pinned" in err["message"] and len(err["data"]["held"]) == 5
        assert call(proc, "adapters/list", {}) == before
        assert len(before["adapters"]) == 5
        # One unpinned resident is not room enough for a rank-16 adapter (two rank-8 slots): the load fails
        # without evicting the one it could have evicted.
        assert call(proc, "adapters/load", {"path": str(adapters["r10"]), "pin": False})["pinned"] is False
        before = call(proc, "adapters/list", {})
        err = proc.call("adapters/load", {"path": str(adapters["wide16"])})["error"]
        assert err["code"] == -32023, err
        assert call(proc, "adapters/list", {}) == before
        call(proc, "adapters/unload", {"id": ids["r11"]})
        assert call(proc, "adapters/load", {"path": str(adapters["r2"])})["evicted"] == []

    def test_use_count_and_last_use(self, proc, adapters, tiny_model_dir):
        rid = call(proc, "adapters/load", {"path": str(adapters["r0"])})["id"]
        before = {a["id"]: a for a in call(proc, "adapters/list", {})["adapters"]}[rid]
        ask(proc, tiny_model_dir, adapters=[{"id": rid, "scale": 0.5}])
        after = {a["id"]: a for a in call(proc, "adapters/list", {})["adapters"]}[rid]
        assert after["useCount"] == before["useCount"] + 1
        assert after["lastUsedAt"] >= after["loadedAt"]

    def test_error_paths_answer_and_keep_serving(self, proc, adapters, tiny_model_dir, tmp_path):
        def error(method, params):
            response = proc.call(method, params)
            assert "error" in response, response
            return response["error"]

        err = error("generate", {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "x"}],
                                 "adapters": [{"id": "nope"}]})
        assert err["code"] == -32018 and err["data"]["field"] == "$.adapters[0].id"
        assert error("adapters/unload", {"id": "nope"})["code"] == -32018
        assert error("adapters/load", {"path": str(tmp_path / "missing")})["code"] == -32018
        mismatch = error("adapters/load", {"path": str(adapters["wide"]), "baseModel": str(tiny_model_dir)})
        assert mismatch["code"] == -32021
        assert "shape mismatches" in mismatch["message"] and "model.layers.2" in mismatch["message"]
        assert mismatch["data"]["shapeMismatches"] and mismatch["data"]["absentModules"]
        dora = error("adapters/load", {"path": str(adapters["dora"])})
        assert dora["code"] == -32024 and "DoRA" in dora["message"]
        bad = error("generate", {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "x"}],
                                 "adapters": [{"id": "a", "path": "/b"}]})
        assert bad["code"] == -32602 and bad["data"]["field"] == "$.adapters[0]"
        both = error("generate", {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "x"}],
                                  "adapters": [], "adapterPath": str(adapters["A"])})
        assert both["code"] == -32602
        r0 = call(proc, "adapters/load", {"path": str(adapters["r0"])})["id"]
        twice = error("generate", {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "x"}],
                                   "adapters": [{"id": r0}, {"path": str(adapters["r0"])}]})
        assert twice["code"] == -32602 and twice["data"]["field"] == "$.adapters[1]"
        assert error("adapters/compose", {"sources": [{"id": "nope", "weight": 1}], "method": "cat"})["code"] == -32018
        assert error("adapters/load", {"path": str(adapters["A"]), "id": "bad id!"})["code"] == -32602
        assert call(proc, "supports", {})["busy"] is False
        assert ask(proc, tiny_model_dir)["tokens"] > 0


# ---------------------------------------------------------------------------------------------
# Stacking, exams, composition, train load: numbers against independent computations
# ---------------------------------------------------------------------------------------------

STOCK_PEFT = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, question, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = json.load(open(adapter + "/adapter_config.json"))
base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter).eval()
tok = AutoTokenizer.from_pretrained(config["base_model_name_or_path"])
text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
prompt = tok(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([list(prompt) + ids])).logits[0, len(prompt) - 1:-1]
print(json.dumps(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()))
"""


@pytest.fixture(scope="module")
def ids(proc, adapters):
    return {name: call(proc, "adapters/load", {"path": str(adapters[name]), "id": name})["id"]
            for name in ("A", "B", "C")}


class TestStackExamCompose:
    def test_resident_matches_disk_and_stock_peft(self, proc, ids, adapters, tiny_model_dir):
        question = QUESTIONS[1]
        resident = ask(proc, tiny_model_dir, question=question, adapters=[{"id": "A"}])
        from_disk = ask(proc, tiny_model_dir, question=question, adapterPath=str(adapters["A"]))
        bare = ask(proc, tiny_model_dir, question=question)
        assert resident["tokenIds"] == from_disk["tokenIds"]
        assert max_diff(resident["logprobs"], from_disk["logprobs"]) < 1e-5
        # Effect floor: the bare base scores the resident's tokens >= 10x the tolerance differently, and the
        # planted error (A at 0.9 of its scale) fails the comparison: both sides of 1e-5 mean something.
        assert max_diff(own_logprobs(tiny_model_dir, [], question, resident["tokenIds"]), resident["logprobs"]) >= 1e-4
        wrong = own_logprobs(tiny_model_dir, [(adapters["A"], 0.9)], question, resident["tokenIds"])
        assert max_diff(wrong, resident["logprobs"]) >= 1e-4
        out = subprocess.run([sys.executable, "-c", STOCK_PEFT, str(adapters["A"]), question,
                              json.dumps(resident["tokenIds"])], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert max_diff(json.loads(out.stdout.strip().splitlines()[-1]), resident["logprobs"]) < 1e-5
        # Resident again after the legacy path took the layers off, and the bare base is bare.
        assert ask(proc, tiny_model_dir, question=question, adapters=[{"id": "A"}])["logprobs"] == resident["logprobs"]
        assert ask(proc, tiny_model_dir, question=question, adapters=[])["logprobs"] == bare["logprobs"]

    def test_stack_is_w_plus_scaled_deltas(self, proc, ids, adapters, tiny_model_dir):
        # A: rank 4, α 8 (c = 2); B: rank 8, α 8, rsLoRA (c = 8/√8).
        stacked = ask(proc, tiny_model_dir, adapters=[{"id": "A", "scale": 0.7}, {"id": "B", "scale": 0.3}])
        own = own_logprobs(tiny_model_dir, [(adapters["A"], 0.7), (adapters["B"], 0.3)], QUESTIONS[0],
                           stacked["tokenIds"])
        assert max_diff(own, stacked["logprobs"]) < 1e-4
        alone = own_logprobs(tiny_model_dir, [(adapters["A"], 0.7)], QUESTIONS[0], stacked["tokenIds"])
        assert max_diff(alone, stacked["logprobs"]) > 1e-3  # B matters: the test can fail
        # Different targets stack too (C adapts q and v only), and a path joins as a resident.
        three = ask(proc, tiny_model_dir, adapters=[{"id": "A", "scale": 0.5}, {"id": "C", "scale": -1.0},
                                                    {"path": str(adapters["r3"]), "scale": 2.0}])
        own = own_logprobs(tiny_model_dir, [(adapters["A"], 0.5), (adapters["C"], -1.0), (adapters["r3"], 2.0)],
                           QUESTIONS[0], three["tokenIds"])
        assert max_diff(own, three["logprobs"]) < 1e-4
        assert any(a["path"] == str(adapters["r3"]) for a in call(proc, "adapters/list", {})["adapters"])

    def test_exam_gives_the_answers_of_single_calls(self, proc, ids, tiny_model_dir):
        prompts = [{"id": f"q{i}", "messages": [{"role": "user", "content": q}]} for i, q in enumerate(QUESTIONS)]
        variants = [{"id": "base", "adapters": []}, {"id": "A", "adapters": [{"id": "A"}]}]
        exam = call(proc, "generate", {"baseModel": str(tiny_model_dir), "prompts": prompts, "variants": variants,
                                       "maxNewTokens": 12, "logprobs": True})
        assert len(exam["answers"]) == 20
        assert [(a["prompt"], a["variant"]) for a in exam["answers"]] == [(i, j) for i in range(10) for j in range(2)]
        assert exam["text"] == exam["answers"][0]["text"] and sorted(exam["adapters"]) == ["A"]
        for answer in exam["answers"]:
            assert answer["promptId"] == f"q{answer['prompt']}" and answer["variantId"] == ("base", "A")[answer["variant"]]
            single = ask(proc, tiny_model_dir, question=QUESTIONS[answer["prompt"]], tokens=12,
                         adapters=variants[answer["variant"]]["adapters"])
            assert_same_answer(answer, single)
            assert answer["finishReason"] in ("stop", "length") and answer["tokens"] == len(answer["tokenIds"])

    def test_exam_with_scales_and_stacks_in_small_batches(self, proc, ids, tiny_model_dir):
        # Same adapter at two scales (two forwards), a stacked variant (its own forward), batches of 4 rows.
        variants = [{"adapters": []}, {"adapters": [{"id": "A"}]}, {"adapters": [{"id": "A", "scale": 0.5}]},
                    {"adapters": [{"id": "A", "scale": 0.7}, {"id": "B", "scale": 0.3}]},
                    {"adapters": [{"id": "C"}]}]
        prompts = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:3]]
        exam = call(proc, "generate", {"baseModel": str(tiny_model_dir), "prompts": prompts, "variants": variants,
                                       "maxNewTokens": 10, "logprobs": True, "batchSize": 4})
        assert len(exam["answers"]) == 15
        for answer in exam["answers"]:
            single = ask(proc, tiny_model_dir, question=QUESTIONS[answer["prompt"]], tokens=10,
                         adapters=variants[answer["variant"]]["adapters"])
            assert_same_answer(answer, single)
        texts = {tuple(a["tokenIds"]) for a in exam["answers"] if a["prompt"] == 0}
        assert len(texts) > 1  # the variants differ

    def test_cat_composition_reloaded_matches_the_stack(self, proc, ids, adapters, tiny_model_dir, tmp_path):
        stacked = ask(proc, tiny_model_dir, adapters=[{"id": "A", "scale": 0.7}, {"id": "B", "scale": 0.3}])
        out = tmp_path / "cat"
        result = call(proc, "adapters/compose", {"sources": [{"id": "A", "weight": 0.7}, {"id": "B", "weight": 0.3}],
                                                 "method": "cat", "outputPath": str(out), "name": "AB-cat", "load": True})
        assert result["adapterPath"] == str(out) and result["rank"] == 12 and result["adapterId"] == "AB-cat"
        manifest = json.loads((out / "compose_manifest.json").read_text())
        assert manifest["method"] == "cat" and manifest["density"] is None
        assert [(p["id"], p["weight"], p["sha256"]) for p in manifest["parents"]] == [
            ("A", 0.7, hashlib.sha256((adapters["A"] / "adapter_model.safetensors").read_bytes()).hexdigest()),
            ("B", 0.3, hashlib.sha256((adapters["B"] / "adapter_model.safetensors").read_bytes()).hexdigest())]
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["use_rslora"] is False and config["r"] == config["lora_alpha"] == 12
        assert sorted(config["target_modules"]) == sorted(TARGETS)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
        reloaded = ask(proc, tiny_model_dir, adapterPath=str(out))  # from disk, stock PEFT loading
        assert reloaded["tokenIds"] == stacked["tokenIds"]
        assert max_diff(reloaded["logprobs"], stacked["logprobs"]) < 1e-4
        resident = ask(proc, tiny_model_dir, adapters=[{"id": "AB-cat"}])
        assert max_diff(resident["logprobs"], stacked["logprobs"]) < 1e-4
        # Mixed targets are exact with cat as well.
        mixed = call(proc, "adapters/compose", {"sources": [{"id": "A", "weight": 1.0}, {"id": "C", "weight": -0.5}],
                                                "method": "cat", "outputPath": str(tmp_path / "ac")})
        want = ask(proc, tiny_model_dir, adapters=[{"id": "A"}, {"id": "C", "scale": -0.5}])
        got = ask(proc, tiny_model_dir, adapterPath=mixed["adapterPath"])
        assert max_diff(got["logprobs"], want["logprobs"]) < 1e-4

    def test_other_methods_and_compose_errors(self, proc, ids, adapters, tiny_model_dir, tmp_path):
        def error(params):
            response = proc.call("adapters/compose", params)
            assert "error" in response, response
            return response["error"]

        two = [{"id": "A", "weight": 0.7}, {"id": "B", "weight": 0.3}]
        err = error({"sources": two, "method": "linear", "outputPath": str(tmp_path / "x")})
        assert err["code"] == -32026 and "use cat or svd" in err["message"] and err["data"]["ranks"] == {"A": 4, "B": 8}
        err = error({"sources": [{"id": "A", "weight": 1}, {"id": "C", "weight": 1}], "method": "ties",
                     "density": 0.5, "outputPath": str(tmp_path / "x")})
        assert err["code"] == -32026 and "target modules" in err["message"] and "use cat or svd" in err["message"]
        err = error({"sources": two, "method": "ties", "outputPath": str(tmp_path / "x")})
        assert err["code"] == -32602 and err["data"]["field"] == "$.density"
        err = error({"sources": two, "method": "dare_ties", "density": 1.5})
        assert err["code"] == -32602 and err["data"]["field"] == "$.density"
        err = error({"sources": [{"id": "A", "weight": 11}], "method": "linear"})
        assert err["code"] == -32602
        assert error({"sources": [{"id": "A", "weight": 1}], "method": "ties", "density": 0.5})["code"] == -32026
        err = error({"sources": two, "method": "cat", "name": "A", "load": True})
        assert err["code"] == -32022
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "file").write_text("x")
        assert error({"sources": two, "method": "cat", "outputPath": str(tmp_path / "taken")})["code"] == -32019
        assert not (tmp_path / "x").exists()
        # Methods that work: svd at any ranks; dare_linear and ties at equal ranks.
        svd = call(proc, "adapters/compose", {"sources": two, "method": "svd", "svdRank": 6,
                                              "outputPath": str(tmp_path / "svd")})
        assert svd["rank"] == 6
        r_ids = [call(proc, "adapters/load", {"path": str(adapters[n])})["id"] for n in ("r4", "r5")]
        for method in ("dare_linear", "ties", "magnitude_prune"):
            made = call(proc, "adapters/compose", {"sources": [{"id": r_ids[0], "weight": 1}, {"id": r_ids[1], "weight": 0.5}],
                                                   "method": method, "density": 0.5, "outputPath": str(tmp_path / method),
                                                   "load": True})
            assert made["rank"] == 8 and made["adapterId"]
            assert ask(proc, tiny_model_dir, adapters=[{"id": made["adapterId"]}])["tokens"] > 0

    def test_a_long_exam_can_be_cancelled(self, proc, ids, tiny_model_dir):
        import time

        prompts = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
        request = proc.request("generate", {"baseModel": str(tiny_model_dir), "prompts": prompts, "batchSize": 1,
                                            "variants": [{"adapters": []}, {"adapters": [{"id": "A"}]}],
                                            "maxNewTokens": 4096})
        deadline = time.monotonic() + 60
        while (call(proc, "status", {}).get("running") or {}).get("kind") != "generate":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.notify("$/cancelRequest", {"id": request})
        error = proc.response(request, timeout=60)["error"]
        assert error["code"] == -32800 and error["data"]["stepsCompleted"] < 20
        assert ask(proc, tiny_model_dir, adapters=[{"id": "A"}])["tokens"] > 0

    def test_unloading_an_adapter_on_the_base_keeps_the_others_exact(self, proc, ids, adapters, tiny_model_dir):
        for name in ("r6", "r7"):
            call(proc, "adapters/load", {"path": str(adapters[name]), "id": name})
        six, seven = (ask(proc, tiny_model_dir, adapters=[{"id": n}]) for n in ("r6", "r7"))
        bare = ask(proc, tiny_model_dir)
        assert call(proc, "adapters/unload", {"id": "r7"})["id"] == "r7"
        assert ask(proc, tiny_model_dir, adapters=[{"id": "r6"}])["logprobs"] == six["logprobs"]
        assert ask(proc, tiny_model_dir)["logprobs"] == bare["logprobs"]
        assert proc.call("generate", {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "x"}],
                                      "adapters": [{"id": "r7"}]})["error"]["code"] == -32018
        # Effect floor for the exact comparisons above: had the unload taken r6 off, or left r7 on, r6's answer
        # would have moved by >= 1e-3 (scored here with the bare base and with r6 + r7, by hand).
        bare_on_six = own_logprobs(tiny_model_dir, [], QUESTIONS[0], six["tokenIds"])
        both_on_six = own_logprobs(tiny_model_dir, [(adapters["r6"], 1.0), (adapters["r7"], 1.0)], QUESTIONS[0],
                                   six["tokenIds"])
        assert max_diff(bare_on_six, six["logprobs"]) >= 1e-3 and max_diff(both_on_six, six["logprobs"]) >= 1e-3
        assert max_diff(own_logprobs(tiny_model_dir, [(adapters["r6"], 1.0)], QUESTIONS[0], six["tokenIds"]),
                        six["logprobs"]) < 1e-4
        assert max_diff(own_logprobs(tiny_model_dir, [(adapters["r7"], 1.0)], QUESTIONS[0], seven["tokenIds"]),
                        seven["logprobs"]) < 1e-4

    def test_train_with_load_is_usable_at_once(self, proc, tiny_model_dir, tmp_path):
        """The adapter a ``train {load: true}`` leaves resident gives the log-probs of the same adapter read from
        disk (1e-5) and of W + (α/r)·B·A by hand (1e-4). Trained at lr 1e-2 (not the default 2e-4, whose B of
        ~3e-4 barely moves the tiny model) so that the bare base, or the adapter at half scale, is >= 10x the
        tolerance away."""
        out = tmp_path / "trained"
        result = call(proc, "train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(4),
                                      "outputPath": str(out), "maxSteps": 4, "batchSize": 2, "load": True,
                                      "learningRate": 1e-2}, timeout=300)
        assert result["adapterId"] and result["warnings"] == []
        listed = {a["id"]: a for a in call(proc, "adapters/list", {})["adapters"]}
        assert listed[result["adapterId"]]["path"] == str(out)
        resident = ask(proc, tiny_model_dir, adapters=[{"id": result["adapterId"]}])
        from_disk = ask(proc, tiny_model_dir, adapterPath=str(out))
        assert resident["tokenIds"] == from_disk["tokenIds"]
        assert max_diff(resident["logprobs"], from_disk["logprobs"]) < 1e-5
        tokens = resident["tokenIds"]
        assert max_diff(own_logprobs(tiny_model_dir, [(out, 1.0)], QUESTIONS[0], tokens), resident["logprobs"]) < 1e-4
        assert max_diff(own_logprobs(tiny_model_dir, [], QUESTIONS[0], tokens), resident["logprobs"]) >= 1e-3
        assert max_diff(own_logprobs(tiny_model_dir, [(out, 0.5)], QUESTIONS[0], tokens), resident["logprobs"]) >= 1e-3


def test_residents_survive_their_base_leaving_the_model_cache(adapters, tiny_model_dir, tmp_path):
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    with Sidecar(env={"LORA_SIDECAR_MAX_MODELS": "1"}) as proc:
        call(proc, "adapters/load", {"path": str(adapters["A"]), "id": "A"})
        before = ask(proc, tiny_model_dir, adapters=[{"id": "A"}])
        ask(proc, other)  # loads the other base: the first one is evicted, with A on it
        assert call(proc, "status", {})["loadedModels"] == [str(other)]
        err = proc.call("generate", {"baseModel": str(other), "messages": [{"role": "user", "content": "x"}],
                                     "adapters": [{"id": "A"}]})["error"]
        assert err["code"] == -32021 and err["data"]["field"] == "$.baseModel"
        after = ask(proc, tiny_model_dir, adapters=[{"id": "A"}])  # reloaded, A goes back on
        assert after["logprobs"] == before["logprobs"]
        assert [a["id"] for a in call(proc, "adapters/list", {})["adapters"]] == ["A"]
        assert proc.close() == 0


def test_protocol_transcript_pastes_as_documented(tiny_model_dir, tmp_path):
    """The genome transcript of docs/PROTOCOL.md, pasted line by line as written (paths moved to tmp)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text()
    block = doc.split("### The adapter genome by hand", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    lines = [line.replace("/tmp/tiny-", f"{tmp_path}/tiny-").replace('"/tmp/tiny"', json.dumps(str(tiny_model_dir)))
             for line in block.strip().splitlines()]
    with Sidecar() as proc:
        responses = {}
        for line in lines:  # one by one, each answered before the next, as a person pastes them
            message = json.loads(line)
            proc.send(message)
            if "id" in message:
                responses[message["id"]] = proc.response(message["id"], timeout=300)
        assert proc.proc.wait(60) == 0
        assert sorted(responses) == list(range(11, 22)) and all("result" in r for r in responses.values()), responses
        exam = responses[15]["result"]["answers"]
        assert [(a["promptId"], a["variantId"]) for a in exam] == [("hi", "base"), ("hi", "hello"), ("bye", "base"),
                                                                    ("bye", "hello")]
        stacked, composed = responses[16]["result"], responses[18]["result"]
        assert composed["tokenIds"] == stacked["tokenIds"]
        assert max_diff(composed["logprobs"], stacked["logprobs"]) < 1e-4
        assert sorted(a["id"] for a in responses[19]["result"]["adapters"]) == ["bye", "hello", "hello-bye"]
        assert responses[20]["result"]["id"] == "bye"
        assert proc.bad_output == []


# ---------------------------------------------------------------------------------------------
# Training is untouched by residents
# ---------------------------------------------------------------------------------------------

def test_training_with_five_residents_matches_a_fresh_sidecar(adapters, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    train = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(6), "maxSteps": 3, "batchSize": 2,
             "rank": 4, "learningRate": 1e-2}
    names = ["A", "B", "C", "r0", "r1"]
    with Sidecar() as busy:
        for name in names:
            call(busy, "adapters/load", {"path": str(adapters[name]), "id": name})
        variants = [{"adapters": [{"id": n}]} for n in names] + [{"adapters": [{"id": "A"}, {"id": "B", "scale": 0.5}]}]
        exam = {"baseModel": str(tiny_model_dir), "prompts": [{"messages": [{"role": "user", "content": q}]}
                                                              for q in QUESTIONS[:2]],
                "variants": variants, "maxNewTokens": 8, "logprobs": True}
        before = call(busy, "generate", exam)["answers"]
        call(busy, "train", {**train, "outputPath": str(tmp_path / "busy")}, timeout=300)
        after = call(busy, "generate", exam)["answers"]
        assert [(a["tokenIds"], a["logprobs"]) for a in after] == [(a["tokenIds"], a["logprobs"]) for a in before]
        assert len(call(busy, "adapters/list", {})["adapters"]) == 5
        assert busy.close() == 0
    with Sidecar() as fresh:
        call(fresh, "train", {**train, "outputPath": str(tmp_path / "fresh")}, timeout=300)
        assert fresh.close() == 0
    a = load_file(str(tmp_path / "busy" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fresh" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2: exam batches agree with single calls on a real model
# ---------------------------------------------------------------------------------------------

@pytest.mark.smollm2
def test_smollm2_exam_matches_single_calls(tmp_path):
    from sidecar.models import resolve_model

    base = Path(resolve_model("default").path)
    adapter = make_adapter(base, tmp_path / "smol", rank=8, alpha=16, seed=7, std=0.02)
    questions = QUESTIONS[:6]  # 12 single calls: the 10 × 2 case runs on the tiny model and in the benchmark
    # One compute thread: on a shared 2-core machine two threads wait on each other (measured 4-8× slower).
    with Sidecar(env={"LORA_SIDECAR_THREADS": "1"}) as proc:
        rid = call(proc, "adapters/load", {"path": str(adapter), "baseModel": "default"}, timeout=600)["id"]
        prompts = [{"messages": [{"role": "user", "content": q}]} for q in questions]
        variants = [{"adapters": []}, {"adapters": [{"id": rid}]}]
        exam = call(proc, "generate", {"prompts": prompts, "variants": variants, "maxNewTokens": 16, "logprobs": True},
                    timeout=600)
        assert len(exam["answers"]) == 12
        for answer in exam["answers"]:
            single = ask(proc, "default", question=questions[answer["prompt"]], tokens=16,
                         adapters=variants[answer["variant"]]["adapters"])
            assert_same_answer(answer, single)
        by_variant = [[tuple(a["tokenIds"]) for a in exam["answers"] if a["variant"] == v] for v in (0, 1)]
        assert by_variant[0] != by_variant[1]  # the adapter changes some answers
        assert proc.close(timeout=120) == 0
