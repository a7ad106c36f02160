"""Compression stages, one module each, registered by name for recipes and the CLI."""

# importing a stage's module registers it
from . import (binarize, dense_sparse, distill, early_exit, finetune, lowrank, matformer, prune,  # noqa: F401
               quantize)
from .base import REGISTRY, Context, Stage, StageConfig, StageReport

__all__ = ["REGISTRY", "Context", "Stage", "StageConfig", "StageReport"]
