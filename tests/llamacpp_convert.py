"""llama.cpp's own HF → GGUF converter, fetched by package name and cached (never vendored here).

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``) comes from
the source release of the llama-cpp-python version installed in this environment (the one
``bootstrap.sh --dev`` installs), so the GGUF files it writes are what that llama.cpp reads:

    pip download llama-cpp-python==<installed version> --no-binary :all: --no-deps

Only the converter, its packages and llama.cpp's copies of model chat templates
(``models/templates/*.jinja``) are extracted, into
``${LORA_SIDECAR_CONVERTER_CACHE:-${XDG_CACHE_HOME:-~/.cache}/lora-sidecar/llama-cpp-convert}/<version>``,
once: a file lock serialises concurrent test processes, the tree is built in a temporary
directory and renamed into place with a marker written last. The download (76 MB) and the
extraction take about 6 s together on this machine; later calls return at once.

    python -m tests.llamacpp_convert fetch        # prints the cached source directory
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

MARKER = ".complete.json"
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "models/templates/")
"""What is extracted from ``vendor/llama.cpp/`` in the source release."""


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (the converter must match the runtime)."""
    return importlib.metadata.version("llama_cpp_python")


def cache_root() -> Path:
    explicit = os.environ.get("LORA_SIDECAR_CONVERTER_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "lora-sidecar" / "llama-cpp-convert"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def source_dir(version: Optional[str] = None) -> Path:
    """The cached ``vendor/llama.cpp`` subset of llama-cpp-python ``version``; fetched on first use."""
    version = version or llama_cpp_version()
    target = cache_root() / version
    if (target / MARKER).is_file():
        return target
    with _locked(cache_root() / f".{version}.lock"):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f".{version}-", dir=cache_root()) as tmp:
            work = Path(tmp)
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}",
                            "--no-binary", ":all:", "--no-deps", "-d", str(work / "dl"),
                            "--quiet"], check=True, stdout=sys.stderr)
            (archive,) = list((work / "dl").glob("*.tar.gz"))
            tree = work / "llama.cpp"
            _extract(archive, tree)
            (tree / MARKER).write_text(json.dumps({"version": version, "archive": archive.name}))
            if target.exists():  # an incomplete leftover (no marker): never trusted
                shutil.rmtree(target)
            os.rename(tree, target)
        print(f"llama.cpp converter {version} fetched into {target} in {time.monotonic() - started:.1f} s",
              file=sys.stderr)
    return target


def _extract(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            _, sep, rest = member.name.partition("/vendor/llama.cpp/")
            if sep and rest.startswith(KEEP) and (member.isfile() or member.isdir()):
                member.name = rest
                members.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in members):
            raise RuntimeError(f"{archive.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        tar.extractall(out, members=members, filter="data")


def chat_template(file_name: str) -> str:
    """A model's chat template as llama.cpp ships it (``models/templates/<file_name>``)."""
    return (source_dir() / "models" / "templates" / file_name).read_text(encoding="utf-8")


# transformers 5 loads any qwen2 / qwen3_5 checkpoint's tokenizer with Qwen's own pre-tokenizer
# (Qwen2Tokenizer, Qwen3_5Tokenizer), whatever tokenizer.json says. With the SmolLM2 vocabulary of
# the tiny test models that pair is one llama.cpp's table of known tokenizers (a hash of a test
# string's token ids) cannot know, so the converter is told the pre-tokenizer it would pick for the
# real models; tensors are written exactly as the converter writes them.
PRE_TOKENIZER_FALLBACK = {"qwen2": "qwen2", "qwen3_5": "qwen35"}

_RUNNER = """
import runpy, sys
script, fallback = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
if fallback:
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return fallback
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def convert(model_dir: Path, out_file: Path, *, outtype: str = "f32", extra: tuple[str, ...] = (),
            timeout: float = 300) -> Path:
    """Write ``model_dir`` (a transformers checkpoint) as a GGUF base with llama.cpp's converter.

    Runs in a subprocess with the release's own ``gguf-py`` and ``conversion`` first on the path.
    ``--no-mtp`` is passed for Qwen3.5/Qwen3-Next checkpoints (the tiny ones have no
    multi-token-prediction layers). Raises ``RuntimeError`` with the converter's output when it
    fails. Written atomically (a partial file is renamed into place).
    """
    src = source_dir()
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    args = list(extra)
    if any("Qwen3_5" in a or "Qwen3Next" in a for a in config.get("architectures") or []):
        args.append("--no-mtp")
    fallback = PRE_TOKENIZER_FALLBACK.get(str(config.get("model_type")), "")
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)]), "NO_LOCAL_GGUF": "1"}
    tmp_out = out_file.with_name(f".{out_file.name}.partial")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(src / "convert_hf_to_gguf.py"), fallback,
                           str(model_dir), "--outfile", str(tmp_out), "--outtype", outtype, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not tmp_out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}) on {model_dir}:\n"
                           f"{proc.stderr[-4000:]}")
    os.replace(tmp_out, out_file)
    return out_file


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.llamacpp_convert")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="fetch (once) and print the cached converter directory")
    conv = sub.add_parser("convert", help="convert a transformers checkpoint to a GGUF base")
    conv.add_argument("model_dir", type=Path)
    conv.add_argument("out_file", type=Path)
    conv.add_argument("--outtype", default="f32")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(source_dir())
    else:
        print(convert(args.model_dir, args.out_file, outtype=args.outtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
