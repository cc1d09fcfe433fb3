"""Draining (issue 25): a file of requests piped to ``lora-sidecar --drain`` runs to its end, and
``shutdown {drain: true}`` finishes the jobs received before it; without either, end of input and
``shutdown`` still cancel, and a signal or the parent's death still stops the process at once.

The README's transcript is read from README.md itself (the "Usage" section's here-doc), so the
documented file and what this test pipes are the same lines; only ``"default"`` becomes the tiny
model and ``/tmp/my-adapter`` a temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sidecar_proc import HOOKED_ARGV, REPO, Sidecar, chat_dataset, process_gone
from tests.test_reliability import PARENT, train_request, wait_file

README_ADAPTER = "/tmp/my-adapter"


def readme_transcript() -> list[dict]:
    """The request lines of the README's ``cat > requests.ndjson <<'EOF'`` here-doc."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"\$ cat > requests\.ndjson <<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert match, "README.md has no `cat > requests.ndjson <<'EOF'` transcript"
    return [json.loads(line) for line in match.group(1).splitlines()]


def localise(messages: list[dict], model: Path, adapter: Path) -> list[dict]:
    """The transcript on the tiny model, writing its adapter to ``adapter``."""
    out = json.loads(json.dumps(messages))
    for msg in out:
        params = msg.get("params", {})
        if params.get("baseModel") == "default":
            params["baseModel"] = str(model)
        for key in ("outputPath", "adapterPath"):
            if params.get(key) == README_ADAPTER:
                params[key] = str(adapter)
    return out


def pipe(messages: list[dict], tmp_path: Path, *args: str, name: str = "run", timeout: float = 300,
         ) -> tuple[int, list[dict], str]:
    """Run ``python -m sidecar ARGS`` with ``messages`` in a file as its stdin (NDJSON), to its end:
    its exit status, every stdout message (each checked to be JSON-RPC 2.0), its stderr."""
    requests = tmp_path / f"{name}.ndjson"
    requests.write_text("".join(json.dumps(m) + "\n" for m in messages))
    env = {**os.environ, "LORA_SIDECAR_DATA": str(tmp_path / "data")}
    with open(requests, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "sidecar", *args], stdin=stdin, capture_output=True,
                              cwd=REPO, env=env, timeout=timeout)
    stderr = done.stderr.decode(errors="replace")
    out = []
    for line in done.stdout.decode().splitlines():
        msg = json.loads(line)  # stdout is protocol only: every line is a JSON-RPC message
        assert msg.get("jsonrpc") == "2.0", (line, stderr[-3000:])
        out.append(msg)
    return done.returncode, out, stderr


def responses(out: list[dict]) -> dict:
    return {m["id"]: m for m in out if "method" not in m}


def position(out: list[dict], id) -> int:
    return next(i for i, m in enumerate(out) if "method" not in m and m.get("id") == id)


# --- the README transcript ------------------------------------------------------------------------

