"""Binarized attention (EcoFormer): replace softmax attention in chosen layers by hashed linear attention.

For each chosen layer, in order (so a layer is calibrated on what the already-binarized layers before it produce):
1. run the model on calibration data and capture the layer's attention input; compute its per-head queries and keys;
2. similarity targets from the layer's own softmax scores q.k: for every query, +1 for its `top_k` highest-scoring
   keys, -1 for its `top_k` lowest, 0 elsewhere (padded keys never count);
3. anchors: a seeded sample of the unit-normalised calibration queries and keys; kernel width: their mean squared
   distance to the anchors; feature mean: the mean RBF feature (EcoFormer's centring);
4. projections by the EcoFormer (KSH) objective: maximise sum_ij S_ij h(q_i).h(k_j) / (nnz b) over relaxed codes
   tanh(phi A), by Adam for `hash_steps`; the sign codes of the learned projections are kept only if they agree with
   the targets better than the random start did (as EcoFormer keeps the better of its two);
5. swap in EcoAttention with the layer's q, k, v, o weights.
The stage's details report, per layer, the code agreement with the targets (1 = every top key shares the query's
code, every bottom key is its opposite) and how close the new attention's output is to the old one on calibration
data. Recovery is the `distill` stage after this one.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal, Optional, Union

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from ..errors import RecipeError
from ..models.canonical import MASK_NEG, CanonicalTransformer, LayerShape
from ..models.ecoformer import EcoAttention, binarize as sign_codes, rbf_features, squared_distances, unit_columns
from ..models.tasks import cosine_rows, label_agreement
from ..progress import info, progress_bar
from ..space import searchable
from .base import Context, Stage, StageConfig, StageResult
from .importance import calibration_batches


class BinarizeConfig(StageConfig):
    layers: Union[Literal["all"], list[int]] = Field("all", description="layer indices (0-based) to binarize, or all")
    bits: int = Field(16, ge=1, le=256, description="hash code width b",
                      json_schema_extra=searchable(choices=[8, 16, 32]))
    anchors: int = Field(25, ge=1, le=4096, description="RBF anchors m per head")
    top_k: int = Field(10, ge=1, description="per query: the k highest and k lowest scoring keys are the targets")
    calibration_examples: int = Field(128, ge=4, le=100000, description="train examples whose attention the hash is "
                                                                         "fitted to")
    hash_steps: int = Field(200, ge=0, le=100000, description="Adam steps fitting the hash projections")
    hash_lr: float = Field(0.05, gt=0, lt=10, description="Adam learning rate fitting the hash projections")

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, v):
        if isinstance(v, list) and (not v or min(v) < 0):
            raise ValueError("must be `all` or a non-empty list of layer indices >= 0")
        return v


# -- pure functions -----------------------------------------------------------------------------------------------

def similarity_targets(scores: torch.Tensor, valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """+1 / -1 / 0 targets (n, heads, t, t) from attention scores (n, heads, t, t) and valid tokens (n, t) bool.

    Per valid query, +1 on its k highest-scoring valid keys and -1 on its k lowest, with k = min(top_k, valid/2) so
    the two sets never overlap in a short sequence; padded queries and keys get 0."""
    n_valid = valid.sum(-1).view(-1, 1, 1, 1)
    k = torch.clamp(n_valid // 2, max=top_k)
    ranked = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0 = highest; padded keys rank last
    targets = (rank < k).float() - ((rank >= n_valid - k) & (rank < n_valid)).float()
    return targets * valid[:, None, :, None]


def code_agreement(hq: torch.Tensor, hk: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over target pairs of S_ij hq_i.hk_j / b, per head: 1 when every +1 pair has equal codes and every -1
    pair opposite ones; about 0 for unrelated codes. hq, hk (n, heads, b, t); targets (n, heads, t, t).
    Computed as S Hk: never a second t x t tensor."""
    bits = hq.shape[-2]
    agree = (hq.transpose(-1, -2) * torch.matmul(targets, hk.transpose(-1, -2))).sum(dim=(0, 2, 3))
    return agree / (targets.abs().sum(dim=(0, 2, 3)).clamp(min=1) * bits)


