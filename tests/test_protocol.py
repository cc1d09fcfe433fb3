"""The wire protocol over the real process, without training: framing, errors, recovery, lifecycle."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from sidecar import errors, wire
from sidecar.stdio import FrameReader, encode
from tests.sidecar_proc import REPO, Sidecar


# --- framing units (no process) -----------------------------------------------------------------

def frames(data: bytes, max_bytes: int = 1000):
    reader = FrameReader(io.BytesIO(data), max_bytes=max_bytes)
    out = []
    while (frame := reader.read()) is not None:
        out.append((frame.framing, frame.body, frame.error))
    return out


def test_ndjson_crlf_and_blank_lines():
    assert frames(b'{"a":1}\r\n\r\n\n{"b":2}\n{"c":3}') == [
        ("ndjson", b'{"a":1}', None), ("ndjson", b'{"b":2}', None), ("ndjson", b'{"c":3}', None)]


def test_content_length_frames_mixed_with_lines():
    body = '{"x":"é"}'.encode()
    data = b"Content-Length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" % len(body)
    data += body + b'{"y":1}\n'
    assert frames(data) == [("lsp", body, None), ("ndjson", b'{"y":1}', None)]


def test_oversized_line_is_skipped_and_stream_recovers():
    out = frames(b"x" * 5000 + b"\n" + b'{"ok":1}\n', max_bytes=1000)
    assert out[0][0] == "ndjson" and out[0][1] is None and "longer than 1000" in out[0][2]
    assert out[1] == ("ndjson", b'{"ok":1}', None)


def test_oversized_lsp_body_is_skipped():
    data = b"Content-Length: 3000\r\n\r\n" + b"y" * 3000 + b'{"ok":1}\n'
    out = frames(data, max_bytes=1000)
    assert out[0][2] and out[1] == ("ndjson", b'{"ok":1}', None)


def test_encode_escapes_line_separators_and_nan():
    data = encode({"s": "a\u2028b\u2029c", "loss": float("nan")})
    assert b"\xe2\x80\xa8" not in data and b"\\u2028" in data and b"\\u2029" in data
    assert json.loads(data) == {"s": "a\u2028b\u2029c", "loss": None}


def test_decode_params_names_the_field():
    with pytest.raises(errors.InvalidParams) as info:
        wire.decode_params({"rank": "8"}, wire.TrainParams)
    assert info.value.data["field"] == "$.rank" and "Expected `int`, got `str`" in info.value.message
    with pytest.raises(errors.InvalidParams) as info:
        wire.decode_params({"dataset": {"examples": [{"messages": [{"role": "user", "content": 1}]}]}},
                           wire.TrainParams)
    assert info.value.data["field"] == "$.dataset.examples[0].messages[0].content"
    with pytest.raises(errors.InvalidParams) as info:
        wire.decode_params({"rnak": 8}, wire.TrainParams)
    assert info.value.data["field"] == "$.rnak"


def test_schema_command_exports_every_method():
    out = subprocess.run([sys.executable, "-m", "sidecar", "schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    assert set(schema["methods"]) == set(wire.METHODS)
    assert "TrainParams" in schema["$defs"] and "Progress" in schema["$defs"]
    assert "learningRate" in schema["$defs"]["TrainParams"]["properties"]


def test_version_command():
    out = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("lora-sidecar ")


# --- the real process ---------------------------------------------------------------------------

@pytest.fixture
def sidecar():
    proc = Sidecar()
    yield proc
    proc.kill()


def test_supports_reports_capabilities(sidecar):
    result = sidecar.call("supports")["result"]
    assert result["protocolVersion"] == "1.0"
    assert result["supportsFineTuning"] is True
    assert {"supports", "train", "cancel", "status", "generate", "shutdown"} <= set(result["methods"])
    assert result["devices"][0]["type"] == "cpu"
    assert result["defaults"]["rank"] == 8 and result["defaults"]["learningRate"] == 2e-4
    assert result["quantization"]["fourBit"] is False and result["quantization"]["reason"]
    assert result["busy"] is False and result["queueLength"] == 0
    assert "torch" in result["libraries"]


def test_supports_checks_a_model_without_loading(sidecar, tmp_path):
    missing = sidecar.call("supports", {"baseModel": str(tmp_path / "nope")})["result"]["model"]
    assert missing["resolvable"] is False and "nope" in missing["error"]
    assert sidecar.call("status")["result"]["loadedModels"] == []


def test_bad_input_gets_errors_and_the_server_keeps_serving(sidecar):
    sidecar.send_raw(b"this is not json\n")
    sidecar.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"supports"\n')  # truncated
    sidecar.send_raw(b"\xff\xfe\xfd garbage\n")
    sidecar.send_raw(b"J" * 1_000_000 + b"\n")
    sidecar.send_raw(b'{"jsonrpc":"2.0","id":"raw-2"}\n')  # no method: -32600 answered with its id
    sidecar.send_raw(b"[]\n")
    parse_errors = []
    deadline = time.monotonic() + 30
    while len(parse_errors) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        parse_errors = [m for m in sidecar.all if isinstance(m, dict) and "error" in m]
    codes = [m["error"]["code"] for m in parse_errors]
    assert codes[:4] == [-32700, -32700, -32700, -32700], codes
    assert "UTF-8" in parse_errors[2]["error"]["message"]
    assert -32600 in codes
    assert sidecar.call("nope")["error"]["code"] == -32601
    bad_type = sidecar.call("train", {"dataset": {"examples": []}, "rank": "eight"})["error"]
    assert bad_type["code"] == -32602 and bad_type["data"]["field"] == "$.rank"
    unknown = sidecar.call("train", {"datasetPath": "x.jsonl", "epochz": 2})["error"]
    assert unknown["code"] == -32602 and unknown["data"]["field"] == "$.epochz"
    positional = sidecar.call("cancel", ["job"])["error"]
    assert positional["code"] == -32602
    neither = sidecar.call("train", {"rank": 4})["error"]
    assert neither["code"] == -32602 and neither["data"]["field"] == "$.dataset"
    assert sidecar.call("supports")["result"]["protocolVersion"] == "1.0"
    assert sidecar.bad_output == []
    assert sidecar.proc.poll() is None


def test_notifications_get_no_response(sidecar):
    sidecar.notify("status")
    sidecar.notify("no-such-method")
    sidecar.notify("$/cancelRequest", {"id": 99})
    assert sidecar.call("status")["id"] is not None
    assert len([m for m in sidecar.all if isinstance(m, dict)]) == 1


def test_batch_is_answered_as_a_batch(sidecar):
    sidecar.send_raw(json.dumps([
        {"jsonrpc": "2.0", "id": "a", "method": "status"},
        {"jsonrpc": "2.0", "method": "status"},
        {"jsonrpc": "2.0", "id": "b", "method": "cancel", "params": {"jobId": "zzz"}},
    ]).encode() + b"\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(isinstance(m, list) for m in sidecar.all):
        time.sleep(0.05)
    batch = next(m for m in sidecar.all if isinstance(m, list))
    assert sorted(r["id"] for r in batch) == ["a", "b"]
    assert next(r for r in batch if r["id"] == "b")["result"] == {"jobId": "zzz", "state": "unknown"}


def test_raw_stdout_never_carries_raw_line_separators():
    proc = subprocess.run([sys.executable, "-m", "sidecar"], input=(json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "cancel", "params": {"jobId": "a\u2028b"}}, ensure_ascii=False)
        + "\n").encode(), capture_output=True, timeout=120)
    assert proc.returncode == 0
    assert b"\xe2\x80\xa8" not in proc.stdout and b"a\\u2028b" in proc.stdout


def test_content_length_client_gets_content_length_answers():
    proc = Sidecar(framing="lsp")
    try:
        assert proc.call("supports")["result"]["protocolVersion"] == "1.0"
        assert proc.call("cancel", {"jobId": "nope"})["result"]["state"] == "unknown"
        assert proc.framings_seen == {"lsp"}
        assert proc.close() == 0
    finally:
        proc.kill()


def test_a_long_valid_line_is_accepted(sidecar):
    # ~3 MB of inline data in one line: accepted and validated (the limit is 64 MiB by default).
    big = {"examples": [{"messages": [{"role": "user", "content": "x" * 1000},
                                      {"role": "bogus", "content": "y"}]}] * 3000}
    error = sidecar.call("train", {"dataset": big, "baseModel": "/nonexistent/model", "rank": "x"})["error"]
    assert error["code"] == -32602 and error["data"]["field"] == "$.rank"


def test_oversized_message_limit_is_configurable_and_recovers():
    proc = Sidecar(env={"LORA_SIDECAR_MAX_MESSAGE_BYTES": "10000"})
    try:
        proc.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"status","params":{"x":"' + b"z" * 20000 + b'"}}\n')
        err = proc.wait_for(lambda m: "error" in m, timeout=30)["error"]
        assert err["code"] == -32600 and "longer than 10000" in err["message"]
        assert proc.call("status")["result"]["running"] is None
    finally:
        proc.kill()


def test_shutdown_then_exit_exits_zero(sidecar):
    result = sidecar.call("shutdown")["result"]
    assert result == {"ok": True, "cancelledJobs": []}
    assert sidecar.call("train", {"datasetPath": "x.jsonl"})["error"]["code"] == errors.ShuttingDown.CODE
    sidecar.notify("exit")
    assert sidecar.proc.wait(20) == 0


def test_exit_without_shutdown_exits_one(sidecar):
    sidecar.call("status")
    sidecar.notify("exit")
    assert sidecar.proc.wait(20) == 1


def test_stdin_eof_exits_zero(sidecar):
    sidecar.call("status")
    sidecar.proc.stdin.close()
    assert sidecar.proc.wait(20) == 0


def test_sigterm_exits_zero(sidecar):
    sidecar.call("status")
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(20) == 0


def test_wrapper_runs_the_sidecar_from_another_directory(tmp_path):
    import os

    if not os.path.exists(os.path.join(sys.prefix, ".bootstrap-ok")):
        pytest.skip("tests are not running inside a bootstrapped environment")
    env = {"LORA_SIDECAR_ENV": sys.prefix}
    proc = Sidecar(argv=[str(REPO / "bootstrap" / "train-wrapper.sh"), "-m", "sidecar"], env=env, cwd=tmp_path)
    try:
        assert proc.call("supports")["result"]["sidecarVersion"]
        assert proc.close() == 0
    finally:
        proc.kill()
