"""Several nodes, run on this machine: two torchrun agents ("nodes"), one process each, a c10d
rendezvous on 127.0.0.1, each running the command docs/SCALING.md gives (checked word for word,
host, port, paths and processes per node aside).

The 2-node job (batchSize 2 per process) is compared with the single-process job at batchSize 4 of
tests/test_distributed.py (same JOB, dtype float32, dropout 0; its fixtures are reused), within the
same tolerance. Killing one node's agent must fail the job on the other: a non-zero exit, no result,
no temporary adapter directory, every process gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.sidecar_proc import REPO, process_gone
from tests.test_distributed import (JOB, assert_single_process_adapter, sidecar,  # noqa: F401 (fixtures)
                                    single_process_adapter)

SCALING = REPO / "docs" / "SCALING.md"
PROGRESS = re.compile(r"rank(\d) sidecar\.worker: progress (\{.*\})")
# A hang guard, not a speed check: the surviving node fails within about a second of the kill
# (gloo sees the dead peer's sockets close; docs/SCALING.md); this bound only stops a hang.
FAIL_BOUND_S = 120


def node_command(node: int, endpoint: str, job: str, result: str, *, nproc: int = 1,
                 rdzv_id: str = "lora-1") -> list[str]:
    """The command docs/SCALING.md gives for node ``node`` of 2. Node 0 is the one at the endpoint: it
    hosts the rendezvous store (``is_host`` says so rather than leaving torch to guess from the host
    name, which both agents of this test match). No ``--node-rank``: the c10d rendezvous ignores it."""
    return ["bootstrap/train-wrapper.sh", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
            str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
            "--rdzv-conf", f"is_host={int(node == 0)}",
            "-m", "sidecar.training.worker", "--strategy", "ddp", "--job", job, "--result", result]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(tmp_path: Path, job: dict, run_id: str,
                **extra_env: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Both nodes, each an agent in its own session (so that one node can be killed whole)."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    endpoint = f"127.0.0.1:{free_port()}"
    # The job's own directory (params.json) goes to a data dir of the test, not the checkout's.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_SIDECAR_THREADS": "1",
           "LORA_SIDECAR_DATA": str(tmp_path / "data"),
           "LORA_SIDECAR_ENV": os.environ.get("LORA_SIDECAR_ENV", sys.prefix), **extra_env}
    nodes, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "wb") as log:
            nodes.append(subprocess.Popen(
                node_command(node, endpoint, str(tmp_path / "job.json"), str(tmp_path / "result.json"),
                             rdzv_id=run_id),
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
    return nodes, logs


def progress(log: Path) -> list[tuple[int, dict]]:
    return [(int(r), json.loads(p)) for r, p in PROGRESS.findall(log.read_text(errors="replace"))]


def rank0_node(logs: list[Path]) -> int:
    """Which node runs rank 0: c10d orders the nodes by host name, then agent pid (not by node index)."""
    found = [n for n, log in enumerate(logs) if progress(log)]
    assert len(found) == 1, found
    return found[0]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def wait_first_step(nodes: list[subprocess.Popen], logs: list[Path]) -> int:
    """Wait until a training step is logged (both nodes still running); returns the node of rank 0."""
    deadline = time.monotonic() + 600
    while not [p for log in logs for _, p in progress(log) if p["phase"] == "training" and p["step"] >= 1]:
        assert all(node.poll() is None for node in nodes), logs[0].read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "no training step within 600 s"
        time.sleep(0.2)
    return rank0_node(logs)


def stop(nodes: list[subprocess.Popen]) -> None:
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def test_scaling_md_gives_the_commands_this_file_runs():
    text = " ".join(SCALING.read_text().replace("\\\n", " ").split())
    for node in (0, 1):
        doc = node_command(node, "node0.example:29400", "/shared/job.json", "/shared/result.json", nproc=8)
        assert " ".join(doc) in text, f"docs/SCALING.md lacks the node {node} command: {' '.join(doc)}"


def test_two_nodes_give_the_single_process_adapter(tiny_model_dir, tmp_path, sidecar,  # noqa: F811
                                                  single_process_adapter):  # noqa: F811
    out = tmp_path / "out" / "adapter"
    job = {"baseModel": str(tiny_model_dir), "outputPath": str(out), **JOB, "batchSize": 2, "jobId": "nodes"}
    nodes, logs = start_nodes(tmp_path, job, "equal")
    try:
        codes = [node.wait(timeout=600) for node in nodes]
    finally:
        stop(nodes)
    assert codes == [0, 0], "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
    assert_single_process_adapter(out, single_process_adapter, sidecar, tiny_model_dir, tmp_path,
                                  "2 nodes x 1 process")

    reference = json.loads((single_process_adapter / "training_manifest.json").read_text())
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["metrics"]["steps"] == 4
    assert result["metrics"]["trainLoss"] == pytest.approx(reference["metrics"]["trainLoss"], abs=1e-5)
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["engine"]["distributed"] == {"processes": 2, "strategy": "ddp", "backend": "gloo",
                                                 "device": "cpu"}
    # Progress: rank 0 logs each step as a JSON line on its node's stderr; rank 1 logs none.
    main = rank0_node(logs)
    steps = [p["step"] for _, p in progress(logs[main]) if p["phase"] == "training"]
    assert steps and steps[-1] == 4 and steps == sorted(steps)
    assert {rank for rank, _ in progress(logs[main])} == {0}


def test_killing_one_node_fails_the_job_on_the_other(tiny_model_dir, tmp_path):
    """The node of rank 1 is killed whole (agent and worker); the node of rank 0 must fail the job."""
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    job = {"baseModel": str(tiny_model_dir), "outputPath": str(out), **JOB, "batchSize": 2,
           "maxSteps": 100_000, "jobId": "nodes-kill"}
    nodes, logs = start_nodes(tmp_path, job, "kill")
    try:
        main = wait_first_step(nodes, logs)
        survivor, victim = nodes[main], nodes[1 - main]
        workers = [children(node.pid) for node in nodes]
        assert [len(w) for w in workers] == [1, 1], workers  # one worker process under each agent
        pids = [nodes[0].pid, nodes[1].pid, *workers[0], *workers[1]]
        killed_at = max(p["step"] for _, p in progress(logs[main]) if p["phase"] == "training")
        start = time.monotonic()
        os.killpg(victim.pid, signal.SIGKILL)  # the agent; its worker dies with it (PDEATHSIG)
        code = survivor.wait(timeout=FAIL_BOUND_S)
        elapsed = time.monotonic() - start
    finally:
        stop(nodes)
    log = logs[main].read_text(errors="replace")
    print(f"node {main} (rank 0) exited {code} {elapsed:.2f} s after node {1 - main} was killed at step {killed_at}")
    assert code != 0 and victim.returncode == -signal.SIGKILL, log[-3000:]
    # Rank 0 finished no step without rank 1: at most the step under way when the kill came.
    steps = [p["step"] for _, p in progress(logs[main]) if p["phase"] == "training"]
    assert max(steps) <= killed_at + 1
    assert re.search(r'rank0 sidecar\.worker: rank 0: \{"type": "error", "code": -32017, ',
                     log), log[-3000:]
    assert "ChildFailedError" in log  # torchrun's own report of the failed rank
    assert not (tmp_path / "result.json").exists()
    assert list(out.parent.iterdir()) == []  # no adapter, no temporary directory beside it
    gone_by = time.monotonic() + 30  # the killed node's worker is reaped by init once PDEATHSIG killed it
    while not all(process_gone(p) for p in pids) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert [p for p in pids if not process_gone(p)] == []


PG_TIMEOUT_S = 8


def test_a_node_that_goes_silent_fails_the_job_after_the_collective_timeout(tiny_model_dir, tmp_path):
    """A node lost without closing its sockets (power or network loss), simulated by SIGSTOP of its agent
    and worker: their kernel keeps the connections open, so gloo sees no error, only silence. With
    LORA_SIDECAR_PG_TIMEOUT=8 the other node fails the job once that timeout has passed — not before
    (it is the timeout that ends it), and not 30 minutes later (torch's default)."""
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    job = {"baseModel": str(tiny_model_dir), "outputPath": str(out), **JOB, "batchSize": 2,
           "maxSteps": 100_000, "jobId": "nodes-silent"}
    nodes, logs = start_nodes(tmp_path, job, "silent", LORA_SIDECAR_PG_TIMEOUT=str(PG_TIMEOUT_S))
    try:
        main = wait_first_step(nodes, logs)
        survivor, victim = nodes[main], nodes[1 - main]
        start = time.monotonic()
        for pid in [victim.pid, *children(victim.pid)]:
            os.kill(pid, signal.SIGSTOP)
        code = survivor.wait(timeout=FAIL_BOUND_S)
        elapsed = time.monotonic() - start
        assert victim.poll() is None  # still there, stopped: nothing closed its sockets
    finally:
        stop(nodes)
    log = logs[main].read_text(errors="replace")
    print(f"node {main} (rank 0) exited {code} {elapsed:.2f} s after node {1 - main} was stopped "
          f"(timeout {PG_TIMEOUT_S} s)")
    assert code != 0, log[-3000:]
    assert PG_TIMEOUT_S - 1 <= elapsed <= PG_TIMEOUT_S + 60, elapsed
    assert re.search(r"time(d)? ?out", log, re.IGNORECASE), log[-3000:]
    assert not (tmp_path / "result.json").exists() and list(out.parent.iterdir()) == []
