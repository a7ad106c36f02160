"""Hugging Face causal LMs (Llama / SmolLM, Qwen2, Gemma 3 text) from a local folder into the canonical decoder.

Each family is a small table: how its config reads into a CausalLMConfig and where each canonical weight lives in the
folder's state dict. The config is read through transformers' own config class, so the defaults a config.json leaves
out (Gemma's query_pre_attn_scalar, its layer pattern, a rope_scaling written in the v4 form) are the ones
transformers' model uses. After mapping, transformers' model from the same folder and the canonical one run on the
same real text (one row left-padded); an import whose logits differ by more than LM_PARITY_TOL is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ArchitectureError, CheckpointError, ParityError, PocketformerError, first_error
from ..progress import quiet
from .causal import CausalLM, CausalLMConfig, DecoderLayerShape
from .importers import read_hf_weights, register_family
from .io import file_sha256

# Largest |logit difference| accepted between transformers' model and the import, in fp32 (the same weights and the
# same ops in another order: measured 1e-5 on SmolLM2-135M's 30 layers).
LM_PARITY_TOL = 1e-3
# Real text for the parity check (Natsume Soseki, Botchan, tr. Yasotaro Morri, 1918; public domain).
PARITY_TEXT = ("Because of an hereditary recklessness, I have been playing always a losing game since my childhood. "
               "During my grammar school days, I was laid up for about a week by jumping from the second story of "
               "the school building. Some may ask why I committed such a rash act.")
FIX = "the config.json does not describe a model of its model_type: re-save the checkpoint with `save_pretrained`."


@dataclass(frozen=True)
class Family:
    name: str  # pocketformer's family name (the layout app runtimes know it by)
    build: Callable[[Any], dict[str, Any]]  # transformers config -> CausalLMConfig fields beyond the common ones
    layer_keys: Callable[[int, bool], dict[str, str]]  # canonical module -> source module, for layer i


def _common(c) -> dict[str, Any]:
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ArchitectureError(f"partial rotary embeddings (partial_rotary_factor {c.partial_rotary_factor}) are "
                                "not supported.", "use a model with rotary embeddings over the whole head.")
    types = list(getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers)
    layers = []
    for i in range(c.num_hidden_layers):
        window = (getattr(c, "sliding_window", None) or 0) if types[i] == "sliding_attention" else 0
        base, factor = _rope(c, types[i])
        layers.append(DecoderLayerShape(heads=heads, kv_heads=kv, head_dim=head_dim, ffn=c.intermediate_size,
                                        window=window, rope_base=base, rope_factor=factor))
    eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id] if c.eos_token_id is not None else []
    return {"hidden": c.hidden_size, "vocab_size": c.vocab_size, "layers": layers,
            "max_positions": c.max_position_embeddings, "eps": c.rms_norm_eps,
            "tie_embeddings": bool(getattr(c, "tie_word_embeddings", False)), "bos_token_id": c.bos_token_id,
            "eos_token_ids": eos, "pad_token_id": c.pad_token_id if c.pad_token_id is not None else 0}


def _rope(c, layer_type: str) -> tuple[float, float]:
    """(base, linear factor) of a layer's rotary positions; other scalings are refused."""
    params = getattr(c, "rope_parameters", None) or {}
    if layer_type in params:  # Gemma 3: one entry per layer type
        params = params[layer_type]
    kind = params.get("rope_type", params.get("type", "default"))
    base = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    if kind == "default":
        return float(base), 1.0
    if kind == "linear":
        return float(base), float(params["factor"])
    raise ArchitectureError(f"rotary scaling {kind!r} is not supported.", "use a model with default or linear rotary "
                                                                          "scaling.")


def _act(c, key: str) -> str:
    name = getattr(c, key, None)
    table = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if name not in table:
        raise ArchitectureError(f"FFN activation {name!r} is not supported in a gated FFN.",
                                f"use one of {sorted(table)}.")
    return table[name]


def _llama(c) -> dict[str, Any]:
    bias = bool(getattr(c, "attention_bias", False))
    return {"family": "llama", "act": _act(c, "hidden_act"), "qkv_bias": bias, "o_bias": bias,
            "mlp_bias": bool(getattr(c, "mlp_bias", False))}


