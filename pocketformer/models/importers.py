"""Map Hugging Face checkpoints (BERT, MiniLM, RoBERTa, DistilBERT, ViT) from a local folder into the canonical model.

Each architecture is one small table: how its config reads into a ModelConfig and where each canonical weight lives
in its state dict. After mapping, the source model (transformers, from the same folder) and the canonical model run on
the same inputs; an import whose outputs differ by more than PARITY_TOL is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ArchitectureError, CheckpointError, ParityError, first_error
from ..progress import quiet
from ..store import contained, read_json_file
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


def _head_dim(cfg: dict, hidden: str = "hidden_size", heads: str = "num_attention_heads") -> int:
    """Each head's width: the hidden size split evenly over the heads (ValueError for a config that cannot be)."""
    for key in (hidden, heads):
        if type(cfg[key]) is not int or cfg[key] < 1:
            raise ValueError(f"{key} is {cfg[key]!r}, not a positive whole number")
    if cfg[hidden] % cfg[heads]:
        raise ValueError(f"{hidden} {cfg[hidden]} does not split into {cfg[heads]} heads ({heads}) of equal width")
    return cfg[hidden] // cfg[heads]


def _bert_like(cfg: dict, position_offset: int = 0) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        modality="text", hidden=cfg["hidden_size"], eps=cfg.get("layer_norm_eps", 1e-12),
        act=_act(cfg.get("hidden_act", "gelu")),
        layers=[LayerShape(heads=heads, head_dim=_head_dim(cfg), ffn=cfg["intermediate_size"])
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
        layers=[LayerShape(heads=heads, head_dim=_head_dim(cfg, "dim", "n_heads"), ffn=cfg["hidden_dim"])
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
        layers=[LayerShape(heads=heads, head_dim=_head_dim(cfg), ffn=cfg["intermediate_size"])
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

# Importers of other model kinds (causal LMs) by model_type: `fn(folder, config dict, check_parity, trust_pickle)`
# -> (model, provenance). They register from their own modules (pocketformer.models.lm_importers).
FAMILY_IMPORTERS: dict[str, Callable] = {}


def register_family(model_type: str, importer: Callable) -> None:
    FAMILY_IMPORTERS[model_type] = importer


def read_hf_config(folder: Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"Checkpoint {folder} does not exist.", "check the path.")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not a checkpoint folder.",
                              "pass the folder that holds config.json and model.safetensors.")
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} has no config.json.",
                              "pass a folder written by `save_pretrained` or by `pocketformer compress`.")
    cfg = read_json_file(folder / "config.json", "Checkpoint config", "re-download or re-save the checkpoint.")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / 'config.json'} is not a JSON object of settings.",
                              "re-download or re-save the checkpoint.")
    return cfg


def _shards(index: Path) -> list[Path]:
    """The files a sharded checkpoint's index names (each a plain file name beside the index)."""
    fix = "re-download or re-save the checkpoint."
    weight_map = read_json_file(index, "Shard index", fix)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map (which file holds which tensor).", fix)
    return sorted({contained(index.parent, f, str(index)) for f in weight_map.values()})


