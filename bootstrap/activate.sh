# Activate lora-sidecar's training environment in the current shell (bash or zsh):
#
#   source bootstrap/activate.sh
#
# Puts the environment's python first on PATH (venv: its own activate script, so `deactivate`
# works; micromamba: `micromamba activate` when micromamba is available) and exports
# LORA_SIDECAR_ENV. When the environment is not bootstrapped it says so and returns non-zero,
# leaving the shell open and unchanged.

_lora_sidecar_activate() {
  local src repo data env_dir shell_name
  if [ -n "${BASH_VERSION:-}" ]; then
    src="${BASH_SOURCE[0]}"
  elif [ -n "${ZSH_VERSION:-}" ]; then
    # zsh syntax, hidden from bash's parser.
    eval 'src="${(%):-%x}"'
  else
    echo "activate.sh: source it from bash or zsh" >&2
    return 2
  fi
  repo="$(cd "$(dirname "$src")/.." && pwd)"
  data="${LORA_SIDECAR_DATA:-$repo/.continuum/genome}"
  env_dir="${LORA_SIDECAR_ENV:-$data/python}"
  case "$env_dir" in /*) ;; *) env_dir="$PWD/$env_dir" ;; esac

  if [ ! -x "$env_dir/bin/python" ] || [ ! -f "$env_dir/.bootstrap-ok" ]; then
    echo "Training environment not bootstrapped. Run: bash bootstrap/bootstrap.sh" >&2
    echo "(looked in $env_dir)" >&2
    return 1
  fi

  if [ -f "$env_dir/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$env_dir/bin/activate" || return 1
  elif command -v micromamba >/dev/null 2>&1; then
    shell_name=bash
    [ -n "${ZSH_VERSION:-}" ] && shell_name=zsh
    eval "$(micromamba shell hook -s "$shell_name")" && micromamba activate "$env_dir" || return 1
  else
    # A conda-style environment without micromamba on PATH: PATH and CONDA_PREFIX are enough for python.
    export PATH="$env_dir/bin:$PATH"
    export CONDA_PREFIX="$env_dir"
  fi
  export LORA_SIDECAR_ENV="$env_dir"
  hash -r 2>/dev/null
  echo "lora-sidecar environment active: $env_dir ($("$env_dir/bin/python" --version 2>&1))" >&2
}

if [ -n "${BASH_VERSION:-}" ] && [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "activate.sh must be sourced, not run: source bootstrap/activate.sh" >&2
  exit 2
fi
_lora_sidecar_activate
_lora_sidecar_status=$?
unset -f _lora_sidecar_activate
eval "unset _lora_sidecar_status; return $_lora_sidecar_status"
