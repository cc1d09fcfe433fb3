"""Reliability: no input deafens the control plane, the sidecar never outlives its parent, batches
are answered element by element, a client's mistake gets an error naming the field, a kill -9 leaves
a complete adapter or nothing.

Sections 1–4, the fuzzer, kill -9 and the soak drive the real process over stdio
(tests/sidecar_proc.py). The last section, "In-process", calls the pieces directly (the message
writer, the server's error mapping, housekeeping, the fuzzer's constants) without a sidecar process.
No assertion here depends on how fast the machine is, except the parent-death bound, whose margin is
explained where it is set."""

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


# --- 2. the sidecar never outlives its parent ---------------------------------------------------------

# A parent that starts the sidecar, prints its pid, sends the requests given (then closes the
# sidecar's stdin when asked: a fifth argument, true), and drains the sidecar's stdout, touching a file
# for each watched substring seen there. The test SIGKILLs it.
PARENT = r"""
import json, os, subprocess, sys, threading, time
argv, requests, stderr_path, watch, *close_stdin = json.loads(sys.argv[1])
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
if close_stdin and close_stdin[0]:
    child.stdin.close()
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


# Here time is the point. The sidecar gets SIGTERM from PR_SET_PDEATHSIG at once and then waits at most
# 0.5 s for a running job before exiting anyway (docs/RELIABILITY.md); measured on a quiet machine: gone
# after 0.06 s idle, about 0.65 s in the other phases. Under load 4 on 2 cores a runnable process still
# gets at least a third of a core, which makes that about 2 s; 6 s leaves another 3x on top of it. A
# sidecar that waits for the held operation instead stays alive 60 s (the hold), one that never
# notices the death for ever: both stay far outside the bound.
PARENT_DEATH_BOUND_S = 6.0


class TestParentDeath:
    @pytest.mark.parametrize("phase", ["idle", "loading", "training", "saving", "generating"])
    def test_sidecar_is_gone_within_6_s_of_its_parent_being_killed(self, phase, tiny_model_dir, tmp_path):
        """Through the process: a parent process starts the sidecar and is SIGKILLed. ``training`` is a
        real, cancellable job (the issue's reproduction); ``loading``, ``saving`` and ``generating``
        are held 60 s by a hook that ignores cancellation, as a long model load would."""
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
            while not process_gone(pid) and time.monotonic() - killed < 2 * PARENT_DEATH_BOUND_S:
                time.sleep(0.02)
            elapsed, alive = time.monotonic() - killed, not process_gone(pid)
            if alive:
                os.kill(pid, signal.SIGKILL)
            assert not alive and elapsed < PARENT_DEATH_BOUND_S, (
                f"sidecar alive {elapsed:.2f} s after its parent died:\n{log()}")
            print(f"{phase}: gone {elapsed:.2f} s after the parent's SIGKILL")
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

    def test_notifications_only_get_nothing_and_an_empty_batch_one_error(self, sidecar):
        sidecar.send_raw(b'[{"jsonrpc":"2.0","method":"status"},{"jsonrpc":"2.0","method":"nope"}]\n')
        sidecar.send_raw(b"[]\n")
        err = sidecar.wait_for(lambda m: "error" in m)
        assert err["error"]["code"] == -32600 and err["id"] is None and "empty batch" in err["error"]["message"]
        assert sidecar.call("status")["result"]["running"] is None
        assert not any(isinstance(m, list) for m in sidecar.all)
        assert len(sidecar.all) == 2

    def test_a_train_in_a_batch_can_be_cancelled_and_holds_the_batch_answer(self, tiny_model_dir, tmp_path, sidecar):
        train = {"jsonrpc": "2.0", "id": "t", "method": "train", "params": {
            "baseModel": str(tiny_model_dir), "dataset": chat_dataset(8), "outputPath": str(tmp_path / "out"),
            "maxSteps": 100_000, "epochs": 1000, "batchSize": 2, "progressInterval": 0, "jobId": "in-batch"}}
        sidecar.send_raw(json.dumps([train, {"jsonrpc": "2.0", "id": "s", "method": "status"}]).encode() + b"\n")
        sidecar.wait_for(lambda m: m.get("method") == "progress" and m["params"]["phase"] == "training", 120)
        assert sidecar.call("status")["result"]["running"]["jobId"] == "in-batch"  # answered meanwhile
        assert not any(isinstance(m, list) for m in sidecar.all)  # the batch waits for its train
        sidecar.notify("$/cancelRequest", {"id": "t"})
        deadline = time.monotonic() + 60
        while not any(isinstance(m, list) for m in sidecar.all) and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = next(m for m in sidecar.all if isinstance(m, list))
        by_id = {r["id"]: r for r in answer}
        status = by_id["s"]["result"]
        assert by_id["t"]["error"]["code"] == -32800
        assert "in-batch" in [j["jobId"] for j in [status["running"] or {"jobId": None}] + status["queued"]]
        assert not (tmp_path / "out").exists()


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


# --- crashes: kill -9, stale temporary directories ----------------------------------------------------

def adapter_is_complete(out: Path) -> bool:
    from safetensors import safe_open

    names = {p.name for p in out.iterdir()}
    if not {"adapter_model.safetensors", "adapter_config.json", "training_manifest.json"} <= names:
        return False
    json.loads((out / "adapter_config.json").read_text())
    json.loads((out / "training_manifest.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        return len(list(f.keys())) > 0


def leftovers(out: Path) -> list[str]:
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".tmp-"))


class TestKill9:
    """Through the process: kill -9 of a real tiny-model job in a known phase, at a seeded random moment
    within it. Every case asserts the phase the kill hit (from the notifications the dead process
    wrote) and that phase's outcome: the output path holds a complete adapter or nothing, the next
    start-up lists the job as interrupted (or completed, when the adapter was already in place), and
    what the kill left (``<out>.tmp-<job>``) is gone after that start-up — checked in every case."""

    # loading: held by the test hook (ignores cancellation), killed 0–0.5 s into the hold;
    # training: a 100 000-step job (it cannot reach saving), killed after step 1–8;
    # saving: killed as soon as the temporary directory exists (or the poll already sees the rename).
    PLANS = [("loading", 1), ("training", 2), ("saving", 3), ("saving", 4)]

    @pytest.mark.parametrize("phase,seed", PLANS, ids=[f"{p}-{s}" for p, s in PLANS])
    def test_kill_at_a_random_moment_of_a_phase(self, phase, seed, tiny_model_dir, tmp_path):
        import random

        rng = random.Random(seed)
        data = tmp_path / "data"
        out = tmp_path / "adapters" / "out"
        job_id = f"kill-{phase}-{seed}"
        env = {"LORA_SIDECAR_DATA": str(data)}
        params = {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(8), "outputPath": str(out),
                  "maxSteps": 12, "batchSize": 2, "progressInterval": 0, "jobId": job_id}
        argv, kill_after = None, 0
        if phase == "loading":
            argv = HOOKED_ARGV
            env.update(LORA_SIDECAR_TEST_HOLD="loading:60", LORA_SIDECAR_TEST_HOLD_MARKER=str(tmp_path / "held"))
        elif phase == "training":
            params["maxSteps"] = 100_000
            kill_after = rng.randint(1, 8)
        with Sidecar(argv=argv, env=env) as proc:
            proc.call("status")
            proc.request("train", params)
            if phase == "loading":
                wait_file(tmp_path / "held", 120, proc.stderr)
                time.sleep(rng.uniform(0.0, 0.5))
            elif phase == "training":
                proc.wait_for(lambda m: m.get("method") == "progress" and m["params"]["jobId"] == job_id
                              and m["params"]["phase"] == "training" and m["params"]["step"] >= kill_after, 120)
            else:
                deadline = time.monotonic() + 120
                while not leftovers(out) and not out.exists():
                    assert time.monotonic() < deadline, proc.stderr()[-3000:]
                    time.sleep(0.001)
            proc.proc.send_signal(signal.SIGKILL)
            proc.proc.wait(10)
        # Leaving the block joined the reader: proc.all holds everything the dead process wrote.
        progress = proc.progress(job_id)
        phases = [p["phase"] for p in progress]
        left = leftovers(out)
        assert not out.exists() or adapter_is_complete(out), f"partial adapter at {out}"
        if phase == "loading":
            assert phases[-1] == "loading", phases
            assert not out.exists() and left == [], (out.exists(), left)
            expected = "interrupted"
        elif phase == "training":
            assert phases[-1] == "training" and "saving" not in phases, phases
            assert progress[-1]["step"] >= kill_after
            assert not out.exists() and left == [], (out.exists(), left)
            expected = "interrupted"
        else:
            assert "saving" in phases and phases[-1] in ("saving", "completed"), phases
            # Killed before the rename: the temporary directory and no output; after it: the whole
            # adapter and no temporary directory. Never both, never neither.
            assert bool(left) != out.exists(), (left, out.exists())
            expected = "completed" if out.exists() else "interrupted"
        with Sidecar(env={"LORA_SIDECAR_DATA": str(data)}) as proc:  # the next start-up sweeps what the job claimed
            status = proc.call("status")["result"]
            assert status["running"] is None
            entry = next((j for j in status["recent"] if j["jobId"] == job_id), None)
            assert entry is not None and entry["state"] == expected, entry
            assert leftovers(out) == [], proc.stderr()
            assert ("removed 1 temporary directory" in proc.stderr()) == bool(left), proc.stderr()[-3000:]
            assert proc.close() == 0
        print(f"{phase}-{seed}: killed after {phases[-1]} step {progress[-1]['step']}; output "
              f"{'complete' if out.exists() else 'absent'}; left {left}; journal: {expected}")


# --- soak ---------------------------------------------------------------------------------------------

class TestSoak:
    JOBS = 20  # alternately train and generate (with the adapter just trained)

    def test_repeated_train_and_generate_jobs_keep_memory_flat(self, tiny_model_dir, tmp_path):
        from tests.sidecar_proc import rss_bytes

        rss = []
        with Sidecar(env={"LORA_SIDECAR_DATA": str(tmp_path / "data")}) as proc:
            for i in range(self.JOBS // 2):
                out = tmp_path / f"a{i}"
                result = proc.call("train", {"baseModel": str(tiny_model_dir), "dataset": chat_dataset(4),
                                             "outputPath": str(out), "maxSteps": 2, "batchSize": 2}, timeout=300)
                assert result["result"]["status"] == "completed", result
                rss.append(rss_bytes(proc.proc.pid))
                gen = proc.call("generate", {"baseModel": str(tiny_model_dir), "adapterPath": str(out),
                                             "messages": [{"role": "user", "content": "Hello"}], "maxNewTokens": 4})
                assert gen["result"]["tokens"] >= 1, gen
                rss.append(rss_bytes(proc.proc.pid))
            assert proc.close() == 0
            assert proc.bad_output == []
        warm, last = rss[5], rss[-1]
        growth = (last - warm) / warm
        print(f"RSS after job 6: {warm / 2**20:.0f} MiB, after job {self.JOBS}: {last / 2**20:.0f} MiB "
              f"({growth:+.1%}); all: {[round(r / 2**20) for r in rss]}")
        assert growth < 0.05, f"RSS grew {growth:.1%} from job 6 to job {self.JOBS}"


# --- In-process: no sidecar process ----------------------------------------------------------------

def test_a_dead_stdout_never_raises_and_leaves_nothing_buffered():
    """MessageWriter on a buffered stream whose reader has gone: the failed write closes the stream
    (so no bytes stay in a buffer whose flush at exit would fail) and later writes are dropped."""
    from sidecar.stdio import MessageWriter

    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    stream = os.fdopen(write_fd, "wb")  # buffered on purpose: the old failure
    writer = MessageWriter(stream)
    writer.write({"jsonrpc": "2.0", "method": "progress", "params": {"x": "y" * 100}})
    assert writer.closed
    # Nothing buffered: the stream itself is closed (a closed BufferedWriter holds no bytes and is
    # not flushed again at exit) and so is its file descriptor; the writer no longer holds it.
    assert stream.closed and writer.stream is not stream
    with pytest.raises(OSError):
        os.fstat(write_fd)
    writer.write({"jsonrpc": "2.0", "id": 1, "result": None})  # dropped, no exception
    writer.close()
    writer.close()


def test_an_os_error_on_a_client_path_becomes_a_path_error_naming_the_field(tmp_path):
    import io

    from sidecar import errors, wire
    from sidecar.rpc import path_error
    from sidecar.server import Server
    from sidecar.stdio import FrameReader, MessageWriter

    err = path_error(PermissionError(13, "Permission denied", f"{tmp_path}/out.tmp-job"),
                     {"baseModel": "m", "outputPath": str(tmp_path / "out")})
    assert err.CODE == -32040 and err.data["field"] == "$.outputPath" and err.data["errno"] == "EACCES"
    assert path_error(PermissionError(13, "Permission denied", "/etc/other"), {"outputPath": "/tmp/x"}) is None
    assert path_error(ValueError("not an OSError"), {"outputPath": "/tmp/x"}) is None

    server = Server(FrameReader(io.BytesIO()), MessageWriter(io.BytesIO()))
    try:
        params = wire.decode_params({"datasetPath": str(tmp_path / "data.jsonl")}, wire.TrainParams)

        def failing(app, job, report, should_stop):
            raise IsADirectoryError(21, "Is a directory", str(tmp_path / "data.jsonl"))

        job = server.app.jobs.submit("train", params, runner=failing, job_id="j", base_model="m",
                                     received_at=time.time())
        with pytest.raises(errors.PathError) as caught:
            job.future.result(30)
        assert caught.value.data["field"] == "$.datasetPath" and "Is a directory" in caught.value.message
    finally:
        server.app.jobs.stop(5)


def test_fuzzer_and_server_agree_on_the_nesting_limit():
    from sidecar import rpc
    from tests import fuzz

    assert fuzz.MAX_DEPTH == rpc.MAX_NESTING_DEPTH


def hold_lock(path: Path) -> int:
    """Hold a claims file's lock as a live sidecar would (flock: per open file, also in one process)."""
    import fcntl

    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


class TestHousekeeping:
    def test_the_sweep_removes_what_dead_processes_claimed_and_spares_live_claims(self, tmp_path):
        from sidecar import housekeeping

        run, adapters, out = tmp_path / "run", tmp_path / "adapters", tmp_path / "elsewhere"
        for d in (run, adapters, out):
            d.mkdir()
        for name in ("adapter.tmp-dead-job", "adapter.tmp-live-job", "adapter-complete"):
            (out / name).mkdir()
            (out / name / "adapter_model.safetensors").write_bytes(b"x")
        (run / "sidecar-1-aaaaaa.claims").write_text(  # dead: nobody holds its lock
            json.dumps({"claim": 1, "dir": str(out), "glob": "adapter.tmp-*"}) + "\n"
            + json.dumps({"claim": 2, "dir": str(adapters), "glob": "*.tmp-*"}) + "\n"
            + json.dumps({"release": 2}) + "\n" + '{"claim": 3, "dir": "/tor')  # a torn last line
        live = run / "sidecar-2-bbbbbb.claims"
        live.write_text(json.dumps({"claim": 1, "dir": str(out), "glob": "adapter.tmp-live-*"}) + "\n")
        fd = hold_lock(live)
        try:
            old, recent = adapters / "a-20260101T000000Z.tmp-x", adapters / "b-20260101T000000Z.tmp-y"
            for d in (old, recent):
                d.mkdir()
                (d / "f").write_text("x")
            two_hours_ago = time.time() - 7200
            for p in (old / "f", old):
                os.utime(p, (two_hours_ago, two_hours_ago))
            removed = housekeeping.sweep(run, adapters)
        finally:
            os.close(fd)
        assert sorted(removed) == sorted([out / "adapter.tmp-dead-job", old])
        assert (out / "adapter.tmp-live-job").is_dir() and (out / "adapter-complete").is_dir() and recent.is_dir()
        assert not (run / "sidecar-1-aaaaaa.claims").exists() and live.exists()

    def test_an_export_claim_removes_its_files_and_a_directory_claim_leaves_files(self, tmp_path):
        """An export claims ``.<name>.tmp-*`` with files: its temporary file and a quantization's
        intermediate go; a train claim (directories only) whose glob a file matches leaves the file,
        and so do a live export's files and the published output."""
        from sidecar import housekeeping

        run, out = tmp_path / "run", tmp_path / "exports"
        run.mkdir()
        out.mkdir()
        dead_export = [".m.gguf.tmp-1a2b", ".m.gguf.tmp-1a2b.f16-3c4d"]
        spared = [".live.gguf.tmp-5e6f", "m.gguf", "adapter.tmp-notes.txt"]
        for name in dead_export + spared:
            (out / name).write_bytes(b"x")
        (out / ".link.gguf.tmp-7a8b").symlink_to(out / "m.gguf")  # never followed, never removed
        directory, pattern = housekeeping.claim_for_export(out / "m.gguf")
        assert (directory, pattern) == (out, ".m.gguf.tmp-*")
        (run / "sidecar-1-aaaaaa.claims").write_text(
            json.dumps({"claim": 1, "dir": str(directory), "glob": pattern, "files": True}) + "\n"
            + json.dumps({"claim": 2, "dir": str(out), "glob": "adapter.tmp-*"}) + "\n"
            + json.dumps({"claim": 3, "dir": str(out), "glob": ".link.gguf.tmp-*", "files": True}) + "\n")
        live = run / "sidecar-2-bbbbbb.claims"
        live.write_text(json.dumps({"claim": 1, "dir": str(out), "glob": ".live.gguf.tmp-*", "files": True}) + "\n")
        fd = hold_lock(live)
        try:
            removed = housekeeping.sweep(run, tmp_path / "no-adapters")
            another_dead = run / "sidecar-9-cccccc.claims"
            another_dead.write_text(json.dumps({"claim": 1, "dir": str(out), "glob": ".live.gguf.tmp-*", "files": True}))
            assert housekeeping.sweep(run, tmp_path / "no-adapters") == []  # the live sidecar still claims it
        finally:
            os.close(fd)
        assert sorted(p.name for p in removed) == sorted(dead_export)
        assert sorted(p.name for p in out.iterdir()) == sorted(spared + [".link.gguf.tmp-7a8b"])

    def test_claims_written_by_a_process_are_what_the_sweep_reads(self, tmp_path):
        """Through the real Claims and claiming(): a held claim is released when the block ends, a claim
        whose process died before the release is swept (the file form too)."""
        from sidecar import housekeeping

        run, out = tmp_path / "run", tmp_path / "out"
        out.mkdir()
        claims, _ = housekeeping.start(run_dir=run, adapters_dir=tmp_path / "none")
        with housekeeping.claiming(claims, *housekeeping.claim_for_export(out / "done.gguf"), files=True):
            pass
        held = housekeeping.claiming(claims, *housekeeping.claim_for_export(out / "cut.gguf"), files=True)
        held.__enter__()  # a crash: never released
        (out / ".done.gguf.tmp-0001").write_bytes(b"x")
        (out / ".cut.gguf.tmp-0002").write_bytes(b"x")
        os.close(claims._fd)  # the process's death drops its lock
        claims2, removed = housekeeping.start(run_dir=run, adapters_dir=tmp_path / "none")
        os.close(claims2._fd)
        assert [p.name for p in removed] == [".cut.gguf.tmp-0002"]
        assert (out / ".done.gguf.tmp-0001").exists()  # released: not this sweep's to remove

    def test_start_never_fails_where_nothing_can_be_written(self, tmp_path):
        from sidecar import housekeeping

        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        claims, removed = housekeeping.start(run_dir=blocker / "run", adapters_dir=tmp_path / "none")
        assert claims is None and removed == []
