"""What a model says about itself to the app that loads its file: the card.

An app developer does not call our Python: their app reads the file. So every artifact carries, in its format's own
convention (ONNX metadata_props, TFLite Model Metadata, Core ML user-defined metadata), the same facts: the label
names, the tokenizer (embedded where the format can, beside the file where it cannot), the longest input, each
input's name and meaning, the output's meaning, and provenance (pocketformer version, recipe hash, source checkpoint,
weights hash). The card is built once from the checkpoint (`card_of`); formats only write it (`Format.annotate`) and
read it back (`Format.read_card`), as the flat string map `metadata()` / `from_metadata()` define.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import __version__

PREFIX = "pocketformer."  # every key we write into a file's metadata starts with it
TOKENIZER_DIR = "{stem}.tokenizer"
TEXT_KEYS = ("name", "task", "modality", "tokenizer_dir")  # card keys whose values are plain strings  # beside the artifacts of one variant, for formats that cannot embed files


@dataclass(frozen=True)
class Tokenizer:
    """A WordPiece (BERT) tokenizer as apps' tokenizers take it: the vocabulary file and the normalisation.
    `strip_accents` None follows `lowercase` (BERT's rule). `files`: the checkpoint's tokenizer files by name."""

    kind: str  # "wordpiece", or a language model's tokenizer.json model type ("bpe", "unigram")
    lowercase: bool
    strip_accents: Optional[bool]
    cls: str
    sep: str
    pad: str
    unk: str
    max_len: int
    files: dict[str, str] = field(default_factory=dict)  # name -> path on this machine (never written into files)

    @property
    def wordpiece(self) -> bool:
        """A BERT tokenizer, which apps' own tokenizers (and TFLite's BertTokenizer unit) mirror."""
        return self.kind == "wordpiece"

    @property
    def strips_accents(self) -> bool:
        return self.lowercase if self.strip_accents is None else self.strip_accents

    def vocab(self) -> list[str]:
        """Tokens in id order (vocab.txt's lines)."""
        if "vocab.txt" in self.files:
            return Path(self.files["vocab.txt"]).read_text(encoding="utf-8").splitlines()
        model = json.loads(Path(self.files["tokenizer.json"]).read_text(encoding="utf-8"))["model"]["vocab"]
        return [t for t, _ in sorted(model.items(), key=lambda kv: kv[1])]

    def vocab_txt(self) -> bytes:
        return ("\n".join(self.vocab()) + "\n").encode("utf-8")

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "files"} | {"files": sorted(self.files)}


@dataclass(frozen=True)
class Image:
    """How an app turns a picture into the model's pixel_values: resize to height x width, keep `channels`
    (1: the mean of R, G, B), then (pixel - mean) / std per channel on 0..255 values."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Card:
    name: str  # the run's name and variant ("minilm-sentiment/model")
    variant: str  # the artifacts' stem ("model", "baseline"): names the tokenizer folder beside them
    task: str  # the task registry's name: "classification", "embedding"
    modality: str  # "text", "vision"
    labels: tuple[str, ...]  # a classifier's label names, in output order; () for embeddings
    inputs: tuple[dict[str, Any], ...]  # name, dtype, axes, meaning
    output: dict[str, Any]  # name, meaning, dim, normalized
    tokenizer: Optional[Tokenizer]
    image: Optional[Image]
    provenance: dict[str, Any]  # pocketformer, recipe_sha256, source, weights_sha256, ...

    @property
    def tokenizer_dir(self) -> Optional[str]:
        """The folder beside the artifacts that holds the tokenizer files (formats that cannot embed them point to
        it), or None for a model without a tokenizer."""
        return TOKENIZER_DIR.format(stem=self.variant) if self.tokenizer else None

    @property
    def max_len(self) -> Optional[int]:
        return self.tokenizer.max_len if self.tokenizer else None

    def description(self) -> str:
        """One sentence for a format's description field."""
        what = (f"{self.modality} classifier ({', '.join(self.labels)})" if self.labels
                else f"{self.modality} {self.task} model ({self.output.get('dim')} dims"
                     + (", L2-normalised)" if self.output.get("normalized") else ")"))
        return f"{self.name}: {what}, made by pocketformer {self.provenance.get('pocketformer', __version__)}."

    def metadata(self) -> dict[str, str]:
        """The card as flat string key/values (ONNX metadata_props, Core ML user-defined metadata): strings as they
        are, everything else as JSON."""
        values = {"name": self.name, "task": self.task, "modality": self.modality, "labels": list(self.labels),
                  "inputs": list(self.inputs), "output": self.output, "max_len": self.max_len,
                  "tokenizer": self.tokenizer.public() if self.tokenizer else None,
                  "tokenizer_dir": self.tokenizer_dir,
                  "image": asdict(self.image) if self.image else None, "provenance": self.provenance}
        return {PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for k, v in values.items() if v is not None}

    def labels_txt(self) -> bytes:
        return ("\n".join(self.labels) + "\n").encode("utf-8")

    def to_json(self) -> dict[str, Any]:
        return from_metadata(self.metadata()) or {}


