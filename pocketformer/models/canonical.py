"""The one transformer every stage and exporter speaks.

An encoder whose every layer has its own shapes (heads, head size, FFN width), built only from ops that ONNX,
litert-torch and coremltools all convert (linear, matmul, softmax, layer norm, gelu, mean): no `new_ones`, no
data-dependent control flow. Importers map checkpoints into it; stages shrink it through the few methods here that
know which tensors must shrink together (a head = q/k/v rows + out-projection columns; a neuron = fc1 row + fc2
column).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from ..registry import member_of
from .factorized import LinearShape, LowRankLinear, build_linear, linear_macs, linear_shape, take_cols, take_rows
from .signature import GraphIO, TensorSpec
from .tasks import TASKS, Task, task_of

# The linears of a layer, by the names LayerShape.linears and stage configs use.
LINEAR_NAMES = ("q", "k", "v", "o", "fc1", "fc2")
# Additive mask value: large enough to zero a softmax weight, small enough to stay finite in fp16.
MASK_NEG = -1.0e4


class LayerShape(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: int = Field(ge=0)
    head_dim: int = Field(ge=1)
    ffn: int = Field(ge=0)
    # Linears stored factorized, by name (q, k, v, o, fc1, fc2); absent = a plain dense matrix.
    linears: dict[str, LinearShape] = Field(default_factory=dict)
    # An ATTENTIONS kind: softmax, or EcoFormer's binarized linear attention (hash_bits-bit codes from `anchors` RBF
    # anchors)
    attention: str = "softmax"
    hash_bits: int = Field(0, ge=0)
    anchors: int = Field(0, ge=0)

    _known_attention = member_of("attention", lambda: ATTENTIONS, "attention kind")

    def summary(self) -> dict[str, Any]:
        """The shape without its defaults, for reports."""
        return self.model_dump(exclude_defaults=True)


class HeadSpec(BaseModel):
    """The task head on top of the encoder. `labels` empty means an embedding model (no classifier), whose output is
    the pooled hidden state, then (as a sentence-transformers folder says) an optional dense projection and an
    optional L2 normalisation."""

    model_config = ConfigDict(extra="forbid")
    pooling: Literal["mean", "cls", "max"] = "mean"  # max: over the real (unmasked) tokens
    pre: Literal["none", "dense_tanh", "dense_relu"] = "none"
    labels: list[str] = Field(default_factory=list)
    # embedding models only
    dense: int = Field(0, ge=0, description="out features of a dense projection after pooling (0: none)")
    dense_act: Literal["identity", "tanh", "relu"] = "identity"
    normalize: bool = Field(False, description="L2-normalise the embedding (sentence-transformers' Normalize)")


class ModelConfig(BaseModel):
    """Everything needed to rebuild the module without the source model's code."""

    model_config = ConfigDict(extra="forbid")
    modality: Literal["text", "vision"]
    hidden: int
    layers: list[LayerShape]
    norm: Literal["post", "pre"] = "post"  # BERT family: post-LN; ViT: pre-LN with a final norm
    act: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    eps: float = 1e-12
    # text
    vocab_size: int = 0
    max_positions: int = 0
    type_vocab_size: int = 0
    position_offset: int = 0  # RoBERTa counts positions from padding_idx + 1
    pad_token_id: int = 0
    embed_norm: bool = True
    # vision
    image_size: int = 0
    patch_size: int = 0
    channels: int = 3
    final_norm: bool = False
    head: HeadSpec = Field(default_factory=HeadSpec)
    # Early exit: a classifier after each of these layers (0-based), besides the final head.
    exits: list[int] = Field(default_factory=list)
    # The exit gate exported artifacts apply by default ({"kind": "entropy", "threshold": ...} or patience).
    exit_gate: dict[str, Any] = Field(default_factory=dict)
    # MatFormer: FFN neurons are sorted so that every prefix is the best sub-network of its width; these are the
    # fractions of each layer's width the nested training covered.
    nested_ffn: list[float] = Field(default_factory=list)
    # How the weights were quantized in PyTorch (scheme, bits, ...): the float weights lie on that grid.
    quantization: dict[str, Any] = Field(default_factory=dict)

    # A task of the registry (pocketformer.models.tasks) for models whose head does not say it; None: an encoder's
    # task is read from its head (classification with labels, else embedding).
    task_kind: Optional[str] = None
    _known_task = member_of("task_kind", lambda: TASKS, "task")

    @property
    def task(self) -> str:
        """The task registry's name for what the output means."""
        return self.task_kind or ("classification" if self.head.labels else "embedding")

    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, declared once: what every exporter, runtime and encoder feeds."""
        if self.modality == "text":
            return (TensorSpec("input_ids", "int64", ("batch", "sequence"), pad=self.pad_token_id),
                    TensorSpec("attention_mask", "int64", ("batch", "sequence")))
        return (TensorSpec("pixel_values", "float32", ("batch", self.channels, self.image_size, self.image_size)),)

    def token_axis(self):
        """The hidden state's token axis: symbolic for text (it follows the input), fixed for images (patches +
        the class token)."""
        return "sequence" if self.modality == "text" else (self.image_size // self.patch_size) ** 2 + 1

    def axis_bounds(self) -> dict[str, int]:
        bounds = {"batch": 4096}
        if self.modality == "text":
            bounds["sequence"] = self.max_positions - self.position_offset
        return bounds


def _act(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.relu


class Attention(nn.Module):
    def __init__(self, hidden: int, shape: LayerShape):
        super().__init__()
        self.heads, self.head_dim = shape.heads, shape.head_dim
        inner = shape.heads * shape.head_dim
        self.q = build_linear(hidden, inner, shape.linears.get("q"))
        self.k = build_linear(hidden, inner, shape.linears.get("k"))
        self.v = build_linear(hidden, inner, shape.linears.get("v"))
        self.o = build_linear(inner, hidden, shape.linears.get("o"))

    def shape_fields(self) -> dict[str, Any]:
        """What this attention adds to its LayerShape (nothing: softmax is the default)."""
        return {}

    @staticmethod
    def mixing_macs(shape: LayerShape, tokens: int) -> int:
        """Multiply-accumulates of mixing the tokens (the projections aside): scores and weighted sum."""
        return 2 * tokens * tokens * shape.heads * shape.head_dim

    def forward(self, x: torch.Tensor, mask_add: Optional[torch.Tensor]) -> torch.Tensor:
        if self.heads == 0:  # every head pruned: only the output bias remains
            return self.o.bias.expand_as(x)
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask_add is not None:
            scores = scores + mask_add
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def keep_heads(self, keep: list[int]) -> None:
        rows = torch.cat([torch.arange(h * self.head_dim, (h + 1) * self.head_dim) for h in keep]) if keep else \
            torch.zeros(0, dtype=torch.long)
        for name in ("q", "k", "v"):
            setattr(self, name, take_rows(getattr(self, name), rows))
        self.o = take_cols(self.o, rows)
        self.heads = len(keep)


# Attention kinds by LayerShape.attention: modules taking (hidden, shape), built by Layer. Other kinds (EcoFormer)
# register themselves from their own module, so this one never imports them.
ATTENTIONS: dict[str, type[nn.Module]] = {"softmax": Attention}


def register_attention(kind: str):
    def register(cls):
        ATTENTIONS[kind] = cls
        return cls
    return register


class FeedForward(nn.Module):
    def __init__(self, hidden: int, shape: LayerShape, act: str):
        super().__init__()
        self.act_name = act
        self.fc1 = build_linear(hidden, shape.ffn, shape.linears.get("fc1"))
        self.fc2 = build_linear(shape.ffn, hidden, shape.linears.get("fc2"))
        # MatFormer training runs only the first `active_width` neurons; None = all. Never saved or exported.
        self.active_width: Optional[int] = None

    @property
    def width(self) -> int:
        return self.fc1.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width == 0:
            return self.fc2.bias.expand_as(x)
        if self.active_width is not None and self.active_width < self.width:
            w = self.active_width
            if isinstance(self.fc1, LowRankLinear) or isinstance(self.fc2, LowRankLinear):
                raise ValueError("nested (MatFormer) widths need dense FFN linears; factorize after extraction")
            h = _act(self.act_name)(F.linear(x, self.fc1.weight[:w], self.fc1.bias[:w]))
            return F.linear(h, self.fc2.weight[:, :w], self.fc2.bias)
        return self.fc2(_act(self.act_name)(self.fc1(x)))

    def keep_neurons(self, keep: list[int]) -> None:
        idx = torch.as_tensor(keep, dtype=torch.long)
        self.fc1 = take_rows(self.fc1, idx)
        self.fc2 = take_cols(self.fc2, idx)


class Layer(nn.Module):
    def __init__(self, hidden: int, shape: LayerShape, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn = ATTENTIONS[shape.attention](hidden, shape)
        self.ln1 = nn.LayerNorm(hidden, eps=cfg.eps)
        self.ffn = FeedForward(hidden, shape, cfg.act)
        self.ln2 = nn.LayerNorm(hidden, eps=cfg.eps)

    @property
    def shape(self) -> LayerShape:
        linears = {name: linear_shape(getattr(module, name))
                   for module, names in ((self.attn, ("q", "k", "v", "o")), (self.ffn, ("fc1", "fc2")))
                   for name in names}
        return LayerShape(heads=self.attn.heads, head_dim=self.attn.head_dim, ffn=self.ffn.width,
                          linears={k: v for k, v in linears.items() if v is not None}, **self.attn.shape_fields())

    def forward(self, x: torch.Tensor, mask_add: Optional[torch.Tensor]) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), mask_add)
            return x + self.ffn(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask_add))
        return self.ln2(x + self.ffn(x))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position_offset = cfg.position_offset
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps) if cfg.embed_norm else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        # Positions as a slice of the table, not an arange gather: static for every converter.
        x = self.word(input_ids) + self.position.weight[self.position_offset:self.position_offset + t].unsqueeze(0)
        if self.token_type is not None:  # single-segment inputs: token type 0 everywhere
            x = x + self.token_type.weight[0]
        return self.norm(x) if self.norm is not None else x


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.proj = nn.Conv2d(cfg.channels, cfg.hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        self.position = nn.Parameter(torch.zeros(1, n_patches + 1, cfg.hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position


class ClassifierHead(nn.Module):
    def __init__(self, hidden: int, spec: HeadSpec):
        super().__init__()
        self.pre_kind = spec.pre
        self.pre = nn.Linear(hidden, hidden) if spec.pre != "none" else None
        self.out = nn.Linear(hidden, len(spec.labels))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.pre is not None:
            pooled = self.pre(pooled)
            pooled = torch.tanh(pooled) if self.pre_kind == "dense_tanh" else F.relu(pooled)
        return self.out(pooled)


class EmbeddingHead(nn.Module):
    """An embedding model's head after pooling: an optional dense projection with its activation, then an optional
    L2 normalisation, written with ops every converter takes (no `F.normalize`)."""

    def __init__(self, hidden: int, spec: HeadSpec):
        super().__init__()
        self.act = spec.dense_act
        self.dense = nn.Linear(hidden, spec.dense) if spec.dense else None
        self.normalize = spec.normalize

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            pooled = self.dense(pooled)
            pooled = torch.tanh(pooled) if self.act == "tanh" else F.relu(pooled) if self.act == "relu" else pooled
        if self.normalize:  # as F.normalize: x / max(|x|, 1e-12)
            pooled = pooled / torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True)).clamp(min=1e-12)
        return pooled


class Described:
    """What every canonical model (the encoder here, the decoder in causal.py) says about itself, read from its
    modules and its spec: its config, task, declared graph and that graph's module."""

    @property
    def config(self):
        """The spec with layer shapes read from the modules, so it can never drift from the weights."""
        return self.spec.model_copy(update={"layers": [layer.shape for layer in self.layers]}, deep=True)

    @property
    def task(self) -> Task:
        return task_of(self.spec)

    @property
    def kind(self) -> str:
        """The architecture: "encoder" (this module's model) or "causal_lm" (causal.py); what a stage declares it
        runs on (Stage.kinds)."""
        return getattr(self.spec, "kind", "encoder")

    @property
    def input_names(self) -> list[str]:
        return self.io.input_names

    @property
    def output_name(self) -> str:
        return self.task.output

    def graph_module(self) -> nn.Module:
        """The module an exporter converts: it takes `io`'s inputs positionally and returns its outputs."""
        return self


