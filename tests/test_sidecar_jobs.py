"""Jobs through the real process on the tiny model: progress, warm reuse, cancel, queue, EOF, noisy stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.sidecar_proc import Sidecar, chat_dataset

PHASE_ORDER = ["queued", "loading", "preparing", "training", "evaluating", "saving", "completed"]


def train_params(model: Path, out: Path, **extra) -> dict:
    return {"baseModel": str(model), "dataset": chat_dataset(8), "outputPath": str(out), "maxSteps": 4,
            "batchSize": 2, "progressInterval": 0, **extra}


def long_params(model: Path, out: Path, **extra) -> dict:
    # Enough steps that the job is still running when the test acts on it.
    return train_params(model, out, maxSteps=100_000, epochs=1000, **extra)


TOL = 1e-4
"""Sidecar log-probs against an independent computation (stock PEFT in this process): float32 rounding
is ~1e-6, so 1e-4 is loose for equal computations and still 10x below every effect the tests require."""

STRONG_STEPS = 6


def assert_no_partial_output(out: Path) -> None:
    assert not out.exists(), f"partial adapter left at {out}"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(out.name)], list(out.parent.iterdir())


@pytest.fixture(scope="module")
def sidecar():
    proc = Sidecar()
    yield proc
    proc.kill()


def wait_training(proc: Sidecar, job_id: str, min_step: int = 1, timeout: float = 120) -> dict:
    return proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id
                         and m["params"]["phase"] == "training" and m["params"]["step"] >= min_step, timeout)


@pytest.fixture(scope="module")
def strong_adapter(sidecar, tiny_model_dir, tmp_path_factory) -> tuple[dict, Path]:
    """An adapter trained at a high learning rate (1e-2, 6 steps: B of order 1e-2, not the ~1e-4 of the default
    2e-4) so that it moves the tiny model's log-probs far more than ``TOL``. Returns (response, path)."""
    out = tmp_path_factory.mktemp("strong") / "adapter"
    response = sidecar.call("train", train_params(tiny_model_dir, out, jobId="strong", maxSteps=STRONG_STEPS,
                                                  learningRate=1e-2), timeout=300)
    return response, out


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reference_logprobs(model_dir: Path, question: str, token_ids: list[int], adapter: Path | None = None,
                       scale: float = 1.0) -> list[float]:
    """Log-probs of ``token_ids`` after ``question`` computed here, without the sidecar: the plain base model
    (``adapter`` None) or stock ``PeftModel.from_pretrained`` with every LoRA scaling multiplied by ``scale``
    (``scale`` != 1 is a deliberately wrong reference, to show that a comparison can fail)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        model = PeftModel.from_pretrained(model, str(adapter))
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.scaling[name] *= scale
    model.eval()
    prompt = chat_prompt_ids(model_tokenizer(model_dir), question)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(token_ids)])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0].tolist()


def model_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


class TestTrainOverStdio:
    def test_train_reports_progress_in_order_and_writes_a_peft_adapter(self, sidecar, tiny_model_dir, tmp_path):
        assert sidecar.call("supports", {"baseModel": str(tiny_model_dir)})["result"]["model"]["resolvable"]
        out = tmp_path / "adapter"
        request_id = sidecar.request("train", train_params(tiny_model_dir, out, jobId="first"))
        response = sidecar.response(request_id, timeout=300)
        result = response["result"]
        assert result["jobId"] == "first" and result["status"] == "completed"
        assert Path(result["adapterPath"]) == out
        for name in ("adapter_model.safetensors", "adapter_config.json", "training_manifest.json"):
            assert (out / name).is_file(), name
        metrics = result["metrics"]
        assert metrics["steps"] == 4 and metrics["examplesProcessed"] >= 8
        assert metrics["trainLoss"] > 0 and metrics["finalLoss"] > 0 and metrics["tokensPerSecond"] > 0
        assert metrics["modelCached"] is False

        progress = sidecar.progress("first")
        phases = [p["phase"] for p in progress]
        assert phases[0] == "queued" and phases[-1] == "completed"
        assert "training" in phases and "saving" in phases
        ranks = [PHASE_ORDER.index(p) for p in phases]
        assert ranks == sorted(ranks), phases
        steps = [p["step"] for p in progress]
        assert steps == sorted(steps), steps
        assert max(steps) == 4
        # The final notification precedes the response, and nothing of the job follows it.
        done = sidecar.index_of(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "first"
                                and m["params"]["phase"] == "completed")
        answer = sidecar.index_of(lambda m: m.get("id") == request_id and "method" not in m)
        assert 0 <= done < answer
        assert sidecar.bad_output == []

        manifest = json.loads((out / "training_manifest.json").read_text())
        assert manifest["jobId"] == "first"

    def test_train_response_and_saved_weights_load_into_stock_peft(self, sidecar, strong_adapter, tiny_model_dir):
        """The train response is complete and true (status, path, steps), and the weights file holds the trained
        LoRA: stock PEFT loads every tensor of it under the names it expects (equal values, not a fresh init),
        B is non-zero, and loading it moves the model's output by far more than ``TOL``."""
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        response, out = strong_adapter
        assert "result" in response, response
        result = response["result"]
        assert result["jobId"] == "strong" and result["status"] == "completed", result
        assert Path(result["adapterPath"]) == out and Path(result["manifestPath"]).parent == out
        metrics = result["metrics"]
        assert metrics["steps"] == STRONG_STEPS, metrics
        assert metrics["examplesProcessed"] == STRONG_STEPS * 2, metrics  # batchSize 2, 8 examples: no short batch
        assert 0 < metrics["finalLoss"] < 100 and 0 < metrics["trainLoss"] < 100, metrics
        assert max(p["step"] for p in sidecar.progress("strong")) == STRONG_STEPS
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["lora_alpha"] == 16 and not config.get("modules_to_save")

        saved = load_file(str(out / "adapter_model.safetensors"))
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), out).eval()
        lora = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        assert lora and sorted(saved) == sorted(lora), (sorted(saved)[:4], sorted(lora)[:4])
        for name, tensor in saved.items():
            assert torch.equal(lora[name].detach(), tensor), f"{name}: the model does not hold the file's values"
        b_max = {n: float(t.abs().max()) for n, t in saved.items() if ".lora_B." in n}
        assert len(b_max) == len(saved) // 2 and min(b_max.values()) > 0, b_max  # B starts at exactly 0
        assert max(b_max.values()) > 1e-3, b_max

        ids = torch.tensor([chat_prompt_ids(model_tokenizer(tiny_model_dir), "Hello") + [0, 1, 2]])
        with torch.no_grad():
            moved = float((model(ids).logits - base(ids).logits).abs().max())
        assert moved >= 10 * TOL, f"loading the adapter moves the logits by {moved:.2e} only"

    def test_second_job_reuses_the_warm_model(self, sidecar, tiny_model_dir, tmp_path):
        sidecar.call("train", train_params(tiny_model_dir, tmp_path / "a", jobId="warm-1"), timeout=300)
        result = sidecar.call("train", train_params(tiny_model_dir, tmp_path / "b", jobId="warm-2"),
                              timeout=300)["result"]
        assert result["metrics"]["modelCached"] is True
        # Warm reuse shown by what happened (no load, no loading phase), not by a time a loaded machine can break.
        assert result["metrics"]["loadTimeMs"] == 0
        assert result["metrics"]["timeToFirstStepMs"] > 0
        assert "loading" not in [p["phase"] for p in sidecar.progress("warm-2")]
        assert str(tiny_model_dir) in " ".join(sidecar.call("status")["result"]["loadedModels"])

    def test_generate_applies_the_adapter_only_when_asked(self, sidecar, strong_adapter, tiny_model_dir, tmp_path):
        """generate with ``adapterPath`` gives stock PEFT's log-probs for its tokens, and without it the bare
        base model's (each within ``TOL``); the adapter moves those log-probs by >= 10x ``TOL``, so a server that
        ignored the adapter, or applied it at half scale, fails the comparison (both checked below)."""
        _, out = strong_adapter
        question = "Hello"
        params = {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": question}],
                  "maxNewTokens": 8, "logprobs": True}
        base = sidecar.call("generate", params)["result"]
        adapted = sidecar.call("generate", {**params, "adapterPath": str(out)})["result"]
        assert adapted["adapterPath"] == str(out) and base["adapterPath"] is None
        assert 0 < adapted["tokens"] == len(adapted["tokenIds"]) == len(adapted["logprobs"]) <= 8
        assert 0 < base["tokens"] == len(base["tokenIds"]) == len(base["logprobs"]) <= 8

        peft = reference_logprobs(tiny_model_dir, question, adapted["tokenIds"], adapter=out)
        assert max_diff(peft, adapted["logprobs"]) < TOL, (peft, adapted["logprobs"])
        assert max_diff(reference_logprobs(tiny_model_dir, question, base["tokenIds"]), base["logprobs"]) < TOL
        # Effect floor: the bare base scores the adapted answer >= 10x TOL differently.
        bare = reference_logprobs(tiny_model_dir, question, adapted["tokenIds"])
        assert max_diff(bare, adapted["logprobs"]) >= 10 * TOL, (bare, adapted["logprobs"])
        # Planted error: the adapter at half scale fails the same comparison.
        half = reference_logprobs(tiny_model_dir, question, adapted["tokenIds"], adapter=out, scale=0.5)
        assert max_diff(half, adapted["logprobs"]) >= 10 * TOL, (half, adapted["logprobs"])
        # The adapter was applied for that call only.
        again = sidecar.call("generate", params)["result"]
        assert (again["tokenIds"], again["logprobs"]) == (base["tokenIds"], base["logprobs"])

        missing = sidecar.call("generate", {**params, "adapterPath": str(tmp_path / "none")})["error"]
        assert missing["code"] == -32018

    def test_dataset_and_model_errors_keep_the_server_serving(self, sidecar, tiny_model_dir, tmp_path):
        bad = {"examples": [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                            {"messages": [{"role": "wizard", "content": "hi"}]}]}
        err = sidecar.call("train", {**train_params(tiny_model_dir, tmp_path / "x"), "dataset": bad})["error"]
        assert err["code"] == -32010 and err["data"]["index"] == 1 and "role" in err["data"]["field"]
        err = sidecar.call("train", train_params(tmp_path / "no-model", tmp_path / "y"))["error"]
        assert err["code"] == -32011 and err["data"]["tried"]
        assert sidecar.call("supports")["result"]["busy"] is False
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


