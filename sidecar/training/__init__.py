"""Training: the recipe (``recipe.train``: lifecycle, loop, manifest), the loss and evaluation
(``loss``), the learning-rate schedule (``schedule``) and the fused LoRA branch used while training
(``fastlora``)."""

from .recipe import train

__all__ = ["train"]
