"""Shared infrastructure at the bottom of the import graph: where caches live, what versions made a result, how JSON
and artifact bytes are written (atomically), and how a run folder's records are read back.

Every layer may import this module; it imports nothing of pocketformer's but errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CheckpointError

MANIFEST = "artifacts.json"  # the artifacts folder's record of every exported file
COMPRESS_FILE = "compress.json"  # the run folder's record of the compression


def cache_root() -> Path:
    if os.environ.get("POCKETFORMER_CACHE"):
        return Path(os.environ["POCKETFORMER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pocketformer"


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    return {"pocketformer": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# CPU features that decide which int8/fp16 kernels a runtime picks (and so its speed, and int8's exact rounding).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",  # x86-64
                "asimddp", "i8mm", "bf16", "sve")  # arm64: dot product, int8 matmul


def cpu() -> dict[str, object]:
    """This host's CPU model and the kernel-deciding features it has (Linux /proc/cpuinfo; empty elsewhere): a
    speed claim names them."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    except OSError:
        pass
    return {"model": model, "features": [f for f in CPU_FEATURES if f in flags]}


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (missing ones as "absent"), for cache keys and provenance."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def digest(obj: Any) -> str:
    """sha256 of a JSON-able object, keys sorted: the cache key of a configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees a partial file. The temporary file
    is created new (a leftover of that name, or a symlink planted there, is removed, never followed), and the rename
    replaces a symlink at `path` itself rather than writing where it points."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def contained(folder: Path, name: str, what: str) -> Path:
    """`folder / name` for a name read from a file (a manifest's entry), refused unless it is a plain file name in
    that folder: no separators, no `..`, not absolute."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and not Path(name).is_absolute()
    if not plain:
        raise CheckpointError(f"{what} names {name!r}, which is not a file in {folder}.",
                              "re-export the artifacts; a manifest only names files beside it.")
    return Path(folder) / name


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str).encode())


def read_manifest(artifacts_dir: Path) -> list[dict[str, Any]]:
    """The records of artifacts.json; every record's file must lie in the folder (nothing outside is read or
    replaced because a manifest says so)."""
    path = Path(artifacts_dir) / MANIFEST
    if not path.is_file():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}).", "re-export the artifacts.") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "file" in r for r in records):
        raise CheckpointError(f"{path} is not a list of artifact records.", "re-export the artifacts.")
    for r in records:
        contained(artifacts_dir, r["file"], str(path))
    return records


def write_manifest(artifacts_dir: Path, records: list[dict[str, Any]]) -> None:
    """Merge records into the manifest, replacing those of the same file."""
    current = {r["file"]: r for r in read_manifest(artifacts_dir)}
    current.update({r["file"]: r for r in records})
    atomic_write_bytes(Path(artifacts_dir) / MANIFEST,
                       json.dumps(sorted(current.values(), key=lambda r: r["file"]), indent=2).encode())


def read_compress(out_dir: Path) -> dict[str, Any]:
    """The run folder's compress.json: recipe, versions, hashes and what each stage changed."""
    path = Path(out_dir) / COMPRESS_FILE
    if not path.is_file():
        raise CheckpointError(f"{out_dir} holds no {COMPRESS_FILE}.",
                              "run `pocketformer compress CKPT --recipe R.yaml -o OUT/` first.")
    return json.loads(path.read_text())
