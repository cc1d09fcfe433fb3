"""Jobs through the real process on the tiny model: progress, warm reuse, cancel, queue, EOF, noisy stdout."""

from __future__ import annotations

import json
import sys
import time
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

    def test_adapter_loads_with_stock_peft(self, tiny_model_dir, tmp_path, sidecar):
        out = tmp_path / "adapter"
        sidecar.call("train", train_params(tiny_model_dir, out), timeout=300)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model = PeftModel.from_pretrained(base, out)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["lora_alpha"] == 16 and not config.get("modules_to_save")
        assert any("lora_A" in n for n, _ in model.named_parameters())

    def test_second_job_reuses_the_warm_model(self, sidecar, tiny_model_dir, tmp_path):
        sidecar.call("train", train_params(tiny_model_dir, tmp_path / "a", jobId="warm-1"), timeout=300)
        result = sidecar.call("train", train_params(tiny_model_dir, tmp_path / "b", jobId="warm-2"),
                              timeout=300)["result"]
        assert result["metrics"]["modelCached"] is True
        assert result["metrics"]["loadTimeMs"] == 0
        assert 0 < result["metrics"]["timeToFirstStepMs"] < 30_000
        assert "loading" not in [p["phase"] for p in sidecar.progress("warm-2")]
        assert str(tiny_model_dir) in " ".join(sidecar.call("status")["result"]["loadedModels"])

    def test_generate_with_and_without_adapter(self, sidecar, tiny_model_dir, tmp_path):
        out = tmp_path / "adapter"
        sidecar.call("train", train_params(tiny_model_dir, out), timeout=300)
        params = {"baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "Hello"}],
                  "maxNewTokens": 5}
        base = sidecar.call("generate", params)["result"]
        adapted = sidecar.call("generate", {**params, "adapterPath": str(out)})["result"]
        assert base["tokens"] <= 5 and adapted["adapterPath"] == str(out)
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
        started = time.monotonic()
        status = sidecar.call("status")["result"]
        assert status["running"]["jobId"] == "to-cancel" and time.monotonic() - started < 2
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
    def test_stdin_closed_mid_training_exits_zero_without_partial_adapter(self, tiny_model_dir, tmp_path):
        out = tmp_path / "adapter"
        with Sidecar() as proc:
            proc.request("train", long_params(tiny_model_dir, out, jobId="eof"))
            wait_training(proc, "eof")
            proc.proc.stdin.close()
            started = time.monotonic()
            assert proc.proc.wait(30) == 0
            assert time.monotonic() - started < 10
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