def from_metadata(props: dict[str, str]) -> Optional[dict[str, Any]]:
    """A card read back from a file's metadata map, as plain JSON values; None when the file carries none."""
    found = {k.removeprefix(PREFIX): v for k, v in props.items() if k.startswith(PREFIX)}
    if not found:
        return None
    out = {}
    for k, v in found.items():
        try:
            out[k] = v if k in TEXT_KEYS else json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# -- building a card from a checkpoint -----------------------------------------------------------------------------

MEANINGS = {
    "input_ids": "token ids from the tokenizer: [CLS] text [SEP], padded with the pad id",
    "attention_mask": "1 for each real token, 0 for padding",
    "segment_ids": "token type ids: all 0 for one text",
    "pixel_values": "the image, channels first, normalised as the card's image entry says",
}
OUTPUT_MEANINGS = {
    "logits": "one score per label, before softmax",
    "embedding": "one vector per input",
}


def _tokenizer(folder: Path, max_len: int) -> Optional[Tokenizer]:
    """The checkpoint's WordPiece tokenizer, or None when it has none (or not one an app tokenizer can mirror)."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return None
    spec = json.loads(tj.read_text(encoding="utf-8"))
    model, norm = spec.get("model") or {}, spec.get("normalizer") or {}
    if model.get("type") != "WordPiece" or norm.get("type") != "BertNormalizer":
        return None
    config = {}
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    files = {p.name: str(p) for p in sorted(folder.iterdir())
             if p.name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")}

    def tok(key: str, default: str) -> str:
        v = config.get(key, default)
        return v.get("content", default) if isinstance(v, dict) else v

    return Tokenizer("wordpiece", bool(norm.get("lowercase", True)), norm.get("strip_accents"),
                     tok("cls_token", "[CLS]"), tok("sep_token", "[SEP]"), tok("pad_token", "[PAD]"),
                     model.get("unk_token", "[UNK]"), max_len, files)


LM_MEANINGS = {
    "input_ids": "token ids of the new tokens (the whole prompt at the first step, then one token a step)",
    "attention_mask": "1 for each real token of the past and the new tokens, 0 for padding",
    "position_ids": "each new token's position in the text",
    "tokens": "token ids of the new tokens, padded at the end to the signature's length",
    "input_pos": "the new tokens' positions: the cache slots they are written to",
}


def _lm_card(model, folder: Path, name: str, variant: str, max_len: int, provenance: dict[str, Any]) -> Card:
    """A decoder-only language model's card: its cached graph's inputs, the logits over the vocabulary, and its
    tokenizer.json (beside the files; not one an app's WordPiece tokenizer mirrors)."""
    cfg = model.config
    inputs = tuple({"name": t.name, "dtype": t.dtype, "axes": list(t.axes),
                    "meaning": LM_MEANINGS.get(t.name, "this layer's keys or values of the earlier tokens (the "
                                                      "previous step's present.N.key / present.N.value)"
                                                      if t.name.startswith("past_") else "")}
                   for t in cfg.inputs())
    output = {"name": "logits", "meaning": "next-token scores over the vocabulary, one row per new token",
              "dim": cfg.vocab_size, "normalized": False}
    tokenizer = None
    tj = Path(folder) / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer as HfTokenizer

        tok = HfTokenizer.from_file(str(tj))
        kind = str((json.loads(tj.read_text(encoding="utf-8")).get("model") or {}).get("type", "")).lower()

        def token(i: Optional[int]) -> str:
            return (tok.id_to_token(i) or "") if i is not None else ""

        eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
        # cls: the token every prompt starts with (BOS; empty when the model adds none); sep: the end of text
        tokenizer = Tokenizer(kind, False, False, token(cfg.bos_token_id if cfg.add_bos else None), token(eos),
                              token(cfg.pad_token_id), "", max_len, {"tokenizer.json": str(tj)})
    return Card(name, variant, cfg.task, "text", (), inputs, output, tokenizer, None,
                {"pocketformer": __version__, **provenance})


def card_of(model, folder: Path, name: str, variant: str, max_len: int, provenance: dict[str, Any]) -> Card:
    """The card of the canonical `model` saved in checkpoint `folder` (its tokenizer files), exported as
    `variant`, for inputs of up to `max_len` tokens; `provenance`: what made it (recipe hash, source, weights)."""
    cfg = model.config
    if getattr(cfg, "kind", None) == "causal_lm":
        return _lm_card(model, folder, name, variant, max_len, provenance)
    inputs = tuple({"name": t.name, "dtype": t.dtype, "axes": list(t.axes), "meaning": MEANINGS.get(t.name, "")}
                   for t in cfg.inputs())
    out = model.io.outputs[-1]
    dim = len(cfg.head.labels) if cfg.head.labels else (cfg.head.dense or cfg.hidden)
    output = {"name": out.name, "meaning": OUTPUT_MEANINGS.get(out.name, ""), "dim": dim,
              "normalized": bool(cfg.head.normalize)}
    image = None
    if cfg.modality == "vision":  # pixel_values are the dataset's floats in 0..1: an app's 0..255 pixels / 255
        image = Image(cfg.image_size, cfg.image_size, cfg.channels, (0.0,) * cfg.channels, (255.0,) * cfg.channels)
    return Card(name, variant, cfg.task, cfg.modality, tuple(cfg.head.labels), inputs, output,
                _tokenizer(Path(folder), max_len) if cfg.modality == "text" else None, image,
                {"pocketformer": __version__, **provenance})
