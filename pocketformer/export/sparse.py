"""Sparse weight storage, what the formats share: a dense-sparse model's S matrices hold mostly exact zeros, which
a dense file stores at full price. Each format module has its own encoding (ONNX sparse initializers, TFLite
SparsityParameters + DENSIFY, CoreML constexpr_sparse_to_dense); a tensor is converted only when that encoding is
smaller than its dense bytes, and each returns what it did, for the artifact record (`summary`):
  {"encoding", "tensors": converted, "dense_bytes" / "sparse_bytes": of the converted tensors,
   "left_dense": zero-heavy tensors (>= half zeros) that stayed dense, with "why_dense" when there are any}.
Sparse storage changes the file, never the arithmetic: every runtime rebuilds the same dense matrix (once, when it
prepares the graph) before a dense matmul, so expect the dense model's latency, not a faster one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

MIN_ELEMENTS = 1024  # smaller tensors stay dense: a few bytes saved are not worth a format feature
ZERO_HEAVY = 0.5  # tensors with at least this fraction of zeros are reported when they stay dense


def has_dense_sparse(model: nn.Module) -> bool:
    """Whether the model holds dense-sparse linears, whose S the exporters can store sparse."""
    from ..models.factorized import DenseSparseLinear

    return any(isinstance(m, DenseSparseLinear) for m in model.modules())


def summary(encoding: str, converted: list[tuple[int, int]], left_dense: int, why_dense: str) -> dict[str, Any]:
    result = {"encoding": encoding, "tensors": len(converted), "dense_bytes": sum(d for d, _ in converted),
              "sparse_bytes": sum(s for _, s in converted), "left_dense": int(left_dense)}
    return {**result, "why_dense": why_dense} if left_dense else result
