"""Map Hugging Face checkpoints (BERT, MiniLM, RoBERTa, DistilBERT, ViT) from a local folder into the canonical model.

Each architecture is one small table: how its config reads into a ModelConfig and where each canonical weight lives
in its state dict. After mapping, the source model (transformers, from the same folder) and the canonical model run on
the same inputs; an import whose outputs differ by more than PARITY_TOL is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ArchitectureError, CheckpointError, ParityError
from .canonical import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig
from .io import file_sha256, load_safetensors

PARITY_TOL = 1e-4


@dataclass(frozen=True)
class Architecture:
    prefix: str  # the base model's attribute name in *ForSequenceClassification state dicts
    build: Callable[[dict], ModelConfig]
    layer_keys: Callable[[int], dict[str, str]]  # canonical name -> source name, for layer i
    embed_keys: dict[str, str]
    final_keys: dict[str, str]
    head_keys: dict[str, str]  # canonical classifier names -> source names (no prefix)
    head: Callable[[dict], HeadSpec]


def _labels(cfg: dict) -> list[str]:
    id2label = cfg.get("id2label") or {}
    archs = cfg.get("architectures") or []
    if not any("Classification" in a for a in archs):
        return []
    n = len(id2label) or cfg.get("num_labels", 2)  # transformers omits id2label when it is the 2-label default
    return [id2label.get(str(i), id2label.get(i, f"LABEL_{i}")) for i in range(n)]


def _bert_like(cfg: dict, position_offset: int = 0) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        modality="text", hidden=cfg["hidden_size"], eps=cfg.get("layer_norm_eps", 1e-12),
        act=_act(cfg.get("hidden_act", "gelu")),
        layers=[LayerShape(heads=heads, head_dim=cfg["hidden_size"] // heads, ffn=cfg["intermediate_size"])
                for _ in range(cfg["num_hidden_layers"])],
        vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"],
        type_vocab_size=cfg.get("type_vocab_size", 2), position_offset=position_offset,
        pad_token_id=cfg.get("pad_token_id") or 0,
    )


def _act(name: str) -> str:
    table = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
    if name not in table:
        raise ArchitectureError(f"Activation {name!r} is not supported.", f"use one of {sorted(table)}.")
    return table[name]


def _bert_layer(i: int) -> dict[str, str]:
    p = f"encoder.layer.{i}."
    return {"attn.q": p + "attention.self.query", "attn.k": p + "attention.self.key",
            "attn.v": p + "attention.self.value", "attn.o": p + "attention.output.dense",
            "ln1": p + "attention.output.LayerNorm", "ffn.fc1": p + "intermediate.dense",
            "ffn.fc2": p + "output.dense", "ln2": p + "output.LayerNorm"}


_BERT_EMBED = {"embeddings.word": "embeddings.word_embeddings", "embeddings.position": "embeddings.position_embeddings",
               "embeddings.token_type": "embeddings.token_type_embeddings", "embeddings.norm": "embeddings.LayerNorm"}


def _distilbert(cfg: dict) -> ModelConfig:
    if cfg.get("sinusoidal_pos_embds"):
        # The sinusoidal table is still stored as position_embeddings.weight, so the lookup is identical.
        pass
    heads = cfg["n_heads"]
    return ModelConfig(
        modality="text", hidden=cfg["dim"], eps=1e-12, act=_act(cfg.get("activation", "gelu")),
        layers=[LayerShape(heads=heads, head_dim=cfg["dim"] // heads, ffn=cfg["hidden_dim"])
                for _ in range(cfg["n_layers"])],
        vocab_size=cfg["vocab_size"], max_positions=cfg["max_position_embeddings"], type_vocab_size=0,
        pad_token_id=cfg.get("pad_token_id") or 0,
    )


def _distilbert_layer(i: int) -> dict[str, str]:
    p = f"transformer.layer.{i}."
    return {"attn.q": p + "attention.q_lin", "attn.k": p + "attention.k_lin", "attn.v": p + "attention.v_lin",
            "attn.o": p + "attention.out_lin", "ln1": p + "sa_layer_norm", "ffn.fc1": p + "ffn.lin1",
            "ffn.fc2": p + "ffn.lin2", "ln2": p + "output_layer_norm"}


def _vit(cfg: dict) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        modality="vision", hidden=cfg["hidden_size"], eps=cfg.get("layer_norm_eps", 1e-12), norm="pre",
        act=_act(cfg.get("hidden_act", "gelu")),
        layers=[LayerShape(heads=heads, head_dim=cfg["hidden_size"] // heads, ffn=cfg["intermediate_size"])
                for _ in range(cfg["num_hidden_layers"])],
        image_size=cfg["image_size"], patch_size=cfg["patch_size"], channels=cfg.get("num_channels", 3),
        embed_norm=False, final_norm=True,
    )


def _vit_layer(i: int) -> dict[str, str]:
    p = f"layers.{i}."
    return {"attn.q": p + "attention.q_proj", "attn.k": p + "attention.k_proj", "attn.v": p + "attention.v_proj",
            "attn.o": p + "attention.o_proj", "ln1": p + "layernorm_before", "ffn.fc1": p + "mlp.fc1",
            "ffn.fc2": p + "mlp.fc2", "ln2": p + "layernorm_after"}


# transformers 4 saved ViT under other names; map them onto the transformers 5 ones read above.
_VIT_V4_NAMES = {"encoder.layer.": "layers.", "attention.attention.query": "attention.q_proj",
                 "attention.attention.key": "attention.k_proj", "attention.attention.value": "attention.v_proj",
                 "attention.output.dense": "attention.o_proj", "intermediate.dense": "mlp.fc1",
                 "output.dense": "mlp.fc2"}


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture(
        prefix="bert", build=_bert_like, layer_keys=_bert_layer, embed_keys=_BERT_EMBED, final_keys={},
        head_keys={"classifier.pre": "bert.pooler.dense", "classifier.out": "classifier"},
        head=lambda c: HeadSpec(pooling="cls", pre="dense_tanh", labels=_labels(c))),
    "roberta": Architecture(
        prefix="roberta", build=lambda c: _bert_like(c, position_offset=(c.get("pad_token_id") or 1) + 1),
        layer_keys=_bert_layer, embed_keys=_BERT_EMBED, final_keys={},
        head_keys={"classifier.pre": "classifier.dense", "classifier.out": "classifier.out_proj"},
        head=lambda c: HeadSpec(pooling="cls", pre="dense_tanh", labels=_labels(c))),
    "distilbert": Architecture(
        prefix="distilbert", build=_distilbert, layer_keys=_distilbert_layer,
        embed_keys={k: v for k, v in _BERT_EMBED.items() if k != "embeddings.token_type"}, final_keys={},
        head_keys={"classifier.pre": "pre_classifier", "classifier.out": "classifier"},
        head=lambda c: HeadSpec(pooling="cls", pre="dense_relu", labels=_labels(c))),
    "vit": Architecture(
        prefix="vit", build=_vit, layer_keys=_vit_layer,
        embed_keys={"embeddings.cls": "embeddings.cls_token", "embeddings.position": "embeddings.position_embeddings",
                    "embeddings.proj": "embeddings.patch_embeddings.projection"},
        final_keys={"final_norm": "layernorm"},
        head_keys={"classifier.out": "classifier"},
        head=lambda c: HeadSpec(pooling="cls", pre="none", labels=_labels(c))),
}
# MiniLM checkpoints are BERT checkpoints (model_type "bert").


def read_hf_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"Checkpoint {folder} does not exist.", "check the path.")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder.",
                              "pass the folder that holds config.json and model.safetensors.")
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json.",
                              "pass a folder written by `save_pretrained` or by `pocketformer compress`.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / 'config.json'} is not valid JSON ({e.msg}).",
                              "re-download or re-save the checkpoint.") from None


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The checkpoint's tensors, from safetensors (single or sharded); a pickle only through weights_only loading."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        pickles = [p for p in (folder / "pytorch_model.bin", *folder.glob("*.pt")) if p.is_file()]
        if not pickles:
            raise CheckpointError(f"{folder} has no model.safetensors.", "save the model with "
                                  "`save_pretrained(..., safe_serialization=True)`.")
        try:  # weights_only refuses any pickle that would run code: only tensors come back
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{pickles[0]} is not a plain tensor pickle and will not be unpickled "
                                  f"({type(e).__name__}).", "convert it to safetensors in a trusted environment "
                                  "(`save_pretrained(..., safe_serialization=True)`).") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pickles[0]} holds no state dict of tensors.", "save a state dict as safetensors.")
        return state, [pickles[0]]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_safetensors(f))
    return state, files


def import_hf(folder: Path, check_parity: bool = True) -> tuple[CanonicalTransformer, dict]:
    """Import a Hugging Face folder. Returns the canonical model and its provenance (source, hashes, parity)."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    model_type = cfg.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ArchitectureError(f"Architecture {model_type!r} ({', '.join(cfg.get('architectures') or [])}) is not "
                                "supported.", f"use a checkpoint of one of: {', '.join(sorted(ARCHITECTURES))}.")
    arch = ARCHITECTURES[model_type]
    spec = arch.build(cfg).model_copy(update={"head": arch.head(cfg)})
    state, files = read_hf_weights(folder)
    if model_type == "vit":
        state = _rename_v4_vit(state)
    model = CanonicalTransformer(spec)
    _copy_weights(model, state, arch, spec)
    model.eval()
    provenance = {
        "source": str(folder.resolve()), "source_architecture": (cfg.get("architectures") or [model_type])[0],
        "source_model_type": model_type,
        "source_files_sha256": {f.name: file_sha256(f) for f in files},
    }
    if check_parity:
        provenance["import_parity_max_abs_diff"] = check_source_parity(model, folder, cfg)
    return model, provenance


