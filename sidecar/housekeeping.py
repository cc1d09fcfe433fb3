"""Start-up housekeeping: remove the temporary directories (and export files) that dead jobs left behind.

A job writes its output (an adapter) into ``<target>.tmp-<job>`` and renames it to ``<target>``,
so nothing half-written ever sits at an output path; an export writes ``.<name>.tmp-<id>`` beside
its target (a quantized merge also its unquantized intermediate, ``.<name>.tmp-<id>.f16-<id>``, as
large as the model in f16). A process killed while writing (kill -9, power loss) leaves these
behind. The rule that removes them:

1. Every sidecar holds an exclusive ``flock`` on its own ``<data>/run/sidecar-<pid>-<random>.claims``
   for its whole life, and appends a line for each job that may write a temporary directory: the
   directory and the glob of the names it may use (``<name>.tmp-*`` beside an ``outputPath``,
   ``*.tmp-*`` in the default adapters directory, ``.<name>.tmp-*`` beside an export's target, which
   may name files as well), and another line when the job ends.
2. At start-up, a claims file whose lock can be taken belongs to a process that is gone (the kernel
   drops a lock when its holder dies, however it dies): the directories its open claims match are
   removed, unless a live sidecar claims them too, and the file is deleted.
3. In the default adapters directory, a ``*.tmp-*`` directory that no live sidecar claims and in
   which nothing changed for ``STALE_AGE`` seconds is removed too (left by a process that kept no
   claims file, e.g. an older version).

Only directories are removed, and files where the claim says so (an export's). Cheap (a directory listing and a few small files) and never fatal: a
failure is logged and start-up goes on. No torch.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import logging
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from . import paths

log = logging.getLogger("sidecar.housekeeping")

STALE_AGE = 3600.0
"""Seconds without change after which an unclaimed ``*.tmp-*`` in the adapters directory is stale."""

try:
    import fcntl
except ImportError:  # Windows: no flock, no claims; temporary directories stay until removed by hand
    fcntl = None  # type: ignore[assignment]


class Claims:
    """This process's claims file: ``add`` before a job may create temporary directories,
    ``release`` when it has ended. Thread-safe; a failed write is logged, never raised."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, directory: str | os.PathLike, pattern: str, *, files: bool = False) -> int:
        """Claim the names matching ``pattern`` in ``directory`` (directories only, unless ``files``)."""
        key = next(self._keys)
        self._append({"claim": key, "dir": str(directory), "glob": pattern, **({"files": True} if files else {})})
        return key

    def release(self, key: int) -> None:
        self._append({"release": key})

    def _append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as exc:
                log.warning("could not write %s: %s", self.path, exc)


