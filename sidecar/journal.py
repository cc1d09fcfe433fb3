"""The job journal: every train job's state on disk, so a restarted sidecar knows what became of the
jobs of the process before it. No torch.

One small JSON file per job, ``<data>/jobs/<job key>.json``, rewritten whole at every transition
(queued, running, each checkpoint, completed / failed / cancelled / interrupted) through a temporary
file, fsync and rename: a crash leaves the previous version or the new one, never half. Beside it,
``<data>/jobs/<job key>/`` holds the job's ``params.json`` (written when it is queued) and its
checkpoints (sidecar/jobdir.py). An entry records its owner process (pid, boot id, process start
time: sidecar/procs.py), so another process can tell whether the owner is gone.

Cleanup rule — at start-up (``recover``), and the history bound again after each job ends:

1. An entry left ``queued``, ``running`` or ``paused`` by a process that is gone becomes ``interrupted``, with
   the newest complete checkpoint found on disk (the disk is the truth: the process may have died
   between a checkpoint's rename and its journal update). If the job's adapter is already in place
   (it died after the final rename), the entry becomes ``completed`` instead.
2. Temporary checkpoint directories (``*.tmp-<pid>``, ``*.old-<pid>``) of processes that are gone
   are deleted, and so are job directories without an entry whose owner is gone.
3. History is bounded: the newest ``LORA_SIDECAR_JOB_HISTORY`` entries (default 50) are kept; older
   ones are deleted with their job directories.

A job that completes deletes its checkpoints as soon as its adapter is in place, and its directory
once the completion is journaled (the adapter is the result); cancelled, failed and interrupted jobs
keep theirs, so they can be resumed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

import msgspec

from . import jobdir, paths, wire
from .files import MANIFEST_FILE, atomic_write_text
from .procs import owner_alive, pid_alive, process_identity

log = logging.getLogger("sidecar.journal")

FORMAT = "lora-sidecar.job/1"
HISTORY_ENV = "LORA_SIDECAR_JOB_HISTORY"
DEFAULT_HISTORY = 50
RECENT_FINISHED = 20
ACTIVE = ("queued", "running", "paused")  # paused: held by `pause`, queued or at a pause point
_TEMP = re.compile(r"\.(tmp|old)-(\d+)$")


# ---------------------------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------------------------

def history_limit() -> int:
    try:
        return max(1, int(os.environ.get(HISTORY_ENV) or DEFAULT_HISTORY))
    except ValueError:
        return DEFAULT_HISTORY


class Journal:
    def __init__(self, root: Optional[Path] = None, history: Optional[int] = None) -> None:
        self.root = Path(root) if root is not None else paths.jobs_dir()
        self.history = history or history_limit()
        self.owner = process_identity()
        self._lock = threading.Lock()

    def entry_path(self, job_id: str) -> Path:
        return self.root / f"{paths.job_key(job_id)}.json"

    def job_dir(self, job_id: str) -> Path:
        return self.root / paths.job_key(job_id)

    # --- writing ------------------------------------------------------------------------------

    def record(self, job: Any) -> None:
        """Write the entry of a ``jobs.Job`` (a train job) as it is now. Never raises: a journal that
        cannot be written (disk full) is logged, and the job goes on."""
        try:
            entry = {
                "format": FORMAT, "jobId": job.job_id, "kind": job.kind, "state": job.state, "phase": job.phase,
                "baseModel": job.base_model, "step": job.step, "totalSteps": job.total_steps,
                "submittedAt": job.received_at, "startedAt": job.started_at, "finishedAt": job.finished_at,
                "error": job.error, "adapterPath": job.adapter_path,
                "lastCheckpoint": wire.to_builtins(job.last_checkpoint or self._last_on_disk(job)),
                "outputPath": getattr(job.params, "output_path", None), "owner": self.owner,
                "priority": job.priority, "threads": job.threads, "pausedBy": job.paused_by,
                "updatedAt": time.time(),
            }
            with self._lock:
                self.root.mkdir(parents=True, exist_ok=True)
                if job.state == "queued":
                    jobdir.save_params(self.job_dir(job.job_id), job.job_id, job.params)
                self._write(entry)
                if job.state == "completed":
                    jobdir.discard_job_dir(self.job_dir(job.job_id))
                if job.state not in ACTIVE:
                    self._prune()
        except Exception:  # noqa: BLE001 - the journal must never fail a job
            log.exception("journal: cannot record job %s", getattr(job, "job_id", "?"))

    def _write(self, entry: dict[str, Any]) -> None:
        atomic_write_text(self.entry_path(entry["jobId"]), json.dumps(entry, ensure_ascii=False) + "\n")

    def _last_on_disk(self, job: Any) -> Optional[wire.CheckpointRef]:
        """A job that ended without writing a checkpoint itself (a resume cancelled while queued) may
        still have its earlier ones."""
        if job.state in ACTIVE or job.state == "completed":
            return None
        last = jobdir.latest(self.job_dir(job.job_id))
        return jobdir.ref(last, jobdir.read_state(last, verify=False)) if last is not None else None

    def cancel(self, job_id: str) -> Optional[str]:
        """``cancel`` of a job of an earlier process: an interrupted one becomes cancelled (no longer
        offered for resuming; its checkpoints stay). Returns its state, or None when unknown."""
        with self._lock:
            entry = self._read(self.entry_path(job_id))
            if entry is None or entry["jobId"] != job_id:
                return None
            if entry["state"] == "interrupted":
                entry.update(state="cancelled", phase="cancelled", updatedAt=time.time())
                self._write(entry)
            return entry["state"]

    # --- reading ------------------------------------------------------------------------------

    @staticmethod
    def _read(path: Path) -> Optional[dict[str, Any]]:
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("journal: unreadable entry %s", path)
            return None
        return entry if isinstance(entry, dict) and entry.get("format") == FORMAT else None

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry, newest update first."""
        try:
            files = [p for p in self.root.iterdir() if p.suffix == ".json" and p.is_file()]
        except FileNotFoundError:
            return []
        found = [e for e in (self._read(p) for p in files) if e is not None]
        return sorted(found, key=lambda e: e.get("updatedAt") or 0, reverse=True)

    def get(self, job_id: str) -> Optional[dict[str, Any]]:
        entry = self._read(self.entry_path(job_id))
        return entry if entry is not None and entry["jobId"] == job_id else None

    @staticmethod
    def info(entry: dict[str, Any]) -> wire.JobInfo:
        fields = {k: entry.get(k) for k in ("jobId", "kind", "state", "phase", "baseModel", "step", "totalSteps",
                                            "submittedAt", "startedAt", "finishedAt", "error", "adapterPath",
                                            "lastCheckpoint", "priority", "threads", "pausedBy")}
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, wire.JobInfo)

    def recent(self, live: list[wire.JobInfo], limit: int = RECENT_FINISHED) -> list[wire.JobInfo]:
        """``status.recent``: this process's finished jobs and the journal's (earlier processes), newest
        first — the newest ``limit`` finished ones, plus every interrupted one still in the journal."""
        seen = {j.job_id for j in live}
        older = [self.info(e) for e in self.entries() if e["jobId"] not in seen and e["state"] not in ACTIVE]
        merged = sorted(live + older, key=lambda j: j.finished_at or j.submitted_at, reverse=True)
        finished = [j for j in merged if j.state != "interrupted"][:limit]
        keep = {id(j) for j in finished}
        return [j for j in merged if id(j) in keep or j.state == "interrupted"]

    # --- start-up recovery and cleanup ----------------------------------------------------------

    def recover(self) -> list[str]:
        """Mark the jobs of dead processes interrupted (or completed), clean up; returns the ids changed.
        Never raises: a journal that cannot be read or cleaned is logged, and the sidecar starts."""
        try:
            return self._recover()
        except Exception:  # noqa: BLE001
            log.exception("journal: start-up recovery failed in %s", self.root)
            return []

    def _recover(self) -> list[str]:
        changed = []
        with self._lock:
            for entry in self.entries():
                if entry["state"] not in ACTIVE or owner_alive(entry.get("owner")):
                    continue
                job_dir = self.job_dir(entry["jobId"])
                adapter = self._completed_adapter(entry, job_dir)
                now = time.time()
                if adapter is not None:
                    entry.update(state="completed", phase="completed", adapterPath=adapter, finishedAt=now,
                                 lastCheckpoint=None)
                else:
                    self._mark_interrupted(entry, job_dir, now)
                entry["updatedAt"] = now
                self._write(entry)
                if adapter is not None:
                    jobdir.discard_job_dir(job_dir)
                changed.append(entry["jobId"])
                log.info("journal: job %s of a dead process is now %s", entry["jobId"], entry["state"])
            self._clean_directories()
            self._prune()
        return changed

    @staticmethod
    def _mark_interrupted(entry: dict[str, Any], job_dir: Path, now: float) -> None:
        """An entry of a dead process becomes interrupted, offering the newest checkpoint on disk."""
        last = jobdir.latest(job_dir)
        entry.update(state="interrupted", phase="interrupted", finishedAt=now,
                     error=f"The sidecar process (pid {entry['owner']['pid']}) ended while the job "
                           f"was {entry['state']}")
        if last is None:
            entry["lastCheckpoint"] = None
            return
        try:
            state = jobdir.read_state(last, verify=False)
            entry["lastCheckpoint"] = wire.to_builtins(jobdir.ref(last, state))
            entry["step"] = state["step"]
        except Exception:  # noqa: BLE001 - a damaged checkpoint is just not offered
            log.warning("journal: checkpoint %s is unreadable", last)

    @staticmethod
    def _completed_adapter(entry: dict[str, Any], job_dir: Path) -> Optional[str]:
        """The adapter path when the job's adapter was already renamed into place, else None."""
        try:
            doc = jobdir.load_params(job_dir)
        except Exception:  # noqa: BLE001
            return None
        output = (doc or {}).get("params", {}).get("outputPath") or entry.get("outputPath")
        if not output:
            return None
        try:
            manifest = json.loads((Path(output) / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        return output if isinstance(manifest, dict) and manifest.get("jobId") == entry["jobId"] else None

    def _clean_directories(self) -> None:
        try:
            dirs = [p for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return
        keys = {p.stem for p in self.root.iterdir() if p.suffix == ".json"}
        for leftover in self.root.glob(".*.tmp-*"):  # atomic_write_text's temp file of a dead process
            m = _TEMP.search(leftover.name)
            if m and leftover.is_file() and not pid_alive(int(m.group(2))):
                leftover.unlink(missing_ok=True)
        for job_dir in dirs:
            for sub in list(job_dir.iterdir()):
                m = _TEMP.search(sub.name)
                if m and sub.is_dir() and not pid_alive(int(m.group(2))):
                    shutil.rmtree(sub, ignore_errors=True)
            if job_dir.name not in keys:
                try:
                    owner = (jobdir.load_params(job_dir) or {}).get("owner")
                except Exception:  # noqa: BLE001
                    owner = None
                if not owner_alive(owner):
                    log.info("journal: removing %s (no journal entry)", job_dir)
                    shutil.rmtree(job_dir, ignore_errors=True)

    def _prune(self) -> None:
        for entry in self.entries()[self.history:]:
            if entry["state"] in ACTIVE and owner_alive(entry.get("owner")):
                continue
            # Entry first: a crash in between leaves an orphan directory, which start-up removes.
            self.entry_path(entry["jobId"]).unlink(missing_ok=True)
            jobdir.discard_job_dir(self.job_dir(entry["jobId"]))