def _rename_v4_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if "encoder.layer." in k:
            for old, new in _VIT_V4_NAMES.items():
                k = k.replace(old, new)
        out[k] = v
    return out


def _copy_weights(model: CanonicalTransformer, state: dict[str, torch.Tensor], arch: Architecture,
                  spec: ModelConfig) -> None:
    def find(src: str) -> torch.Tensor:
        for cand in (src, f"{arch.prefix}.{src}"):
            if cand in state:
                return state[cand]
        raise CheckpointError(f"Weight {src!r} is missing from the checkpoint.",
                              "the checkpoint is incomplete or not the architecture its config.json names.")

    mapping = dict(arch.embed_keys)
    for i in range(len(spec.layers)):
        mapping.update({f"layers.{i}.{k}": v for k, v in arch.layer_keys(i).items()})
    mapping.update(arch.final_keys)
    if spec.head.labels:
        mapping.update(arch.head_keys)
    target = model.state_dict()
    new_state = {}
    for name in target:
        module, _, leaf = name.rpartition(".")
        src = mapping.get(module)
        if src is None and name in mapping:  # bare parameters (ViT cls token, position table)
            src, leaf = mapping[name], None
        if src is None:
            raise CheckpointError(f"No source weight is mapped to {name}.", "report this as a pocketformer bug.")
        tensor = find(f"{src}.{leaf}" if leaf else src)
        if tensor.shape != target[name].shape:
            raise CheckpointError(f"Weight {src} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(target[name].shape)} from config.json.", "the checkpoint and its "
                                  "config.json disagree: re-save the checkpoint.")
        new_state[name] = tensor.float()
    model.load_state_dict(new_state)


