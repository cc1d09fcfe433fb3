"""Checks of the benchmark's fixed inputs and arithmetic (``pytest bench``; a few seconds).

They guard what a timing run cannot show: that both sides train on the same tokens with the same
labels, and that the FLOP model and the target checks compute what docs/PERFORMANCE.md says.
"""

from __future__ import annotations

import json

import pytest

from bench import dataset, limit
from bench.__main__ import check_targets, compute_ratios
from bench.common import TRAINING_TEMPLATE

SMOLLM2 = limit.ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)


@pytest.fixture(scope="module")
def tokenizer():
    from sidecar.models import load_embedded_tokenizer

    return load_embedded_tokenizer()


@pytest.mark.parametrize("shape", list(dataset.SHAPES))
def test_kept_datasets_match_their_generators(shape):
    path, build = dataset.SHAPES[shape]
    expected = "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in build())
    assert path.read_text(encoding="utf-8") == expected


def test_dataset_mix():
    examples = dataset.load_examples()
    assert len(examples) == 64
    with_system = [e for e in examples if e["messages"][0]["role"] == "system"]
    multi_turn = [e for e in examples if sum(m["role"] == "assistant" for m in e["messages"]) > 1]
    assert len(with_system) == 22 and len(multi_turn) == 8


# Each shape: (tokens, labelled tokens, shortest, longest) with the sidecar's rendering.
SHAPE_FACTS = {"chat": (5200, 2600, 37, 255), "short": (3993, 1847, 79, 91), "long": (13863, 1719, 860, 872)}


@pytest.mark.parametrize("shape", list(dataset.SHAPES))
def test_token_counts_and_labels_agree_between_trl_template_and_sidecar(tokenizer, shape):
    """The baseline's training template renders the same text and marks the same tokens as the
    sidecar's labels: same tokens fed, same loss positions — on every data shape. The short shape
    stays within 60-120 tokens a row, the long one within 600-1,000."""
    from sidecar import data

    template = TRAINING_TEMPLATE.read_text()
    records = data.load_jsonl(str(dataset.SHAPES[shape][0]))
    items, stats = data.tokenize(records, tokenizer, loss_on="assistant", max_seq_length=1024)
    lengths = [len(t.input_ids) for t in items]
    assert (stats.tokens, stats.trainable_tokens, min(lengths), max(lengths)) == SHAPE_FACTS[shape]
    assert stats.truncated == 0
    for rec, item in zip(records, items):
        messages = [{"role": m.role, "content": m.content} for m in rec.example.messages]
        assert tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template) == \
            tokenizer.apply_chat_template(messages, tokenize=False)
        enc = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert enc["input_ids"] == item.input_ids
        assert [int(m) for m in enc["assistant_masks"]] == [int(t != data.IGNORE) for t in item.labels]


@pytest.mark.parametrize("length", [128, 1024])
def test_synthetic_examples_have_exact_length(tokenizer, length):
    for ex in dataset.synthetic_examples(tokenizer, length, 3):
        assert len(tokenizer.apply_chat_template(ex["messages"], tokenize=True, return_dict=True)["input_ids"]) == length


def test_flop_model_for_smollm2():
    assert SMOLLM2.linear_params == 106_168_320
    # 4·N + 4·V·d on half the positions
    assert limit.flops_per_token(SMOLLM2, logit_fraction=0.5) == 4 * 106_168_320 + 2 * 49152 * 576
    extra = limit.extra_flops(SMOLLM2, rank=8, target_modules=["q_proj"], tokens=10, sequence_lengths=[10])
    assert extra["lora"] == 6 * 8 * (576 + 576) * 30 * 10
    assert extra["attention"] == 3 * 2 * 2 * 576 * 55 * 30


def test_matmul_probe_reports_a_positive_peak():
    r = limit.matmul_gflops(1, shapes=[(32, 64, 48)], repeats=1, min_seconds=0.001)
    assert r["peak_gflops"] > 0 and r["peak_shape"] == [32, 64, 48]


def _result(b_tps: float, s_tps: float, b_first: float, s_first: float, s_start: float, b_rss: float,
            s_rss: float, b_loss: float, s_loss: float) -> dict:
    shape = {**limit.describe(SMOLLM2)}
    return {
        "model": {"shape": shape},
        "settings": {"rank": 8, "target_modules": ["q_proj"], "max_steps": None},
        "dataset": {"lengths": [100] * 52},
        "limit": {"peak_gflops": 100.0},
        "baseline": {"tokens_per_s": b_tps, "tokens": 5200, "padded_tokens": 8000, "launch_to_first_step_s": b_first,
                     "launch_to_first_step_begin_s": b_first - 1, "peak_rss_mb": b_rss},
        "sidecar": {"tokens_per_s": s_tps, "tokens": 5200, "request_to_first_step_s": s_first, "peak_rss_mb": s_rss,
                    "measured_job": {"tokens": 5200, "label_tokens": 2600, "request_to_training_start_s": s_start}},
        "evaluation": {"losses": {"baseline": b_loss, "sidecar": s_loss}},
    }


