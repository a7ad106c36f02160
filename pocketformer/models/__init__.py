"""The canonical transformer, its checkpoint format, and importers that map source checkpoints into it."""

from . import ecoformer as _ecoformer  # noqa: F401  registers the "ecoformer" attention kind
from .canonical import CanonicalTransformer, HeadSpec, LayerShape, ModelConfig, count_params, encoder_macs
from .io import is_canonical, load, save
from .importers import ARCHITECTURES, import_hf

__all__ = ["ARCHITECTURES", "CanonicalTransformer", "HeadSpec", "LayerShape", "ModelConfig", "count_params",
           "encoder_macs", "import_hf", "is_canonical", "load", "save", "load_any"]


def load_any(path, trust_pickle: bool = False):
    """A canonical checkpoint folder or a Hugging Face folder -> (model, provenance). A Hugging Face folder whose
    weights are only a pickle is read (weights_only) only with `trust_pickle`."""
    from pathlib import Path

    path = Path(path)
    if is_canonical(path):
        model, meta = load(path)
        return model, meta.get("provenance", {})
    return import_hf(path, trust_pickle=trust_pickle)