def _qwen2(c) -> dict[str, Any]:
    return {"family": "qwen2", "act": _act(c, "hidden_act"), "qkv_bias": True}


def _gemma3(c) -> dict[str, Any]:
    if getattr(c, "use_bidirectional_attention", False):
        raise ArchitectureError("this Gemma 3 model attends bidirectionally (an embedding model), not causally.",
                                "import a causal Gemma 3 language model.")
    return {"family": "gemma3", "act": _act(c, "hidden_activation"), "norm_offset": 1.0, "qk_norm": True,
            "sandwich_norm": True, "query_scale": float(c.query_pre_attn_scalar) ** -0.5,
            "embed_scale": float(c.hidden_size) ** 0.5, "attn_softcap": c.attn_logit_softcapping,
            "final_softcap": c.final_logit_softcapping, "add_bos": True}


def _layer_keys(i: int, sandwich: bool) -> dict[str, str]:
    p = f"model.layers.{i}."
    keys = {"attn.q": p + "self_attn.q_proj", "attn.k": p + "self_attn.k_proj", "attn.v": p + "self_attn.v_proj",
            "attn.o": p + "self_attn.o_proj", "attn.q_norm": p + "self_attn.q_norm",
            "attn.k_norm": p + "self_attn.k_norm", "ffn.gate": p + "mlp.gate_proj", "ffn.up": p + "mlp.up_proj",
            "ffn.down": p + "mlp.down_proj", "norm1": p + "input_layernorm"}
    if sandwich:  # Gemma: post_attention_layernorm follows attention; the FFN has its own pre and post norms
        keys.update({"post_attn_norm": p + "post_attention_layernorm", "norm2": p + "pre_feedforward_layernorm",
                     "post_ffn_norm": p + "post_feedforward_layernorm"})
    else:  # Llama, Qwen2: post_attention_layernorm is the FFN's pre-norm
        keys["norm2"] = p + "post_attention_layernorm"
    return {f"layers.{i}.{k}": v for k, v in keys.items()}


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _llama, _layer_keys),
    "qwen2": Family("qwen2", _qwen2, _layer_keys),
    "gemma3_text": Family("gemma3", _gemma3, _layer_keys),
}


