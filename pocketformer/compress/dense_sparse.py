"""Dense-sparse factorization (DSFormer): each chosen Linear W (m x n) becomes W ~ D S, a dense basis D (m x k) times
a sparse S (k x n) holding at most s non-zeros in each column (one column per input feature).

Initialisation (pure functions below): truncated SVD gives an orthonormal basis U_k; the best s-sparse coefficients
of each column for an orthonormal basis are the top-s entries of U_k^T W, which fixes S's support. Then a few
alternating least-squares passes on that fixed support: D by least squares given S, then each column's kept entries
given D. Every pass solves its half exactly, so the error never rises. D's columns end at unit norm (S's rows take
the scale), so the straight-through top-s projection that recovery training applies compares like with like.

Stored weights: m k + s n instead of m n; linears where that saves nothing stay dense. The product still runs as two
dense matmuls (k (m + n) MACs per token): the gain is parameters and, where the format stores S sparse, file size.
Linears that are already factorized (low-rank or dense-sparse) are skipped, not factorized again: that would fit
the factors, compounding both errors. Recovery is the `distill` stage after this one (it trains in train mode, where
DenseSparseLinear projects S to its top-s entries with a straight-through gradient).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..models.factorized import DenseSparseLinear, LowRankLinear
from ..progress import info
from ..space import searchable
from .amounts import Size, resolve, round_to_multiple
from .base import Context, Factorization, FactorizationConfig, StageResult


class DenseSparseConfig(FactorizationConfig):
    rank: Size = Field(0.5, description="basis size k of each linear: a fraction of min(m, n) in (0, 1], or a count",
                       json_schema_extra=searchable(0.125, 1.0))
    nnz: Size = Field(0.125, description="non-zeros kept in each column of S: a fraction of the basis size in "
                                         "(0, 1], or a count", json_schema_extra=searchable(0.03125, 0.5, log=True))
    refinements: int = Field(3, ge=0, le=50, description="alternating least-squares passes after the SVD start")
    round_to: int = Field(8, ge=1, le=256, description="basis sizes rounded up to multiples of this (matmul shapes "
                                                       "stay kernel-friendly)")


def basis_size(rank: Size, m: int, n: int, round_to: int) -> int:
    """k for an m x n weight: a fraction of min(m, n) or a count, rounded up to `round_to`, at most min(m, n)."""
    limit = min(m, n)
    return round_to_multiple(resolve(rank, limit), round_to, "up", limit)


def nnz_per_column(nnz: Size, k: int) -> int:
    """s for a basis of size k: a fraction of k or a count, at least 1, at most k."""
    return resolve(nnz, k, at_least=1)


def stored_params(m: int, n: int, k: int, s: int) -> int:
    """Weights a dense-sparse m x n linear stores: all of D, and S's kept entries."""
    return m * k + s * n


def _ridge(gram: torch.Tensor, size: int) -> torch.Tensor:
    """A ridge (size x size) too small to bias the fit, large enough that a basis vector no column uses, or a zero
    basis column, solves to zero instead of NaN."""
    return (1e-10 * gram.diagonal().mean() + 1e-30) * torch.eye(size, dtype=gram.dtype)


