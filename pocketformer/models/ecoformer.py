"""EcoFormer attention: queries and keys hashed into b-bit {-1,+1} codes, attention linear in sequence length.

Each head hashes a vector x (query or key) with a kernelized hash function (KSH, as EcoFormer):
    u = x / |x|                                       scale-free, so RBF distance tracks cosine similarity
    phi_m = exp(-|u - a_m|^2 / (2 w)) - mu_m          RBF kernel to m anchors a_m, width w, centred by mu
    h = sign(A phi)                                   b bits; a straight-through estimator while training
and attends with the codes' inner products shifted positive by a bias (EcoFormer's b + 1):
    out_i = sum_j (h_i.h_j + bias) v_j / sum_j (h_i.h_j + bias),
computed as h_i (H^T V): the only sequence-sized tensors are t x b and t x d, never t x t.

Queries, keys and codes are laid out feature-major, (..., d, t) and (..., b, t): every per-head constant (anchors,
projections) then multiplies from the left. ONNX Runtime's dynamic int8 quantizer only touches a MatMul whose
right-hand side is a constant, and its per-channel kernels reject per-head (3-D) weights, so the hash functions
stay float while the linears are quantized; and H^T V needs no transpose.

One deviation from the public code (ziplab/EcoFormer), which hashes a shared query-key projection: BERT-family
models project queries and keys separately, so each head has a query projection and a key projection over the same
anchors (equal projections are the EcoFormer case). Anchors, widths, means and projections are buffers, learned on
calibration data by the `binarize` stage and then fixed, as in EcoFormer; recovery training reaches q and k through
the straight-through estimator.

Only ops that ONNX, litert-torch and coremltools all convert: matmul, exp, sign, pad, sum, rsqrt, division.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn import functional as F

from .canonical import MASK_NEG, Attention, LayerShape, register_attention

NORM_EPS = 1e-12  # keeps an all-zero query or key finite; far below any real vector's squared norm


# -- pure functions: vectors and codes feature-major, (..., heads, d, t) and (..., heads, b, t) -------------------

def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """Each vector (axis -2) scaled to unit length."""
    return x * torch.rsqrt((x * x).sum(-2, keepdim=True) + NORM_EPS)


def squared_distances(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """|a_m - x_t|^2 for x (..., heads, d, t) and anchors (heads, m, d) -> (..., heads, m, t), by matmul (no
    m x d x t broadcast)."""
    return ((anchors * anchors).sum(-1, keepdim=True) - 2.0 * torch.matmul(anchors, x)
            + (x * x).sum(-2, keepdim=True))


def rbf_features(x: torch.Tensor, anchors: torch.Tensor, width: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Centred RBF kernel of unit-normalised x to the anchors: (..., heads, d, t) -> (..., heads, m, t).
    width (heads, 1, 1), mean (heads, m, 1)."""
    return torch.exp(squared_distances(unit_columns(x), anchors) / (-2.0 * width)) - mean