class CanonicalTransformer(Described, nn.Module):
    """Encoder + pooling + optional classifier. Text input: (input_ids, attention_mask); vision: pixel_values."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.spec = cfg.model_copy(deep=True)
        self.embeddings = TextEmbeddings(cfg) if cfg.modality == "text" else PatchEmbeddings(cfg)
        self.layers = nn.ModuleList([Layer(cfg.hidden, s, cfg) for s in cfg.layers])
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps) if cfg.final_norm else None
        self.classifier = ClassifierHead(cfg.hidden, cfg.head) if cfg.head.labels else None
        has_embedding_head = not cfg.head.labels and (cfg.head.dense or cfg.head.normalize)
        self.embedding_head = EmbeddingHead(cfg.hidden, cfg.head) if has_embedding_head else None
        self.exit_heads = nn.ModuleList([ClassifierHead(cfg.hidden, self.exit_spec) for _ in cfg.exits])

    @property
    def exit_spec(self) -> HeadSpec:
        """Exit heads pool like the final head and map straight to the labels (no pre-classifier layer)."""
        return HeadSpec(pooling=self.spec.head.pooling, pre="none", labels=list(self.spec.head.labels))

    # -- description (config, task, input_names, output_name, graph_module: Described) -------------------------
    @property
    def io(self) -> GraphIO:
        """Inputs from the modality, the output from the task: the declaration exporters derive wrappers, dynamic
        axes and example inputs from."""
        return GraphIO(self.spec.inputs(), (self.task.output_spec(self.spec),), self.spec.axis_bounds())

    def embed(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The embeddings of the model's inputs (token ids, or pixels): the first input; the mask is applied
        by attention."""
        return self.embeddings(inputs[0])

    def token_table(self) -> Optional[nn.Embedding]:
        """The token embedding table (the largest weight of a text model, which no stage changes), or None."""
        return getattr(self.embeddings, "word", None)

    def attention_mask(self, inputs: tuple[torch.Tensor, ...]) -> Optional[torch.Tensor]:
        """The padding mask among the model's inputs, or None for inputs without one (images)."""
        names = self.input_names
        return inputs[names.index("attention_mask")] if "attention_mask" in names else None

    # -- forward -----------------------------------------------------------------------------------------------
    def encode(self, *inputs: torch.Tensor, all_hidden: bool = False):
        """Hidden states after the last layer (and, with all_hidden, after the embeddings and each layer)."""
        x = self.embed(*inputs)
        mask = self.attention_mask(inputs)
        mask_add = attention_bias(mask, x.dtype) if mask is not None else None
        hidden = [x]
        for layer in self.layers:
            x = layer(x, mask_add)
            hidden.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
            hidden[-1] = x
        return (x, hidden) if all_hidden else x

    def pool(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        pooling = self.spec.head.pooling
        if pooling == "cls":
            return x[:, 0]
        if attention_mask is None:
            return x.max(dim=1).values if pooling == "max" else x.mean(dim=1)
        m = attention_mask.to(x.dtype).unsqueeze(-1)
        if pooling == "max":  # padded tokens pushed far below any real value, as sentence-transformers does
            return (x * m + (1.0 - m) * MASK_NEG).max(dim=1).values
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def head_output(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        pooled = self.pool(x, attention_mask)
        if self.classifier is not None:
            return self.classifier(pooled)
        return self.embedding_head(pooled) if self.embedding_head is not None else pooled

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head_output(self.encode(*inputs), self.attention_mask(inputs))

    def exit_output(self, index: int, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits of exit head `index` on the hidden state after its layer, normalised as the final head's input
        is (a pre-LN model's residual stream is not)."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.exit_heads[index](self.pool(x, attention_mask))

    def exit_logits(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit head, in spec.exits order, then the final head's."""
        x, hidden = self.encode(*inputs, all_hidden=True)
        mask = self.attention_mask(inputs)
        return [self.exit_output(i, hidden[layer + 1], mask) for i, layer in enumerate(self.spec.exits)] + \
            [self.head_output(x, mask)]

    linear_names = LINEAR_NAMES  # a layer's linears, by the names LayerShape.linears and stage configs use

    def linears(self, names=LINEAR_NAMES):
        """(layer index, name, owning module, linear) for the named linears of every layer, in order; a stage
        replaces one with setattr(owner, name, new)."""
        for li, layer in enumerate(self.layers):
            for name in names:
                owner = layer.attn if name in ("q", "k", "v", "o") else layer.ffn
                yield li, name, owner, getattr(owner, name)

    # -- structural edits: the only places that know which tensors shrink together ---------------------------
    def keep_heads(self, layer: int, keep: list[int]) -> None:
        self.layers[layer].attn.keep_heads(sorted(keep))

    def keep_neurons(self, layer: int, keep: list[int]) -> None:
        self.layers[layer].ffn.keep_neurons(sorted(keep))
        self.spec.nested_ffn = []  # removing neurons breaks the nesting: prefixes were trained on the old order

    def order_neurons(self, layer: int, order: list[int]) -> None:
        """Permute a layer's FFN neurons so `order[0]` comes first: the function is unchanged, only which neurons
        a prefix (MatFormer's nested width) holds."""
        if sorted(order) != list(range(self.layers[layer].ffn.width)):
            raise ValueError(f"order must be a permutation of layer {layer}'s {self.layers[layer].ffn.width} neurons")
        self.layers[layer].ffn.keep_neurons(list(order))

    def keep_layers(self, keep: list[int]) -> None:
        if self.spec.exits:
            raise ValueError("remove layers before adding early exits: the exits are placed after given layers")
        self.layers = nn.ModuleList([self.layers[i] for i in sorted(keep)])

    def set_labels(self, labels: list[str], pooling: str = "mean") -> None:
        """Attach a fresh classifier (fine-tuning an embedding model into a classifier)."""
        self.spec.head = HeadSpec(pooling=pooling, pre="none", labels=list(labels))
        self.classifier = ClassifierHead(self.spec.hidden, self.spec.head)
        self.embedding_head = None  # the classifier reads the pooled state; an embedding's projection goes

    def set_exits(self, layers: list[int]) -> None:
        """Fresh exit heads after these layers (0-based; the last layer's head is the classifier)."""
        if any(not 0 <= i < len(self.layers) - 1 for i in layers):
            raise ValueError(f"exit layers must lie in 0..{len(self.layers) - 2}, got {layers}")
        self.spec.exits = sorted(set(layers))
        self.exit_heads = nn.ModuleList([ClassifierHead(self.spec.hidden, self.exit_spec) for _ in self.spec.exits])


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias from a 0/1 padding mask: (batch, 1, 1, seq), MASK_NEG where padded."""
    return (1.0 - attention_mask.to(dtype))[:, None, None, :] * MASK_NEG


def count_params(model: nn.Module) -> int:
    """Parameters stored; a dense-sparse S counts only the entries it keeps."""
    from .factorized import DenseSparseLinear

    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, DenseSparseLinear):
            total -= m.first.weight.numel() - min(m.nnz, m.rank) * m.in_features
    return total


def encoder_macs(cfg: ModelConfig, seq_len: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (encoder + head; embedding lookups are free)."""
    h, t = cfg.hidden, seq_len
    if cfg.modality == "vision":
        t = (cfg.image_size // cfg.patch_size) ** 2 + 1
        macs = (t - 1) * cfg.channels * cfg.patch_size ** 2 * h
    else:
        macs = 0
    for s in cfg.layers:
        inner = s.heads * s.head_dim
        dims = {"q": (h, inner), "k": (h, inner), "v": (h, inner), "o": (inner, h), "fc1": (h, s.ffn),
                "fc2": (s.ffn, h)}
        macs += t * sum(linear_macs(i, o, s.linears.get(n)) for n, (i, o) in dims.items())
        macs += ATTENTIONS[s.attention].mixing_macs(s, t)
    if cfg.head.labels:
        macs += (h * h if cfg.head.pre != "none" else 0) + h * len(cfg.head.labels)
    else:
        macs += h * cfg.head.dense
    return macs
