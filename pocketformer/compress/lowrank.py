"""Low-rank factorization (LRT): each chosen Linear W (m x n) becomes V (r x n) then U (m x r) from truncated SVD.

The rank of each linear comes from one of:
- energy: the smallest r keeping `energy` of the squared singular values (per linear);
- budget: keep `budget` of the chosen linears' parameters overall, spent greedily where a rank buys the most relative
  energy per parameter (so layers that compress well give up more);
- ranks: given by name (`{fc1: 128}`) or one number for every chosen linear.
A factorization only saves work when r (m + n) < m n, i.e. r < mn/(m+n): linears where it would not are left dense.
Ranks are rounded up to multiples of `round_to` so matmul shapes stay kernel-friendly. Recovery is the `distill`
stage after this one.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from pydantic import Field, model_validator

from ..errors import RecipeError
from ..models.canonical import CanonicalTransformer
from ..models.factorized import LowRankLinear
from ..progress import info
from ..space import searchable
from .amounts import round_to_multiple
from .base import ALL_LINEARS, Context, Factorization, FactorizationConfig, StageResult


class LowRankConfig(FactorizationConfig):
    method: Literal["energy", "budget", "ranks"] = Field("budget", description="how each rank is chosen: energy, "
                                                         "budget or ranks (see the settings of each)")
    energy: float = Field(0.9, gt=0, le=1, description="energy method: fraction of squared singular values kept",
                          json_schema_extra=searchable(0.5, 0.99))
    budget: float = Field(0.5, gt=0, lt=1, description="budget method: fraction of the chosen linears' params kept",
                          json_schema_extra=searchable(0.1, 0.9))
    ranks: Union[int, dict[str, int]] = Field(0, description="ranks method: one rank, or a rank per linear name")
    round_to: int = Field(8, ge=1, le=256, description="ranks rounded up to multiples of this (matmul shapes stay "
                                                       "kernel-friendly)")

    @model_validator(mode="after")
    def _ranks_given(self):
        if self.method == "ranks" and not self.ranks:
            raise ValueError("method 'ranks' needs `ranks`: one number, or a number per linear name (e.g. fc1: 128)")
        if isinstance(self.ranks, dict):
            unknown = sorted(set(self.ranks) - set(ALL_LINEARS))
            if unknown:
                raise ValueError(f"unknown linear names {unknown} in ranks; use {', '.join(ALL_LINEARS)}")
        return self


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U) with U @ V the best rank-`rank` approximation of `weight`; the singular values split evenly."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root[None, :]).float()


def break_even_rank(m: int, n: int) -> float:
    """Below this rank, two factors hold fewer weights (and cost fewer MACs) than the dense matrix."""
    return m * n / (m + n)


def energy_rank(singular: torch.Tensor, energy: float) -> int:
    cum = torch.cumsum(singular.double() ** 2, 0)
    return int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1


def budget_ranks(spectra: list[torch.Tensor], shapes: list[tuple[int, int]], budget: float) -> list[int]:
    """Ranks keeping `budget` of the total dense parameters, spent greedily on the rank-one pieces with the most
    relative energy per parameter."""
    total = sum(m * n for m, n in shapes)
    gains = []
    for i, (s, (m, n)) in enumerate(zip(spectra, shapes)):
        rel = (s.double() ** 2) / (s.double() ** 2).sum()
        gains.extend((float(g) / (m + n), i) for g in rel)
    ranks = [0] * len(spectra)
    spent = 0
    for _, i in sorted(gains, key=lambda t: -t[0]):
        m, n = shapes[i]
        if spent + m + n > budget * total:
            continue
        ranks[i] += 1
        spent += m + n
    return ranks


class LowRank(Factorization[LowRankConfig], name="lowrank", version=1,
              summary="low-rank factorization of linears by truncated SVD (rank by energy, budget or list)"):
    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        chosen, decisions = [], []
        for li, name, parent, module in model.linears(cfg.linears_of(model)):
            if isinstance(module, LowRankLinear):  # factorizing the factors again would buy nothing
                decisions.append({"layer": li, "linear": name, "rank": None,
                                  "why": f"skipped: already factorized ({module.shape().kind}, rank {module.rank})"})
            elif module.weight.numel():
                chosen.append((li, name, parent, module))
        spectra = [torch.linalg.svdvals(m.weight.detach().double()) for *_, m in chosen]
        shapes = [tuple(m.weight.shape) for *_, m in chosen]
        if cfg.method == "energy":
            ranks = [energy_rank(s, cfg.energy) for s in spectra]
        elif cfg.method == "budget":
            ranks = budget_ranks(spectra, shapes, cfg.budget)
        else:
            ranks = [cfg.ranks if isinstance(cfg.ranks, int) else cfg.ranks.get(name, 0)
                     for _, name, *_ in chosen]
        for (li, name, parent, module), r, (m, n), s in zip(chosen, ranks, shapes, spectra):
            r = round_to_multiple(r, cfg.round_to, "up", min(m, n)) if r else 0
            kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum()) if r else 0.0
            if not r or r >= break_even_rank(m, n):
                decisions.append({"layer": li, "linear": name, "shape": [m, n], "rank": None,
                                  "why": "dense: a factorization at this rank saves nothing"})
                continue
            v, u = svd_factors(module.weight, r)
            new = LowRankLinear(n, m, r, bias=module.bias is not None)
            with torch.no_grad():
                new.first.weight.copy_(v)
                new.second.weight.copy_(u)
                if module.bias is not None:
                    new.second.bias.copy_(module.bias)
            setattr(parent, name, new)
            decisions.append({"layer": li, "linear": name, "shape": [m, n], "rank": r, "energy_kept": round(kept, 4)})
        factorized = [d for d in decisions if d["rank"]]
        if not factorized:
            raise RecipeError("lowrank factorized nothing: every chosen linear is already factorized or would need "
                              "a rank at or above mn/(m+n), where two factors are no smaller than one matrix.",
                              "lower `energy`, lower `budget`, give smaller `ranks`, or choose other `linears`.")
        info(f"    factorized {len(factorized)} of {len(decisions)} linears; ranks "
             + ", ".join(f"L{d['layer']}.{d['linear']}={d['rank']}" for d in factorized[:12])
             + (" ..." if len(factorized) > 12 else ""))
        return StageResult(model, {"linears": decisions})
