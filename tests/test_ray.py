"""Ray Train: the TorchTrainer path of docs/SCALING.md (``sidecar.training.ray_entry.fit``) on a local
Ray instance with 2 CPU workers (gloo), compared with the single-process job of
tests/test_distributed.py (same JOB, batchSize 4 against 2 per worker, dtype float32, dropout 0;
its fixtures are reused) within the same tolerance; rank 0's progress reaches the driver.
"""

from __future__ import annotations

import json

import pytest
import ray  # the dev extra's ray[train]: bash bootstrap/bootstrap.sh --dev installs it

from tests.test_distributed import (JOB, PHASES, assert_single_process_adapter, sidecar,  # noqa: F401
                                    single_process_adapter)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A local Ray instance with the machine's 2 cores as 2 CPUs: one per Train worker (whose job
    directories go to a data dir of the test)."""
    data = str(tmp_path_factory.mktemp("ray-data"))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "LORA_SIDECAR_THREADS": "1",
                                       "LORA_SIDECAR_DATA": data}})
    yield
    ray.shutdown()


def test_ray_train_gives_the_single_process_adapter_and_rank0_progress_reaches_the_driver(
        local_ray, tiny_model_dir, tmp_path, sidecar, single_process_adapter):  # noqa: F811
    from ray.train import RunConfig

    from sidecar.training.ray_entry import fit

    out = tmp_path / "out" / "adapter"
    params = {"baseModel": str(tiny_model_dir), "outputPath": str(out), **JOB, "batchSize": 2, "jobId": "ray"}
    seen: list[dict] = []
    result = fit(params, num_workers=2, on_progress=seen.append,
                 run_config=RunConfig(name="lora", storage_path=str(tmp_path / "ray-results")))

    assert_single_process_adapter(out, single_process_adapter, sidecar, tiny_model_dir, tmp_path, "Ray Train")
    reference = json.loads((single_process_adapter / "training_manifest.json").read_text())
    assert result is not None and result["metrics"]["steps"] == 4
    assert result["metrics"]["trainLoss"] == pytest.approx(reference["metrics"]["trainLoss"], abs=1e-5)
    manifest = json.loads((out / "training_manifest.json").read_text())
    assert manifest["engine"]["distributed"] == {"processes": 2, "strategy": "ddp", "backend": "gloo",
                                                 "device": "cpu"}
    # Progress: rank 0's, in order, the objects of the sidecar's `progress` notification (the recipe's
    # phases: `queued` and `completed` come from a sidecar's job queue, which Ray replaces).
    assert seen and {p["jobId"] for p in seen} == {"ray"}
    phases = [p["phase"] for p in seen]
    order = [PHASES.index(p) for p in phases]
    assert order == sorted(order) and phases[0] == "loading" and phases[-1] == "saving", phases
    steps = [p["step"] for p in seen if p["phase"] == "training"]
    assert steps == sorted(steps) and steps[-1] == 4


def test_a_failing_job_raises_on_the_driver_with_the_rank_error(local_ray, tmp_path):
    """A request check fails in every worker (no such base model): ``fit`` raises Ray's
    TrainingFailedError carrying the sidecar's error, and writes nothing."""
    from ray.train import RunConfig, TrainingFailedError

    from sidecar.training.ray_entry import fit

    out = tmp_path / "out"
    out.mkdir()
    params = {"baseModel": str(tmp_path / "no-such-model"), "outputPath": str(out / "adapter"), **JOB,
              "batchSize": 2, "jobId": "ray-fail"}
    seen: list[dict] = []
    with pytest.raises(TrainingFailedError) as failure:
        fit(params, num_workers=2, on_progress=seen.append,
            run_config=RunConfig(name="fail", storage_path=str(tmp_path / "ray-results")))
    assert "ModelNotFound" in str(failure.value) and "no-such-model" in str(failure.value), str(failure.value)[-2000:]
    assert list(out.iterdir()) == []
