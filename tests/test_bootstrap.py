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


def _fake_python(bin_dir: Path, name: str, version: tuple[int, int]) -> Path:
    """``bin_dir/name``: this test's real interpreter, reporting ``version`` as ``sys.version_info`` (a
    sitecustomize sets it before any code runs, so bootstrap's own ``python_ok`` comparison decides) and its own
    path as ``sys.executable``. It cannot build anything: ``venv`` and ``ensurepip`` do not import and ``-m`` is
    refused, so a bootstrap that accepts it stops at "cannot create virtual environments"."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / name
    site = bin_dir.parent / f"site-{name}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.version_info = ({version[0]}, {version[1]}, 0, 'final', 0)\n"
        f"sys.executable = {str(fake)!r}\n"
        "sys.modules['venv'] = None\n"
        "sys.modules['ensurepip'] = None\n")
    fake.write_text('#!/bin/sh\ncase "$1" in -m) echo "fake python: -m refused" >&2; exit 97;; esac\n'
                    f'PYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    fake.chmod(0o755)
    check = subprocess.run([str(fake), "-c", "import sys; print(tuple(sys.version_info[:2]), sys.executable)"],
                           capture_output=True, text=True)
    assert check.stdout.split() == [f"({version[0]},", f"{version[1]})", str(fake)], check
    return fake


def _bootstrap_until_python_chosen(env: dict[str, str]) -> subprocess.CompletedProcess:
    result = _run(["bash", str(BOOTSTRAP / "bootstrap.sh")], env=env)
    if "not enough disk space" in result.stderr:
        pytest.skip("bootstrap stops on free disk space before it chooses a Python here")
    return result


CANNOT_VENV = "cannot create virtual environments"


@pytest.mark.parametrize("version, accepted", [((3, 9), False), ((2, 7), False), ((3, 10), True), ((3, 13), True)])
def test_lora_sidecar_python_is_checked_by_its_version(tmp_path: Path, version, accepted):
    """LORA_SIDECAR_PYTHON reporting ``version``: below 3.10 bootstrap refuses it before creating anything; from
    3.10 it takes it (and then stops at the fake's missing venv module, never building an environment)."""
    fake = _fake_python(tmp_path / "bin", f"python{version[0]}.{version[1]}", version)
    env = _env(LORA_SIDECAR_ENV=str(tmp_path / "env"), LORA_SIDECAR_PYTHON=str(fake))
    result = _bootstrap_until_python_chosen(env)
    assert result.returncode != 0
    if accepted:
        assert f"{fake} {CANNOT_VENV}" in result.stderr, result.stderr
        assert "is not a working Python" not in result.stderr
    else:
        assert f"LORA_SIDECAR_PYTHON={fake} is not a working Python >= 3.10" in result.stderr, result.stderr
        assert CANNOT_VENV not in result.stderr
    assert not (tmp_path / "env" / "bin").exists() and not (tmp_path / "env" / "pyvenv.cfg").exists()


SEARCHED = ["python3", "python3.13", "python3.12", "python3.11", "python3.10", "python"]


@pytest.mark.parametrize("versions, chosen", [
    ({name: (3, 9) for name in SEARCHED}, None),                       # every candidate too old: refused
    ({**{name: (3, 9) for name in SEARCHED}, "python3.12": (3, 12)}, "python3.12"),  # the first new enough one
    ({**{name: (3, 8) for name in SEARCHED}, "python3": (3, 11), "python3.10": (3, 10)}, "python3"),
])
def test_python_search_on_path_skips_interpreters_older_than_3_10(tmp_path: Path, versions, chosen):
    """Without LORA_SIDECAR_PYTHON bootstrap tries python3, python3.13 … python3.10, python on PATH in turn and
    takes the first whose version is >= 3.10 (fakes shadow every real interpreter on PATH)."""
    bin_dir = tmp_path / "bin"
    fakes = {name: _fake_python(bin_dir, name, v) for name, v in versions.items()}
    path = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env = {**_env(LORA_SIDECAR_ENV=str(tmp_path / "env"), PATH=path, HOME=str(tmp_path), MAMBA_EXE="")}
    mamba = subprocess.run(["bash", "-c", "command -v micromamba || ls /usr/local/bin/micromamba "
                            "/opt/micromamba/bin/micromamba"], env=env, capture_output=True, text=True)
    if mamba.returncode == 0 and mamba.stdout.strip():
        pytest.skip(f"a micromamba is installed ({mamba.stdout.split()[0]}): bootstrap would not search for a Python")
    result = _bootstrap_until_python_chosen(env)
    assert result.returncode != 0
    if chosen is None:
        assert "no Python >= 3.10 found" in result.stderr, result.stderr
        assert CANNOT_VENV not in result.stderr
    else:
        assert f"{fakes[chosen]} {CANNOT_VENV}" in result.stderr, result.stderr
        assert "no Python >= 3.10 found" not in result.stderr
    assert not (tmp_path / "env" / "bin").exists() and not (tmp_path / "env" / "pyvenv.cfg").exists()


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