def binarize(logits: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """sign(logits) in {-1, +1}. With `straight_through`, the backward pass is the gradient of clamp(logits, -1, 1)
    (EcoFormer's estimator): identity inside [-1, 1], zero where the sign is saturated."""
    codes = torch.sign(logits)
    if not straight_through:
        return codes
    clipped = logits.clamp(-1.0, 1.0)
    return clipped + (codes - clipped).detach()


def hash_codes(x: torch.Tensor, anchors: torch.Tensor, width: torch.Tensor, mean: torch.Tensor,
               projection: torch.Tensor, straight_through: bool = False) -> torch.Tensor:
    """b-bit codes of x (..., heads, d, t) with projection (heads, b, m) -> (..., heads, b, t)."""
    return binarize(torch.matmul(projection, rbf_features(x, anchors, width, mean)), straight_through)


def keep_from_mask(mask_add: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The canonical additive mask (batch, 1, 1, t) of 0 / MASK_NEG as key weights of 1 / 0, same shape."""
    if mask_add is None:
        return None
    return 1.0 - mask_add * (1.0 / MASK_NEG)


def linear_attention(hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
                     bias: float) -> torch.Tensor:
    """out_i = sum_j keep_j (hq_i.hk_j + bias) v_j / sum_j keep_j (hq_i.hk_j + bias), as hq_i (Hk^T V).

    hq, hk (..., b, t); v (..., t, d); keep (batch, 1, 1, t) or None -> (..., t, d). The bias and the denominator
    ride along as one extra row or column each: hq gets a row of `bias`, hk a row of ones (so the augmented inner
    product is hq.hk + bias), v a column of ones (so the last output column is the denominator). A padded key's
    augmented code is zeroed, so it adds to neither sum."""
    hq = F.pad(hq, (0, 0, 0, 1), value=float(bias))
    hk = F.pad(hk, (0, 0, 0, 1), value=1.0)
    if keep is not None:
        hk = hk * keep
    v = F.pad(v, (0, 1), value=1.0)
    summed = torch.matmul(hq.transpose(-1, -2), torch.matmul(hk, v))  # (..., t, d + 1)
    return summed[..., :-1] / summed[..., -1:]


def quadratic_attention(hq: torch.Tensor, hk: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor],
                        bias: float) -> torch.Tensor:
    """The same attention with its t x t weight matrix written out: the reference `linear_attention` must equal."""
    weights = torch.matmul(hq.transpose(-1, -2), hk) + bias
    if keep is not None:
        weights = weights * keep
    return torch.matmul(weights, v) / weights.sum(-1, keepdim=True)


# -- the module ---------------------------------------------------------------------------------------------------

@register_attention("ecoformer")
class EcoAttention(Attention):
    """Canonical attention (the same q, k, v, o) with EcoFormer's hashed linear attention in place of softmax."""

    def __init__(self, hidden: int, shape: LayerShape):
        super().__init__(hidden, shape)
        if shape.hash_bits < 1 or shape.anchors < 1:
            raise ValueError(f"ecoformer attention needs hash_bits >= 1 and anchors >= 1, got {shape.hash_bits} "
                             f"and {shape.anchors}")
        h, m, b, d = shape.heads, shape.anchors, shape.hash_bits, shape.head_dim
        # Untrained values still hash sensibly (random unit anchors, random hyperplanes); `binarize` learns them.
        self.register_buffer("anchors", F.normalize(torch.randn(h, m, d), dim=-1))
        self.register_buffer("kernel_width", torch.ones(h, 1, 1))
        self.register_buffer("feature_mean", torch.zeros(h, m, 1))
        self.register_buffer("query_projection", torch.randn(h, b, m))
        self.register_buffer("key_projection", self.query_projection.clone())

    @property
    def hash_bits(self) -> int:
        return self.query_projection.shape[1]

    @property
    def n_anchors(self) -> int:
        return self.anchors.shape[1]

    @property
    def bias(self) -> float:
        """Keeps every weight h_i.h_j + bias >= 1 (EcoFormer's b + 1), so the denominator never vanishes."""
        return float(self.hash_bits + 1)

    def shape_fields(self) -> dict[str, Any]:
        return {"attention": "ecoformer", "hash_bits": self.hash_bits, "anchors": self.n_anchors}

    @staticmethod
    def mixing_macs(shape: LayerShape, tokens: int) -> int:
        """RBF to anchors, projection to codes, then h_i (H^T V): linear in the tokens."""
        s = shape
        return tokens * s.heads * (s.anchors * s.head_dim + s.anchors * s.hash_bits + 2 * s.hash_bits * s.head_dim)

    def codes(self, x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """Codes (..., heads, b, t) of queries or keys (..., heads, d, t)."""
        return hash_codes(x, self.anchors, self.kernel_width, self.feature_mean, projection,
                          straight_through=self.training)

    def forward(self, x: torch.Tensor, mask_add: Optional[torch.Tensor]) -> torch.Tensor:
        if self.heads == 0:
            return self.o.bias.expand_as(x)
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim).permute(0, 2, 3, 1)  # (b, heads, d, t)
        k = self.k(x).reshape(b, t, self.heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)  # (b, heads, t, d)
        ctx = linear_attention(self.codes(q, self.query_projection), self.codes(k, self.key_projection), v,
                               keep_from_mask(mask_add), self.bias)
        return self.o(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def keep_heads(self, keep: list[int]) -> None:
        super().keep_heads(keep)
        idx = torch.as_tensor(keep, dtype=torch.long)
        for name in ("anchors", "kernel_width", "feature_mean", "query_projection", "key_projection"):
            setattr(self, name, getattr(self, name)[idx].clone())
