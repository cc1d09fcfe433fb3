"""Reliability: no input deafens the control plane, the sidecar never outlives its parent, batches
are answered element by element, a client's mistake gets an error naming the field.

Every test drives the real process (tests/sidecar_proc.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sidecar_proc import HOOKED_ARGV, REPO, Sidecar, chat_dataset, process_gone


@pytest.fixture
def sidecar():
    proc = Sidecar()
    yield proc
    proc.kill()


def errors_with_id(proc: Sidecar, id, timeout: float = 30) -> dict:
    return proc.response(id, timeout)["error"]


# --- 1. nesting and the read loop -----------------------------------------------------------------

class TestReadLoop:
    def test_a_deeply_nested_message_is_refused_and_the_server_keeps_serving(self, sidecar):
        # 10,000 levels: deeper than the JSON decoder recurses (the reproduction).
        sidecar.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"supports","params":{"baseModel":'
                         + b"[" * 10000 + b"]" * 10000 + b"}}\n")
        refused = sidecar.wait_for(lambda m: "error" in m and m.get("id") is None)["error"]
        assert refused["code"] == -32600 and "nested deeper than 128" in refused["message"]
        # 200 levels decode fine but are over the limit: refused with the request's id.
        sidecar.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"supports","params":{"baseModel":'
                         + b"[" * 200 + b"]" * 200 + b"}}\n")
        err = errors_with_id(sidecar, 2)
        assert err["code"] == -32600 and "$.params.baseModel" in err["message"]
        # 120 levels are within the limit: the params are checked as usual.
        sidecar.send_raw(b'{"jsonrpc":"2.0","id":3,"method":"supports","params":{"baseModel":'
                         + b"[" * 120 + b"]" * 120 + b"}}\n")
        assert errors_with_id(sidecar, 3)["code"] == -32602
        assert sidecar.call("status")["result"]["running"] is None
        assert sidecar.bad_output == []
        sidecar.proc.stdin.close()
        assert sidecar.proc.wait(20) == 0

    def test_a_failure_while_handling_one_message_is_answered_and_reading_goes_on(self):
        with Sidecar(argv=HOOKED_ARGV, env={"LORA_SIDECAR_TEST_BREAK": "handle"}) as proc:
            proc.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":"BOOM"}}\n')
            err = proc.wait_for(lambda m: "error" in m)["error"]
            assert err["code"] == -32603 and "stderr" in err["message"]
            assert proc.call("status")["result"]["running"] is None
            assert proc.close() == 0
            assert "test hook: handling this message fails" in proc.stderr()

    def test_a_broken_input_stream_ends_the_process_instead_of_leaving_it_deaf(self):
        with Sidecar(argv=HOOKED_ARGV, env={"LORA_SIDECAR_TEST_BREAK": "reader"}) as proc:
            assert proc.call("status")["result"]["running"] is None
            assert proc.proc.wait(20) == 1
            assert "the read loop failed" in proc.stderr()


def test_a_dead_stdout_never_raises_and_leaves_nothing_buffered():
    from sidecar.stdio import MessageWriter

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    writer = MessageWriter(os.fdopen(write_fd, "wb"))  # buffered on purpose: the old failure
    writer.write({"jsonrpc": "2.0", "method": "progress", "params": {"x": "y" * 100}})
    assert writer.closed
    writer.write({"jsonrpc": "2.0", "id": 1, "result": None})  # dropped, no exception
    writer.close()
    writer.close()


# --- 2. the sidecar never outlives its parent ---------------------------------------------------------

# A parent that starts the sidecar, prints its pid, sends the requests given, and drains the
# sidecar's stdout, touching a file for each watched substring seen there. The test SIGKILLs it.
PARENT = r"""
import json, os, subprocess, sys, threading, time
argv, requests, stderr_path, watch = json.loads(sys.argv[1])
child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(stderr_path, "wb"))
print(child.pid, flush=True)
def drain():
    for line in child.stdout:
        for needle, path in watch:
            if needle.encode() in line:
                open(path, "w").close()
threading.Thread(target=drain, daemon=True).start()
for r in requests:
    child.stdin.write((json.dumps(r) + "\n").encode()); child.stdin.flush()