def test_targets_pass_and_fail_on_the_stated_thresholds():
    res = _result(50, 160, 10.0, 0.4, 0.1, 3000, 2500, 2.0, 2.04)
    res["ratios"] = compute_ratios(res)
    t = check_targets(res)
    assert res["ratios"]["speedup"] == pytest.approx(3.2)
    # 160 tokens/s × 4.81e8 FLOP = 77 GFLOP/s of a 100 GFLOP/s peak
    assert res["ratios"]["limit_fraction"] == pytest.approx(160 * 481_296_384 / 100e9)
    assert all(v["pass"] for k, v in t.items() if not v["target"].startswith("(info)"))

    res = _result(50, 120, 4.0, 0.6, 0.6, 3000, 3100, 2.0, 2.06)  # 120 × 4.81e8 = 58 % of the peak
    res["ratios"] = compute_ratios(res)
    t = check_targets(res)
    failed = {k for k, v in t.items() if v["pass"] is False}
    assert failed == {"speedup", "limit_fraction", "first_step_abs", "first_step_ratio", "first_step_done_abs",
                      "peak_rss", "loss"}


def test_bf16_matmuls_are_held_to_their_own_bound():
    """A sidecar that multiplied in bf16 is measured against the bf16 peak for the blocks and the fp32
    peak for the LM head (which stays fp32), not against the fp32 peak alone."""
    res = _result(50, 160, 10.0, 0.4, 0.1, 3000, 2500, 2.0, 2.04)
    res["limit_bf16"] = {"peak_gflops": 200.0}
    res["sidecar"]["measured_job"]["engine"] = {"bf16MatmulLayers": 210}
    r = compute_ratios(res)
    per_token = 4 * 106_168_320 / 200e9 + 2 * 49152 * 576 / 100e9  # seconds at the two peaks
    assert r["sidecar_bf16_matmuls"] and r["compute_limit_tokens_per_s"] == pytest.approx(1 / per_token)
    assert r["compute_limit_fraction"] == pytest.approx(160 * per_token)
    assert r["limit_fraction"] == pytest.approx(160 * 481_296_384 / 100e9)  # the fp32 figure, still reported
    res["sidecar"]["measured_job"]["engine"] = {"bf16MatmulLayers": 0}
    assert compute_ratios(res)["compute_limit_fraction"] == pytest.approx(160 * 481_296_384 / 100e9)


def test_targets_without_a_baseline_are_not_applicable():
    res = _result(50, 160, 10.0, 0.4, 0.1, 3000, 2500, 2.0, 2.0)
    del res["baseline"], res["evaluation"]["losses"]["baseline"]
    res["ratios"] = compute_ratios(res)
    t = check_targets(res)
    assert t["speedup"]["pass"] is None and t["peak_rss"]["pass"] is None and t["loss"]["pass"] is None
    assert t["limit_fraction"]["pass"] is True


def test_per_shape_ratios_and_summary():
    """A run over several shapes gets ratios and targets per shape, and the summary has a line each."""
    import io

    from bench.__main__ import finish_ratios, print_summary

    chat, short = _result(50, 160, 10.0, 0.4, 0.1, 3000, 2500, 2.0, 2.0), _result(60, 150, 10.0, 0.4, 0.1, 3000, 2500, 2.0, 2.1)
    res = {"model": chat["model"], "limit": chat["limit"], "out": "x.json",
           "shapes": {name: {k: r[k] for k in ("settings", "dataset", "baseline", "sidecar", "evaluation")}
                      for name, r in (("chat", chat), ("short", short))}}
    finish_ratios(res)
    assert res["shapes"]["chat"]["targets"]["speedup"]["pass"] is True
    assert res["shapes"]["short"]["ratios"]["speedup"] == pytest.approx(2.5)
    assert res["shapes"]["short"]["targets"]["speedup"]["pass"] is False
    assert res["shapes"]["short"]["targets"]["loss"]["pass"] is False
    text = io.StringIO()
    print_summary(res, text)
    assert "chat" in text.getvalue() and "2.50×" in text.getvalue()


def test_lever_gains_use_the_two_reference_runs_and_skip_cut_rows():
    from bench.levers import gains

    rows = [{"name": "reference", "tokens_per_s": 200.0}, {"name": "fp32_matmuls", "tokens_per_s": 100.0},
            {"name": "bf16_weights", "tokens_per_s": 50.0, "steps_limit": 3},
            {"name": "reference_repeat", "tokens_per_s": 220.0}]
    out = gains(rows)
    assert out["reference_tokens_per_s"] == 210.0 and out["noise"] == pytest.approx(20 / 210)
    by = {r["name"]: r["speedup_of_lever"] for r in out["rows"]}
    assert by["fp32_matmuls"] == pytest.approx(2.1) and by["bf16_weights"] is None