def test_the_readme_transcript_piped_through_drain_mode_trains_and_answers_with_the_adapter(
        tiny_model_dir, tmp_path):
    transcript = readme_transcript()
    methods = [m["method"] for m in transcript]
    assert methods == ["supports", "train", "generate", "shutdown", "exit"], methods
    adapter = tmp_path / "my-adapter"
    messages = localise(transcript, tiny_model_dir, adapter)
    train_id, generate_id, shutdown_id = (m["id"] for m in messages[1:4])
    # The tiny model's greedy text is newlines with or without a 10-step adapter: compare the
    # per-token log-probabilities, which are what the adapter changes.
    messages[2]["params"]["logprobs"] = True

    code, out, stderr = pipe(messages, tmp_path, "--drain")
    answers = responses(out)
    assert code == 0, stderr[-3000:]
    assert all("result" in answers[m["id"]] for m in messages if "id" in m), out
    trained = answers[train_id]["result"]
    assert trained["status"] == "completed" and trained["adapterPath"] == str(adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert trained["metrics"]["steps"] == 10, trained["metrics"]
    phases = [m["params"]["phase"] for m in out if m.get("method") == "progress"]
    assert phases[-1] == "completed" and "training" in phases, phases
    # In order: the train's answer, then the generate's that uses its adapter, then the shutdown's.
    assert position(out, train_id) < position(out, generate_id) < position(out, shutdown_id)
    assert answers[shutdown_id]["result"] == {"ok": True, "cancelledJobs": []}
    adapted = answers[generate_id]["result"]
    assert adapted["adapterPath"] == str(adapter)

    # The same question to the bare base, in a second script that just ends (no shutdown, no exit).
    base_request = json.loads(json.dumps(messages[2]))
    del base_request["params"]["adapterPath"]
    code, out, stderr = pipe([base_request], tmp_path, "--drain", name="base")
    assert code == 0, stderr[-3000:]
    base = responses(out)[generate_id]["result"]
    assert base["adapterPath"] is None
    # Greedy decoding is deterministic (~1e-6 in float32): other tokens, or a larger gap between the
    # log-probabilities of the same tokens, are the adapter's doing.
    gap = max(abs(a - b) for a, b in zip(adapted["logprobs"], base["logprobs"]))
    assert base["tokenIds"] != adapted["tokenIds"] or gap > 1e-4, \
        f"the generate answer does not reflect the trained adapter (largest gap {gap:.2e})"


@pytest.mark.parametrize("ending", ["end of input", "shutdown"])
def test_without_drain_mode_end_of_input_and_shutdown_still_cancel(ending, tiny_model_dir, tmp_path):
    """Today's contract, kept as the default: the application stops the sidecar by closing stdin
    (or by ``shutdown``), and whatever was running or queued is cancelled."""
    adapter = tmp_path / "my-adapter"
    messages = localise(readme_transcript(), tiny_model_dir, adapter)
    if ending == "end of input":
        messages = messages[:3]
    train_id, generate_id = messages[1]["id"], messages[2]["id"]

    code, out, stderr = pipe(messages, tmp_path, name=ending.replace(" ", "-"))
    answers = responses(out)
    assert code == 0, stderr[-3000:]
    for id in (train_id, generate_id):
        assert answers[id]["error"]["code"] == -32800, answers[id]
    assert answers[train_id]["error"]["data"]["stepsCompleted"] == 0, answers[train_id]
    assert not adapter.exists()
    if ending == "shutdown":
        assert len(answers[messages[3]["id"]]["result"]["cancelledJobs"]) == 2, out
    else:
        assert "stdin closed; stopping" in stderr


# --- shutdown {drain: true} on a live sidecar -----------------------------------------------------

def test_a_draining_shutdown_answers_after_the_earlier_jobs_and_refuses_later_ones(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    # The job holds 3 s at its first training step (a hook): long enough to see the read loop go on.
    env = {"LORA_SIDECAR_DATA": str(tmp_path / "data"), "LORA_SIDECAR_TEST_HOLD": "training:3"}
    with Sidecar(argv=HOOKED_ARGV, env=env) as proc:
        bad = proc.call("shutdown", {"drain": "yes"})
        assert bad["error"]["code"] == -32602, bad  # a bad param is refused; nothing is shut down
        nowhere = proc.call("generate", {"baseModel": str(tiny_model_dir), "adapterPath": str(out),
                                         "messages": [{"role": "user", "content": "Hi"}]})
        assert nowhere["error"]["code"] == -32018, nowhere  # no job writes it: refused on arrival
        train = proc.request("train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(8),
                                       "outputPath": str(out), "maxSteps": 30, "batchSize": 2})
        # Now a train job ahead of it writes that adapter: queued, and run with it.
        generate = proc.request("generate", {"baseModel": str(tiny_model_dir), "adapterPath": str(out),
                                             "messages": [{"role": "user", "content": "Hi"}], "maxNewTokens": 2})
        shutdown = proc.request("shutdown", {"drain": True})
        # The read loop goes on while the jobs finish: status answers, a new job is refused.
        status_id = proc.request("status")
        status = proc.response(status_id, timeout=30)["result"]
        late = proc.call("train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(2),
                                   "outputPath": str(tmp_path / "late"), "maxSteps": 1}, timeout=30)
        assert late["error"]["code"] == -32015, late
        proc.notify("exit")  # an exit sent during the drain ends the process after it
        proc.proc.stdin.close()
        assert proc.response(train, timeout=300)["result"]["metrics"]["steps"] == 30
        assert proc.response(generate, timeout=60)["result"]["adapterPath"] == str(out)
        assert proc.response(shutdown, timeout=60)["result"] == {"ok": True, "cancelledJobs": []}
        assert proc.proc.wait(60) == 0, proc.stderr()[-3000:]
        pending = ([status["running"]] if status["running"] else []) + status["queued"]
        assert [j["kind"] for j in pending] == ["train", "generate"], status
        answered = [proc.index_of(lambda m, id=id: m.get("id") == id and "method" not in m)
                    for id in (status_id, train, generate, shutdown)]
        assert answered == sorted(answered), proc.all
        assert not (tmp_path / "late").exists()