time.sleep(3600)
"""


def train_request(model: Path, out: Path, **extra) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "train", "params": {
        "baseModel": str(model), "dataset": chat_dataset(8), "outputPath": str(out), "maxSteps": 100_000,
        "epochs": 1000, "batchSize": 2, "progressInterval": 0, **extra}}


def wait_file(path: Path, timeout: float, why) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), why()


class TestParentDeath:
    @pytest.mark.parametrize("phase", ["idle", "loading", "training", "saving", "generating"])
    def test_sidecar_is_gone_within_2_s_of_its_parent_being_killed(self, phase, tiny_model_dir, tmp_path):
        """``training`` is a real, cancellable job (the issue's reproduction); ``loading``, ``saving``
        and ``generating`` are held by a hook that ignores cancellation, as a long model load would."""
        stderr = tmp_path / "sidecar.log"
        log = lambda: stderr.read_text(errors="replace")[-3000:] if stderr.exists() else ""  # noqa: E731
        env = {**os.environ, "LORA_SIDECAR_TEST_HOLD_MARKER": str(tmp_path / "held")}
        requests: list[dict] = [{"jsonrpc": "2.0", "id": "ready", "method": "status"}]
        watch = [['"id":"ready"', str(tmp_path / "ready")],
                 ['"phase":"training","step":2', str(tmp_path / "training")]]
        if phase == "training":
            requests.append(train_request(tiny_model_dir, tmp_path / "out"))
        elif phase in ("loading", "saving"):
            env["LORA_SIDECAR_TEST_HOLD"] = f"{phase}:60"
            requests.append(train_request(tiny_model_dir, tmp_path / "out", maxSteps=2))
        elif phase == "generating":
            env["LORA_SIDECAR_TEST_HOLD"] = "generating:60"
            requests.append({"jsonrpc": "2.0", "id": 2, "method": "generate", "params": {
                "baseModel": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}]}})
        argv = [sys.executable, "-c", PARENT, json.dumps([HOOKED_ARGV, requests, str(stderr), watch])]
        parent = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO, env=env)
        try:
            pid = int(parent.stdout.readline())
            wait_file(tmp_path / "ready", 60, log)
            if phase == "training":
                wait_file(tmp_path / "training", 120, log)
            elif phase != "idle":
                wait_file(tmp_path / "held", 120, log)
            assert not process_gone(pid), log()
            parent.send_signal(signal.SIGKILL)
            parent.wait()
            killed = time.monotonic()
            while not process_gone(pid) and time.monotonic() - killed < 10:
                time.sleep(0.02)
            elapsed, alive = time.monotonic() - killed, not process_gone(pid)
            if alive:
                os.kill(pid, signal.SIGKILL)
            assert not alive and elapsed < 2.0, f"sidecar alive {elapsed:.2f} s after its parent died:\n{log()}"
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.wait()


# --- 3. batches -------------------------------------------------------------------------------------

def batch_answer(proc: Sidecar, batch: list, timeout: float = 30) -> list:
    before = len([m for m in proc.all if isinstance(m, list)])
    proc.send_raw(json.dumps(batch).encode() + b"\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arrays = [m for m in proc.all if isinstance(m, list)]
        if len(arrays) > before:
            return arrays[before]
        time.sleep(0.02)
    raise TimeoutError(f"no batch answer; stderr:\n{proc.stderr()[-3000:]}")


class TestBatches:
    def test_each_element_is_validated_and_answered_on_its_own(self, sidecar):
        answer = batch_answer(sidecar, [{"jsonrpc": "2.0", "id": "b1", "method": "status"}, 1])
        assert len(answer) == 2
        ok = next(r for r in answer if r["id"] == "b1")
        assert ok["result"]["running"] is None
        bad = next(r for r in answer if r["id"] is None)
        assert bad["error"]["code"] == -32600

    def test_a_batch_of_invalid_elements_gets_one_error_each(self, sidecar):
        answer = batch_answer(sidecar, [1, 2, 3])
        assert [r["error"]["code"] for r in answer] == [-32600] * 3
        assert all(r["id"] is None for r in answer)


# --- 4. a client's mistakes get errors that name the field ------------------------------------------

class TestClientMistakes:
    def test_a_300_character_name_is_invalid_params(self, tiny_model_dir, tmp_path):
        (tmp_path / "data" / "adapters").mkdir(parents=True)
        with Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as proc:
            err = proc.call("train", {"baseModel": str(tiny_model_dir), "name": "n" * 300, "maxSteps": 1,
                                      "dataset": {"examples": [{"text": "hello"}]}}, timeout=120)["error"]
            assert err["code"] == -32602 and err["data"]["field"] == "$.name", err

    def test_a_megabyte_base_model_is_invalid_params(self, sidecar):
        for method, extra in (("supports", {}), ("generate", {"messages": [{"role": "user", "content": "hi"}]}),
                              ("train", {"dataset": {"examples": [{"text": "hello"}]}})):
            err = sidecar.call(method, {"baseModel": "m" * 1_000_000, **extra})["error"]
            assert err["code"] == -32602 and err["data"]["field"] == "$.baseModel", (method, err)

    def test_cancel_request_with_an_object_or_array_id_is_invalid_params(self, sidecar):
        for bad in ({"a": 1}, [1, 2], True):
            err = sidecar.call("$/cancelRequest", {"id": bad})["error"]
            assert err["code"] == -32602 and err["data"]["field"] == "$.id", (bad, err)
        sidecar.notify("$/cancelRequest", {"id": {"a": 1}})
        assert sidecar.call("status")["result"]["running"] is None


# --- the fuzzer -------------------------------------------------------------------------------------

class TestFuzz:
    def test_fuzzer_and_server_agree_on_the_nesting_limit(self):
        from sidecar import server
        from tests import fuzz

        assert fuzz.MAX_DEPTH == server.MAX_NESTING_DEPTH

    def test_10000_fuzzed_messages_are_all_answered_correctly(self):
        from sidecar import wire
        from tests import fuzz

        report = fuzz.run(messages=10_000, seed=12, max_bytes=16384, timeout=120)
        print(json.dumps({k: v for k, v in report.items() if k != "stderrTail"}, indent=1))
        assert report["ok"], report["problems"]
        assert report["sent"] == 10_000 and report["missing"] == report["duplicates"] == 0
        assert report["internalErrors"] == 0 and report["nonProtocolLines"] == 0 and report["exitCode"] == 0
        families = {k.split("/")[0] for k in report["kinds"]}
        assert families == {"framing", "request", "batch"}
        assert len([k for k in report["kinds"] if k.startswith("framing/")]) >= 12
        fuzzed = (set(wire.METHODS) | set(wire.NOTIFICATIONS_IN)) - set(fuzz.EXCLUDED_METHODS)
        assert all(report["methods"].get(m, 0) >= 100 for m in fuzzed), report["methods"]
