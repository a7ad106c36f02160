"""The canonical decoder-only language model: what every LM importer maps into and every LM stage and exporter speaks.

The same idea as the encoder (pocketformer.models.canonical): one module, every layer its own shapes, so a pruned or
MatFormer-sliced model is still this module. It covers the Llama / SmolLM, Qwen2 and Gemma 3 families:

- pre-norm RMSNorm (Gemma: weight stored as w with (1 + w) applied; optional sandwich norms after attention and FFN);
- rotary positions with a base (and linear scale factor) per layer, so Gemma 3's local and global layers fit;
- grouped-query attention with per-layer query and key-value head counts, optional per-head q/k RMSNorm (Gemma 3),
  q/k/v biases (Qwen2), a per-model query scale (Gemma's query_pre_attn_scalar), sliding-window layers, optional
  attention-logit soft-capping;
- gated FFNs (SwiGLU or GeGLU) with per-layer width;
- token embedding scaled (Gemma: sqrt(hidden)), tied or untied output embedding, optional final soft-capping.

Built from ops ONNX, litert-torch and coremltools all convert: no data-dependent control flow, GQA by expand and
reshape (no repeat_interleave), a finite additive mask. The forward takes past key-values and can return the present
ones in the Optimum / ONNX Runtime GenAI layout ([batch, kv_heads, length, head_dim] per layer), so the exporters
wrap this module rather than re-implement it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional as F

from ..registry import member_of
from .factorized import LinearShape, build_linear, linear_macs, linear_shape, take_cols, take_rows
from .signature import GraphIO, TensorSpec
from .canonical import Described
from .tasks import TASKS

# Additive mask value for positions a query must not see: exp() of it is 0 in fp32 and it stays finite in fp16.
MASK_NEG = -1.0e4
LM_LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class DecoderLayerShape(BaseModel):
    """One decoder layer's shapes: query heads, key-value heads (each serving heads / kv_heads query heads), head
    width, FFN width, attention window (0: the whole context) and rotary base."""

    model_config = ConfigDict(extra="forbid")
    heads: int = Field(ge=0)
    kv_heads: int = Field(ge=0)
    head_dim: int = Field(ge=1)
    ffn: int = Field(ge=0)
    window: int = Field(0, ge=0, description="sliding attention window, in tokens including the query's own (0: none)")
    rope_base: float = Field(10000.0, gt=0)
    rope_factor: float = Field(1.0, gt=0, description="linear position scaling (positions / factor)")
    linears: dict[str, LinearShape] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _groups(self):
        if (self.kv_heads == 0) != (self.heads == 0) or (self.kv_heads and self.heads % self.kv_heads):
            raise ValueError(f"{self.heads} query heads do not split into groups over {self.kv_heads} key-value heads")
        return self

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 0

    def summary(self) -> dict[str, Any]:
        return self.model_dump(exclude_defaults=True)


class CausalLMConfig(BaseModel):
    """Everything needed to rebuild a decoder without the source model's code."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["causal_lm"] = "causal_lm"
    family: str = Field(description="the source family (llama, qwen2, gemma3): provenance, and the layout name app "
                                    "runtimes expect")
    hidden: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    layers: list[DecoderLayerShape]
    max_positions: int = Field(ge=1, description="the longest context the source was trained for")
    eps: float = 1e-6
    act: Literal["silu", "gelu_tanh"] = "silu"
    norm_offset: float = Field(0.0, description="RMSNorm scales by (norm_offset + weight): 1 for Gemma, 0 otherwise")
    qk_norm: bool = False
    sandwich_norm: bool = Field(False, description="norms after attention and after the FFN too (Gemma 2/3)")
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    query_scale: Optional[float] = Field(None, description="scores are multiplied by this (None: head_dim ** -0.5)")
    embed_scale: float = 1.0
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    tie_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = Field(default_factory=list)
    pad_token_id: int = 0
    add_bos: bool = False
    quantization: dict[str, Any] = Field(default_factory=dict)
    nested_ffn: list[float] = Field(default_factory=list, description=(
        "MatFormer: FFN neurons sorted so that every prefix is the best sub-network of its width; these are the "
        "width fractions trained jointly (`pocketformer extract` cuts them out)"))
    task_kind: str = "causal_lm"
    _known_task = member_of("task_kind", lambda: TASKS, "task")

    @property
    def task(self) -> str:
        return self.task_kind

    @property
    def modality(self) -> str:
        return "text"

    def inputs(self) -> tuple[TensorSpec, ...]:
        """The cached decoder's inputs, in the Optimum / ONNX Runtime GenAI layout: the new tokens, the mask over
        past + new tokens (1: a real token), the new tokens' positions, and each layer's past keys and values."""
        past = [TensorSpec(f"past_key_values.{i}.{kv}", "float32", ("batch", s.kv_heads, "past", s.head_dim))
                for i, s in enumerate(self.layers) for kv in ("key", "value")]
        return (TensorSpec("input_ids", "int64", ("batch", "sequence"), pad=self.pad_token_id),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ("batch", "sequence")), *past)

    def outputs(self) -> tuple[TensorSpec, ...]:
        """Each layer's present keys and values (past + new), then the logits: the task's output comes last."""
        present = [TensorSpec(f"present.{i}.{kv}", "float32", ("batch", s.kv_heads, "total", s.head_dim))
                   for i, s in enumerate(self.layers) for kv in ("key", "value")]
        return (*present, TensorSpec("logits", "float32", ("batch", "sequence", self.vocab_size)))

    def axis_bounds(self) -> dict[str, int]:
        return {"batch": 64, "sequence": self.max_positions, "past": self.max_positions, "total": self.max_positions}

    def fixed_cache_io(self, tokens: int, context: int) -> GraphIO:
        """A fixed-shape graph over a cache of `context` slots (batch 1), taking `tokens` new tokens: LiteRT-LM's
        names (`tokens`, `input_pos`, `kv_cache_k_N` / `kv_cache_v_N` in and out, `logits`), each layer's cache as
        (1, kv_heads, context, head_dim)."""
        cache = [TensorSpec(f"kv_cache_{kv}_{i}", "float32", (1, s.kv_heads, context, s.head_dim))
                 for i, s in enumerate(self.layers) for kv in ("k", "v")]
        inputs = (TensorSpec("tokens", "int32", (1, tokens), pad=self.pad_token_id),
                  TensorSpec("input_pos", "int32", (tokens,)), *cache)
        return GraphIO(inputs, (*cache, TensorSpec("logits", "float32", (1, tokens, self.vocab_size))),
                       {"context": context})


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in fp32 (as Llama and Gemma do).

    `scaled` (set by `fp16_safe_norms` for a converter that computes in fp16 and drops the fp32 casts): x is divided
    by its row's largest magnitude before it is squared, the same value in exact arithmetic. Unscaled, x * x is inf
    in fp16 past |x| = 256, and real models' residual streams go far past it (SmolLM2-135M's reaches 25,000 in one
    channel: its fp16 Core ML program gave cosine -0.008 against PyTorch)."""

    scaled = False

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if offset == 0 else torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.scaled:  # x / rms(x) = y / sqrt(mean(y^2) + eps / s^2) for y = x / s; s >= 1 keeps eps / s^2 finite
            s = x.abs().amax(-1, keepdim=True).clamp_min(1.0)
            y = x / s
            x = y * torch.rsqrt((y * y).mean(-1, keepdim=True) + self.eps / (s * s))
        else:
            x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (x * w).to(dtype)


@contextmanager
def fp16_safe_norms(module: nn.Module):
    """Every RMSNorm in `module` scaled (see RMSNorm) while a converter that computes in fp16 traces it."""
    norms = [m for m in module.modules() if isinstance(m, RMSNorm)]
    for m in norms:
        m.scaled = True
    try:
        yield module
    finally:
        for m in norms:
            del m.scaled


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """cos and sin of position x inverse frequency, for one (base, factor): the HF rotate-half layout."""

    def __init__(self, head_dim: int, base: float, factor: float):
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv / factor, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (batch, seq, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (batch, 1, seq, head_dim)
        return emb.cos(), emb.sin()


class DecoderAttention(nn.Module):
    def __init__(self, cfg: CausalLMConfig, shape: DecoderLayerShape):
        super().__init__()
        h = cfg.hidden
        self.heads, self.kv_heads, self.head_dim, self.window = shape.heads, shape.kv_heads, shape.head_dim, \
            shape.window
        self.scale = cfg.query_scale if cfg.query_scale is not None else shape.head_dim ** -0.5
        self.softcap = cfg.attn_softcap
        lin = shape.linears
        self.q = build_linear(h, shape.heads * shape.head_dim, lin.get("q"), bias=cfg.qkv_bias)
        self.k = build_linear(h, shape.kv_heads * shape.head_dim, lin.get("k"), bias=cfg.qkv_bias)
        self.v = build_linear(h, shape.kv_heads * shape.head_dim, lin.get("v"), bias=cfg.qkv_bias)
        self.o = build_linear(shape.heads * shape.head_dim, h, lin.get("o"), bias=cfg.o_bias)
        self.q_norm = RMSNorm(shape.head_dim, cfg.eps, cfg.norm_offset) if cfg.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, cfg.eps, cfg.norm_offset) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (batch, heads, seq, head_dim) and this step's k, v (batch, kv_heads, seq, head_dim), rotary applied."""
        b, s, _ = x.shape
        q = self.q(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        """Attention of q over the whole cache k, v (batch, kv_heads, total, head_dim), then the output projection.

        Each key-value head serves g query heads (heads kv*g .. kv*g+g-1): the g heads' queries are stacked as g*s
        rows against their one key-value head, never the keys and values copied g times. Copying them (expand)
        costs a copy of the whole cache per layer and step: measured in LiteRT on a tiny 2-layer Llama with a
        1,024-slot cache, 8.6 ms a decode step against 0.42 ms this way."""
        b, _, s, d = q.shape
        g = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, g * s, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        probs = torch.softmax(scores.reshape(b, self.heads, s, -1) + mask_add, dim=-1)
        out = torch.matmul(probs.reshape(b, self.kv_heads, g * s, -1), v).reshape(b, self.heads, s, d)
        return self.o(out.transpose(1, 2).reshape(b, s, self.heads * d))

    def shape_fields(self) -> dict[str, Any]:
        return {}

    def keep_heads(self, keep: list[int]) -> None:
        """Keep the query heads `keep`; a key-value head goes with the last of its query heads. Every key-value
        head kept must keep the same number of query heads (the graph stacks a group's queries as one block, and
        GQA's layout is heads = kv_heads x group): pruning within groups removes the same count from each."""
        keep = sorted(set(keep))
        g = self.heads // self.kv_heads
        if not keep or any(not 0 <= h < self.heads for h in keep):
            raise ValueError(f"keep 1 to {self.heads} of heads 0..{self.heads - 1}, got {keep}; remove the layer "
                             "to remove all its heads")
        groups = sorted({h // g for h in keep})
        per_group = {grp: sum(1 for h in keep if h // g == grp) for grp in groups}
        if len(set(per_group.values())) != 1:
            raise ValueError(f"key-value groups would keep different numbers of query heads {per_group}: keep "
                             "the same count in each group")
        d = self.head_dim
        q_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        kv_rows = torch.cat([torch.arange(grp * d, (grp + 1) * d) for grp in groups])
        self.q = take_rows(self.q, q_rows)
        self.k, self.v = take_rows(self.k, kv_rows), take_rows(self.v, kv_rows)
        self.o = take_cols(self.o, q_rows)
        self.heads, self.kv_heads = len(keep), len(groups)

    def keep_groups(self, groups: list[int]) -> None:
        """Keep the key-value heads `groups` with all their query heads."""
        g = self.heads // self.kv_heads
        self.keep_heads([grp * g + i for grp in groups for i in range(g)])


class GatedFFN(nn.Module):
    def __init__(self, cfg: CausalLMConfig, shape: DecoderLayerShape):
        super().__init__()
        lin = shape.linears
        self.act_name = cfg.act
        self.gate = build_linear(cfg.hidden, shape.ffn, lin.get("gate"), bias=cfg.mlp_bias)
        self.up = build_linear(cfg.hidden, shape.ffn, lin.get("up"), bias=cfg.mlp_bias)
        self.down = build_linear(shape.ffn, cfg.hidden, lin.get("down"), bias=cfg.mlp_bias)
        # MatFormer training runs only the first `active_width` neurons; None = all. Never saved or exported.
        self.active_width: Optional[int] = None

    @property
    def width(self) -> int:
        return self.gate.out_features

    def keep_neurons(self, keep: list[int]) -> None:
        """Keep the neurons `keep`: their gate and up rows and their down columns, together."""
        keep = sorted(set(keep))
        if not keep or any(not 0 <= n < self.width for n in keep):
            raise ValueError(f"keep 1 to {self.width} of neurons 0..{self.width - 1}; remove the layer to remove "
                             "all its FFN")
        self.take(keep)

    def take(self, neurons: list[int]) -> None:
        """The neurons `neurons`, in that order: gate and up rows and down columns together."""
        idx = torch.as_tensor(neurons, dtype=torch.long)
        self.gate, self.up, self.down = take_rows(self.gate, idx), take_rows(self.up, idx), take_cols(self.down, idx)

    def act(self, g: torch.Tensor) -> torch.Tensor:
        return F.silu(g) if self.act_name == "silu" else F.gelu(g, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_width is not None and self.active_width < self.width:
            w = self.active_width
            if any(linear_shape(lin) is not None for lin in (self.gate, self.up, self.down)):
                raise ValueError("nested (MatFormer) widths need dense FFN linears; factorize after extraction")
            gate = F.linear(x, self.gate.weight[:w], None if self.gate.bias is None else self.gate.bias[:w])
            up = F.linear(x, self.up.weight[:w], None if self.up.bias is None else self.up.bias[:w])
            return F.linear(self.act(gate) * up, self.down.weight[:, :w], self.down.bias)
        return self.down(self.act(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: CausalLMConfig, shape: DecoderLayerShape):
        super().__init__()
        self.rope_key = (shape.rope_base, shape.rope_factor)
        self.attn = DecoderAttention(cfg, shape)
        self.ffn = GatedFFN(cfg, shape)
        self.norm1 = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_offset)
        self.norm2 = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_offset)
        self.post_attn_norm = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_offset) if cfg.sandwich_norm else None
        self.post_ffn_norm = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_offset) if cfg.sandwich_norm else None

    @property
    def shape(self) -> DecoderLayerShape:
        a = self.attn
        linears = {name: linear_shape(getattr(owner, name)) for owner, names in
                   ((a, ("q", "k", "v", "o")), (self.ffn, ("gate", "up", "down"))) for name in names}
        return DecoderLayerShape(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, ffn=self.ffn.width,
                                 window=a.window, rope_base=self.rope_key[0], rope_factor=self.rope_key[1],
                                 linears={k: v for k, v in linears.items() if v is not None})

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask_add: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]], write=None):
        """`write(past, k, v) -> (keys, values)` puts this step's keys and values into the cache (default: appended
        to the past)."""
        q, k, v = self.attn.project(self.norm1(x), *rope)
        if write is not None:
            k, v = write(past, k, v)
        elif past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        a = self.attn.attend(q, k, v, mask_add)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        f = self.ffn(self.norm2(x))
        if self.post_ffn_norm is not None:
            f = self.post_ffn_norm(f)
        return x + f, (k, v)