def claim_for_output(output_path: str | None, adapters_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The (directory, glob) a train job's temporary directory will match: ``<name>.tmp-*`` beside
    ``output_path``, or any ``*.tmp-*`` in the default adapters directory when there is none."""
    if output_path:
        target = Path(os.path.abspath(os.path.expanduser(output_path)))
        return target.parent, glob.escape(target.name) + ".tmp-*"
    return Path(adapters_dir or paths.adapters_dir()).absolute(), "*.tmp-*"


def claim_for_export(target: Path) -> tuple[Path, str]:
    """The (directory, glob) an export's temporary files match: ``.<name>.tmp-*`` beside ``target``
    (its intermediate ``.<name>.tmp-<id>.f16-<id>`` too). Claimed with ``files=True``."""
    return target.parent, glob.escape(f".{target.name}") + ".tmp-*"


@contextmanager
def claiming(claims: Optional[Claims], directory: Path, pattern: str, *, files: bool = False) -> Iterator[None]:
    """Hold a claim while the block runs (nothing where the process keeps no claims)."""
    key = claims.add(directory, pattern, files=files) if claims is not None else None
    try:
        yield
    finally:
        if key is not None:
            claims.release(key)


def start(run_dir: Path | None = None, adapters_dir: Path | None = None) -> tuple[Claims | None, list[Path]]:
    """Remove stale temporary directories (and export files), then open this process's claims file.

    Returns the claims (None where they cannot be kept) and what was removed."""
    if fcntl is None:
        return None, []
    run_dir = run_dir or paths.data_dir() / "run"
    adapters_dir = adapters_dir or paths.adapters_dir()
    removed: list[Path] = []
    try:
        removed = sweep(run_dir, adapters_dir)
    except Exception:  # noqa: BLE001 - housekeeping never stops the sidecar
        log.exception("housekeeping: sweeping %s failed", run_dir)
    try:
        return _open_own(run_dir), removed
    except OSError as exc:
        log.warning("housekeeping: cannot keep claims in %s (%s); temporary directories of this process "
                    "will not be cleaned up after a crash", run_dir, exc)
        return None, removed


def _open_own(run_dir: Path) -> Claims:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"sidecar-{os.getpid()}-{secrets.token_hex(3)}.claims"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return Claims(path, fd)


class Claim(NamedTuple):
    directory: Path
    pattern: str
    files: bool = False  # files match too (an export's), not only directories


def _open_claims(text: str) -> list[Claim]:
    """The claims in a file's text that were not released (a torn last line is ignored)."""
    claims: dict[int, Claim] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            if "claim" in record:
                claims[record["claim"]] = Claim(Path(record["dir"]), str(record["glob"]), record.get("files") is True)
            else:
                claims.pop(record["release"], None)
        except (ValueError, KeyError, TypeError):
            continue
    return list(claims.values())


def sweep(run_dir: Path, adapters_dir: Path, now: float | None = None) -> list[Path]:
    """Apply the rule in the module doc; returns what was removed (directories, an export's files)."""
    now = time.time() if now is None else now
    # Candidates in the adapters directory are listed before the live claims are read: a live job
    # claims its directory before creating it, so a candidate cannot belong to an unread claim.
    unclaimed = [p for p in _listdir(adapters_dir) if fnmatch.fnmatchcase(p.name, "*.tmp-*")]
    live: list[Claim] = []
    dead: list[tuple[Path, int, list[Claim]]] = []
    for path in sorted(_listdir(run_dir)):
        if not path.name.endswith(".claims"):
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its sidecar is alive
            try:
                live += _open_claims(path.read_text(errors="replace"))
            except OSError:
                pass
            os.close(fd)
            continue
        try:
            dead.append((path, fd, _open_claims(path.read_text(errors="replace"))))
        except OSError:
            os.close(fd)

    def claimed_by_live(p: Path) -> bool:
        return any(p.parent == c.directory and fnmatch.fnmatchcase(p.name, c.pattern) for c in live)

    removed: list[Path] = []
    kinds: list[str] = []
    for path, fd, claims in dead:
        try:
            for claim in claims:
                for p in _listdir(claim.directory):
                    if fnmatch.fnmatchcase(p.name, claim.pattern) and not claimed_by_live(p):
                        kind = _remove(p, files=claim.files)
                        if kind:
                            removed.append(p)
                            kinds.append(kind)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    for p in unclaimed:
        if p.exists() and not claimed_by_live(p) and now - _last_change(p) > STALE_AGE and _remove(p):
            removed.append(p)
            kinds.append("directory")
    if removed:
        log.info("housekeeping: removed %s left by dead jobs: %s", _count(kinds), ", ".join(str(p) for p in removed))
    return removed


def _count(kinds: list[str]) -> str:
    """"1 temporary directory", "2 temporary directories and 1 temporary file"."""
    dirs, files = kinds.count("directory"), kinds.count("file")
    parts = [f"{dirs} temporary director{'y' if dirs == 1 else 'ies'}"] if dirs else []
    return " and ".join(parts + ([f"{files} temporary file{'' if files == 1 else 's'}"] if files else []))


def _listdir(directory: Path) -> list[Path]:
    try:
        return [directory / name for name in os.listdir(directory)]
    except OSError:
        return []


def _last_change(p: Path) -> float:
    times = [p.stat().st_mtime]
    for child in _listdir(p):
        try:
            times.append(child.lstat().st_mtime)
        except OSError:
            pass
    return max(times)


def _remove(p: Path, files: bool = False) -> Optional[str]:
    """Remove a directory, or a regular file where ``files``; never follows a symbolic link.
    Returns what was removed ("directory" / "file"), None when nothing was."""
    try:
        if p.is_symlink():
            return None
        if p.is_dir():
            shutil.rmtree(p)
            return "directory"
        if files and p.is_file():
            p.unlink()
            return "file"
        return None
    except OSError as exc:
        log.warning("housekeeping: could not remove %s: %s", p, exc)
        return None
