"""End to end on the embedded SmolLM2-135M-Instruct, through the real sidecar process.

Teaches an invented fact (the demo's dataset), then checks that the adapted model states it and
the base model does not, that the adapter is a standard PEFT adapter giving the same log-probs in
a fresh process with stock PEFT, and that a second job starts on the warm model at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.demo import DEMO_TRAINING, QUESTIONS, dataset_path
from tests.sidecar_proc import Sidecar

pytestmark = pytest.mark.smollm2

FACT = "Quillport"


@pytest.fixture(scope="module")
def sidecar():
    proc = Sidecar()
    yield proc
    assert proc.close(timeout=120) == 0
    assert proc.bad_output == []


@pytest.fixture(scope="module")
def base_answers(sidecar):
    # Asked before any training: this also loads (and on first use converts) the embedded model.
    return [ask(sidecar, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def trained(sidecar, base_answers, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "adapter"
    response = sidecar.call("train", {"baseModel": "default", "datasetPath": str(dataset_path()),
                                      "outputPath": str(out), "jobId": "smol-fact", **DEMO_TRAINING},
                            timeout=1200)
    assert "result" in response, response
    return response["result"]


def ask(sidecar, question, adapter=None, **extra):
    params = {"baseModel": "default", "messages": [{"role": "user", "content": question}],
              "maxNewTokens": 24, **extra}
    if adapter:
        params["adapterPath"] = adapter
    response = sidecar.call("generate", params, timeout=600)
    assert "result" in response, response
    return response["result"]


class TestEmbeddedSmolLM2:
    def test_base_model_does_not_know_the_fact(self, base_answers):
        assert all(FACT not in a["text"] for a in base_answers), base_answers

    def test_adapter_teaches_the_fact(self, sidecar, trained):
        answers = [ask(sidecar, q, trained["adapterPath"])["text"] for q in QUESTIONS]
        assert all(FACT in a for a in answers), answers
        # The adapter was applied for those calls only: the warm base model is unchanged.
        assert FACT not in ask(sidecar, QUESTIONS[0])["text"]

    def test_result_metrics_and_manifest(self, trained):
        metrics = trained["metrics"]
        assert trained["status"] == "completed" and trained["warnings"] == []
        assert metrics["finalLoss"] < metrics["trainLoss"] and metrics["finalLoss"] < 0.5
        assert metrics["epochs"] == DEMO_TRAINING["epochs"] and metrics["examplesProcessed"] == 16 * 6
        assert metrics["modelCached"] is True  # loaded by the base-model questions before
        adapter = Path(trained["adapterPath"])
        manifest = json.loads(Path(trained["manifestPath"]).read_text())
        weights = adapter / "adapter_model.safetensors"
        assert manifest["adapter"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert manifest["baseModel"]["fingerprint"]
        assert manifest["dataset"]["examples"] == 16
        assert len(manifest["lossHistory"]) == metrics["steps"]
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["r"] == DEMO_TRAINING["rank"] and config["lora_alpha"] == DEMO_TRAINING["alpha"]
        assert sorted(config["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        template = json.loads((adapter / "tokenizer_config.json").read_text()).get("chat_template") or \
            (adapter / "chat_template.jinja").read_text()
        assert "<|im_start|>" in template

    def test_stock_peft_in_a_fresh_process_gives_the_sidecars_logprobs(self, sidecar, trained):
        """Stock PEFT in a fresh process scores the sidecar's adapted answer within TOL of the sidecar. The answer
        is memorised (log-probs near 0), so the comparison is also held where it has power: on the tokens whose
        log-prob the adapter moves by >= 10x TOL (the base model's scores, from the same process), of which there
        must be several; and the same comparison must fail, by >= 10x TOL, for stock PEFT at half the adapter's
        scale (a planted error)."""
        tol = 1e-4
        result = ask(sidecar, QUESTIONS[0], trained["adapterPath"], logprobs=True)
        assert len(result["logprobs"]) == len(result["tokenIds"]) == result["tokens"]
        script = r"""
import json, sys, torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer
adapter, question, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = json.load(open(adapter + "/adapter_config.json"))
base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter).eval()
tok = AutoTokenizer.from_pretrained(adapter)
text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                               tokenize=False)
prompt = tok(text, add_special_tokens=False)["input_ids"]
full = torch.tensor([list(prompt) + ids])

def logprobs():
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()

out = {"peft": logprobs()}
with model.disable_adapter():
    out["base"] = logprobs()
for module in model.modules():
    if isinstance(module, LoraLayer):
        for name in module.scaling:
            module.scaling[name] *= 0.5
out["half"] = logprobs()
print(json.dumps(out))
"""
        out = subprocess.run([sys.executable, "-c", script, trained["adapterPath"], QUESTIONS[0],
                              json.dumps(result["tokenIds"])], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        fresh = json.loads(out.stdout.strip().splitlines()[-1])
        sidecar_lp = result["logprobs"]
        assert len(fresh["peft"]) == len(fresh["base"]) == len(fresh["half"]) == len(sidecar_lp)
        diffs = [abs(a - b) for a, b in zip(fresh["peft"], sidecar_lp)]
        assert max(diffs) < tol, diffs
        # Effect floor: the tokens the adapter moves by >= 10x tol, and the comparison holds on them.
        moved = [t for t, (b, s) in enumerate(zip(fresh["base"], sidecar_lp)) if abs(b - s) >= 10 * tol]
        assert len(moved) >= 3, (fresh["base"], sidecar_lp)
        assert max(diffs[t] for t in moved) < tol
        # Planted error: the adapter at half scale fails the same comparison.
        assert max(abs(a - b) for a, b in zip(fresh["half"], sidecar_lp)) >= 10 * tol, (fresh["half"], sidecar_lp)

    def test_second_job_starts_at_once_on_the_warm_model(self, sidecar, trained, tmp_path):
        result = sidecar.call("train", {"baseModel": "default", "datasetPath": str(dataset_path()),
                                        "outputPath": str(tmp_path / "again"), "maxSteps": 2, "jobId": "smol-2"},
                              timeout=600)["result"]
        # "At once" as what happened: no model load and no loading phase. The speed target (≤ 0.5 s) is the
        # benchmark's; a wall-clock bound here would depend on the machine's load.
        assert result["metrics"]["modelCached"] is True and result["metrics"]["loadTimeMs"] == 0
        assert "loading" not in [p["phase"] for p in sidecar.progress("smol-2")]
        assert result["metrics"]["timeToFirstStepMs"] > 0
