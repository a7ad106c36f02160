"""What every exporter shares: a forward with named arguments, parity metrics, and the artifact record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models.canonical import CanonicalTransformer

class NamedInputs(torch.nn.Module):
    """The canonical model with one named argument per input, as exporters need."""

    def __init__(self, model: CanonicalTransformer):
        super().__init__()
        self.model = model

    def forward(self, *args):  # replaced per modality below so exporters see real parameter names
        raise NotImplementedError


class TextInputs(NamedInputs):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


class VisionInputs(NamedInputs):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def named(model: CanonicalTransformer) -> NamedInputs:
    return (TextInputs if model.spec.modality == "text" else VisionInputs)(model).eval()


def pad_to(inputs: tuple[torch.Tensor, ...], seq: int, model: CanonicalTransformer) -> tuple[torch.Tensor, ...]:
    """Text inputs padded (pad token, mask 0) or truncated to `seq` tokens; vision inputs unchanged."""
    if model.spec.modality != "text":
        return inputs
    ids, mask = inputs
    ids, mask = ids[:, :seq], mask[:, :seq]
    pad = seq - ids.shape[1]
    return (torch.nn.functional.pad(ids, (0, pad), value=model.spec.pad_token_id),
            torch.nn.functional.pad(mask, (0, pad), value=0))


def fill_batch(tensors: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """Tensors of fewer than `batch` rows filled up by repeating the last row, for files with a fixed batch."""
    n = len(tensors[0])
    if n >= batch:
        return tuple(tensors)
    return tuple(torch.cat([t, t[-1:].expand(batch - n, *t.shape[1:])]) for t in tensors)


def run_in_batches(run, names: list[str], inputs: tuple[torch.Tensor, ...], batch: int) -> np.ndarray:
    """`run(feeds)` over `inputs` in chunks of a fixed `batch` (the last chunk filled up); one row per input."""
    outs = []
    for start in range(0, len(inputs[0]), batch):
        chunk = tuple(t[start:start + batch] for t in inputs)
        n = len(chunk[0])
        outs.append(run({k: t.numpy() for k, t in zip(names, fill_batch(chunk, batch))})[:n])
    return np.concatenate(outs)


def artifact_size(path: Path) -> int:
    """Bytes on disk of an artifact: a file, or a package folder (CoreML .mlpackage)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


# Reduced-precision files (fp16, int8, palettes) are kept when they make the float model's decisions.
QUANT_MIN_COSINE = 0.99  # embedding outputs: same direction
QUANT_MIN_AGREEMENT = 0.9  # classifier outputs: same predicted label on the check inputs


def reduced_precision_ok(result: dict[str, float], classifier: bool) -> bool:
    """Classifiers are judged by argmax agreement: the cosine of a 2-logit vector swings with small shifts near the
    decision boundary (a fine-tuned MiniLM sentiment model's ORT int8 file: logit cosine 0.985 on 16 test inputs).
    Embedding outputs are judged by cosine. Accuracy on the whole test split is validate's job."""
    if classifier:
        return result["argmax_agreement"] >= QUANT_MIN_AGREEMENT
    return result["cosine"] >= QUANT_MIN_COSINE


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs diff, and the mean over examples of the cosine between output vectors."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12)
    return {"max_abs_diff": float(np.abs(ref - cand).max()), "cosine": float(cos.mean()),
            "min_cosine": float(cos.min()), "argmax_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
            "examples": int(len(ref))}
