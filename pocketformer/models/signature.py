"""What a graph takes and gives, declared once: tensor names, dtypes and axes (symbolic or fixed).

The canonical model declares its inputs (from its modality) and outputs (from its task); a model that exports as
several graphs (early-exit segments today, prefill/decode tomorrow) declares each graph the same way. Exporters derive
the forward's parameter names, dynamic axes and example inputs from these declarations, never from a modality or task
branch of their own (as Optimum's export configs declare I/O, but once for our one model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

Axis = Union[str, int]  # a symbolic axis ("batch", "sequence") or a fixed size

# Symbolic axes that may stay dynamic in a file; every other axis is fixed by the model's shapes. A decoder's cached
# graph also has the past's length and the total (past + new tokens) its attention mask covers.
DYNAMIC_AXES = ("batch", "sequence", "past", "total")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a graph."""

    name: str
    dtype: str  # numpy's name: "int64", "float32"
    axes: tuple[Axis, ...]
    pad: float = 0  # the value that fills positions past an example's end when the sequence axis is padded


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of one graph, plus the largest size each symbolic axis may take."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bounds: dict[str, int] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input: axis position -> symbolic name, for the axes that may stay dynamic."""
        return {t.name: {i: a for i, a in enumerate(t.axes) if a in DYNAMIC_AXES} for t in self.inputs}

    def has_axis(self, name: str) -> bool:
        return any(name in t.axes for t in self.inputs)

    def fit(self, inputs: tuple[torch.Tensor, ...], sizes: dict[str, int]) -> tuple[torch.Tensor, ...]:
        """Inputs padded (with each input's pad value) or truncated along their "sequence" axis to
        sizes["sequence"]; inputs without that axis, or sizes without it, unchanged."""
        if "sequence" not in sizes:
            return tuple(inputs)
        seq = sizes["sequence"]
        out = []
        for spec, t in zip(self.inputs, inputs):
            if "sequence" in spec.axes:
                axis = spec.axes.index("sequence")
                t = t.narrow(axis, 0, min(seq, t.shape[axis]))
                short = seq - t.shape[axis]
                if short:
                    pad = [0, 0] * (t.dim() - 1 - axis) + [0, short]
                    t = torch.nn.functional.pad(t, pad, value=spec.pad)
            out.append(t)
        return tuple(out)


@dataclass
class Graph:
    """One exportable graph: a module taking the declared inputs positionally and returning the declared outputs
    (a tensor for one output, a tuple in declaration order for several)."""

    module: nn.Module
    io: GraphIO


def parameter_name(name: str) -> str:
    """A tensor name as a Python parameter name (past_key_values.0.key -> past_key_values_0_key)."""
    out = re.sub(r"\W", "_", name)
    if not out.isidentifier():
        raise ValueError(f"input name {name!r} cannot be a parameter name")
    return out


def named_forward(module: nn.Module, names: list[str], outputs: Optional[list[str]] = None) -> nn.Module:
    """`module` (taking the declared inputs positionally) behind a forward with one named parameter per input:
    converters name a file's inputs after the forward's parameters (input_ids, not args_0). With `outputs`, setting
    `dict_outputs` makes forward return a dict by output name (LiteRT names a signature's outputs after its keys)."""
    params = ", ".join(parameter_name(n) for n in names)
    scope: dict = {}
    exec(f"def forward(self, {params}):\n    return self._call({params})", scope)  # noqa: S102 - names checked

    class Named(nn.Module):
        forward = scope["forward"]

        def __init__(self):
            super().__init__()
            self.model = module
            self.dict_outputs = False

        def _call(self, *args):
            out = self.model(*args)
            if self.dict_outputs and outputs:
                return dict(zip(outputs, out if isinstance(out, tuple) else (out,)))
            return out

    Named.__qualname__ = Named.__name__ = "NamedInputs"  # converters put it in tensor names: keep them short
    return Named().eval()