# --- the exit status of drain mode ------------------------------------------------------------------

STATUS = '{"jsonrpc":"2.0","id":1,"method":"status"}'


@pytest.mark.parametrize("last,code,answers", [
    (None, 0, 1),
    ('{"jsonrpc":"2.0","id":2,"method":"nope"}', 1, 2),  # -32601
    ('{"jsonrpc":"2.0","id":2,"method":', 1, 2),  # -32700
    ('{"jsonrpc":"2.0","method":"exit"}', 1, 1),  # exit without shutdown, as in every mode
    ('{"jsonrpc":"2.0","id":2,"method":"shutdown"}', 0, 2),
])
def test_drain_mode_exits_0_only_when_every_request_succeeded(last, code, answers, tmp_path):
    lines = [STATUS] + ([last] if last else [])
    requests = tmp_path / "requests.ndjson"
    requests.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "LORA_SIDECAR_DATA": str(tmp_path / "data")}
    with open(requests, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--drain"], stdin=stdin,
                              capture_output=True, cwd=REPO, env=env, timeout=120)
    out = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert (done.returncode, len(out)) == (code, answers), (out, done.stderr.decode()[-2000:])
    assert "result" in out[0]


# --- drain mode never outlives its parent, and a signal still stops it --------------------------------
# The parent is test_reliability's, told to close the sidecar's stdin after the requests (so it drains).


def test_parent_death_in_drain_mode_stops_the_sidecar_at_once(tiny_model_dir, tmp_path):
    stderr = tmp_path / "sidecar.log"
    log = lambda: stderr.read_text(errors="replace")[-3000:] if stderr.exists() else ""  # noqa: E731
    env = {**os.environ, "LORA_SIDECAR_DATA": str(tmp_path / "data")}
    # Effectively endless: only the parent's death can end this run promptly.
    requests = [train_request(tiny_model_dir, tmp_path / "out")]
    watch = [['"phase":"training","step":3', str(tmp_path / "training")]]
    argv = [sys.executable, "-m", "sidecar", "--drain"]
    parent = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps([argv, requests, str(stderr), watch, True])],
                              stdout=subprocess.PIPE, cwd=REPO, env=env)
    try:
        pid = int(parent.stdout.readline())
        wait_file(tmp_path / "training", 120, log)
        # Its stdin is closed and it trains on: it is draining, not stopping.
        assert "stdin closed; finishing what was received" in log() and not process_gone(pid), log()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        killed = time.monotonic()
        while not process_gone(pid) and time.monotonic() - killed < 10:
            time.sleep(0.02)
        elapsed, alive = time.monotonic() - killed, not process_gone(pid)
        if alive:
            os.kill(pid, signal.SIGKILL)
        assert not alive and elapsed < 2.0, f"sidecar alive {elapsed:.2f} s after its parent died:\n{log()}"
        assert not (tmp_path / "out").exists()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_sigterm_in_drain_mode_stops_promptly_and_exits_1(tiny_model_dir, tmp_path):
    with Sidecar(argv=[sys.executable, "-m", "sidecar", "--drain"],
                 env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as proc:
        request = train_request(tiny_model_dir, tmp_path / "out")
        proc.send(request)
        proc.proc.stdin.close()  # draining from here on
        proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["phase"] == "training"
                      and m["params"]["step"] >= 2, timeout=120)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = proc.proc.wait(15)
        assert time.monotonic() - signalled < 5, proc.stderr()[-3000:]
        assert proc.response(request["id"], timeout=5)["error"]["code"] == -32800
        assert code == 1, proc.stderr()[-3000:]  # the script was cut short
