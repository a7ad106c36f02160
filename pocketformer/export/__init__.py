"""Export: one module per format (each a Format, export/base.py), one loop (export/loop.py) that writes, checks and
records every graph of a model in every precision. Every module of this package is imported here, which registers
what it defines (formats in FORMATS, graph sets such as the early-exit segments): a new format is one module."""

import importlib
import pkgutil

from .base import FORMATS, Format
from .loop import ExportFailures, export

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FORMATS", "ExportFailures", "Format", "export"]
