"""The canonical transformer, its checkpoint format, and importers that map source checkpoints into it."""

from . import ecoformer as _ecoformer  # noqa: F401  registers the "ecoformer" attention kind
from . import lm_importers as _lm_importers  # noqa: F401  registers the causal LM families' importers
from .causal import CausalLM, CausalLMConfig
from .canonical import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig, count_params, encoder_macs
from .io import is_canonical, load, save
from .importers import ARCHITECTURES, import_hf

__all__ = ["ARCHITECTURES", "CanonicalTransformer", "CausalLM", "CausalLMConfig", "HeadSpec", "LayerShape",
           "ModelConfig", "count_params", "encoder_macs", "import_hf", "is_canonical", "load", "save", "load_any", "source_folder"]


def source_folder(path):
    """The folder a checkpoint is read from: a GGUF file's canonical conversion (made once, cached), else the path."""
    from pathlib import Path

    from .gguf_import import converted, is_gguf

    path = Path(path)
    return converted(path) if is_gguf(path) else path


def load_any(path, trust_pickle: bool = False):
    """A canonical checkpoint folder, a Hugging Face folder or a GGUF file -> (model, provenance). A Hugging Face
    folder whose weights are only a pickle is read (weights_only) only with `trust_pickle`."""
    path = source_folder(path)
    if is_canonical(path):
        model, meta = load(path)
        return model, meta.get("provenance", {})
    return import_hf(path, trust_pickle=trust_pickle)