def parity_inputs(spec: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs for parity checks: random tokens with the second row padded, or random pixels."""
    g = torch.Generator().manual_seed(seed)
    if spec.modality == "vision":
        return (torch.randn(batch, spec.channels, spec.image_size, spec.image_size, generator=g),)
    seq = min(seq, spec.max_positions - spec.position_offset)
    ids = torch.randint(low=3, high=spec.vocab_size, size=(batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq // 2:] = 0
    ids[mask == 0] = spec.pad_token_id
    return ids, mask


def check_source_parity(model: CanonicalTransformer, folder: Path, cfg: dict) -> float:
    """Run transformers' own model from `folder` beside ours; raise ParityError beyond PARITY_TOL."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = model.spec
    cls_name = (cfg.get("architectures") or [""])[0]
    auto = transformers.AutoModel
    if spec.head.labels:
        auto = (transformers.AutoModelForImageClassification if spec.modality == "vision"
                else transformers.AutoModelForSequenceClassification)
    try:
        source = auto.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as e:
        raise CheckpointError(f"transformers could not load {folder} as {cls_name or auto.__name__} "
                              f"({str(e).splitlines()[0][:200]}).", "check that the folder is a complete "
                              "`save_pretrained` output.") from None
    inputs = parity_inputs(spec)
    with torch.no_grad():
        if spec.modality == "text":
            out = source(input_ids=inputs[0], attention_mask=inputs[1])
            keep = inputs[1].bool()  # padded positions are masked out of everything downstream
        else:
            out = source(pixel_values=inputs[0])
            keep = None
        if spec.head.labels:  # classification models: compare what the user gets, the logits
            diff = (model(*inputs) - out.logits).abs().max().item()
        else:
            delta = model.encode(*inputs) - out.last_hidden_state
            diff = (delta[keep] if keep is not None else delta).abs().max().item()
    if not diff <= PARITY_TOL:
        raise ParityError(f"Imported model differs from the source by {diff:.2e} (tolerance {PARITY_TOL:.0e}).",
                          "this checkpoint uses a variant pocketformer does not reproduce; report it with its "
                          "config.json.")
    return diff