class TestCancelAndQueue:
    def test_cancel_mid_training_then_train_again(self, sidecar, tiny_model_dir, tmp_path):
        out = tmp_path / "cancelled"
        request_id = sidecar.request("train", long_params(tiny_model_dir, out, jobId="to-cancel"))
        seen = wait_training(sidecar, "to-cancel", min_step=2)["params"]["step"]
        # status is answered while the job trains, not after it: the answer names the job running, in training,
        # at a step no earlier than one already reported (the job has 100 000 steps, so it cannot have finished
        # and restarted; no wall-clock bound, which a loaded machine would break).
        status = sidecar.call("status")["result"]
        running = status["running"]
        assert running["jobId"] == "to-cancel" and running["state"] == "running", status
        assert running["phase"] == "training" and running["step"] >= seen, (running, seen)
        assert sidecar.index_of(lambda m: m.get("id") == request_id and "method" not in m) == -1
        assert sidecar.call("cancel", {"jobId": "to-cancel"})["result"]["state"] == "cancelling"
        error = sidecar.response(request_id, timeout=60)["error"]
        assert error["code"] == -32800
        assert error["data"]["jobId"] == "to-cancel"
        assert error["data"]["stepsCompleted"] >= seen
        assert sidecar.progress("to-cancel")[-1]["phase"] == "cancelled"
        assert_no_partial_output(out)
        assert sidecar.call("cancel", {"jobId": "to-cancel"})["result"]["state"] == "cancelled"
        ok = sidecar.call("train", train_params(tiny_model_dir, tmp_path / "after"), timeout=300)["result"]
        assert ok["status"] == "completed"

    def test_queued_job_is_dropped_without_running(self, sidecar, tiny_model_dir, tmp_path):
        first = sidecar.request("train", long_params(tiny_model_dir, tmp_path / "a", jobId="runner"))
        wait_training(sidecar, "runner")
        second = sidecar.request("train", train_params(tiny_model_dir, tmp_path / "b", jobId="waiter"))
        queued = sidecar.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "waiter")
        assert queued["params"]["phase"] == "queued"
        assert [j["jobId"] for j in sidecar.call("status")["result"]["queued"]] == ["waiter"]
        assert sidecar.call("cancel", {"jobId": "waiter"})["result"]["state"] == "cancelled"
        error = sidecar.response(second, timeout=30)["error"]
        assert error["code"] == -32800 and error["data"]["stepsCompleted"] == 0
        assert "training" not in [p["phase"] for p in sidecar.progress("waiter")]
        # $/cancelRequest (vscode-jsonrpc's CancellationToken) cancels by request id.
        sidecar.notify("$/cancelRequest", {"id": first})
        assert sidecar.response(first, timeout=60)["error"]["code"] == -32800
        assert_no_partial_output(tmp_path / "a")
        assert_no_partial_output(tmp_path / "b")

    def test_queue_full_and_duplicate_job_id(self, tiny_model_dir, tmp_path):
        with Sidecar(env={"LORA_SIDECAR_MAX_QUEUE": "1"}) as proc:
            first = proc.request("train", long_params(tiny_model_dir, tmp_path / "a", jobId="one"))
            wait_training(proc, "one")
            dup = proc.call("train", long_params(tiny_model_dir, tmp_path / "dup", jobId="one"))["error"]
            assert dup["code"] == -32020
            proc.request("train", long_params(tiny_model_dir, tmp_path / "b", jobId="two"))
            proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == "two")
            full = proc.call("train", long_params(tiny_model_dir, tmp_path / "c", jobId="three"))["error"]
            assert full["code"] == -32014 and full["data"]["limit"] == 1
            shut = proc.call("shutdown", timeout=60)["result"]
            assert sorted(shut["cancelledJobs"]) == ["one", "two"]
            assert proc.response(first)["error"]["code"] == -32800
            proc.notify("exit")
            assert proc.proc.wait(30) == 0
            for name in ("a", "b", "c", "dup"):
                assert_no_partial_output(tmp_path / name)


