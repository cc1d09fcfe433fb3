"""The adapter genome's methods: ``adapters/load``, ``adapters/unload``, ``adapters/compose``,
``adapters/export`` and ``adapters/list``. Everything that touches a model runs on the job worker, in
request order; ``adapters/list`` answers at once from the registry."""

from __future__ import annotations

import os
from typing import Any

import msgspec

from .. import errors, wire
from ..adapters.compose import check_params as check_compose
from ..app import App
from ..files import ADAPTER_FILE, sha256_file
from ..jobs import Job, Report, ShouldStop
from ..rpc import Request, method

def run_load(app: App, job: Job, report: Report, should_stop: ShouldStop) -> wire.AdaptersLoadResult:
    p = job.params
    return app.adapters.load(p.path, models=app.models, adapter_id=p.id, pin=p.pin, base_model=p.base_model,
                             device=p.device, dtype=p.dtype, trust_remote_code=p.trust_remote_code).result()


@method("adapters/load", job="adapters/load", run=run_load)
def adapters_load(app: App, request: Request, p: wire.AdaptersLoadParams) -> Any:
    return app.queue(request, p, base_model=p.base_model or "").future


def run_unload(app: App, job: Job, report: Report, should_stop: ShouldStop) -> wire.AdaptersUnloadResult:
    resident = app.adapters.unload(job.params.id)
    return wire.AdaptersUnloadResult(id=resident.id, bytes_freed=resident.bytes, used_bytes=app.adapters.used_bytes())


@method("adapters/unload", job="adapters/unload", run=run_unload)
def adapters_unload(app: App, request: Request, p: wire.AdaptersUnloadParams) -> Any:
    return app.queue(request, p, base_model="").future


def run_compose(app: App, job: Job, report: Report, should_stop: ShouldStop) -> wire.AdaptersComposeResult:
    from ..adapters.compose import compose

    return compose(job.params, models=app.models, registry=app.adapters, stack=app.stack, claims=app.claims)


@method("adapters/compose", job="adapters/compose", run=run_compose)
def adapters_compose(app: App, request: Request, p: wire.AdaptersComposeParams) -> Any:
    check_compose(p)
    return app.queue(request, p, base_model=p.base_model or "").future


def run_export(app: App, job: Job, report: Report, should_stop: ShouldStop) -> wire.ExportResult:
    # On the worker like train and generate: a merge reads a full fp32 copy of the base, which
    # must not run beside a training job, and the warm cache is consulted without locking.
    from ..adapters.export import export_adapter

    p = job.params
    return export_adapter(p.adapter_path, p.format, output_path=p.output_path, out_type=p.out_type,
                          overwrite=p.overwrite, base_model=p.base_model, models=app.models_if_made,
                          claims=app.claims)


@method("adapters/export", job="export", run=run_export)
def adapters_export(app: App, request: Request, p: wire.ExportParams) -> Any:
    wire.one_of(p, "adapter_path", "id", message="Give exactly one of adapterPath and id", field="$.adapterPath")
    if p.id is not None:
        p = msgspec.structs.replace(p, adapter_path=_adapter_dir_for_id(app, p.id))
    return app.queue(request, p, base_model=p.base_model or p.adapter_path).future


def _adapter_dir_for_id(app: App, adapter_id: str) -> str:
    """The directory a resident adapter was loaded from, provided its weights there are still
    the ones that are resident (an export must describe what the id answers with)."""
    resident = app.adapters.get(adapter_id, "$.id")
    weights = os.path.join(resident.path, ADAPTER_FILE)
    try:
        same = sha256_file(weights) == resident.sha256
    except OSError:
        same = False
    if not same:
        raise errors.AdapterNotFound(
            f"Resident adapter {adapter_id!r} was loaded from {resident.path}, whose weights are gone or have "
            "changed since; export that directory by adapterPath, or load it again", id=adapter_id,
            path=resident.path)
    return resident.path


@method("adapters/list")
def adapters_list(app: App, request: Request, p: wire.AdaptersListParams) -> wire.AdaptersListResult:
    return app.adapters.summary()