def pick_anchors(points: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """m distinct rows of points (heads, p, d), the same row positions for every head: a seeded sample."""
    idx = torch.randperm(points.shape[1], generator=generator)[:m]
    return points[:, idx].clone()


def kernel_statistics(xs: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(width (heads,1,1), feature mean (heads,m,1)) for points xs (heads, d, p): the width is the mean squared
    distance of the unit-normalised points to the anchors (EcoFormer's), the mean their mean RBF feature."""
    width = squared_distances(unit_columns(xs), anchors).mean(dim=(1, 2)).view(-1, 1, 1)
    mean = rbf_features(xs, anchors, width, torch.zeros(1)).mean(-1, keepdim=True)
    return width, mean


def fit_projections(phi_q: torch.Tensor, phi_k: torch.Tensor, targets: torch.Tensor, bits: int, steps: int,
                    lr: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Query and key projections (heads, b, m) maximising the agreement of tanh-relaxed codes with the targets.

    phi_q, phi_k (n, heads, m, t) centred RBF features. Both projections start from one seeded Gaussian matrix (the
    shared-hash EcoFormer case). Returns the projections whose sign codes agree best (learned, or the start) and
    the agreement of each per head."""
    heads, m = phi_q.shape[1], phi_q.shape[-2]
    start = torch.randn(heads, bits, m, generator=generator)
    pq, pk = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    opt = torch.optim.Adam([pq, pk], lr=lr)
    with progress_bar("binarize: hash functions", steps) as advance:
        for _ in range(steps):
            relaxed_q, relaxed_k = torch.tanh(torch.matmul(pq, phi_q)), torch.tanh(torch.matmul(pk, phi_k))
            loss = -code_agreement(relaxed_q, relaxed_k, targets).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            advance(agreement=-loss.item())

    def agreement(aq, ak):
        return code_agreement(sign_codes(torch.matmul(aq, phi_q)), sign_codes(torch.matmul(ak, phi_k)), targets)

    with torch.no_grad():
        before, after = agreement(start, start), agreement(pq.detach(), pk.detach())
    better = (after >= before).view(-1, 1, 1)  # per head: the learned projection only where it helps
    return {"query": torch.where(better, pq.detach(), start), "key": torch.where(better, pk.detach(), start),
            "start_agreement": before, "agreement": torch.maximum(before, after)}


# -- calibration capture ------------------------------------------------------------------------------------------

def _attention_inputs(model: CanonicalTransformer, layer: int,
                      batches) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(x, mask_add) that layer's attention receives, per calibration batch, in the model as it stands."""
    captured = []
    hook = model.layers[layer].attn.register_forward_pre_hook(lambda _m, args: captured.append(args))
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                model(*inputs)
    finally:
        hook.remove()
    return [(x.detach(), mask) for x, mask in captured]


def _valid(x: torch.Tensor, mask_add: Optional[torch.Tensor]) -> torch.Tensor:
    if mask_add is None:
        return torch.ones(x.shape[:2], dtype=torch.bool)
    return mask_add[:, 0, 0, :] > MASK_NEG / 2


def _heads(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    b, t, _ = x.shape
    return getattr(attn, name)(x).reshape(b, t, attn.heads, attn.head_dim).transpose(1, 2)


def _padded_cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Concatenate along axis 0, zero- (False-) padding axis `dim` (the sequence) to the longest."""
    t = max(x.shape[dim] for x in tensors)
    out = []
    for x in tensors:
        padded = x.new_zeros(x.shape[:dim] + (t,) + x.shape[dim + 1:])
        padded.narrow(dim, 0, x.shape[dim]).copy_(x)
        out.append(padded)
    return torch.cat(out)


# -- the stage ----------------------------------------------------------------------------------------------------

class Binarize(Stage[BinarizeConfig], name="binarize", version=1,
               summary="EcoFormer binarized attention: hashed queries/keys, attention linear in sequence length"):
    excludes = frozenset({"binarized"})
    provides = frozenset({"binarized"})
    reasons = {"binarized": "a layer that already has EcoFormer attention cannot have its hash fitted to softmax "
                            "targets again"}

    def effects(self):
        full = super().effects()
        return full if self.config.layers == "all" else replace(full, provides=frozenset())

    def min_layers(self) -> tuple[int, str]:
        layers = self.config.layers
        return (0, "") if layers == "all" else (max(layers) + 1, f"it binarizes layer {max(layers)}")

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        chosen = list(range(len(model.layers))) if cfg.layers == "all" else sorted(set(cfg.layers))
        if chosen and chosen[-1] >= len(model.layers):
            raise RecipeError(f"binarize layers {[i for i in chosen if i >= len(model.layers)]} do not exist: the "
                              f"model has {len(model.layers)} layers.",
                              f"use indices 0-{len(model.layers) - 1}, or `layers: all`.")
        for li in chosen:
            if isinstance(model.layers[li].attn, EcoAttention):
                raise RecipeError(f"layer {li} already has EcoFormer attention; its hash cannot be fitted to softmax "
                                  "targets again.", "binarize each layer once (drop it from `layers`).")
        batches = calibration_batches(ctx, cfg.calibration_examples)
        model.eval()
        with torch.no_grad():
            before = torch.cat([model(*inputs) for inputs, _ in batches])
        report = []
        for li in chosen:
            if model.layers[li].attn.heads == 0:
                report.append({"layer": li, "skipped": "no attention heads left"})
                continue
            report.append(self._binarize_layer(model, li, batches, torch.Generator().manual_seed(ctx.seed + li)))
            r = report[-1]
            info(f"    layer {li}: code agreement {r['code_agreement']:.3f} (random hash {r['random_agreement']:.3f}),"
                 f" attention output cosine {r['attention_output_cosine']:.3f}")
        with torch.no_grad():
            after = torch.cat([model(*inputs) for inputs, _ in batches])
        summary = {"layers": report, "output_cosine": float(cosine_rows(before, after).mean())}
        if model.task.has_labels:
            summary["label_agreement"] = label_agreement(before, after)
        return StageResult(model, summary)

    def _binarize_layer(self, model: CanonicalTransformer, li: int, batches, generator: torch.Generator) -> dict:
        cfg = self.config
        old = model.layers[li].attn
        captured = _attention_inputs(model, li, batches)
        with torch.no_grad():
            q = _padded_cat([_heads(old, "q", x) for x, _ in captured], 2)
            k = _padded_cat([_heads(old, "k", x) for x, _ in captured], 2)
            valid = _padded_cat([_valid(x, m) for x, m in captured], 1)
            # q.k ranks keys as the softmax scores do (the 1/sqrt(d) scale changes no ranking)
            targets = similarity_targets(torch.matmul(q, k.transpose(-1, -2)), valid, cfg.top_k)
            tokens = torch.cat([q.transpose(0, 1)[:, valid], k.transpose(0, 1)[:, valid]], dim=1)  # (heads, p, d)
            if tokens.shape[1] < cfg.anchors:
                raise RecipeError(f"binarize needs at least {cfg.anchors} calibration tokens for its anchors; layer "
                                  f"{li} saw {tokens.shape[1]}.", "raise calibration_examples or lower anchors.")
            anchors = pick_anchors(F.normalize(tokens, dim=-1), cfg.anchors, generator)
            width, mean = kernel_statistics(tokens.transpose(-1, -2), anchors)
            phi_q, phi_k = (rbf_features(x.transpose(-1, -2), anchors, width, mean) for x in (q, k))
        fit = fit_projections(phi_q, phi_k, targets, cfg.bits, cfg.hash_steps, cfg.hash_lr, generator)

        shape = LayerShape(**{**model.layers[li].shape.model_dump(), "attention": "ecoformer",
                              "hash_bits": cfg.bits, "anchors": cfg.anchors})
        new = EcoAttention(model.spec.hidden, shape)
        for name in ("q", "k", "v", "o"):
            getattr(new, name).load_state_dict(getattr(old, name).state_dict())
        with torch.no_grad():
            new.anchors.copy_(anchors)
            new.kernel_width.copy_(width)
            new.feature_mean.copy_(mean)
            new.query_projection.copy_(fit["query"])
            new.key_projection.copy_(fit["key"])
        new.train(old.training)
        cosines = []
        with torch.no_grad():  # per real token: the old attention's output against the new one's
            for x, m in captured:
                valid = _valid(x, m)
                cosines.append(cosine_rows(old(x, m)[valid], new(x, m)[valid]))
        model.layers[li].attn = new
        return {"layer": li, "code_agreement": float(fit["agreement"].mean()),
                "random_agreement": float(fit["start_agreement"].mean()),
                "per_head_agreement": [round(float(a), 4) for a in fit["agreement"]],
                "attention_output_cosine": float(np.concatenate(cosines).mean())}
