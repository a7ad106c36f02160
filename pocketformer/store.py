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
# What later commands read of a run folder's records; a record without one was written by an older pocketformer.
COMPRESS_KEYS = ("recipe", "recipe_sha256", "versions", "input", "prepare", "stages", "baseline", "model")
COMPRESS_RECIPE_KEYS = ("name", "data", "seed", "max_len")
RECORD_KEYS = ("file", "variant", "format", "precision")
RERUN_COMPRESS = "re-run `pocketformer compress CKPT --recipe R.yaml -o OUT/` with this pocketformer"


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


def output_folder(path: Path, what: str = "Output folder") -> Path:
    """A folder a command will write into: refused up front (before any work) when a file stands at its path,
    which writing would otherwise fail on, or replace."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file, not a folder.",
                              "pass a new or existing folder for the output (--out).")
    return path


def read_json_file(path: Path, what: str, fix: str) -> Any:
    """A JSON file's content; unreadable or invalid JSON is one CheckpointError naming `what` it is and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e}).",
                              "check the file's permissions.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({getattr(e, 'msg', e)}).", fix) from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=False, default=str).encode())


def read_manifest(artifacts_dir: Path, require: tuple[str, ...] = ("file",)) -> list[dict[str, Any]]:
    """The records of artifacts.json, each holding the keys `require`s (RECORD_KEYS for a command that picks
    artifacts by them); every record's file must lie in the folder (nothing outside is read or replaced because a
    manifest says so)."""
    path = Path(artifacts_dir) / MANIFEST
    if not path.is_file():
        return []
    records = read_json_file(path, "Artifact manifest", "re-export the artifacts (`pocketformer export OUT/`).")
    if not isinstance(records, list) or not all(isinstance(r, dict) and "file" in r for r in records):
        raise CheckpointError(f"{path} is not a list of artifact records.", "re-export the artifacts.")
    for r in records:
        contained(artifacts_dir, r["file"], str(path))
        missing = [k for k in require if k not in r]
        if missing:
            raise CheckpointError(f"{path}: the record of {r['file']} has no {', '.join(missing)} (written by an "
                                  "older pocketformer).", f"re-export the artifacts: `pocketformer export "
                                                          f"{Path(artifacts_dir).parent}`.")
    return records


def write_manifest(artifacts_dir: Path, records: list[dict[str, Any]]) -> None:
    """Merge records into the manifest, replacing those of the same file."""
    current = {r["file"]: r for r in read_manifest(artifacts_dir)}
    current.update({r["file"]: r for r in records})
    atomic_write_bytes(Path(artifacts_dir) / MANIFEST,
                       json.dumps(sorted(current.values(), key=lambda r: r["file"]), indent=2).encode())


def read_compress(out_dir: Path) -> dict[str, Any]:
    """The run folder's compress.json: recipe, versions, hashes and what each stage changed. A folder that is not a
    run, or a record an older pocketformer wrote without what this one reads, is one CheckpointError."""
    out_dir = Path(out_dir)
    path = out_dir / COMPRESS_FILE
    if not out_dir.exists():
        raise CheckpointError(f"Run folder {out_dir} does not exist.",
                              "check the path, or run `pocketformer compress CKPT --recipe R.yaml -o OUT/` first.")
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file, not a run folder.",
                              "pass the folder written by `pocketformer compress` (-o OUT/).")
    if not path.is_file():
        raise CheckpointError(f"{out_dir} holds no {COMPRESS_FILE}.",
                              "run `pocketformer compress CKPT --recipe R.yaml -o OUT/` first.")
    meta = read_json_file(path, "Run record", f"{RERUN_COMPRESS}; the file was damaged or cut short.")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object.", f"{RERUN_COMPRESS}.")
    missing = [k for k in COMPRESS_KEYS if k not in meta]
    recipe = meta.get("recipe")
    if not missing and not isinstance(recipe, dict):
        missing = ["recipe"]
    missing += [f"recipe.{k}" for k in COMPRESS_RECIPE_KEYS if not missing and k not in recipe]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing)}: it was written by an older pocketformer.",
                              f"{RERUN_COMPRESS} (finished stages are cached).")
    return meta