class TestProcessLifecycle:
    def test_stdin_closed_mid_training_stops_the_job_and_exits_zero_without_partial_adapter(self, tiny_model_dir,
                                                                                              tmp_path):
        """EOF stops the running job itself: the stop timeout is raised to 600 s, so an exit within the 120 s
        wait (a tiny step is milliseconds; 120 s holds at load 4) cannot come from that timeout's forced exit."""
        out = tmp_path / "adapter"
        with Sidecar(env={"LORA_SIDECAR_STOP_TIMEOUT": "600"}) as proc:
            proc.request("train", long_params(tiny_model_dir, out, jobId="eof"))
            wait_training(proc, "eof")
            proc.proc.stdin.close()
            assert proc.proc.wait(120) == 0
        assert_no_partial_output(out)

    def test_stdout_stays_clean_when_training_code_writes_to_fd1(self, tiny_model_dir, tmp_path):
        # Wrap the real engine so that every job prints and writes straight to file descriptor 1,
        # as a misbehaving library or C extension would.
        noisy = (
            "import os, sys\n"
            "import sidecar.training as training\n"
            "real = training.train\n"
            "def train(*a, **k):\n"
            "    def report(p, inner=k['report']):\n"
            "        print('NOISE from print', p.step)\n"
            "        os.write(1, b'NOISE straight to fd 1\\n')\n"
            "        inner(p)\n"
            "    k['report'] = report\n"
            "    print('NOISE before training')\n"
            "    return real(*a, **k)\n"
            "training.train = train\n"
            "from sidecar.cli import main\n"
            "sys.exit(main())\n"
        )
        with Sidecar(argv=[sys.executable, "-c", noisy]) as proc:
            result = proc.call("train", train_params(tiny_model_dir, tmp_path / "a"), timeout=300)["result"]
            assert result["status"] == "completed"
            assert proc.close() == 0
            assert proc.bad_output == []
            assert "NOISE straight to fd 1" in proc.stderr() and "NOISE from print" in proc.stderr()
