"""GGUF files (llama.cpp's format) into the canonical decoder: Llama / SmolLM, Qwen2 and Gemma 3.

The weights are dequantized to fp32 with the `gguf` package (a 4-bit GGUF becomes its dequantized 4-bit weights, not
the original float model: every figure compared to such a baseline says so). llama.cpp's converter changed two things
that are undone here: Llama's q/k rows are permuted from Hugging Face's rotate-half layout into interleaved pairs, and
Gemma's norm weights are stored as 1 + w. The configuration is the one transformers reads from the same metadata (its
defaults fill what the file leaves out, e.g. Gemma 3's local rotary base and layer pattern); the tokenizer is the
file's own vocabulary, turned into a `tokenizers` tokenizer by transformers' converter. The import is then checked
against transformers' own GGUF loader on real text, as a Hugging Face import is.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ArchitectureError, CheckpointError, first_error
from ..progress import quiet
from .causal import CausalLM
from .io import file_sha256
from .lm_importers import FAMILIES, check_lm_parity, lm_spec, map_weights

# GGUF architecture -> transformers model_type of the family importer
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
# `ffn_norm` is the FFN's pre-norm in both, but Hugging Face names it differently per family.
_BLOCK_BY_ARCH = {"gemma3": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                             "post_ffw_norm": "post_feedforward_layernorm"},
                  "llama": {"ffn_norm": "post_attention_layernorm"}, "qwen2": {"ffn_norm": "post_attention_layernorm"}}
FIX = "pass a GGUF file written by llama.cpp's converter (convert_hf_to_gguf.py) of a Llama, Qwen2 or Gemma 3 model."


def hf_name(name: str, arch: str) -> str:
    """The Hugging Face name of a GGUF tensor."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    part = m and (_BLOCK_BY_ARCH[arch].get(m.group(2)) or _BLOCK.get(m.group(2)))
    if not part:
        raise ArchitectureError(f"GGUF tensor {name!r} has no place in a {arch} decoder.", FIX)
    return f"model.layers.{m.group(1)}.{part}.{m.group(3)}"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Llama q/k permutation (Hugging Face rotate-half rows -> interleaved pairs)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[Any, str]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except FileNotFoundError:
        raise CheckpointError(f"GGUF file {path} does not exist.", "check the path.") from None
    except (KeyError, ValueError, OSError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({first_error(e)[:160]}).",
                              "re-download or re-convert it; it may be truncated.") from None
    if arch not in GGUF_ARCHITECTURES:
        raise ArchitectureError(f"GGUF architecture {arch!r} is not supported.",
                                f"use a GGUF of one of: {', '.join(sorted(GGUF_ARCHITECTURES))}.")
    return reader, arch


def gguf_state(reader, arch: str, heads: int, kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to fp32 under its Hugging Face name, llama.cpp's transforms undone."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])
        if arch == "llama" and ".attn_q." in t.name:
            w = unpermute(w, heads)
        elif arch == "llama" and ".attn_k." in t.name:
            w = unpermute(w, kv_heads)
        if arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - 1.0
        state[hf_name(t.name, arch)] = torch.from_numpy(w if w.flags.writeable else w.copy())
    return state


def gguf_config(path: Path):
    """transformers' config for the file's metadata (its GGUF loader's reading, defaults included)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.utils.logging.set_verbosity_error()
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    model_type = parsed.pop("model_type")
    parsed.pop("architectures", None)
    return transformers.AutoConfig.for_model(model_type, **parsed), model_type


def gguf_tokenizer(path: Path):
    """(tokenizers.Tokenizer from the file's vocabulary, whether a BOS token is prepended)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokens, tok_cfg = get_gguf_tokenizer(str(path))
    tokenizer, _ = convert_gguf_tokenizer(arch, tokens)
    return tokenizer, bool(tok_cfg.get("add_bos_token", False))


def import_gguf(path: Path, tok_dir: Path, check_parity: bool = True) -> tuple[CausalLM, dict]:
    """(canonical model, provenance) from a GGUF file; its vocabulary is written to tok_dir/tokenizer.json (a folder
    the caller owns and removes)."""
    path = Path(path)
    reader, arch = read_gguf(path)
    with quiet("transformers", "gguf", stderr=True):
        c, model_type = gguf_config(path)
    spec = lm_spec(c, model_type, path)
    tokenizer, add_bos = gguf_tokenizer(path)
    spec = spec.model_copy(update={"add_bos": add_bos})
    types = sorted({t.tensor_type.name for t in reader.tensors})
    model = CausalLM(spec)
    map_weights(model, gguf_state(reader, arch, spec.layers[0].heads, spec.layers[0].kv_heads),
                FAMILIES[model_type], str(path))
    model.eval()
    Path(tok_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(Path(tok_dir) / "tokenizer.json"))
    provenance = {"source": str(path.resolve()), "source_architecture": f"GGUF {arch}", "source_model_type": model_type,
                  "source_files_sha256": {path.name: file_sha256(path)},
                  "gguf_tensor_types": types,
                  "baseline_note": f"weights dequantized from the GGUF's {'/'.join(types)} tensors: the baseline is "
                                   "the quantized model, not its original float weights"}
    if check_parity:
        provenance["import_parity"] = check_lm_parity(model, lambda: _transformers_gguf(path), tokenizer)
    return model, provenance


def _transformers_gguf(path: Path):
    import transformers

    with quiet("transformers", "gguf", "accelerate", stderr=True):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                 local_files_only=True, dtype=torch.float32).eval()


# Bump when the conversion's result changes: cached conversions made by another version are redone.
CONVERSION_VERSION = 1


def converted(path: Path) -> Path:
    """The GGUF file as a canonical checkpoint folder (weights, config, provenance, tokenizer.json), converted and
    parity-checked once, then kept in the cache under the file's hash."""
    from ..progress import info
    from ..store import cache_root, package_versions
    from .io import is_canonical, save

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist.", "check the path.")
    versions = package_versions("gguf", "transformers")
    key = f"{file_sha256(path)[:24]}-v{CONVERSION_VERSION}-gguf{versions['gguf']}-tf{versions['transformers']}"
    folder = cache_root() / "gguf" / key
    if is_canonical(folder):
        return folder
    info(f"converting {path.name} (GGUF) into a canonical checkpoint: dequantizing, then checking against "
         "transformers' GGUF loader")
    with tempfile.TemporaryDirectory(prefix="pocketformer-gguf-tokenizer-") as tok_dir:
        model, provenance = import_gguf(path, Path(tok_dir))
        save(model, folder, provenance, tokenizer_dir=Path(tok_dir))
    return folder


def is_gguf(path: Path) -> bool:
    """A file whose first bytes are GGUF's magic."""
    path = Path(path)
    if not path.is_file():
        return path.suffix == ".gguf"
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