def hf_config(folder: Path):
    """transformers' config object for the folder (its defaults fill what config.json leaves out)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"transformers cannot read {folder / 'config.json'} ({first_error(e)[:200]}).", FIX) \
            from None


def lm_spec(c, model_type: str, folder: Path) -> CausalLMConfig:
    family = FAMILIES[model_type]
    try:
        return CausalLMConfig(**{**_common(c), **family.build(c)})
    except ArchitectureError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'} describes no decoder pocketformer can build "
                              f"({first_error(e)}).", FIX) from None


def map_weights(model: CausalLM, state: dict[str, torch.Tensor], family: Family, where: str) -> None:
    """Copy `state` (Hugging Face names) into the canonical model; every canonical tensor must be found with its
    shape, and every source tensor used (a leftover would be a part the canonical model does not compute)."""
    spec = model.spec
    mapping = {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
    for i in range(len(spec.layers)):
        mapping.update(family.layer_keys(i, spec.sandwich_norm))
    new_state, used = {}, set()
    for name, want in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        src = f"{mapping[module]}.{leaf}" if module in mapping else None
        if src is None:
            raise CheckpointError(f"No source weight is mapped to {name}.", "report this as a pocketformer bug.")
        if src not in state:
            raise CheckpointError(f"Weight {src!r} is missing from {where}.", "the checkpoint is incomplete or not "
                                  "the architecture its config names.")
        if tuple(state[src].shape) != tuple(want.shape):
            raise CheckpointError(f"Weight {src} has shape {tuple(state[src].shape)}, expected {tuple(want.shape)} "
                                  "from the config.", "the checkpoint and its config disagree: re-save it.")
        new_state[name] = state[src].float()
        used.add(src)
    extra = sorted(k for k in state if k not in used and not (k == "lm_head.weight" and spec.tie_embeddings
                                                               and torch.equal(state[k], state["model.embed_tokens.weight"])))
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ArchitectureError(f"{where} holds weights the canonical decoder has no place for ({', '.join(extra[:3])}"
                                f"{', ...' if len(extra) > 3 else ''}).", "this variant is not supported; report it "
                                "with its config.json.")
    model.load_state_dict(new_state)


def import_lm_hf(folder: Path, cfg: dict, check_parity: bool = True, trust_pickle: bool = False
                 ) -> tuple[CausalLM, dict]:
    folder = Path(folder)
    model_type = cfg["model_type"]
    c = hf_config(folder)
    spec = lm_spec(c, model_type, folder)
    state, files = read_hf_weights(folder, trust_pickle)
    model = CausalLM(spec)
    map_weights(model, state, FAMILIES[model_type], str(folder))
    model.eval()
    provenance = {"source": str(folder.resolve()), "source_architecture": (cfg.get("architectures") or [model_type])[0],
                  "source_model_type": model_type,
                  "source_files_sha256": {f.name: file_sha256(f) for f in files}}
    if check_parity:
        provenance["import_parity"] = check_lm_parity(model, lambda: _hf_model(folder), tokenizer_of(folder))
    return model, provenance


def _hf_model(folder: Path):
    import transformers

    with quiet("transformers", "torchao", stderr=True):
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                                 dtype=torch.float32).eval()


def tokenizer_of(folder: Path):
    """The folder's tokenizers.Tokenizer (tokenizer.json), or None."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def parity_batch(spec: CausalLMConfig, tokenizer, length: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of real text tokens (random ids without a tokenizer); the second left-padded by a third."""
    if tokenizer is not None:
        ids = tokenizer.encode(PARITY_TEXT).ids
        if spec.add_bos and spec.bos_token_id is not None and ids[:1] != [spec.bos_token_id]:
            ids = [spec.bos_token_id] + ids
        ids = torch.tensor([ids[:length]])
    else:
        ids = torch.randint(3, spec.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    n = ids.shape[1]
    pad = n // 3
    ids = torch.cat([ids, torch.cat([torch.full((1, pad), spec.pad_token_id), ids[:, :n - pad]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def check_lm_parity(model: CausalLM, source_factory, tokenizer) -> dict[str, Any]:
    """The source model and the import on the same text; ParityError beyond LM_PARITY_TOL. Also checks that the
    import's cached decoding (prefill, then one token at a time) gives its own full-sequence logits."""
    ids, mask = parity_batch(model.spec, tokenizer)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        source = source_factory()
    except PocketformerError:
        raise
    except Exception as e:
        raise CheckpointError(f"transformers could not load the source model ({first_error(e)[:200]}).",
                              "check that the folder is a complete `save_pretrained` output.") from None
    with torch.no_grad():
        want = source(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, mask, pos)
        real = mask.bool()
        diff = (got - want)[real].abs().max().item()
        agree = float((got.argmax(-1) == want.argmax(-1))[real].float().mean())
        cached = cache_consistency(model, ids[:1])
    if not diff <= LM_PARITY_TOL:
        raise ParityError(f"The imported decoder's logits differ from transformers' by {diff:.2e} (tolerance "
                          f"{LM_PARITY_TOL:.0e}) on {int(real.sum())} tokens of text.",
                          "this checkpoint uses a variant pocketformer does not reproduce; report it with its "
                          "config.json.")
    if not cached <= LM_PARITY_TOL:
        raise ParityError(f"The imported decoder's cached decoding differs from its full forward by {cached:.2e}.",
                          "report this as a pocketformer bug with the checkpoint's config.json.")
    return {"max_abs_logit_diff": diff, "tokens": int(real.sum()), "top1_agreement": agree,
            "cache_max_abs_diff": cached, "tolerance": LM_PARITY_TOL}


def cache_consistency(model: CausalLM, ids: torch.Tensor, prefill: int = 0) -> float:
    """Max |logit difference| between the full forward and a prefill of `prefill` tokens (half by default)
    followed by one-token steps with the cache."""
    full = model(ids)
    n = ids.shape[1]
    k = prefill or n // 2
    logits, past = model(ids[:, :k], use_cache=True)
    diffs = [(logits - full[:, :k]).abs().max()]
    for t in range(k, n):
        logits, past = model(ids[:, t:t + 1], past=past, use_cache=True)
        diffs.append((logits[:, 0] - full[:, t]).abs().max())
    return float(torch.stack(diffs).max())


for _type in FAMILIES:
    register_family(_type, import_lm_hf)
