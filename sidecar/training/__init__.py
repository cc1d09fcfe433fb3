"""Training: the recipe (``recipe.train``: prepare → setup → loop → publish), the request checks at the
door (``checks``), the loss and evaluation (``loss``), the learning-rate schedule (``schedule``), the
fused LoRA branch (``fastlora``), checkpoints (``checkpoint``, ``checkpointer``) and distributed jobs
(``distributed``, ``group``, ``worker``, ``world``).

Importing the package imports no torch: ``train`` is loaded on first use, so the server can import
``training.checks`` and ``training.distributed`` before torch is needed.
"""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .recipe import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
