"""Shared infrastructure at the bottom of the import graph: where caches live, what versions made a result, how JSON
and artifact bytes are written (atomically), and how a run folder's records are read back.

Every layer may import this module; it imports nothing of pocketformer's but errors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Optional

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


# CPU features that decide which int8/fp16 kernels a runtime picks (and so its speed, and int8's exact rounding), as
# the kernel names them (/proc/cpuinfo flags on x86-64, Features on arm64).
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                "amx_tile",  # x86-64
                "asimddp", "i8mm", "bf16", "sve")  # arm64: dot product, int8 matmul
# The fingerprint's words, in order: one word per kernel family, whichever flag of it the CPU reports.
FINGERPRINT_WORDS = (("AVX2", ("avx2",)), ("FMA", ("fma",)), ("AVX-512", ("avx512f",)),
                     ("VNNI", ("avx512_vnni", "avx_vnni")), ("BF16", ("avx512_bf16",)),
                     ("AMX", ("amx_int8", "amx_bf16", "amx_tile")),
                     ("dotprod", ("asimddp",)), ("i8mm", ("i8mm",)), ("bf16", ("bf16",)), ("sve", ("sve",)))
# Instructions that multiply int8 vectors into int32 sums: with them int8 matmuls can beat fp32; without, int8 kernels
# widen to int16/fp32 first and buy size, not speed.
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
ARCHES = {"x86_64": "x86-64", "amd64": "x86-64", "x64": "x86-64", "aarch64": "arm64", "arm64": "arm64"}


def arch_name(machine: str) -> str:
    """The architecture under one name per kind ("x86-64", "arm64"), whatever the OS calls it."""
    return ARCHES.get(machine.lower(), machine.lower() or "unknown")


def fingerprint_of(arch: str, features, known: bool = True) -> str:
    """The CPU kind as the kernels see it, stable and readable: "x86-64 AVX2 FMA AVX-512 VNNI BF16", "arm64 dotprod
    i8mm". Two hosts with one fingerprint pick the same kernels. `known`: were the features read at all?"""
    have = set(features)
    words = [word for word, flags in FINGERPRINT_WORDS if have & set(flags)]
    return " ".join([arch, *words] if known else [arch, "(CPU features not detected)"])


def int8_dot_product(features) -> bool:
    """Does a CPU with these features (CPU_FEATURES names) have int8 dot-product instructions (x86 VNNI/AMX, arm64
    dotprod/i8mm)?"""
    return bool(set(features) & set(INT8_DOT_PRODUCT))


def u8s8_saturates(info: dict[str, Any]) -> bool:
    """Do ONNX Runtime's u8 x s8 int8 kernels saturate on this CPU (a cpu() record)? On x86-64 without VNNI/AMX they
    use VPMADDUBSW, whose int16 sum of two u8 x s8 products overflows once weights use the full 8 bits (ORT's
    quantization guide): the file's outputs then depend on the host. ARM's kernels widen first and do not saturate."""
    return info["arch"] == "x86-64" and not int8_dot_product(info["features"])


def parse_cpuinfo(text: str, machine: str) -> dict[str, Any]:
    """The CPU a Linux /proc/cpuinfo text describes (`machine`: platform.machine() of that host): its model, the
    kernel-deciding features (in CPU_FEATURES order) and their fingerprint."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and not model:
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    return _described(model or machine, arch_name(machine), flags, known=bool(flags))


def _described(model: str, arch: str, flags: set[str], known: bool) -> dict[str, Any]:
    features = [f for f in CPU_FEATURES if f in flags]
    return {"model": model, "arch": arch, "features": features, "fingerprint": fingerprint_of(arch, features, known)}


# macOS: sysctl names for what Linux lists in /proc/cpuinfo.
MACOS_ARM_FEATURES = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm",
                      "hw.optional.arm.FEAT_BF16": "bf16"}
MACOS_X86_FEATURES = {"AVX2": "avx2", "FMA": "fma", "AVX512F": "avx512f", "AVX512VNNI": "avx512_vnni"}


def _sysctl(name: str) -> str:
    import subprocess

    try:
        proc = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _macos_cpu(machine: str) -> dict[str, Any]:
    arch = arch_name(machine)
    if arch == "arm64":
        flags = {flag for name, flag in MACOS_ARM_FEATURES.items() if _sysctl(name) == "1"}
        known = bool(_sysctl("hw.optional.arm.FEAT_DotProd"))
    else:
        words = f"{_sysctl('machdep.cpu.features')} {_sysctl('machdep.cpu.leaf7_features')}".upper().split()
        flags, known = {MACOS_X86_FEATURES[w] for w in words if w in MACOS_X86_FEATURES}, bool(words)
    return _described(_sysctl("machdep.cpu.brand_string") or machine, arch, flags, known)


@functools.lru_cache(maxsize=1)
def _this_cpu() -> dict[str, Any]:
    machine = platform.machine()
    if platform.system() == "Darwin":
        return _macos_cpu(machine)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text, machine)


def cpu() -> dict[str, Any]:
    """This host's CPU: model, architecture, the kernel-deciding features it has (Linux /proc/cpuinfo, macOS
    sysctl) and their fingerprint. A speed claim names the fingerprint."""
    info = _this_cpu()
    return {**info, "features": list(info["features"])}


def fingerprint() -> str:
    """This host's CPU fingerprint (fingerprint_of): what a latency figure measured here names."""
    return _this_cpu()["fingerprint"]


def cpu_text(record: Optional[dict[str, Any]], machine: str) -> Optional[str]:
    """A recorded cpu() as results name it ("AMD EPYC, x86-64 AVX2 FMA AVX-512 VNNI BF16"); a record from before
    fingerprints is fingerprinted from its features. None: no CPU was recorded."""
    if not record:
        return None
    fp = record.get("fingerprint") or fingerprint_of(arch_name(machine), record.get("features", []))
    return f"{record.get('model') or machine}, {fp}"


@functools.lru_cache(maxsize=None)
def code_sha256(*subpackages: str) -> str:
    """A hash of pocketformer's own source in `subpackages` (e.g. "export", "models"): an artifact made by other
    code than this (an upgrade, a fix to an exporter or to the model) is never reused in its place."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for sub in subpackages:
        for path in sorted((root / sub).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


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
