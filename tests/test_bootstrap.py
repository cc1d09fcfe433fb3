"""The bootstrap scripts, the wrapper and the packaging files: fast checks, nothing is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "bootstrap"
WRAPPER = BOOTSTRAP / "train-wrapper.sh"
NOT_BOOTSTRAPPED = "Training environment not bootstrapped. Run: bash bootstrap/bootstrap.sh"
SCRIPTS = [BOOTSTRAP / "bootstrap.sh", BOOTSTRAP / "train-wrapper.sh", BOOTSTRAP / "activate.sh",
           BOOTSTRAP / "test-training.sh", REPO / ".ci" / "run"]


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_SIDECAR_")}
    env.update(overrides)
    return env


def _run(args: list[str], *, env: dict[str, str], cwd: Path | str = "/tmp", timeout: float = 60):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# --- packaging files ---------------------------------------------------------------------------

def _environment_yml_pip_deps(text: str) -> list[str]:
    """The items of the `- pip:` list in environment.yml (simple YAML, parsed by indentation)."""
    deps, pip_indent = [], None
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped.strip():
            continue
        indent = len(stripped) - len(stripped.lstrip())
        if pip_indent is None:
            if stripped.strip() in ("- pip:", "-  pip:"):
                pip_indent = indent
            continue
        if indent <= pip_indent:
            break
        item = stripped.strip()
        assert item.startswith("- "), f"unexpected line in the pip list of environment.yml: {line!r}"
        deps.append(item[2:].strip().strip("'\""))
    return deps


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req).lower()


def test_environment_yml_lists_the_same_packages_as_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    env_yml = (REPO / "environment.yml").read_text()
    pip_deps = _environment_yml_pip_deps(env_yml)
    assert pip_deps, "environment.yml has no `- pip:` list"
    assert sorted(map(_normalise, pip_deps)) == sorted(map(_normalise, pyproject["project"]["dependencies"]))
    conda_deps = re.findall(r"^\s+- (python=[\d.]+|pip)\s*$", env_yml, re.MULTILINE)
    assert "pip" in conda_deps and any(d.startswith("python=3.") for d in conda_deps)


def test_environment_yml_parser_sees_drift():
    text = "dependencies:\n  - python=3.11\n  - pip\n  - pip:\n      - torch>=2.4\n      - msgspec>=0.19\nother: 1\n"
    assert _environment_yml_pip_deps(text) == ["torch>=2.4", "msgspec>=0.19"]


def _readme_commands() -> list[str]:
    """The fenced command blocks of the README section `## The two commands`, comment lines dropped."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## The two commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(?:bash|sh|console)?\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return ["\n".join(l for l in b.strip().splitlines() if not l.lstrip().startswith("#")) for b in blocks]


def test_readme_leads_with_exactly_two_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0] == "bash bootstrap/bootstrap.sh && bootstrap/train-wrapper.sh -m sidecar demo"
    assert commands[1].startswith("bash bootstrap/bootstrap.sh --dev && ")


def test_ci_runs_readme_command_two_verbatim():
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in ci
    lines = [l for l in ci.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert lines[-1] == _readme_commands()[1]
    assert os.access(REPO / ".ci" / "run", os.X_OK)


# --- the scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bootstrap_help_and_unknown_option(tmp_path: Path):
    env = _env(LORA_SIDECAR_ENV=str(tmp_path / "env"))
    result = _run(["bash", str(BOOTSTRAP / "bootstrap.sh"), "--help"], env=env)
    assert result.returncode == 0, result.stderr
    for word in ("--force", "--dev", "LORA_SIDECAR_ENV", "LORA_SIDECAR_TORCH", "LORA_SIDECAR_TORCH_INDEX"):
        assert word in result.stdout
    bad = _run(["bash", str(BOOTSTRAP / "bootstrap.sh"), "--frobnicate"], env=env)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    assert not (tmp_path / "env").exists()


def test_bootstrap_refuses_a_python_older_than_3_10(tmp_path: Path):
    # A fake interpreter that reports 3.9 is rejected before anything is created or installed.
    fake = tmp_path / "python3.9"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    env = _env(LORA_SIDECAR_ENV=str(tmp_path / "env"), LORA_SIDECAR_PYTHON=str(fake))
    result = _run(["bash", str(BOOTSTRAP / "bootstrap.sh")], env=env)
    assert result.returncode != 0
    assert "LORA_SIDECAR_PYTHON" in result.stderr and ">= 3.10" in result.stderr
    assert not (tmp_path / "env" / "bin").exists()


def test_bootstrap_force_refuses_to_delete_a_directory_that_is_not_an_environment(tmp_path: Path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    result = _run(["bash", str(BOOTSTRAP / "bootstrap.sh"), "--force"], env=_env(LORA_SIDECAR_ENV=str(precious)))
    assert result.returncode != 0
    assert "refusing to delete" in result.stderr
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_wrapper_without_environment(tmp_path: Path):
    result = _run([str(WRAPPER), "-c", "print('should not run')"], env=_env(LORA_SIDECAR_ENV=str(tmp_path / "missing")))
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == NOT_BOOTSTRAPPED


def test_wrapper_with_python_but_no_marker(tmp_path: Path):
    # An interrupted bootstrap leaves an interpreter but no marker: not trusted.
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "bin" / "python").symlink_to(sys.executable)
    result = _run([str(WRAPPER), "-c", "print('should not run')"], env=_env(LORA_SIDECAR_ENV=str(env_dir)))
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == NOT_BOOTSTRAPPED
    assert "--force" in result.stderr


def _bootstrapped_prefix() -> Path:
    prefix = Path(sys.prefix)
    if not (prefix / ".bootstrap-ok").is_file():
        pytest.skip(f"the tests are not running in a bootstrapped environment ({prefix} has no .bootstrap-ok)")
    return prefix


def test_wrapper_runs_the_environment_from_any_directory(tmp_path: Path):
    import sidecar

    prefix = _bootstrapped_prefix()
    code = "import sys, sidecar; print(sidecar.__version__); print(sys.prefix)"
    result = _run([str(WRAPPER), "-c", code], env=_env(LORA_SIDECAR_ENV=str(prefix)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [sidecar.__version__, str(prefix)]


def test_activate_sets_up_the_shell_and_never_exits_it(tmp_path: Path):
    prefix = _bootstrapped_prefix()
    script = f"source {BOOTSTRAP / 'activate.sh'}; echo rc=$?; command -v python; echo $LORA_SIDECAR_ENV"
    ok = _run(["bash", "-c", script], env=_env(LORA_SIDECAR_ENV=str(prefix)), cwd=tmp_path)
    lines = ok.stdout.splitlines()
    assert lines[0] == "rc=0", ok.stderr
    assert Path(lines[1]).parent == prefix / "bin"
    assert lines[2] == str(prefix)

    missing = _run(["bash", "-c", script], env=_env(LORA_SIDECAR_ENV=str(tmp_path / "missing")), cwd=tmp_path)
    assert missing.stdout.splitlines()[0] == "rc=1"  # the shell went on after the failed activation
    assert NOT_BOOTSTRAPPED in missing.stderr


def test_activate_refuses_to_be_executed():
    result = _run(["bash", str(BOOTSTRAP / "activate.sh")], env=_env())
    assert result.returncode != 0 and "must be sourced" in result.stderr