def causal_mask(attention_mask: torch.Tensor, query_len: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (batch, 1, query_len, total): a query at absolute slot total - query_len + i sees key slot j
    when j <= its slot, j is a real token, and (for a window) j > its slot - window."""
    total = attention_mask.shape[1]
    q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + (total - query_len)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = k_pos <= q_pos
    if window:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), MASK_NEG, dtype=dtype))


class CausalLM(Described, nn.Module):
    """Token embedding -> decoder layers -> final norm -> output embedding (logits over the vocabulary)."""

    def __init__(self, cfg: CausalLMConfig):
        super().__init__()
        self.spec = cfg.model_copy(deep=True)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList([DecoderLayer(cfg, s) for s in cfg.layers])
        self.final_norm = RMSNorm(cfg.hidden, cfg.eps, cfg.norm_offset)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.ropes = nn.ModuleDict()
        for s in cfg.layers:
            key = rope_name(s.rope_base, s.rope_factor)
            if key not in self.ropes:
                self.ropes[key] = Rotary(s.head_dim, s.rope_base, s.rope_factor)

    # -- description (config, task, input_names, output_name: Described) ----------------------------------------
    @property
    def io(self) -> GraphIO:
        """The cached decoder graph every exporter writes (prefill is the same graph with an empty past)."""
        cfg = self.config
        return GraphIO(cfg.inputs(), cfg.outputs(), cfg.axis_bounds())

    def graph_module(self) -> nn.Module:
        return CachedDecoder(self)

    def fixed_cache_graphs(self, prefill: int, context: int) -> dict[str, FixedCacheDecoder]:
        """The two graphs a fixed-shape file holds (LiteRT-LM's signatures): prefill of `prefill` tokens and decode
        of one, over one cache of `context` slots."""
        return {"prefill": FixedCacheDecoder(self, prefill, context).eval(),
                "decode": FixedCacheDecoder(self, 1, context).eval()}

    def graph_inputs(self, ids: torch.Tensor, past_len: int) -> tuple[torch.Tensor, ...]:
        """`io`'s inputs for the tokens `ids` (batch, n): the first `past_len` already in the cache (computed here),
        the rest new."""
        b, n = ids.shape
        with torch.no_grad():
            if past_len:
                _, past = self(ids[:, :past_len], use_cache=True)
            else:
                past = self.empty_past(b)
        positions = torch.arange(past_len, n).expand(b, -1)
        return (ids[:, past_len:], torch.ones(b, n, dtype=torch.long), positions,
                *[t for kv in past for t in kv])

    def token_table(self) -> nn.Embedding:
        return self.embed

    def attention_mask(self, inputs: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        return inputs[1] if len(inputs) > 1 else None

    linear_names = LM_LINEAR_NAMES  # a layer's linears, by the names DecoderLayerShape.linears and stages use

    def linears(self, names=LM_LINEAR_NAMES):
        """(layer index, name, owning module, linear) for the named linears of every layer, in order."""
        for li, layer in enumerate(self.layers):
            for name in names:
                owner = layer.attn if name in ("q", "k", "v", "o") else layer.ffn
                yield li, name, owner, getattr(owner, name)

    # -- structural edits: the only places that know which tensors shrink together ---------------------------
    def keep_heads(self, layer: int, keep: list[int]) -> None:
        self.layers[layer].attn.keep_heads(keep)

    def keep_groups(self, layer: int, groups: list[int]) -> None:
        self.layers[layer].attn.keep_groups(groups)

    def keep_neurons(self, layer: int, keep: list[int]) -> None:
        self.layers[layer].ffn.keep_neurons(keep)
        self.spec.nested_ffn = []  # removing neurons breaks the nesting: prefixes were trained on the old order

    def order_neurons(self, layer: int, order: list[int]) -> None:
        """Permute a layer's FFN neurons so `order[0]` comes first: the function is unchanged, only which neurons a
        prefix (MatFormer's nested width) holds."""
        ffn = self.layers[layer].ffn
        if sorted(order) != list(range(ffn.width)):
            raise ValueError(f"order must be a permutation of layer {layer}'s {ffn.width} neurons")
        ffn.take(list(order))

    def keep_layers(self, keep: list[int]) -> None:
        """Keep the layers `keep` (each with its own window and rotary base); rotary tables no layer uses go."""
        keep = sorted(set(keep))
        if not keep or any(not 0 <= i < len(self.layers) for i in keep):
            raise ValueError(f"keep 1 to {len(self.layers)} of layers 0..{len(self.layers) - 1}, got {keep}")
        self.layers = nn.ModuleList([self.layers[i] for i in keep])
        used = {rope_name(*layer.rope_key) for layer in self.layers}
        for key in [k for k in self.ropes if k not in used]:
            del self.ropes[key]

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                past: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None, use_cache: bool = False):
        """Logits (batch, seq, vocab) for each position. `attention_mask` covers past + these tokens (1: real
        token); positions default to the count of real tokens before each one (left padding starts at 0).
        With `use_cache`, also the present key-values per layer (past + these), for the next step."""
        b, s = input_ids.shape
        past_len = past[0][0].shape[2] if past else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past_len + s, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past_len:]
        logits, present = self.body(input_ids, position_ids,
                                    lambda window, dtype: causal_mask(attention_mask, s, window, dtype), past)
        return (logits, present) if use_cache else logits

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               all_hidden: bool = False):
        """The final-normed hidden states (batch, seq, hidden) of a whole sequence, no cache; with all_hidden also
        the embeddings' and every layer's (the last one final-normed), as the encoder's encode gives them: what
        recovery distillation matches. head_output turns the first into logits."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.long, device=input_ids.device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden: Optional[list[torch.Tensor]] = [] if all_hidden else None
        x, _ = self.run_layers(input_ids, position_ids,
                               lambda window, dtype: causal_mask(attention_mask, s, window, dtype), None,
                               hidden=hidden)
        x = self.final_norm(x)
        if hidden is None:
            return x
        hidden[-1] = x
        return x, hidden

    def head_output(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.logits(x)

    def body(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask_of, past, write=None):
        """Embedding -> layers -> logits, and each layer's keys and values after this step. `mask_of(window,
        dtype)` is the additive mask of layers with that window; `write` as DecoderLayer.forward takes it."""
        x, present = self.run_layers(input_ids, position_ids, mask_of, past, write)
        return self.logits(self.final_norm(x)), present

    def run_layers(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask_of, past, write=None,
                   hidden: Optional[list[torch.Tensor]] = None):
        """Embedding -> layers: the last layer's output and each layer's keys and values; with `hidden`, the
        embeddings and every layer's output appended to it."""
        x = self.embed(input_ids)
        if self.spec.embed_scale != 1.0:
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        ropes = {key: rope(position_ids) for key, rope in self.ropes.items()}
        masks: dict[int, torch.Tensor] = {}
        present = []
        if hidden is not None:
            hidden.append(x)
        for i, layer in enumerate(self.layers):
            w = layer.attn.window
            if w not in masks:
                masks[w] = mask_of(w, x.dtype)
            x, kv = layer(x, ropes[rope_name(*layer.rope_key)], masks[w], past[i] if past else None, write)
            present.append(kv)
            if hidden is not None:
                hidden.append(x)
        return x, present

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        if self.spec.final_softcap:
            out = torch.tanh(out / self.spec.final_softcap) * self.spec.final_softcap
        return out

    def empty_past(self, batch: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(batch, la.attn.kv_heads, 0, la.attn.head_dim, dtype=dtype),) * 2 for la in self.layers]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int, eos: Optional[list[int]] = None) -> torch.Tensor:
        """Greedy decoding with the cache, batch 1: the new token ids (stops after an eos id)."""
        logits, past = self(input_ids, use_cache=True)
        out = []
        for _ in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if eos and nxt in eos:
                break
            logits, past = self(torch.tensor([[nxt]]), past=past, use_cache=True,
                                attention_mask=torch.ones(1, past[0][0].shape[2] + 1, dtype=torch.long))
        return torch.tensor(out, dtype=torch.long)


class CachedDecoder(nn.Module):
    """The decoder as a graph: (input_ids, attention_mask, position_ids, past k0, v0, k1, v1, ...) ->
    (present k0, v0, ..., logits), the layout ONNX Runtime GenAI and Optimum feed."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, present = self.model(input_ids, attention_mask, position_ids, past=past, use_cache=True)
        return (*[t for kv in present for t in kv], logits)


def index_copy_slice(cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`cache` with `new` written along the slot axis (2) from slot `start` on: FixedCacheDecoder's default cache
    write. A converter may set its own (LiteRT's DYNAMIC_UPDATE_SLICE: export/tflite.py)."""
    return cache.index_copy(2, start + torch.arange(new.shape[2]), new)


class FixedCacheDecoder(nn.Module):
    """The decoder over a cache of a fixed number of slots, for fixed-shape formats (TFLite, CoreML):
    (tokens (1, T), input_pos (T,), kv_cache_k_0, kv_cache_v_0, ...) -> (the caches after this step, logits).

    The T new tokens sit at the consecutive positions `input_pos`; their keys and values are written into the cache
    at those slots, and each token attends to the slots at or before its position (within its layer's window).
    A prompt shorter than T is padded at its end: the padding writes slots after the prompt that no later query
    sees before the next real token overwrites them. So one graph of T tokens prefills any prompt (in chunks of T)
    and a graph of one token decodes."""

    def __init__(self, model: CausalLM, tokens: int, context: int):
        super().__init__()
        self.model, self.context = model, context
        self.io = model.config.fixed_cache_io(tokens, context)

    def slice_update(self, cache: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """The cache write; a converter may set its own on the instance (export/tflite.py: DYNAMIC_UPDATE_SLICE)."""
        return index_copy_slice(cache, new, start)

    def forward(self, tokens, input_pos, *cache_flat):
        cache = [(cache_flat[2 * i], cache_flat[2 * i + 1]) for i in range(len(cache_flat) // 2)]
        positions = input_pos.long()
        start = positions[:1]
        slots = torch.arange(self.context)[None, :]

        def mask_of(window: int, dtype: torch.dtype) -> torch.Tensor:
            allowed = slots <= positions[:, None]
            if window:
                allowed = allowed & (slots > positions[:, None] - window)
            # arithmetic, not where(allowed, 0, NEG): coremltools types a select of two scalars as a scalar
            return ((~allowed).to(dtype) * MASK_NEG)[None, None]

        def write(past, k, v):
            return self.slice_update(past[0], k, start), self.slice_update(past[1], v, start)

        logits, present = self.model.body(tokens, positions[None], mask_of, cache, write)
        return (*[t for kv in present for t in kv], logits)


def rope_name(base: float, factor: float) -> str:
    """ModuleDict key of a rotary table (no dots allowed)."""
    return f"b{base:g}_f{factor:g}".replace(".", "p").replace("+", "")


@torch.no_grad()
def window_nll(model, wins: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's summed next-token NLL and predicted-token count per window."""
    nll, counts = [], []
    for w in wins:
        logits = model(torch.tensor([w]))[0, :-1].double()
        nll.append(float(F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum")))
        counts.append(len(w) - 1)
    return np.asarray(nll), np.asarray(counts)


def window_perplexity(model, wins: list[list[int]]) -> float:
    """exp of the mean next-token NLL over every predicted token of the windows (the model put in eval mode)."""
    nll, counts = window_nll(model.eval(), wins)
    return math.exp(nll.sum() / counts.sum())


def decoder_macs(cfg: CausalLMConfig, tokens: int, context: int = 0) -> int:
    """Multiply-accumulates of `tokens` new tokens attending over `context` earlier ones (plus themselves), batch 1:
    prefill is (T, 0), one decode step is (1, T)."""
    h, macs = cfg.hidden, 0
    for s in cfg.layers:
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        dims = {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, s.ffn), "up": (h, s.ffn),
                "down": (s.ffn, h)}
        macs += tokens * sum(linear_macs(i, o, s.linears.get(n)) for n, (i, o) in dims.items())
        seen = min(context + tokens, s.window) if s.window else context + tokens
        macs += 2 * tokens * seen * q
    return macs + tokens * h * cfg.vocab_size


def lm_config_summary(cfg: CausalLMConfig) -> str:
    heads = sorted({(s.heads, s.kv_heads) for s in cfg.layers})
    return (f"{cfg.family} causal LM, {len(cfg.layers)} layers, hidden {cfg.hidden}, heads "
            f"{'/'.join(f'{h}q:{k}kv' for h, k in heads)}, vocab {cfg.vocab_size}, "
            f"{'tied' if cfg.tie_embeddings else 'untied'} output embedding, context {cfg.max_positions}")

