"""`lora-sidecar train --config … --output …` prints the application's step-bridge lines on stdout (issue 22,
item 4): JSON ``step``/``checkpoint`` events, ``MEMORY_REPORT:`` lines and ``Final loss: X`` last; the human
progress stays on stderr.

Through the process: the CLI is spawned as a subprocess on the tiny model and its stdout is parsed the way the
application's bridge parses its trainer's stdout (``bridge_parse``: every line a JSON event, a MEMORY_REPORT
line or the Final loss line, nothing else). In process: the parser's planted errors (a stray text line,
steps going back, a line after Final loss) and the rate limit with a fake clock.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import wire
from sidecar.compat_events import EventLines

REPO = Path(__file__).resolve().parents[1]
STEP_KEYS = {"event", "step", "loss", "lr", "epoch", "memMb", "tokenAccuracy", "gradNorm"}
CHECKPOINT_KEYS = {"event", "step", "path", "sizeMb"}
MEMORY_KEYS = {"phase", "device", "allocated_bytes", "peak_bytes", "process_rss_bytes"}
FINAL = re.compile(r"Final loss: (-?\d+(?:\.\d+)?)")


def bridge_parse(stdout: str) -> dict:
    """Read stdout as the application's bridge does; raise AssertionError on any line it could not use."""
    steps, checkpoints, memory, final = [], [], [], None
    for n, line in enumerate(stdout.splitlines(), 1):
        assert final is None, f"line {n} after the Final loss line: {line!r}"
        if line.startswith("MEMORY_REPORT: "):
            report = json.loads(line[len("MEMORY_REPORT: "):])
            assert set(report) == MEMORY_KEYS, report
            memory.append(report)
        elif line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "step":
                assert set(event) == STEP_KEYS, event
                assert not steps or event["step"] > steps[-1]["step"], f"step went back at line {n}: {line}"
                steps.append(event)
            elif event.get("event") == "checkpoint":
                assert set(event) == CHECKPOINT_KEYS, event
                checkpoints.append(event)
            else:
                raise AssertionError(f"line {n}: unknown event {line!r}")
        elif m := FINAL.fullmatch(line):
            final = float(m.group(1))
        else:
            raise AssertionError(f"line {n} is not a bridge line: {line!r}")
    assert final is not None, "no Final loss line"
    return {"steps": steps, "checkpoints": checkpoints, "memory": memory, "final": final}


# -----------------------------------------------------------------------------------------------
# Through the process
# -----------------------------------------------------------------------------------------------

def test_compat_cli_stdout_is_what_the_bridge_reads(tiny_model_dir, tmp_path):
    ds = tmp_path / "data.jsonl"
    ds.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer number {i}"}]})
                            for i in range(6)) + "\n")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"baseModel": str(tiny_model_dir), "datasetPath": "data.jsonl", "rank": 4, "alpha": 8,
                               "epochs": 2, "learningRate": 1e-3, "batchSize": 1, "checkpointEvery": 4}))
    out_dir, data = tmp_path / "adapter", tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "sidecar", "train", "--config", str(cfg), "--output", str(out_dir)],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "LORA_SIDECAR_DATA": str(data)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = bridge_parse(proc.stdout)

    manifest = json.loads((out_dir / "training_manifest.json").read_text())
    metrics = manifest["metrics"]
    total = metrics["steps"]
    assert total == 12  # 6 examples x 2 epochs, batch 1: the effect floor of the step checks below
    # Final loss equals the result's finalLoss, to the 4 decimals printed (tolerance 5e-5).
    assert abs(got["final"] - metrics["finalLoss"]) <= 5e-5, (got["final"], metrics["finalLoss"])

    steps = got["steps"]
    assert steps and steps[-1]["step"] == total  # the last step is never dropped by the rate limit
    assert all(1 <= s["step"] <= total for s in steps)
    for s in steps:
        assert math.isfinite(s["loss"]) and s["loss"] > 0 and s["lr"] > 0 and 0 < s["epoch"] <= 2
        assert 0 <= s["tokenAccuracy"] <= 1 and math.isfinite(s["gradNorm"]) and s["memMb"] > 0
    # Each step event carries that step's loss as the manifest's lossHistory has it (tolerance: the JSON float
    # round trip, 1e-9 relative); a step event off by one step would differ by far more on this run.
    by_step = {h["step"]: h["loss"] for h in manifest["lossHistory"]}
    assert len(by_step) == total
    for s in steps:
        assert s["loss"] == pytest.approx(by_step[s["step"]], rel=1e-9), (s, by_step)

    ckpts = got["checkpoints"]
    assert [c["step"] for c in ckpts] == [4, 8, 12][:len(ckpts)] and len(ckpts) >= 2, ckpts
    for c in ckpts:
        assert c["sizeMb"] > 0 and Path(c["path"]).is_relative_to(data), c

    memory = got["memory"]
    assert memory[-1]["phase"] == "completed" and "training" in [m["phase"] for m in memory]
    for m in memory:
        assert m["device"] == "cpu" and m["process_rss_bytes"] > 2**20
        assert m["allocated_bytes"] > 0 and m["peak_bytes"] >= m["allocated_bytes"] - 2**20  # MiB rounding

    # The human-readable progress stays on stderr, not on stdout.
    assert "[training]" in proc.stderr and "[training]" not in proc.stdout
    assert "Final loss" not in proc.stderr


