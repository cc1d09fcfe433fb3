"""A seeded fuzzer for the sidecar's control plane, driving the real process.

    bootstrap/train-wrapper.sh -m tests.fuzz --messages 100000 --seed 1     # outside CI
    tests/test_reliability.py::TestFuzz                                      # 10,000 in the suite

It generates messages on three layers, mixed at random:

- **framing**: NDJSON and Content-Length frames, CRLF, blank lines, garbage lines, invalid UTF-8,
  JSON cut short, lone surrogates, lines and bodies over the size limit (and exactly at it), bad
  and negative Content-Length headers, JSON nested past what the decoder can recurse;
- **envelope**: ids of every JSON type, missing, wrong and extra members, notifications, batches
  (empty, mixed, of notifications only, nested, of non-objects), nesting around the depth limit;
- **params** of every request method and accepted notification, generated from
  ``wire.json_schema()`` — so methods added later are fuzzed without a change here: valid-shaped
  values, boundary values, wrong types, unknown fields, huge strings, deep nesting.

Nothing it sends can start heavy work or write outside its temporary directory: every field whose
name looks like a model or a path (``path|model|dir|file|output``) is always present (a default can
name a real model) and drawn from a small pool of paths under the temporary directory that are
not models, adapters or datasets (or is an invalid path), so ``train``, ``generate`` and any
``adapters/*`` method fail fast; the process runs with its cwd and data directory there. ``shutdown``
and ``exit`` are only sent at the end.

Checked: the process stays up; every request with a valid id is answered exactly once (ids are
unique); exactly the expected number of answers carry ``id: null``; no answer to a notification;
stdout carries protocol only; no -32603 for any input; a final ``status`` is answered and
``shutdown`` + ``exit`` end the process with code 0.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.sidecar_proc import REPO, Sidecar

MAX_DEPTH = 128  # rpc.MAX_NESTING_DEPTH; a test checks they agree
PATHLIKE = re.compile(r"path|model|dir|file|output", re.I)
EXCLUDED_METHODS = ("shutdown", "exit")
UNKNOWN_METHODS = ["nope", "", "Train", "rpc.discover", "status ", "$/progress", "adapters/nope", "x" * 300]
UNKNOWN_FIELDS = ["epochz", "", "ctx", "self", "__proto__", "constructor", "id", "jsonrpc", "é🙂", "k" * 200]
TEXTS = ["", "a", "hello world", "Zorbania", "ünïcødé ✓", "🙂🙃", "line\nbreak", "tab\there", 'quote " back \\',
         "\u2028\u2029", "nul\u0000byte", "../../etc/passwd", "{not json}", "[1,2", "Content-Length: 5"]


@dataclass
class Case:
    """One message as bytes, with what the sidecar must answer to it."""

    kind: str
    data: bytes
    ids: list = field(default_factory=list)
    nulls: int = 0


def depth(value: Any) -> int:
    """Nesting depth of a JSON value ({} and [] are 1), iteratively."""
    best, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            best = max(best, d)
            stack.extend((c, d + 1) for c in (node.values() if isinstance(node, dict) else node))
    return best


def nested(n: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(n):
        value = [value] if i % 2 else {"k": value}
    return value


class Generator:
    def __init__(self, seed: int, tmp: Path, max_bytes: int) -> None:
        from sidecar import wire

        self.rng = random.Random(seed)
        self.max_bytes = max_bytes
        self.schema = wire.json_schema()
        self.defs = self.schema["$defs"]
        self.methods = {m: v["params"] for m, v in self.schema["methods"].items() if m not in EXCLUDED_METHODS}
        self.methods.update({m: p for m, p in self.schema.get("notificationsIn", {}).items()
                             if m not in EXCLUDED_METHODS})
        self._ids = itertools.count(1)
        self.method_counts: collections.Counter = collections.Counter()
        self.recent_ids: collections.deque = collections.deque(maxlen=16)
        (tmp / "empty-dir").mkdir(exist_ok=True)
        (tmp / "junk.jsonl").write_text("not json\n{\"messages\": 3}\n")
        self.pool = [str(tmp / "missing-model"), str(tmp / "nope" / "adapter"), str(tmp / "no-data.jsonl"),
                     str(tmp / "empty-dir"), str(tmp / "junk.jsonl"), "relative/missing", "missing-out",
                     str(tmp / "out" / "adapter-ü"), str(tmp / "empty-dir" / "new")]
        self.hostile_paths = ["", str(tmp / "a\u0000b"), str(tmp / "line\nbreak"), str(tmp / ("x" * 300)),
                              str(tmp) + "/" + "y/" * 2100, str(tmp / ("z" * 190)), str(tmp / ("é" * 130))]

    def dumps(self, value: Any, ascii: bool | None = None) -> bytes:
        ascii = self.rng.random() < 0.5 if ascii is None else ascii
        return json.dumps(value, ensure_ascii=ascii, separators=(",", ":")).encode()

    # --- ids ------------------------------------------------------------------------------------

    def new_id(self) -> Any:
        n = next(self._ids)
        kind = self.rng.random()
        if kind < 0.45:
            value: Any = n
        elif kind < 0.8:
            value = f"f-{n}" + self.rng.choice(["", "-é", "-\u2028", " space", "-🙂", '-"q"'])
        elif kind < 0.9:
            value = n + 0.5
        elif kind < 0.95:
            value = -n
        else:
            value = 2**70 + n
        self.recent_ids.append(value)
        return value

    # --- values from the JSON Schema ------------------------------------------------------------

    def value(self, node: dict, name: str = "", level: int = 0) -> Any:
        rng = self.rng
        if PATHLIKE.search(name) and "string" in self._types(node):
            return self.path_value()
        roll = rng.random()
        if level > 6 or roll < 0.04:
            return self.wrong_type(node)
        if roll < 0.06:
            return self.any_json(3) if rng.random() < 0.5 else nested(rng.choice([5, 50, 120]))
        if "$ref" in node:
            return self.object(self.defs[node["$ref"].rsplit("/", 1)[1]], level + 1)
        if "anyOf" in node:
            return self.value(rng.choice(node["anyOf"]), name, level)
        if "enum" in node:
            return rng.choice(node["enum"]) if rng.random() < 0.9 else rng.choice(["", "auto ", "AUTO", 7])
        kind = node.get("type")
        if isinstance(kind, list):
            kind = rng.choice(kind)
        if kind == "string":
            return self.string(node)
        if kind == "integer":
            return self.number(node, integer=True)
        if kind == "number":
            return self.number(node, integer=False)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "null":
            return None
        if kind == "array":
            lo = node.get("minItems", 0)
            n = rng.choice([lo, lo, lo + 1, lo + 2, 0, 5])
            return [self.value(node.get("items", {}), name, level + 1) for _ in range(n)]
        if kind == "object":
            if "properties" in node:
                return self.object(node, level + 1)
            return {self.key(): self.any_json(2) for _ in range(rng.randrange(4))}
        return self.any_json(2)

    def _types(self, node: dict) -> set:
        """The JSON types a schema node accepts (following anyOf, not $ref)."""
        if "anyOf" in node:
            return set().union(*(self._types(n) for n in node["anyOf"]))
        if "$ref" in node:
            return {"object"}
        if "enum" in node:
            return {"enum"}
        kind = node.get("type")
        return set(kind) if isinstance(kind, list) else {kind} if kind else {"any"}

    def path_value(self) -> Any:
        roll = self.rng.random()
        if roll < 0.8:
            return self.rng.choice(self.pool)
        if roll < 0.95:
            return self.rng.choice(self.hostile_paths)
        return self.rng.choice([3, None, True, ["a"], {"p": 1}])

    def object(self, node: dict, level: int) -> dict:
        rng = self.rng
        out = {}
        required = set(node.get("required", []))
        for prop, sub in node.get("properties", {}).items():
            if prop in required or PATHLIKE.search(prop) or rng.random() < 0.35:
                if not (prop in required and rng.random() < 0.03):  # now and then a required one is missing
                    out[prop] = self.value(sub, prop, level)
        if rng.random() < 0.05:
            out[self.key()] = self.any_json(1)
        return out

    def key(self) -> str:
        return self.rng.choice(UNKNOWN_FIELDS) if self.rng.random() < 0.7 else self.string({"maxLength": 20})

    def string(self, node: dict) -> str:
        rng = self.rng
        lo, hi = node.get("minLength", 0), node.get("maxLength")
        roll = rng.random()
        if roll < 0.1 and hi is not None:
            return "s" * rng.choice([hi, hi + 1, max(lo - 1, 0)])
        if roll < 0.13:
            return "h" * rng.choice([1000, 20000])
        if roll < 0.2 and lo:
            return "m" * lo
        text = rng.choice(TEXTS) if rng.random() < 0.6 else "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x2FFF), rng.randrange(0x1F300, 0x1F64F)]))
            for _ in range(rng.randrange(1, 30)))
        return text

    def number(self, node: dict, integer: bool) -> Any:
        rng = self.rng
        lo = node.get("minimum", node.get("exclusiveMinimum"))
        hi = node.get("maximum", node.get("exclusiveMaximum"))
        roll = rng.random()
        if roll < 0.25 and (lo is not None or hi is not None):
            edge = rng.choice([b for b in (lo, hi) if b is not None])
            return edge + rng.choice([-1, 0, 1] if integer else [-1e-9, 0, 1e-9, -1, 1])
        if roll < 0.35:
            return rng.choice([0, -1, 2**31, 2**63, 2**64 + 1, -(2**63) - 1, 10**30] if integer
                              else [0.0, -0.0, 1e308, -1e308, 5e-324, 1e-7, 0.5])
        if roll < 0.4:
            return 1.5 if integer else "1.0"
        if lo is not None and hi is not None:
            value = rng.uniform(lo, hi)
        else:
            value = rng.uniform(lo if lo is not None else -10, (lo if lo is not None else 0) + 10)
        return int(value) if integer else value

    def wrong_type(self, node: dict) -> Any:
        kind = node.get("type")
        options = [None, True, 0, -3.5, "text", [], [1, "a"], {}, {"k": [None]}]
        return self.rng.choice([o for o in options if not _matches(o, kind)] or options)

    def any_json(self, levels: int) -> Any:
        rng = self.rng
        roll = rng.random()
        if levels <= 0 or roll < 0.5:
            return rng.choice([None, True, False, 0, -1, 3.25, 2**64, "", "x", "🙂", "\u0000"])
        if roll < 0.75:
            return [self.any_json(levels - 1) for _ in range(rng.randrange(4))]
        return {self.key(): self.any_json(levels - 1) for _ in range(rng.randrange(4))}

    # --- request objects ------------------------------------------------------------------------

    def params_for(self, method: str) -> Any:
        if method == "$/cancelRequest" and self.recent_ids and self.rng.random() < 0.5:
            return {"id": self.rng.choice(self.recent_ids)}
        if method in self.methods:
            return self.object(self.defs[self.methods[method]], 1)
        return self.any_json(2) if self.rng.random() < 0.3 else {self.key(): self.any_json(1)}

    def element(self, in_batch: bool = False) -> tuple[Any, list, int]:
        """A request object (or something standing in one's place) and its expected answers."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.04:  # not an object at all (a list only inside a batch: alone it is a batch)
            return rng.choice([1, "x", None, True, 2.5] + ([[], [{"jsonrpc": "2.0", "method": "status"}]]
                                                          if in_batch else [])), [], 1
        method = rng.choice(list(self.methods)) if rng.random() < 0.9 else rng.choice(UNKNOWN_METHODS)
        self.method_counts[method if method in self.methods else "(unknown)"] += 1
        el: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if rng.random() < 0.9:
            el["params"] = self.params_for(method)
        valid = isinstance(el.get("params", {}), (dict, list))
        id_roll = rng.random()
        if id_roll < 0.65:
            el["id"] = self.new_id()
        elif id_roll < 0.7:
            el["id"] = None
        elif id_roll < 0.75:
            el["id"] = rng.choice([True, False, [1], {"id": 1}, [], {}])
        # else: a notification
        mutation = rng.random()
        if mutation < 0.03:
            el["jsonrpc"] = rng.choice(["1.0", 2.0, None, "2.0 ", ""])
            valid = False
        elif mutation < 0.05:
            del el["jsonrpc"]
            valid = False
        elif mutation < 0.08:
            el["method"] = rng.choice([None, 5, ["status"], {"m": 1}])
            valid = False
        elif mutation < 0.1:
            del el["method"]
            valid = False
        elif mutation < 0.12:
            el["params"] = rng.choice(["x", 3, True, None])
            valid = False
        elif mutation < 0.14:
            el[rng.choice(["param", "result", "error", "extra", "ID"])] = 1
            valid = False
        elif mutation < 0.18:
            n = rng.choice([1, 60, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, 200, 400])
            el["params"] = {"x": nested(n)}  # replaces params that may have been no object
            valid = depth(el) <= MAX_DEPTH
        if "id" in el:
            value = el["id"]
            if value is None or type(value) not in (int, float, str):
                return el, [], 1
            return el, [value], 0
        return el, [], 0 if valid else 1

    # --- messages ---------------------------------------------------------------------------------

    def case(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.55:
            el, ids, nulls = self.element()
            return self.framed(f"request/{_label(el, ids, nulls)}", self.dumps(el), ids, nulls)
        if roll < 0.68:
            return self.batch()
        return self.framing()

    def batch(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05:
            return self.framed("batch/empty", b"[]", [], 1)
        elements, ids, nulls = [], [], 0
        only_notifications = roll < 0.15
        for _ in range(rng.choice([1, 2, 3, 5, 8])):
            while True:
                el, el_ids, el_nulls = self.element(in_batch=True)
                if not only_notifications or (not el_ids and not el_nulls):
                    break
            elements.append(el)
            ids += el_ids
            nulls += el_nulls
        return self.framed("batch/notifications" if only_notifications else "batch/mixed", self.dumps(elements),
                           ids, nulls)

    def frame(self, body: bytes) -> bytes:
        if self.rng.random() < 0.3:
            extra = b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n" if self.rng.random() < 0.3 else b""
            self.too_long = len(body) > self.max_bytes
            return b"Content-Length: %d\r\n%s\r\n" % (len(body), extra) + body
        end = self.rng.choice([b"\n", b"\r\n", b"\n\n"])
        # A line is read up to max_bytes + 1 bytes; one that has not ended by then is refused.
        self.too_long = len(body) + len(end.split(b"\n")[0]) + 1 > self.max_bytes + 1
        return body + end

    def framed(self, kind: str, body: bytes, ids: list, nulls: int) -> Case:
        """A request or batch case; one over the size limit is refused as a whole (one null answer)."""
        data = self.frame(body)
        if self.too_long:
            return Case(kind + "/oversized", data, [], 1)
        return Case(kind, data, ids, nulls)

    def framing(self) -> Case:
        rng = self.rng
        choice = rng.randrange(12)
        request = {"jsonrpc": "2.0", "id": self.new_id(), "method": "status"}
        if choice == 0:  # garbage without newlines, not JSON
            while True:
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"")
                stripped = junk.strip()
                if stripped and not stripped[:15].lower().startswith(b"content-length") and not _is_json(stripped):
                    return Case("framing/garbage", junk + b"\n", [], 1)
        if choice == 1:
            return Case("framing/blank", rng.choice([b"\n", b"\r\n", b"   \t\n"]), [], 0)
        if choice == 2:  # invalid UTF-8 inside a string
            body = self.dumps(request).replace(b'"status"', b'"st\xff\xfeatus"')
            return Case("framing/invalid-utf8", body + b"\n", [], 1)
        if choice == 3:  # cut short
            body = self.dumps(request)
            return Case("framing/truncated", body[: rng.randrange(1, len(body))] + b"\n", [], 1)
        if choice == 4:  # a lone surrogate escape
            return Case("framing/lone-surrogate", b'{"jsonrpc":"2.0","id":"s","method":"st\\ud800atus"}\n', [], 1)
        if choice == 5:  # over the line limit
            body = self.dumps({**request, "params": {"pad": "p" * (self.max_bytes + rng.randrange(1, 5000))}})
            return Case("framing/oversized-line", body + b"\n", [], 1)
        if choice == 6:  # exactly at the limit (accepted) or one byte over (refused)
            over = rng.random() < 0.5
            base = self.dumps({**request, "params": {"pad": ""}}, ascii=True)
            pad = self.max_bytes - len(base) + (1 if over else 0)
            body = self.dumps({**request, "params": {"pad": "p" * pad}}, ascii=True)
            assert len(body) == self.max_bytes + over
            return Case("framing/at-limit", body + b"\n", [] if over else [request["id"]], 1 if over else 0)
        if choice == 7:  # a Content-Length body over the limit
            n = self.max_bytes + rng.randrange(1, 5000)
            return Case("framing/oversized-body", b"Content-Length: %d\r\n\r\n" % n + b"b" * n, [], 1)
        if choice == 8:
            header = rng.choice([b"Content-Length: abc", b"Content-Length: ", b"content-length: 1e3",
                                 b"Content-Length: -5"])
            return Case("framing/bad-header", header + b"\r\n\r\n", [], 1)
        if choice == 9:  # deeper than the decoder recurses: the whole message is refused
            n = rng.choice([2000, 10000])
            body = b'{"jsonrpc":"2.0","id":1,"method":"supports","params":{"baseModel":' + b"[" * n + b"]" * n + b"}}"
            return Case("framing/deep", self.frame(body), [], 1)
        if choice == 10:  # valid, with odd whitespace
            return Case("framing/whitespace", b"  \t" + self.dumps(request) + b" \r\n", [request["id"]], 0)
        body = rng.choice([b"1", b'"x"', b"null", b"true", b"[1,2,3]"])  # JSON, but no request object
        return Case("framing/not-a-request", self.frame(body), [], 3 if body == b"[1,2,3]" else 1)


def _label(el: Any, ids: list, nulls: int) -> str:
    if not isinstance(el, dict):
        return "not-an-object"
    if nulls:
        return "invalid"
    return "request" if ids else "notification"


def _matches(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    table = {"null": value is None, "boolean": isinstance(value, bool),
             "integer": isinstance(value, int) and not isinstance(value, bool),
             "number": isinstance(value, (int, float)) and not isinstance(value, bool),
             "string": isinstance(value, str), "array": isinstance(value, list), "object": isinstance(value, dict)}
    return any(table.get(k, False) for k in kinds)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False


# --- running ------------------------------------------------------------------------------------------

STALL_SECONDS = 30.0
"""No output at all for this long while messages are being sent: the sidecar has stopped reading."""


def run(messages: int = 10_000, seed: int = 1, max_bytes: int = 65536, timeout: float = 300,
        keep: bool = False) -> dict:
    """Fuzz one sidecar process with ``messages`` messages; returns a report (``ok`` and figures)."""
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-fuzz-"))
    gen = Generator(seed, tmp, max_bytes)
    env = {"LORA_SIDECAR_MAX_MESSAGE_BYTES": str(max_bytes), "LORA_SIDECAR_DATA": str(tmp / "data"),
           "LORA_SIDECAR_MODEL_CACHE": str(tmp / "model-cache"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p]),
           "LORA_SIDECAR_LOG_LEVEL": "WARNING", "LORA_SIDECAR_THREADS": "1"}
    proc = Sidecar(env=env, cwd=tmp)
    expected: collections.Counter = collections.Counter()
    totals = {"nulls": 0, "bytes": 0, "sent": 0}
    kinds: collections.Counter = collections.Counter()
    lock = threading.Lock()
    problems: list[str] = []
    started = time.monotonic()

    def send_all() -> None:
        for _ in range(messages):
            case = gen.case()
            with lock:
                kinds["/".join(case.kind.split("/")[:2])] += 1
                for i in case.ids:
                    expected[_key(i)] += 1
                totals["nulls"] += case.nulls
            try:
                proc.send_raw(case.data)
            except OSError:  # the process is gone; reported below
                return
            totals["bytes"] += len(case.data)
            totals["sent"] += 1

    answered = collections.Counter()
    nulls, internal, malformed, responses, code, alive, shutdown = 0, [], [], 0, None, False, {}
    try:
        # The harness's own requests use ids the generator never makes ("harness-…").
        proc.response(proc.request("status", id="harness-start"), timeout=60)
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        seen, quiet_since = len(proc.all), time.monotonic()
        while sender.is_alive():
            sender.join(0.5)
            if len(proc.all) != seen:
                seen, quiet_since = len(proc.all), time.monotonic()
            elif time.monotonic() - quiet_since > STALL_SECONDS:
                problems.append(f"no output for {STALL_SECONDS:.0f} s while sending (message "
                                f"{totals['sent']} of {messages}): the sidecar stopped reading")
                break
        if proc.proc.poll() is not None:
            problems.append(f"the sidecar exited ({proc.proc.returncode}) during the stream")
        sent_at = time.monotonic()
        if not problems:
            final = proc.response(proc.request("status", id="harness-final"), timeout=timeout)
            if "result" not in final:
                problems.append(f"final status failed: {final}")
            # Jobs answer when they fail: wait until every expected answer is there (or time runs out).
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                answered, nulls = _answers(proc)[:2]
                if nulls >= totals["nulls"] and all(answered[k] >= n for k, n in expected.items()):
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # late duplicates would show up here
            alive = proc.proc.poll() is None
        answered, nulls, internal, malformed, responses = _answers(proc)
        if alive:
            shutdown = proc.response(proc.request("shutdown", id="harness-shutdown"), timeout=120)
            proc.notify("exit")
            code = proc.proc.wait(60)
    except (TimeoutError, RuntimeError, OSError) as exc:
        problems.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        sent_at = time.monotonic()
    finally:
        stderr_tail = proc.stderr()[-5000:]
        proc.kill()
    for harness in ("harness-start", "harness-final", "harness-shutdown"):
        answered.pop(_key(harness), None)
    missing = {k: n - answered[k] for k, n in expected.items() if answered[k] < n}
    duplicates = {k: answered[k] - n for k, n in expected.items() if answered[k] > n}
    unexpected = {k: v for k, v in answered.items() if k not in expected and v > 0}
    if missing:
        problems.append(f"{len(missing)} ids never answered, e.g. {list(missing)[:5]}")
    if duplicates:
        problems.append(f"{len(duplicates)} ids answered more than once, e.g. {list(duplicates)[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} answers to ids never sent or to notifications, e.g. {list(unexpected)[:5]}")
    if nulls != totals["nulls"]:
        problems.append(f"{nulls} answers with id null, expected {totals['nulls']}")
    if internal:
        problems.append(f"{len(internal)} internal errors (-32603), e.g. {internal[:3]}")
    if malformed:
        problems.append(f"{len(malformed)} malformed responses, e.g. {malformed[:3]}")
    if proc.bad_output:
        problems.append(f"{len(proc.bad_output)} non-protocol stdout lines, e.g. {proc.bad_output[:3]}")
    if not alive:
        problems.append("the sidecar was not alive and answering at the end of the stream")
    elif "result" not in shutdown or code != 0:
        problems.append(f"shutdown/exit: {shutdown}, exit code {code}")
    elapsed = time.monotonic() - started
    report = {
        "ok": not problems, "problems": problems, "seed": seed, "messages": messages, "sent": totals["sent"],
        "bytes": totals["bytes"], "maxMessageBytes": max_bytes, "seconds": round(elapsed, 1),
        "sendSeconds": round(sent_at - started, 1), "messagesPerSecond": round(totals["sent"] / max(elapsed, 1e-9)),
        "responses": responses, "idsExpected": sum(expected.values()), "nullAnswers": nulls,
        "internalErrors": len(internal), "missing": len(missing), "duplicates": len(duplicates),
        "unexpected": len(unexpected), "nonProtocolLines": len(proc.bad_output), "exitCode": code,
        "kinds": dict(sorted(kinds.items())), "methods": dict(sorted(gen.method_counts.items())),
    }
    if problems and keep:
        report["stderrTail"] = stderr_tail
        report["tmp"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _key(value: Any) -> tuple[str, Any]:
    return (type(value).__name__ if not isinstance(value, bool) else "bool", value)


def _answers(proc: Sidecar) -> tuple[collections.Counter, int, list, list, int]:
    with proc._lock:
        messages = list(proc.all)
    answered: collections.Counter = collections.Counter()
    nulls, internal, malformed, responses = 0, [], [], 0
    for message in messages:
        for m in message if isinstance(message, list) else [message]:
            if not isinstance(m, dict) or "method" in m:
                continue
            responses += 1
            if ("result" in m) == ("error" in m) or "id" not in m:
                malformed.append(m)
            elif "error" in m and not (isinstance(m["error"].get("code"), int)
                                       and isinstance(m["error"].get("message"), str)):
                malformed.append(m)
            if "error" in m and isinstance(m["error"], dict) and m["error"].get("code") == -32603:
                internal.append(m)
            if m.get("id") is None:
                nulls += 1
            else:
                answered[_key(m["id"])] += 1
    return answered, nulls, internal, malformed, responses


def bisect(messages: int, seed: int = 1, max_bytes: int = 65536) -> tuple[int, Case]:
    """Debugging aid for a failing run: the same seed gives the same messages, so a binary search
    on the number of messages finds the first message after which the run fails. Returns its
    index (1-based) and the message."""
    good, bad = 0, messages
    while bad - good > 1:
        mid = (good + bad) // 2
        if run(mid, seed, max_bytes, timeout=10)["ok"]:
            good = mid
        else:
            bad = mid
    with tempfile.TemporaryDirectory() as tmp:
        gen = Generator(seed, Path(tmp), max_bytes)
        for _ in range(bad):
            case = gen.case()
    return bad, case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-bytes", type=int, default=65536, help="the sidecar's message size limit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the last answers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and stderr on failure")
    parser.add_argument("--bisect", action="store_true", help="on failure, find the first message that breaks the run")
    args = parser.parse_args(argv)
    report = run(args.messages, args.seed, args.max_bytes, timeout=args.timeout, keep=args.keep)
    if not report["ok"] and args.bisect:
        index, case = bisect(args.messages, args.seed, args.max_bytes)
        report["firstFailing"] = {"index": index, "kind": case.kind, "ids": case.ids, "nulls": case.nulls,
                                  "data": case.data[:2000].decode("utf-8", "replace")}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
