"""The training loop, read top to bottom in nanoGPT's order:

    lr → micro-batches (forward, backward) → clip → step → zero_grad → log → evaluate → checkpoint
       → stop checks

One optimizer step takes ``gradientAccumulation`` batches of the epoch's seeded order
(``data.epoch_batches``), each split into micro-batches to the token budget and, in a worker group,
dealt out to the ranks (training/world.py). The loss is normalised by every label of the step, so
neither split changes the update. A checkpoint never falls inside a step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch

from .. import data, errors, wire
from .checkpointer import Checkpointer
from .loss import evaluate
from .pause import PauseGate
from .schedule import lr_multiplier
from .state import Model, RunState, StopSignal, TrainData
from .world import World


def train_loop(params: wire.TrainParams, d: TrainData, model: Model, optimizer: Any, world: World,
               run: RunState, ckpt: Checkpointer, stop: StopSignal) -> None:
    """Run the steps left (all of them, or those after a resume point) until the last step or early
    stopping. A checkpoint taken after the last step (a cancel while saving) or after early stopping
    resumes straight into saving."""
    if ckpt.stopped_early or run.step >= d.total_steps:
        return
    if isinstance(stop.should_stop, PauseGate):  # pause {release}: checkpoint the last whole step first
        stop.should_stop.release_hook = lambda: _release_checkpoint(ckpt, run)
    accumulation = params.gradient_accumulation
    start_epoch, start_group = run.next_epoch, run.next_group
    for epoch in range(start_epoch, d.epochs):
        batches = data.epoch_batches(d.lengths, d.global_batch, seed=params.seed, epoch=epoch,
                                     group_by_length=d.grouped)
        for g in range(start_group if epoch == start_epoch else 0, len(batches), accumulation):
            if run.step >= d.total_steps:
                break
            ckpt.step_begins()
            t_step = time.monotonic()
            lr = params.learning_rate * lr_multiplier(run.step, d.total_steps, params.warmup_ratio, params.scheduler)
            for pg in optimizer.param_groups:
                pg["lr"] = lr
            group = batches[g:g + accumulation]
            loss_sum, tokens, labels = _forward_backward(group, d, model, world, run, stop)
            run.grad_norm = _grad_norm(model, params.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ckpt.step_ends()

            epoch_end = g + accumulation >= len(batches)
            position = (epoch + 1, 0) if epoch_end else (epoch, g + accumulation)
            _log_step(run, d, loss_sum=loss_sum, tokens=tokens, labels=labels, lr=lr, position=position,
                      started=t_step)
            finished = run.step >= d.total_steps
            improved = False
            if _evaluation_due(params, d, run, finished=finished, epoch_end=epoch_end):
                improved = _evaluate(params, d, model, run, ckpt, stop, finished=finished)
            ckpt.after_step(improved=improved, finished=finished)
            if ckpt.stopped_early or finished:
                return


def _release_checkpoint(ckpt: Checkpointer, run: RunState) -> Any:
    """A pause with ``release`` inside a step: checkpoint the step before it (as a cancel does; the
    weights and optimizer are that step's until this one ends); None when checkpoints are off or it is
    checkpointed already. The step then goes on from its accumulated gradients."""
    if not (ckpt.cadence.enabled and ckpt.in_step and ckpt.boundary is not None):
        return None
    scalars, rng = ckpt.boundary
    if scalars["step"] <= ckpt.last_step:
        return None
    run.set_scalars(scalars)
    return ckpt.save(rng)


def _forward_backward(group: list[list[int]], d: TrainData, model: Model, world: World, run: RunState,
                      stop: StopSignal) -> tuple[float, int, int]:
    """Gradients of one optimizer step over this rank's micro-batches; returns the step's loss sum,
    tokens and label count over every rank."""
    # Normalise by every label in the optimizer step, not per micro-batch: a short micro-batch must
    # not weigh as much as a long one.
    labels = sum(d.items[i].trainable for b in group for i in b)
    loss_sum, tokens, examples, correct = 0.0, 0, 0, 0
    counted = True  # every micro-batch's loss said how many tokens it predicted (a wrapper may drop it)
    for part in world.micro_batches(group, d.lengths, d.micro_tokens):  # this rank's rows
        stop.poll()
        batch = data.collate(d.items, part.indices, d.pad_id, model.device)
        with world.sync_gradients(part):
            loss = model.forward(batch)
            (loss * part.scale / labels).backward()
        if part.scale:
            loss_sum += loss.item()
            tokens += batch.tokens
            examples += batch.examples
            counted = counted and hasattr(loss, "correct")
            correct += int(loss.correct) if counted else 0
    run.micro_done += len(group)
    loss_sum, tokens, examples, correct = world.sum(loss_sum, tokens, examples, correct)
    run.examples_seen += int(examples)
    run.token_accuracy = round(correct / labels, 6) if counted and labels else None
    return loss_sum, int(tokens), labels


def _grad_norm(model: Model, max_norm: float) -> Optional[float]:
    """The LoRA weights' gradient norm before clipping (clipped to ``max_norm`` when it is > 0)."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.trainable, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([t.grad for t in model.trainable if t.grad is not None])
    try:
        return round(float(norm), 6)
    except (TypeError, RuntimeError):  # a sharded norm that does not reduce to a number here
        return None


def _log_step(run: RunState, d: TrainData, *, loss_sum: float, tokens: int, labels: int, lr: float,
              position: tuple[int, int], started: float) -> None:
    """Count the step just taken and report it (``position``: the data position of the next step)."""
    if not math.isfinite(loss_sum):
        raise errors.TrainingFailed(f"The loss became {loss_sum} at step {run.step + 1}; lower learningRate",
                                    jobId=run.job_id, stepsCompleted=run.step)
    run.step += 1
    seconds = time.monotonic() - started
    run.train_seconds += seconds
    run.tokens += tokens
    run.epoch = run.micro_done / d.micro_per_epoch
    run.loss, run.lr = loss_sum / labels, lr
    run.loss_total += loss_sum
    run.label_total += labels
    run.next_epoch, run.next_group = position
    if run.first_step_at is None:
        run.first_step_at = time.time()
    run.history.append({"step": run.step, "epoch": round(run.epoch, 4), "loss": run.loss,
                        "learningRate": lr, "tokens": tokens, "labelTokens": labels})
    run.record_step(tokens=tokens, seconds=seconds)
    run.send("training")


def _evaluation_due(params: wire.TrainParams, d: TrainData, run: RunState, *, finished: bool,
                    epoch_end: bool) -> bool:
    """The last step, evalEvery, and epoch ends — but when maxSteps repeats a tiny dataset many times,
    at most about ten epoch-end evaluations in the run."""
    if not d.validation_items:
        return False
    since_eval = run.step - (run.validation_history[-1]["step"] if run.validation_history else 0)
    return bool(finished or (epoch_end and since_eval >= math.ceil(d.total_steps / 10))
                or (params.eval_every and run.step % params.eval_every == 0))


def _evaluate(params: wire.TrainParams, d: TrainData, model: Model, run: RunState, ckpt: Checkpointer,
              stop: StopSignal, *, finished: bool) -> bool:
    """The validation loss now; True when early stopping counts it as a new best."""
    run.send("evaluating")
    run.validation_loss = evaluate(model.lm, d.validation_items, batch_size=params.batch_size, pad_id=d.pad_id,
                                   device=model.device, selective=model.selective, should_stop=stop.should_stop,
                                   on_stop=stop.cancel)
    run.validation_history.append({"step": run.step, "epoch": round(run.epoch, 4),
                                   "validationLoss": run.validation_loss})
    improved = ckpt.evaluated()
    if not finished:
        run.send("training")
    return improved