# -----------------------------------------------------------------------------------------------
# In process: the parser catches planted errors; the rate limit keeps the last step and every checkpoint
# -----------------------------------------------------------------------------------------------

GOOD = ('MEMORY_REPORT: {"phase":"training","device":"cpu","allocated_bytes":1,"peak_bytes":1,'
        '"process_rss_bytes":1}\n'
        '{"event":"step","step":1,"loss":2.0,"lr":0.001,"epoch":0.5,"memMb":1.0,"tokenAccuracy":0.1,"gradNorm":1.0}\n'
        '{"event":"step","step":2,"loss":1.5,"lr":0.001,"epoch":1.0,"memMb":1.0,"tokenAccuracy":0.2,"gradNorm":1.0}\n'
        'Final loss: 1.5000\n')


@pytest.mark.parametrize("planted", [
    lambda s: s.replace("Final loss", "[training] step 2/2\nFinal loss"),     # a stderr line on stdout
    lambda s: s.replace('"step":2', '"step":1'),                               # steps not increasing
    lambda s: s + "trailing\n",                                                # a line after Final loss
    lambda s: s.replace("Final loss: 1.5000\n", ""),                           # no Final loss
    lambda s: s.replace(',"gradNorm":1.0}\nFinal', "}\nFinal"),                # a missing field
])
def test_bridge_parse_catches_planted_errors(planted):
    assert bridge_parse(GOOD)["final"] == 1.5
    with pytest.raises(AssertionError):
        bridge_parse(planted(GOOD))


class _Out:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_rate_limit_keeps_the_last_step_and_every_checkpoint():
    now = [0.0]
    out = _Out()
    lines = EventLines(out, "cpu", interval=0.25, clock=lambda: now[0])
    mem = wire.MemoryNow(rss_mb=100.0)
    for step in range(1, 11):  # ten steps 0.1 s apart: steps 1, 4, 7, 10 pass (0.3 s apart), 10 as the last
        now[0] += 0.1
        ckpt = wire.CheckpointRef(path=f"/c/{step}", step=step, bytes=2**20) if step % 5 == 0 else None
        lines.progress(wire.Progress(job_id="j", phase="training", step=step, total_steps=10, loss=float(step),
                                     learning_rate=1e-3, memory=mem, checkpoint=ckpt))
    lines.final(1.0, mem)
    got = bridge_parse(out.text)
    assert [s["step"] for s in got["steps"]] == [1, 4, 7, 10]
    assert [c["step"] for c in got["checkpoints"]] == [5, 10] and got["checkpoints"][0]["sizeMb"] == 1.0
    assert got["steps"][0]["memMb"] == 100.0 and [m["phase"] for m in got["memory"]] == ["training", "completed"]
