"""Compression stages, one module each, registered by name for recipes and the CLI."""

from . import distill, finetune, prune  # noqa: F401  (importing registers the stages)
from .base import REGISTRY, Context, Stage, StageConfig, StageReport

__all__ = ["REGISTRY", "Context", "Stage", "StageConfig", "StageReport"]