def read_hf_weights(folder: Path, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The checkpoint's tensors, from safetensors (single or sharded). A pickle (pytorch_model.bin, *.pt) only with
    `trust_pickle`, and then only through weights_only loading."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = _shards(index)
    else:
        pickles = [p for p in (folder / "pytorch_model.bin", *sorted(folder.glob("*.pt"))) if p.is_file()]
        if not pickles:
            raise CheckpointError(f"{folder} has no model.safetensors.", "save the model with "
                                  "`save_pretrained(..., safe_serialization=True)`.")
        if not trust_pickle:
            raise CheckpointError(f"{folder} holds its weights only as a pickle ({pickles[0].name}), and unpickling "
                                  "a file can run any code in it, so it is not read by default.",
                                  "convert it to model.safetensors (`save_pretrained(..., safe_serialization=True)`)"
                                  ", or, if you trust where it came from, pass --trust-pickle (in a recipe: "
                                  "trust_pickle: true) to read its tensors with torch.load(weights_only=True).")
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


def import_hf(folder: Path, check_parity: bool = True, trust_pickle: bool = False
              ) -> tuple[CanonicalTransformer, dict]:
    """Import a Hugging Face folder. Returns the canonical model and its provenance (source, hashes, parity).
    Weights stored only as a pickle are read (weights_only) only with `trust_pickle`."""
    folder = Path(folder)
    cfg = read_hf_config(folder)
    model_type = cfg.get("model_type")
    known = ", ".join(sorted({*ARCHITECTURES, *FAMILY_IMPORTERS}))
    if model_type is None:
        raise ArchitectureError(f"{folder / 'config.json'} names no model_type, so its architecture is unknown.",
                                f"pass a checkpoint saved by transformers (`save_pretrained`) of one of: {known}.")
    if isinstance(model_type, str) and model_type in FAMILY_IMPORTERS:
        return FAMILY_IMPORTERS[model_type](folder, cfg, check_parity, trust_pickle)
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise ArchitectureError(f"Architecture {model_type!r} ({', '.join(cfg.get('architectures') or [])}) is not "
                                "supported.", f"use a checkpoint of one of: {known}.")
    arch = ARCHITECTURES[model_type]
    spec, head = _read_spec(arch, cfg, folder)
    sentence = None if head.labels else read_sentence_head(folder, spec.hidden, trust_pickle)
    spec = spec.model_copy(update={"head": sentence.head if sentence else head})
    state, files = read_hf_weights(folder, trust_pickle)
    if model_type == "vit":
        state = _rename_v4_vit(state)
    model = CanonicalTransformer(spec)
    _copy_weights(model, state, arch, spec)
    if sentence is not None and sentence.dense_state:
        model.embedding_head.dense.load_state_dict(sentence.dense_state)
    model.eval()
    provenance = {
        "source": str(folder.resolve()), "source_architecture": (cfg.get("architectures") or [model_type])[0],
        "source_model_type": model_type,
        "source_files_sha256": {f.name: file_sha256(f) for f in files + (sentence.files if sentence else [])},
    }
    if sentence is not None:
        provenance["sentence_transformers"] = sentence.describe()
    if check_parity:
        provenance["import_parity_max_abs_diff"] = check_source_parity(model, folder, cfg)
        if sentence is not None:
            provenance["sentence_embedding_parity_max_abs_diff"] = check_sentence_parity(model, folder)
    return model, provenance


def _read_spec(arch: Architecture, cfg: dict, folder: Path) -> tuple[ModelConfig, HeadSpec]:
    """The canonical shapes and head a config.json describes; a setting missing, of the wrong type or out of range is
    one CheckpointError naming it."""
    fix = "the config.json does not describe a model of its model_type: re-save the checkpoint with " \
          "`save_pretrained`."
    try:
        return arch.build(cfg), arch.head(cfg)
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'} has no {e.args[0]!r} setting.", fix) from None
    except (TypeError, ValueError, AttributeError) as e:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{folder / 'config.json'} describes no model pocketformer can build "
                              f"({first_error(e)}).", fix) from None


# -- sentence-transformers folders: Transformer -> Pooling -> [Dense] -> [Normalize] ---------------------------------

ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}
ST_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh",
                  "torch.nn.modules.activation.ReLU": "relu"}
ST_FIX = "use a sentence-transformers model whose modules are Transformer, Pooling (cls, mean or max), at most one " \
         "Dense (identity, tanh or relu) and Normalize, or import its Transformer folder alone as a token encoder."


@dataclass
class SentenceHead:
    """What a sentence-transformers folder's modules.json puts after the transformer, as the canonical head."""

    head: HeadSpec
    modules: list[str]
    dense_state: dict[str, torch.Tensor]
    files: list[Path]
    max_seq_length: Optional[int]

    def describe(self) -> dict:
        return {"modules": self.modules, "pooling": self.head.pooling, "dense": self.head.dense,
                "dense_act": self.head.dense_act, "normalize": self.head.normalize,
                "max_seq_length": self.max_seq_length}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.", "re-save the sentence-transformers model.") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}).", "re-save the sentence-transformers model.") \
            from None


def _st_pooling(config: dict, path: Path) -> str:
    """The one pooling mode a Pooling module's config turns on (old boolean keys, or "pooling_mode")."""
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        modes = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
        modes = [ST_POOLING.get(f"pooling_mode_{m}", m) for m in modes]
    if len(modes) != 1 or modes[0] not in ("cls", "mean", "max"):
        raise ArchitectureError(f"{path}: pooling {' + '.join(modes) or 'none'} has no equivalent in pocketformer "
                                "(it pools by one of cls, mean or max).", ST_FIX)
    return modes[0]


