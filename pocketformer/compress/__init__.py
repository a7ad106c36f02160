"""Compression stages, one module each, registered by name for recipes and the CLI.

Stages are discovered, not listed: importing every public module of this package registers the Stage subclasses it
defines (Stage.__init_subclass__). A new stage is one module here and its test.
"""

import importlib
import pkgutil

from .base import REGISTRY, Context, Stage, StageConfig, StageReport, StageResult

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
# By name, whatever order imports happened in (a stage module may import another's).
_ordered = dict(sorted(REGISTRY.items()))
REGISTRY.clear()
REGISTRY.update(_ordered)

__all__ = ["REGISTRY", "Context", "Stage", "StageConfig", "StageReport", "StageResult"]
