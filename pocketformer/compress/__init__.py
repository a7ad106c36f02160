"""Compression stages, one module each, registered by name for recipes and the CLI."""

from . import binarize, dense_sparse, distill, early_exit, finetune, lowrank, matformer, prune, quantize  # noqa: F401  (imports register stages)
from .base import REGISTRY, Context, Stage, StageConfig, StageReport

__all__ = ["REGISTRY", "Context", "Stage", "StageConfig", "StageReport"]