def _fit_basis(weight: torch.Tensor, sparse: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """D minimising ||W - D S|| for a fixed S, through the k x k normal equations. A basis vector that no column
    uses keeps its previous value: solved, it would be zero, and a zero column of D with a zero row of S gets no
    gradient in recovery training, so that basis vector would stay dead."""
    gram = sparse @ sparse.T
    basis = torch.linalg.solve(gram + _ridge(gram, len(gram)), sparse @ weight.T).T
    used = sparse.abs().sum(dim=1) > 0
    return torch.where(used[None, :], basis, previous)


def _fit_kept_entries(weight: torch.Tensor, basis: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """S with the given support (n x s row indices per column) minimising ||W - D S||: one small least-squares
    problem per column, solved through its s x s normal equations."""
    k, n = basis.shape[1], weight.shape[1]
    gram = basis.T @ basis
    rhs = (basis.T @ weight).T.gather(1, support)  # n x s
    local = gram[support[:, :, None], support[:, None, :]]  # n x s x s
    coef = torch.linalg.solve(local + _ridge(gram, support.shape[1]), rhs.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(n, k, dtype=weight.dtype).scatter_(1, support, coef).T


def dense_sparse_factors(weight: torch.Tensor, rank: int, nnz: int, refinements: int = 3
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) with D S ~ weight (m x n): D (m x rank) with unit-norm columns, S (rank x n) with at most `nnz`
    non-zeros per column. Deterministic: SVD start, then `refinements` alternating least-squares passes."""
    w = weight.detach().double()
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    basis = u[:, :rank]
    coef = basis.T @ w
    support = coef.abs().topk(min(nnz, rank), dim=0).indices.T  # n x s: rows of S kept in each column
    sparse = torch.zeros_like(coef).scatter_(0, support.T, coef.gather(0, support.T))
    for _ in range(refinements):
        basis = _fit_basis(w, sparse, basis)
        sparse = _fit_kept_entries(w, basis, support)
    scale = basis.norm(dim=0).clamp(min=1e-30)
    return (sparse * scale[:, None]).float(), (basis / scale).float()


def relative_error(weight: torch.Tensor, sparse: torch.Tensor, basis: torch.Tensor) -> float:
    """||W - D S|| / ||W|| (Frobenius)."""
    w = weight.detach().double()
    return float((w - basis.double() @ sparse.double()).norm() / w.norm().clamp(min=1e-30))


def factorize(module: nn.Linear, rank: int, nnz: int, refinements: int) -> tuple[DenseSparseLinear, float]:
    """The dense-sparse replacement of a plain Linear (in its train/eval mode), and its relative error."""
    sparse, basis = dense_sparse_factors(module.weight, rank, nnz, refinements)
    new = DenseSparseLinear(module.in_features, module.out_features, rank, nnz, bias=module.bias is not None)
    with torch.no_grad():
        new.first.weight.copy_(sparse)
        new.second.weight.copy_(basis)
        if module.bias is not None:
            new.second.bias.copy_(module.bias)
    return new.train(module.training), relative_error(module.weight, sparse, basis)


class DenseSparse(Factorization[DenseSparseConfig], name="dense_sparse", version=1,
                  summary="dense-sparse factorization W ~ D S (DSFormer): dense basis, s non-zeros per column of S"):
    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        decisions = []
        for li, name, parent, module in model.linears(cfg.linears_of(model)):
            m, n = module.out_features, module.in_features
            entry = {"layer": li, "linear": name, "shape": [m, n]}
            if isinstance(module, LowRankLinear):
                decisions.append({**entry, "rank": None, "why": f"skipped: already factorized ({module.shape().kind},"
                                                               f" rank {module.rank})"})
                continue
            if not m or not n:
                decisions.append({**entry, "rank": None, "why": "skipped: no weights (every unit pruned)"})
                continue
            k = basis_size(cfg.rank, m, n, cfg.round_to)
            s = nnz_per_column(cfg.nnz, k)
            if stored_params(m, n, k, s) >= m * n:
                decisions.append({**entry, "rank": None, "why": f"dense: basis {k} with {s} non-zeros per column "
                                                               "stores no fewer weights"})
                continue
            new, error = factorize(module, k, s, cfg.refinements)
            setattr(parent, name, new)
            decisions.append({**entry, "rank": k, "nnz": s, "params": stored_params(m, n, k, s),
                              "dense_params": m * n, "relative_error": round(error, 5)})
        done = [d for d in decisions if d["rank"]]
        if not done:
            raise RecipeError("dense_sparse factorized nothing: every chosen linear is already factorized, empty, "
                              "or would store no fewer weights at this basis size and nnz.",
                              "lower `rank` or `nnz`, or choose other `linears`.")
        errors = [d["relative_error"] for d in done]
        before, after = sum(d["dense_params"] for d in done), sum(d["params"] for d in done)
        info(f"    factorized {len(done)} of {len(decisions)} linears: weights {before:,} -> {after:,}, relative "
             f"error mean {sum(errors) / len(errors):.3f}, max {max(errors):.3f}")
        return StageResult(model, {
            "linears": decisions,
            "relative_error": {"mean": round(sum(errors) / len(errors), 5), "max": max(errors)},
            "stored_params": {"before": before, "after": after},
        })
