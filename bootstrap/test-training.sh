#!/usr/bin/env bash
# End-to-end smoke check of a bootstrapped environment, through the stdio protocol as a client uses it:
#
#   bash bootstrap/test-training.sh
#
# 1. builds a tiny random model (python -m sidecar.testing tiny-model DIR; a second or so),
# 2. starts `bootstrap/train-wrapper.sh -m sidecar` and sends supports, then a 3-step train on an
#    inline 4-example dataset, and, once the train response is in, shutdown and the exit notification
#    (shutdown cancels running jobs, so it must not be sent earlier),
# 3. checks that every stdout line is JSON, that every request got a result, that the train result
#    has status "completed", that the sidecar exited 0, and that the adapter files exist.
# Exits 0 on success; otherwise non-zero with what failed, keeping the work directory for a look.
#
# LORA_SIDECAR_SMOKE_TIMEOUT (seconds, default 300) bounds the wait for the train response.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wrapper="$repo/bootstrap/train-wrapper.sh"
timeout_s="${LORA_SIDECAR_SMOKE_TIMEOUT:-300}"
work="$(mktemp -d "${TMPDIR:-/tmp}/lora-sidecar-smoke.XXXXXX")"
out="$work/stdout.jsonl"
err="$work/stderr.log"
pid=""

fail() {
  echo "test-training: FAIL: $1" >&2
  if [ -s "$err" ]; then
    echo "--- last lines of $err ---" >&2
    tail -n 20 "$err" >&2
  fi
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  echo "test-training: work directory kept for inspection: $work" >&2
  exit 1
}
# A write to a sidecar that already died must be reported, not kill this script silently.
trap '' PIPE

echo "test-training: work directory $work"
t0=$SECONDS
if ! "$wrapper" -m sidecar.testing tiny-model "$work/tiny" >/dev/null 2>"$work/tiny-model.log"; then
  err="$work/tiny-model.log"
  fail "could not build the tiny model (is the environment bootstrapped? bash bootstrap/bootstrap.sh)"
fi
echo "test-training: tiny model built in $((SECONDS - t0))s"

# The requests are built by Python so that the paths are JSON-escaped whatever TMPDIR is.
requests="$("$wrapper" - "$work/tiny" "$work/adapter" <<'PY'
import json, sys
tiny, output = sys.argv[1], sys.argv[2]
pairs = [("What colour is the sky?", "Blue."), ("What is 2 + 2?", "4."),
         ("Name a fruit.", "An apple."), ("Say hello.", "Hello!")]
examples = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
train = {"baseModel": tiny, "dataset": {"examples": examples}, "outputPath": output,
         "maxSteps": 3, "batchSize": 2, "name": "smoke"}
for message in ({"jsonrpc": "2.0", "id": 1, "method": "supports"},
                {"jsonrpc": "2.0", "id": 2, "method": "train", "params": train},
                {"jsonrpc": "2.0", "id": 3, "method": "shutdown"},
                {"jsonrpc": "2.0", "method": "exit"}):
    print(json.dumps(message, separators=(",", ":")))
PY
)" || fail "could not build the request transcript"
mapfile -t lines <<<"$requests"

mkfifo "$work/stdin"
t0=$SECONDS
"$wrapper" -m sidecar <"$work/stdin" >"$out" 2>"$err" &
pid=$!
exec 3>"$work/stdin"
send() { printf '%s\n' "$1" >&3 || fail "could not write to the sidecar (it exited early)"; }

send "${lines[0]}"
send "${lines[1]}"
echo "test-training: sent supports and train (maxSteps 3); waiting for the train response …"
deadline=$((SECONDS + timeout_s))
until grep -Eq '"id": ?2[,}]' "$out" 2>/dev/null; do
  kill -0 "$pid" 2>/dev/null || fail "the sidecar exited before answering train"
  [ "$SECONDS" -lt "$deadline" ] || fail "no train response within ${timeout_s}s"
  sleep 0.2
done
send "${lines[2]}"
send "${lines[3]}"
exec 3>&-

deadline=$((SECONDS + 30))
while kill -0 "$pid" 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || fail "the sidecar did not exit within 30s of shutdown + exit"
  sleep 0.1
done
rc=0
wait "$pid" || rc=$?
pid=""
[ "$rc" = 0 ] || fail "the sidecar exited with code $rc after shutdown + exit (expected 0)"
echo "test-training: sidecar ran $((SECONDS - t0))s and exited 0"

"$wrapper" - "$out" "$work/adapter" <<'PY' || fail "the transcript or the adapter files are not as expected (stdout: $out)"
import json, pathlib, sys
out, adapter = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
problems, responses, phases = [], {}, []
for n, line in enumerate(out.read_text().splitlines(), 1):
    try:
        msg = json.loads(line)
    except ValueError as exc:
        problems.append(f"stdout line {n} is not JSON ({exc}): {line[:200]!r}")
        continue
    if msg.get("method") == "progress":
        phases.append(msg["params"]["phase"])
    elif "id" in msg:
        responses[msg["id"]] = msg
for rid, method in ((1, "supports"), (2, "train"), (3, "shutdown")):
    if rid not in responses:
        problems.append(f"no response to {method} (id {rid})")
    elif "result" not in responses[rid]:
        problems.append(f"{method} failed: " + json.dumps(responses[rid].get("error"))[:500])
train = responses.get(2, {}).get("result") or {}
if responses.get(2, {}).get("result") is not None and train.get("status") != "completed":
    problems.append("train status is %r, expected 'completed'" % train.get("status"))
for name in ("adapter_model.safetensors", "adapter_config.json", "training_manifest.json"):
    if not (adapter / name).is_file():
        problems.append(f"missing {adapter / name} (adapterPath in the result: {train.get('adapterPath')})")
if problems:
    print("test-training: FAIL:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
metrics = train.get("metrics", {})
seen = list(dict.fromkeys(phases))
print(f"test-training: OK: train completed, {metrics.get('steps')} steps, final loss {metrics.get('finalLoss'):.4f}; "
      f"{len(phases)} progress notifications (phases: {', '.join(seen)}); adapter files in {adapter}")
PY

rm -rf "$work"