def _st_dense(path: Path, hidden: int, trust_pickle: bool = False
              ) -> tuple[int, str, dict[str, torch.Tensor], list[Path]]:
    config = _read_json(path / "config.json")
    act = ST_ACTIVATIONS.get(config.get("activation_function", "torch.nn.modules.linear.Identity"))
    if act is None or config.get("in_features") != hidden:
        raise ArchitectureError(f"{path}: a Dense module with activation {config.get('activation_function')!r} on "
                                f"{config.get('in_features')} features has no equivalent here (the pooled state has "
                                f"{hidden}).", ST_FIX)
    weights = path / "model.safetensors"
    if weights.is_file():
        state, files = load_safetensors(weights), [weights]
    else:
        state, files = read_hf_weights(path, trust_pickle)  # a pytorch_model.bin: only if trusted
    dense = {k.removeprefix("linear."): v.float() for k, v in state.items() if k.startswith("linear.")}
    if set(dense) - {"weight", "bias"} or "weight" not in dense or \
            tuple(dense["weight"].shape) != (config.get("out_features"), hidden):
        raise CheckpointError(f"{path}'s weights do not match its config.json.", "re-save the sentence-transformers "
                                                                               "model.")
    if "bias" not in dense:
        dense["bias"] = torch.zeros(config["out_features"])
    return int(config["out_features"]), act, dense, files


def read_sentence_head(folder: Path, hidden: int, trust_pickle: bool = False) -> Optional[SentenceHead]:
    """The head a sentence-transformers folder declares (modules.json), or None for a plain Hugging Face folder.
    Modules pocketformer cannot reproduce are refused, never replaced by another head."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return None
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise CheckpointError(f"{folder / 'modules.json'} is not a list of modules.", "re-save the model.")
    kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    if kinds[:1] != ["Transformer"] or modules[0].get("path", "") not in ("", "."):
        raise ArchitectureError(f"{folder}: the first sentence-transformers module is {kinds[0] if kinds else 'none'} "
                                f"at {modules[0].get('path') if modules else '-'!r}; pocketformer imports a Transformer "
                                "stored at the folder's root.", ST_FIX)
    pooling, dense, act, dense_state, files, normalize = None, 0, "identity", {}, [], False
    for kind, module in zip(kinds[1:], modules[1:]):
        path = folder / module.get("path", "")
        order_ok = (kind == "Pooling" and pooling is None) or (kind == "Dense" and pooling and not dense
                                                              and not normalize) or (kind == "Normalize" and pooling)
        if not order_ok:
            raise ArchitectureError(f"{folder}: sentence-transformers module {kind} ({module.get('path')}) "
                                    f"after {', '.join(kinds[:kinds.index(kind)])} has no equivalent in "
                                    "pocketformer's head.", ST_FIX)
        if kind == "Pooling":
            config = _read_json(path / "config.json")
            dim = config.get("word_embedding_dimension", config.get("embedding_dimension", hidden))
            if dim != hidden:
                raise CheckpointError(f"{path}: pools {dim} features but the transformer has {hidden}.",
                                      "re-save the sentence-transformers model.")
            pooling = _st_pooling(config, path / "config.json")
        elif kind == "Dense":
            dense, act, dense_state, files = _st_dense(path, hidden, trust_pickle)
        else:
            normalize = True
    if pooling is None:
        raise ArchitectureError(f"{folder}: modules.json has no Pooling module after the Transformer.", ST_FIX)
    limit = (_read_json(folder / "sentence_bert_config.json").get("max_seq_length")
             if (folder / "sentence_bert_config.json").is_file() else None)
    return SentenceHead(HeadSpec(pooling=pooling, pre="none", labels=[], dense=dense, dense_act=act,
                                 normalize=normalize), kinds, dense_state, files, limit)


def check_sentence_parity(model: CanonicalTransformer, folder: Path) -> float:
    """The whole sentence embedding (pooling, dense, normalisation) against sentence-transformers itself on the same
    token ids; raise ParityError beyond PARITY_TOL."""
    try:
        with quiet("sentence_transformers", "torchao", stderr=True):
            from sentence_transformers import SentenceTransformer
    except ImportError:
        raise CheckpointError(f"{folder} is a sentence-transformers model, and its head can only be checked against "
                              "sentence-transformers itself, which is not installed.",
                              "pip install --no-deps sentence-transformers==6.2.0 (make install does).") from None
    with quiet("sentence_transformers", "torchao", "transformers", stderr=True):
        source = SentenceTransformer(str(folder), device="cpu").eval()
    ids, mask = parity_inputs(model.spec)
    with torch.no_grad():
        want = source({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
        diff = (model(ids, mask) - want).abs().max().item()
    if not diff <= PARITY_TOL:
        raise ParityError(f"The imported sentence embedding differs from sentence-transformers' by {diff:.2e} "
                          f"(tolerance {PARITY_TOL:.0e}).", "report this with the folder's modules.json.")
    return diff


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
        if name.startswith("embedding_head."):  # a sentence-transformers Dense: read from its own folder
            new_state[name] = target[name]
            continue
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
