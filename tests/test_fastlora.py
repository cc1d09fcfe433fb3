"""The fused LoRA branch equals peft's path; micro-batch splitting changes nothing in the update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sidecar import wire
from sidecar.adapters import surgery
from sidecar.training import fastlora, loss as lossmod
from tests.test_engine import EXAMPLES, cache, params, run  # noqa: F401 - cache is a fixture


def test_keep_mask_rate_and_shape():
    torch.manual_seed(0)
    mask = fastlora.keep_mask(torch.Size([64, 1000]), 0.05, torch.device("cpu"))
    assert mask.shape == (64, 1000) and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.95) < 0.005
    assert fastlora.keep_mask(torch.Size([3, 7]), 0.5, torch.device("cpu")).numel() == 21


def reference(x, a, b, scaling, p, mask):
    xd = torch.where(mask, x, 0.0) / (1 - p) if p > 0 else x
    return (xd @ a.t()) @ b.t() * scaling


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_branch_matches_autograd_reference(p):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 8, dtype=torch.float64)

    torch.manual_seed(7)
    out = fastlora.LoraBranch.apply(x, a, b, 0.5, p)
    out.backward(g)
    got = [out.detach(), x.grad.clone(), a.grad.clone(), b.grad.clone()]
    for t in (x, a, b):
        t.grad = None

    torch.manual_seed(7)
    mask = fastlora.keep_mask(x.shape, p, x.device) if p > 0 else None
    ref = reference(x, a, b, 0.5, p, mask)
    ref.backward(g)
    want = [ref.detach(), x.grad, a.grad, b.grad]
    for got_t, want_t in zip(got, want):
        assert torch.allclose(got_t, want_t, atol=1e-10), (got_t - want_t).abs().max()


def test_patched_peft_model_matches_peft_without_dropout(tiny_model_dir, cache):
    from peft.tuners.lora.layer import Linear as LoraLinear

    loaded = cache.get(str(tiny_model_dir))
    before = surgery.snapshot(loaded.model)
    p = wire.TrainParams(dataset_path="x", rank=4, alpha=8, dropout=0.0)
    peft_model = surgery.attach_lora(loaded.model, p, loaded.resolved.path)
    try:
        for module in peft_model.modules():  # non-zero B so the branch contributes
            if isinstance(module, LoraLinear):
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
        peft_model.train()
        ids = torch.randint(0, 1000, (2, 12))

        def loss_and_grads():
            peft_model.zero_grad(set_to_none=True)
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.item(), {n: q.grad.clone() for n, q in peft_model.named_parameters() if q.requires_grad}

        stock_loss, stock_grads = loss_and_grads()
        assert fastlora.patch(peft_model) == 7 * 2
        fused_loss, fused_grads = loss_and_grads()
        assert fused_loss == pytest.approx(stock_loss, abs=1e-6)
        for name, grad in stock_grads.items():
            assert torch.allclose(fused_grads[name], grad, atol=1e-6), name
    finally:
        surgery.detach_lora(loaded.model, peft_model, before)


def test_split_by_tokens():
    lengths = [10, 200, 30, 250, 40]
    assert lossmod.split_by_tokens([0, 2, 4], lengths, 512) == [[0, 2, 4]]
    assert lossmod.split_by_tokens([0, 1, 3], lengths, 0) == [[0, 1, 3]]
    parts = lossmod.split_by_tokens([0, 1, 2, 3], lengths, 512)
    assert sorted(i for part in parts for i in part) == [0, 1, 2, 3]
    assert all(len(part) * max(lengths[i] for i in part) <= 512 for part in parts)
    assert lossmod.split_by_tokens([3], lengths, 100) == [[3]]  # one long example still runs


def test_micro_batch_split_gives_the_same_steps(tiny_model_dir, cache, tmp_path):
    # float32: bf16 matmuls (the default on a CPU with native bf16) round differently per micro-batch shape.
    common = dict(dropout=0.0, epochs=2, warmup_ratio=0.0, batch_size=3, dtype="float32")
    whole, _ = run(params(tiny_model_dir, tmp_path / "whole", micro_batch_tokens=0, **common), cache)
    split, _ = run(params(tiny_model_dir, tmp_path / "split", micro_batch_tokens=40, **common), cache)
    hw = json.loads(Path(whole.manifest_path).read_text())
    hs = json.loads(Path(split.manifest_path).read_text())
    assert hs["engine"]["microBatchTokens"] == 40 and hw["engine"]["microBatchTokens"] == 0
    assert whole.metrics.examples_processed == split.metrics.examples_processed
    assert whole.metrics.epochs == split.metrics.epochs == 2
    for x, y in zip(hw["lossHistory"], hs["lossHistory"]):
        assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], abs=1e-4)


def test_padded_batch_loss_equals_unpadded_per_example_losses(tiny_model_dir, cache):
    """Right padding + causal attention: dropping the attention mask changes no labelled position."""
    from sidecar import data

    loaded = cache.get(str(tiny_model_dir))
    records = [data.Record(example=e, source="dataset", index=i) for i, e in enumerate(EXAMPLES)]
    items, _ = data.tokenize(records, loaded.tokenizer, loss_on="assistant", max_seq_length=256)
    lm = loaded.model
    with torch.no_grad():
        together = lossmod.loss_sum(lm, data.collate(items, range(len(items)), 2), selective=True).item()
        alone = sum(lossmod.loss_sum(lm, data.collate(items, [i], 2), selective=True).item()
                    for i in range(len(items)))
        masked = data.collate(items, range(len(items)), 2)
        masked.right_padded = False  # force the explicit attention mask
        with_mask = lossmod.loss_sum(lm, masked, selective=True).item()
    assert len({len(t.input_ids) for t in items}) > 1  # the batch really is padded
    assert together == pytest.approx(alone, rel=1e-5) and together == pytest.approx(with_mask, rel=1e-5)
