"""Datasets for training, in three stages, each usable on its own (this module re-exports them):

1. sidecar/datasets.py — ``load_train_and_validation(params)`` reads the examples and checks their
   structure, before any model is loaded; ``check_sources`` is the request check the door runs.
2. sidecar/chat.py — ``tokenize(records, tokenizer, ...)`` renders each example with the chat
   template and builds labels aligned with ``input_ids`` (assistant-only with ``loss_on="assistant"``).
3. sidecar/batching.py — ``epoch_batches`` / ``collate`` group examples into right-padded
   micro-batches, reproducible from (seed, epoch).
"""

from __future__ import annotations

from .batching import GROUPING_MIN_SAVING, Batch, collate, epoch_batches, grouping_pays
from .chat import IGNORE, DatasetStats, Tokenized, assistant_char_spans, encode_example, render_chat, tokenize
from .datasets import (ROLES, LoadedData, Record, check_record, check_sources, dataset_sha256, load_inline,
                       load_jsonl, load_train_and_validation, split_records)

__all__ = [
    "GROUPING_MIN_SAVING", "Batch", "collate", "epoch_batches", "grouping_pays",
    "IGNORE", "DatasetStats", "Tokenized", "assistant_char_spans", "encode_example", "render_chat", "tokenize",
    "ROLES", "LoadedData", "Record", "check_record", "check_sources", "dataset_sha256", "load_inline",
    "load_jsonl", "load_train_and_validation", "split_records",
]
