#!/usr/bin/env bash
# Run the training environment's Python with the given arguments, from any working directory:
#   bootstrap/train-wrapper.sh -m sidecar            # the stdio JSON-RPC sidecar
#   bootstrap/train-wrapper.sh path/to/script.py     # any script
# stdout belongs to the program (the sidecar's protocol); this script writes only to stderr.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${LORA_SIDECAR_DATA:-$repo/.continuum/genome}"
env_dir="${LORA_SIDECAR_ENV:-$data/python}"
py="$env_dir/bin/python"
if [ ! -x "$py" ] || [ ! -f "$env_dir/.bootstrap-ok" ]; then
  echo "Training environment not bootstrapped. Run: bash bootstrap/bootstrap.sh" >&2
  [ -d "$env_dir" ] && echo "(found an incomplete environment at $env_dir; bootstrap.sh --force rebuilds it)" >&2
  exit 3
fi
# The repository root on the path makes `-m bench` work from any directory.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export LORA_SIDECAR_ENV="$env_dir"
export PYTHONUNBUFFERED=1
exec "$py" "$@"
