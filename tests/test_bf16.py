"""bf16 matmuls over fp32 weights (sidecar/training/bf16.py, fastlora.LoraLinearBf16).

Tolerances: a bf16 product rounds its inputs to 8 significant bits (relative error 2**-9 each), so a
layer's output and gradients are expected within ~0.5 % of the fp32 ones (checked at 1 %); a whole
training job within a few per cent of the fp32 job's weights (the whole adapter), with the same loss curve to 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidecar.models import cpu_has_native_bf16
from sidecar.training import bf16, fastlora
from tests.test_engine import base_state, cache, params, run  # noqa: F401 - cache is a fixture

native = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512_BF16/AMX)")


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_bf16_layer_matches_the_fp32_maths(p):
    torch.manual_seed(0)
    x = torch.randn(3, 20, 64, requires_grad=True)
    w = torch.randn(48, 64) / 8
    bias = torch.randn(48)
    a = (torch.randn(8, 64) / 8).requires_grad_()
    b = (torch.randn(48, 8) / 8).requires_grad_()
    g = torch.randn(3, 20, 48)

    torch.manual_seed(7)
    out = fastlora.LoraLinearBf16.apply(x, w.to(torch.bfloat16), bias, a, b, 2.0, p)
    got = [out, *torch.autograd.grad(out, (x, a, b), g)]

    torch.manual_seed(7)  # the same mask
    mask = fastlora.keep_mask(x.shape, p, x.device) if p > 0 else torch.ones(x.shape, dtype=torch.bool)
    xr, ar, br = (t.detach().double().requires_grad_() for t in (x, a, b))
    ref = xr @ w.double().t() + bias.double() + (torch.where(mask, xr, 0.0) / (1 - p)) @ ar.t() @ br.t() * 2.0
    want = [ref, *torch.autograd.grad(ref, (xr, ar, br), g.double())]
    for name, got_t, want_t in zip(("output", "grad x", "grad A", "grad B"), got, want):
        assert got_t.dtype == torch.float32
        assert relative(got_t, want_t) < 1e-2, name


def test_mask_lanes_keep_the_same_rate():
    torch.manual_seed(0)
    mask = fastlora.keep_mask(torch.Size([2000, 1000]), 0.05, torch.device("cpu"))
    per_lane = mask.view(-1, 4).float().mean(0)  # the top lane has its own (15-bit) threshold
    assert torch.allclose(per_lane, torch.full((4,), 0.95), atol=2e-3), per_lane


def lora_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.adapter_path) / "adapter_model.safetensors"))


@native
def test_auto_trains_with_bf16_matmuls_close_to_float32_and_leaves_the_base_as_it_was(tiny_model_dir, cache,
                                                                                        tmp_path):
    before = base_state(cache, tiny_model_dir)
    fp32, _ = run(params(tiny_model_dir, tmp_path / "fp32", dtype="float32"), cache, job_id="fp32")
    nbytes = cache.get(str(tiny_model_dir)).total_bytes()
    auto, _ = run(params(tiny_model_dir, tmp_path / "auto"), cache, job_id="auto")
    engine = {r: json.loads(Path(x.manifest_path).read_text())["engine"] for r, x in (("fp32", fp32), ("auto", auto))}
    assert engine["fp32"]["bf16MatmulLayers"] == 0 and engine["auto"]["bf16MatmulLayers"] > 0
    # The bf16 copies of the frozen linear weights stay with the cached model, and its budget counts them.
    assert cache.get(str(tiny_model_dir)).total_bytes() > nbytes

    a, f = lora_weights(auto), lora_weights(fp32)
    assert a.keys() == f.keys()
    # The whole adapter, not each tensor: Adam's first steps divide by |g|, so an element whose gradient
    # is ~0 moves by the full step either way on rounding noise (one k_proj A measured 7 % apart).
    whole = relative(torch.cat([a[k].flatten() for k in f]), torch.cat([f[k].flatten() for k in f]))
    assert whole < 5e-2, whole
    assert auto.metrics.train_loss == pytest.approx(fp32.metrics.train_loss, rel=1e-2)

    # Nothing of the patch stays on the base model: a new float32 job repeats the first one exactly.
    assert base_state(cache, tiny_model_dir) == before
    again, _ = run(params(tiny_model_dir, tmp_path / "again", dtype="float32"), cache, job_id="again")
    for k, t in lora_weights(again).items():
        assert torch.equal(t, f[k]), k
    assert not any("forward" in vars(m) or "_bf16_weight" in vars(m)
                   for m in cache.get(str(tiny_model_dir)).model.modules())


def test_without_native_bf16_auto_stays_float32(tiny_model_dir, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(bf16, "cpu_has_native_bf16", lambda: False)
    result, _ = run(params(tiny_model_dir, tmp_path / "plain", epochs=1), cache)
    assert json.loads(Path(result.manifest_path).read_text())["engine"]["bf16MatmulLayers"] == 0
