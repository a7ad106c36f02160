"""Save and load canonical checkpoints: `model.safetensors` + `pocketformer.json` (shapes and provenance).

Loading needs neither the source model's code nor pickle. Writes go to a temporary folder renamed into place when
complete, so an interrupted save never leaves a half-written checkpoint where a good one stood.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..store import output_folder
from .canonical import CanonicalTransformer, ModelConfig
from .causal import CausalLM, CausalLMConfig

META_FILE = "pocketformer.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the weights' values and names: identical models hash alike whatever file holds them."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def is_canonical(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def atomic_dir(final: Path):
    """Context manager yielding a temporary sibling folder that replaces `final` only on success."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        output_folder(self.final)  # a file there would be silently replaced by the folder
        if self.final.parent.exists():
            output_folder(self.final.parent)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def save(model: CanonicalTransformer, out: Path, provenance: dict[str, Any] | None = None,
         tokenizer_dir: Path | None = None) -> Path:
    out = Path(out)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": model.config.model_dump(),
            "provenance": dict(provenance or {}),
            "weights_sha256": file_sha256(tmp / WEIGHTS_FILE),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return out


def read_meta(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {path} does not exist.", "check the path, or run `pocketformer compress` "
                                                                      "to create it.")
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a pocketformer checkpoint (no {META_FILE}).",
                              "pass a folder written by `pocketformer compress`, or a Hugging Face folder "
                              "(config.json + model.safetensors).") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e.msg} at line {e.lineno}).",
                              "re-create the checkpoint; it was damaged or cut short.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {meta.get('format_version')!r}; this pocketformer "
                              f"reads {FORMAT_VERSION}.", "re-create the checkpoint with this version.")
    return meta


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupt file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file {path} is missing.", "re-create or re-download the checkpoint.")
    try:
        with open(path, "rb"):  # an unreadable file is a permission problem, not a corrupt one
            pass
    except OSError as e:
        raise CheckpointError(f"Weights file {path} cannot be read ({e.strerror or e}).",
                              "check the file's permissions.") from None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"Weights file {path} is truncated or corrupt ({str(e).splitlines()[0]}).",
                              "re-create or re-download the checkpoint.") from None


# The canonical model kinds, by the `kind` their config records (an encoder's config has none).
MODEL_KINDS: dict[str, tuple[type, type]] = {"encoder": (ModelConfig, CanonicalTransformer),
                                             "causal_lm": (CausalLMConfig, CausalLM)}


def model_kind(config: Any) -> tuple[type, type]:
    """(config class, module class) of a saved config."""
    kind = config.get("kind", "encoder") if isinstance(config, dict) else "encoder"
    return MODEL_KINDS.get(kind, MODEL_KINDS["encoder"])


def load(path: Path) -> tuple[CanonicalTransformer, dict[str, Any]]:
    """Rebuild a canonical model (an encoder, or a causal LM) from its folder. Returns (model in eval mode,
    metadata)."""
    path = Path(path)
    meta = read_meta(path)
    config_cls, module_cls = model_kind(meta.get("config"))
    try:
        cfg = config_cls.model_validate(meta["config"])
    except Exception as e:  # pydantic.ValidationError or a missing key
        raise CheckpointError(f"{path / META_FILE} describes no valid model ({str(e).splitlines()[0]}).",
                              "re-create the checkpoint.") from None
    state = load_safetensors(path / WEIGHTS_FILE)
    model = module_cls(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match {META_FILE} ({str(e).splitlines()[-1].strip()}).",
                              "re-create the checkpoint.") from None
    if missing or unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match {META_FILE} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).", "re-create the checkpoint.")
    return model.eval(), meta
