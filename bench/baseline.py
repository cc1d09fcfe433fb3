"""The baseline: the old pipeline, a fresh Python process per job running TRL's ``SFTTrainer``.

The parent (``run``) launches ``python -m bench.baseline CONFIG OUT`` and times it from the launch;
the child loads the converted checkpoint as the old pipeline did, trains with the old pipeline's
settings (fp32 on CPU, gradient checkpointing on, ``adamw_torch``, linear schedule with warm-up,
weight decay 0.01, no packing, batch 4, one epoch), saves the adapter at the end, and writes its
figures as JSON. Timestamps are CLOCK_MONOTONIC, shared by every process on the machine.

Loss: TRL's ``assistant_only_loss`` needs a chat template with ``{% generation %}`` markers, which
SmolLM2's ChatML template lacks and TRL cannot patch, so the child passes
``bench/chatml_training.jinja``: the same template (it renders byte-identical text) with the
markers around each assistant reply and its ``<|im_end|>``: the tokens the sidecar labels too.
"""

from __future__ import annotations

import time

T_PROCESS_START = time.monotonic()  # before any heavy import: imports are part of a job's start-up cost

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from .common import TRAINING_TEMPLATE, JobSettings, now, run_child, write_json  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------

def run(settings: JobSettings, model_path: str, workdir: Path, *, timeout: float = 7200) -> dict[str, Any]:
    """Run one baseline job in a fresh process; return the child's figures plus launch-relative times.

    Peak RSS comes from ``wait4`` on exactly this child (not RUSAGE_CHILDREN, which would mix in
    every other child the benchmark has waited for).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path, out_path, log_path = workdir / "config.json", workdir / "result.json", workdir / "child.log"
    write_json(config_path, {"settings": settings.to_dict(), "model_path": model_path,
                             "output_dir": str(workdir / "trl-output")})
    r, t_launch, t_exit, peak_rss_mb = run_child("bench.baseline", config_path, out_path, log_path,
                                                  threads=settings.threads, timeout=timeout, what="baseline child")
    t = r["timestamps"]
    r["launch_to_process_start_s"] = t["process_start"] - t_launch
    r["launch_to_first_step_begin_s"] = t["first_step_begin"] - t_launch
    r["launch_to_first_step_s"] = t["first_step_end"] - t_launch
    r["launch_to_exit_s"] = t_exit - t_launch
    r["phases_s"] = {
        "imports": t["imports_done"] - t["process_start"],
        "model_load": t["model_loaded"] - t["imports_done"],
        "trainer_setup": t["trainer_ready"] - t["model_loaded"],
        "first_step": t["first_step_end"] - t["trainer_ready"],
        "training": t["last_step_end"] - t["first_step_begin"],
        "save": t["saved"] - t["last_step_end"],
    }
    r["peak_rss_mb"] = peak_rss_mb
    r["log"] = str(log_path)
    return r


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------

def _child(config_path: str, out_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    s = JobSettings.from_dict(cfg["settings"])
    ts: dict[str, float] = {"process_start": T_PROCESS_START}

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from .dataset import load_examples

    torch.set_num_threads(s.threads)
    ts["imports_done"] = now()

    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    ts["model_loaded"] = now()

    dataset = Dataset.from_list(load_examples(Path(s.dataset_path)))
    args = SFTConfig(
        output_dir=cfg["output_dir"],
        num_train_epochs=s.epochs,
        max_steps=s.max_steps if s.max_steps is not None else -1,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.scheduler,
        # transformers 5 folded warmup_ratio into warmup_steps: a float below 1 is a ratio.
        warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=True,
        packing=False,
        max_length=s.max_seq_length,
        assistant_only_loss=True,
        chat_template_path=str(TRAINING_TEMPLATE),
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=s.seed,
        data_seed=s.seed,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout,
                             target_modules=list(s.target_modules), bias="none", task_type="CAUSAL_LM")

    fed = {"tokens": 0, "label_tokens": 0, "padded_tokens": 0, "batches": 0}

    class CountingSFTTrainer(SFTTrainer):
        # Counted where the batch is actually fed, from its attention mask (padding excluded).
        def training_step(self, model, inputs, *a, **kw):
            mask = inputs["attention_mask"]
            fed["tokens"] += int(mask.sum())
            fed["padded_tokens"] += int(mask.numel())
            fed["label_tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            fed["batches"] += 1
            return super().training_step(model, inputs, *a, **kw)

    steps: list[dict[str, Any]] = []

    class Timing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            ts.setdefault("first_step_begin", now())

        def on_step_end(self, args, state, control, **kw):
            t = now()
            ts.setdefault("first_step_end", t)
            ts["last_step_end"] = t
            steps.append({"step": state.global_step, "t": t, "tokens": fed["tokens"]})

    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[Timing()])
    ts["trainer_ready"] = now()
    output = trainer.train()
    trainer.save_model(str(Path(cfg["output_dir"]) / "adapter"))
    ts["saved"] = now()

    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}
    for st in steps:
        st["loss"] = losses.get(st["step"])
        st["t"] -= ts["first_step_begin"]
    training_s = ts["last_step_end"] - ts["first_step_begin"]
    trl_tokens = next((h.get("num_tokens") for h in reversed(trainer.state.log_history) if "num_tokens" in h), None)
    result = {
        "side": "baseline",
        "steps": trainer.state.global_step,
        "tokens": fed["tokens"],
        "label_tokens": fed["label_tokens"],
        "padded_tokens": fed["padded_tokens"],
        "trl_num_tokens": trl_tokens,
        "training_s": training_s,
        "tokens_per_s": fed["tokens"] / training_s,
        "final_loss": steps[-1]["loss"] if steps else None,
        "train_loss": output.training_loss,
        "adapter_dir": str(Path(cfg["output_dir"]) / "adapter"),
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        # What TRL actually ran with, read back from the trainer (not from our request).
        "effective": {"bf16": trainer.args.bf16, "fp16": trainer.args.fp16,
                      "model_dtype": str(trainer.model.dtype).removeprefix("torch."),
                      "gradient_checkpointing": _checkpointing_on(trainer.model),
                      "optim": _enum(trainer.args.optim), "lr_scheduler": _enum(trainer.args.lr_scheduler_type),
                      "warmup_steps": trainer.args.get_warmup_steps(trainer.state.max_steps),
                      "assistant_only_loss": trainer.args.assistant_only_loss, "packing": trainer.args.packing,
                      "learning_rates": [h["learning_rate"] for h in trainer.state.log_history
                                         if "learning_rate" in h]},
        "versions": _versions(),
        "step_log": steps,
        "timestamps": ts,
    }
    write_json(Path(out_path), result)


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value))


def _checkpointing_on(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(base), name):
            return bool(getattr(base, name))
    return False


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__}


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
