"""Factorized linears: a Linear W (out x in) stored as two, so the canonical model can carry low-rank (LRT) and
dense-sparse (DSFormer) layers through save/load and every exporter as plain matmuls.

- LowRankLinear: y = U (V x) + b with V (rank x in), U (out x rank); from truncated SVD.
- DenseSparseLinear: y = D (S x) + b with a dense basis D (out x rank) and a sparse S (rank x in) holding at most
  `nnz` non-zeros in each column (one column per input feature). While training, S is projected to its top-`nnz`
  entries per column in the forward pass and the gradient flows to all of S (straight-through, DSFormer's STF);
  switching to eval mode settles the projection into the stored weights, so an evaluated, saved or exported model
  holds exact zeros and no projection op.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LinearShape(BaseModel):
    """How one Linear of a layer is stored, when it is not a plain dense matrix."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lowrank", "dense_sparse"]
    rank: int = Field(ge=1, description="inner width: the rank (low-rank) or the basis size (dense-sparse)")
    nnz: int = Field(0, ge=0, description="dense-sparse: non-zeros kept in each column of S")


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)  # V
        self.second = nn.Linear(rank, out_features, bias=bias)  # U, and the original bias

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.second.bias

    @property
    def weight(self) -> torch.Tensor:
        """The product U V, the dense matrix this layer stands for (for scoring, never for the forward pass)."""
        return self.second.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # through the submodules, so a quantizer that swaps them (neural-compressor) is used as it swapped them
        return self.second(self.first(x))

    def shape(self) -> LinearShape:
        return LinearShape(kind="lowrank", rank=self.rank)

    def take_rows(self, rows: torch.Tensor) -> "LowRankLinear":
        new = self._like(self.in_features, len(rows))
        with torch.no_grad():
            new.first.weight.copy_(self.first.weight)
            new.second.weight.copy_(self.second.weight[rows])
            if self.bias is not None:
                new.second.bias.copy_(self.second.bias[rows])
        return new

    def take_cols(self, cols: torch.Tensor) -> "LowRankLinear":
        new = self._like(len(cols), self.out_features)
        with torch.no_grad():
            new.first.weight.copy_(self.first.weight[:, cols])
            new.second.load_state_dict(self.second.state_dict())
        return new

    def _like(self, in_features: int, out_features: int) -> "LowRankLinear":
        return LowRankLinear(in_features, out_features, self.rank, bias=self.bias is not None)


def top_per_column(weight: torch.Tensor, nnz: int) -> torch.Tensor:
    """0/1 mask keeping the `nnz` largest-magnitude entries of each column (ties broken by position)."""
    if nnz >= weight.shape[0]:
        return torch.ones_like(weight)
    idx = weight.detach().abs().topk(nnz, dim=0).indices
    return torch.zeros_like(weight).scatter_(0, idx, 1.0)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DenseSparseLinear(LowRankLinear):
    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = True):
        super().__init__(in_features, out_features, rank, bias)
        self.nnz = nnz

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            projected = _StraightThrough.apply(self.first.weight, top_per_column(self.first.weight, self.nnz))
            return self.second(nn.functional.linear(x, projected))
        return self.second(self.first(x))  # S holds exact zeros since `train(False)` settled them

    def settle(self) -> None:
        """Store the top-nnz projection of S (every other entry an exact zero), then balance the factors."""
        if not isinstance(self.first, nn.Linear):  # swapped by a quantizer: its packed weights are already settled
            return
        with torch.no_grad():
            self.first.weight.mul_(top_per_column(self.first.weight, self.nnz))
            self.balance()

    def balance(self) -> None:
        """Rescale each basis vector and its row of S to equal norms; D S is unchanged. Training leaves the split
        arbitrary, and an unbalanced split gives the intermediate (S x) channels of very different ranges, which
        per-tensor int8 activations then destroy (measured on MiniLM: ORT int8 label agreement 0.63 -> 1.0)."""
        with torch.no_grad():
            d, s = self.second.weight.norm(dim=0), self.first.weight.norm(dim=1)
            used = (d > 0) & (s > 0)
            scale = torch.ones_like(d)
            scale[used] = (s[used] / d[used]).sqrt()
            scale[(scale - 1).abs() < 1e-4] = 1.0  # already balanced: leave the bits alone, so hashes are stable
            if bool((scale != 1).any()):
                self.second.weight.mul_(scale[None, :])
                self.first.weight.div_(scale[:, None])

    def train(self, mode: bool = True):
        if not mode:
            self.settle()
        return super().train(mode)

    def shape(self) -> LinearShape:
        return LinearShape(kind="dense_sparse", rank=self.rank, nnz=self.nnz)

    def _like(self, in_features: int, out_features: int) -> "DenseSparseLinear":
        return DenseSparseLinear(in_features, out_features, self.rank, self.nnz, bias=self.bias is not None)


def build_linear(in_features: int, out_features: int, shape: Optional[LinearShape], bias: bool = True) -> nn.Module:
    """The module a LinearShape describes (a plain nn.Linear when there is none)."""
    if shape is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if shape.kind == "lowrank":
        return LowRankLinear(in_features, out_features, shape.rank, bias=bias)
    return DenseSparseLinear(in_features, out_features, shape.rank, shape.nnz, bias=bias)


def linear_shape(module: nn.Module) -> Optional[LinearShape]:
    return module.shape() if isinstance(module, LowRankLinear) else None


def linear_macs(in_features: int, out_features: int, shape: Optional[LinearShape]) -> int:
    """Multiply-accumulates per token as the runtimes execute it: S runs as a dense matmul (no sparse kernels)."""
    if shape is None:
        return in_features * out_features
    return shape.rank * (in_features + out_features)


@contextlib.contextmanager
def quiet_empty():
    """Every head or neuron of a layer may be pruned: its empty linears are meant, so torch's warning about
    initialising zero-element tensors is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        yield


def take_rows(lin: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A linear of `lin`'s output rows `rows` (a pruned unit's outputs gone), dense or factorized."""
    if isinstance(lin, LowRankLinear):
        return lin.take_rows(rows)
    with quiet_empty():
        new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows])
    return new


def take_cols(lin: nn.Module, cols: torch.Tensor) -> nn.Module:
    """A linear of `lin`'s input columns `cols` (a pruned unit's inputs gone), dense or factorized."""
    if isinstance(lin, LowRankLinear):
        return lin.take_cols(cols)
    with quiet_empty():
        new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(lin.weight[:, cols])
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new
