"""A teacher's k largest outputs per position, computed once per train window and kept on disk (distill and
matformer's `teacher_topk`): a language model's teacher need not run its vocabulary head every step, and a later
stage, run or search trial distilling from the same teacher on the same windows does not run it at all (without
hidden-state matching, not the teacher either).

One file per teacher and k under cache_root()/teacher-topk, named by the teacher's weights and pocketformer's
version; inside, each window (by a hash of its token ids) has its values (float32) and token indices (int32),
(positions, k) each. A window is computed the first time a batch holds it; what a stage computed is merged into the
file when it ends (written whole to a temporary name, then renamed), so an interrupted stage costs only its own
windows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save

from ..models.canonical import CanonicalTransformer
from ..models.io import weights_sha256
from ..store import atomic_write_bytes, cache_root, digest, versions


def window_key(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]


class TeacherTopK:
    def __init__(self, teacher: CanonicalTransformer, k: int):
        self.k = k
        name = f"{weights_sha256(teacher)[:24]}-{digest(versions())[:8]}-k{k}.safetensors"
        self.path: Path = cache_root() / "teacher-topk" / name
        self.rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = self._read(self.path)
        self.reused, self.computed = 0, 0
        self._new: set[str] = set()

    @staticmethod
    def _read(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if not path.is_file():
            return {}
        t = load_file(path)
        return {name[:-len(".values")]: (t[name], t[name[:-len(".values")] + ".indices"])
                for name in t if name.endswith(".values")}

    def missing(self, ids: torch.Tensor) -> bool:
        """Does any window (row) of `ids` still need the teacher's outputs?"""
        return any(window_key(row) not in self.rows for row in ids)

    def take(self, ids: torch.Tensor, outputs: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices), (batch, positions, k) each, for the windows `ids`; `outputs()` gives the teacher's full
        outputs for the whole batch, called only when a window is not stored yet."""
        keys = [window_key(row) for row in ids]
        new = [j for j, key in enumerate(keys) if key not in self.rows]
        if new:
            values, indices = outputs().float().topk(self.k, dim=-1)
            for j in new:
                self.rows[keys[j]] = (values[j].contiguous(), indices[j].to(torch.int32).contiguous())
                self._new.add(keys[j])
        self.computed += len(new)
        self.reused += len(keys) - len(new)
        return torch.stack([self.rows[k][0] for k in keys]), torch.stack([self.rows[k][1] for k in keys])

    def save(self) -> None:
        """Merge the windows computed here into the file (another process may have added others meanwhile)."""
        if not self._new:
            return
        rows = {**self._read(self.path), **{key: self.rows[key] for key in self._new}}
        tensors = {f"{key}.{part}": t for key, pair in rows.items() for part, t in zip(("values", "indices"), pair)}
        atomic_write_bytes(self.path, save(tensors))
        self._new.clear()

    def details(self) -> dict:
        return {"k": self.k, "file": str(self.path), "windows_reused": self.reused, "windows_computed": self.computed}
