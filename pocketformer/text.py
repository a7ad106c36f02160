"""Plain text for language models, offline, with deterministic train / validation / test splits.

Built in:
- `wikipedia`: the 106 English Wikipedia articles in gensim's wheel test data (a 2010s dump excerpt, CC BY-SA),
  read with bz2 and an XML parser (no gensim code), wiki markup stripped to prose (templates, tables, references,
  files and categories removed; links kept as their text);
- `botchan`: Natsume Soseki's Botchan (tr. Yasotaro Morri, Project Gutenberg, public domain) from sentencepiece's
  source distribution, Gutenberg's header and licence removed.
A user's own `.txt` file (documents separated by blank lines) splits the same way.

A corpus is a list of documents (articles; Botchan's chapters; a user's paragraphs). Documents are shuffled with the
seed and dealt to the splits by their share of the characters (80 / 10 / 10), so no document is in two splits and
the test text is text no stage trained on.
"""

from __future__ import annotations

import bz2
import functools
import html
import random
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

CORPORA = ("wikipedia", "botchan")
SPLITS = ("train", "validation", "test")
SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}


@dataclass(frozen=True)
class Corpus:
    name: str
    split: str
    documents: tuple[str, ...]

    @property
    def chars(self) -> int:
        return sum(map(len, self.documents))


def _pages(path: Path):
    """(title, wikitext) of main-namespace, non-redirect pages, streamed."""
    with bz2.open(path, "rb") as fh:
        for _, el in ET.iterparse(fh, events=("end",)):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns, title = el.findtext("{*}ns"), el.findtext("{*}title") or ""
            redirect = el.find("{*}redirect") is not None
            text = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if ns == "0" and not redirect and text:
                yield title, text


def _strip_nested(s: str, open_: str, close_: str) -> str:
    """`s` without every (possibly nested) open_ ... close_ span (regular expressions cannot count depth)."""
    out, depth, i, n = [], 0, 0, len(s)
    while i < n:
        if s.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and s.startswith(close_, i):
            depth, i = depth - 1, i + len(close_)
        else:
            if not depth:
                out.append(s[i])
            i += 1
    return "".join(out)


def wiki_prose(wikitext: str) -> str:
    s = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    s = re.sub(r"<ref[^>/]*/>", "", s)
    s = re.sub(r"<ref[^>]*>.*?</ref>", "", s, flags=re.S)
    s = _strip_nested(s, "{{", "}}")  # templates, infoboxes
    s = _strip_nested(s, "{|", "|}")  # tables
    s = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", s, flags=re.I)
    s = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", s)  # [[target|label]] -> label
    s = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", s)  # [url label] -> label
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"'{2,}", "", s)  # bold, italics
    s = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", s, flags=re.M)  # headings -> their text
    s = re.sub(r"^[*#:;]+\s*", "", s, flags=re.M)  # list markers
    s = html.unescape(s)
    return re.sub(r"\n{3,}", "\n\n", s).strip()


@functools.lru_cache(maxsize=1)
def wikipedia_documents() -> tuple[str, ...]:
    from .offline import wikipedia_file

    docs = []
    for title, text in _pages(wikipedia_file()):
        prose = wiki_prose(text)
        if len(prose) > 200:
            docs.append(f"{title}\n\n{prose}")
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def botchan_documents() -> tuple[str, ...]:
    """Botchan's chapters."""
    from .offline import sentencepiece_sdist

    with tarfile.open(sentencepiece_sdist()) as t:
        raw = t.extractfile("sentencepiece-0.2.2/test/botchan.txt").read()
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    start = text.index("\n", text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")) + 1
    body = text[start:text.index("End of Project Gutenberg's Botchan")].strip()
    chapters = [c.strip() for c in re.split(r"\n(?=CHAPTER [IVXL]+\.?\s*\n)", body)]
    return tuple(c for c in chapters if c.startswith("CHAPTER"))


def _user_documents(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"Text file {path} cannot be read ({e}).", "pass a UTF-8 .txt file.") from None
    docs = tuple(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())
    if len(docs) < 3:
        raise DataError(f"Text file {path} has {len(docs)} paragraphs; train, validation and test need 3 at least.",
                        "separate documents (or paragraphs) with blank lines.")
    return docs


def split_documents(docs: tuple[str, ...], split: str, seed: int) -> tuple[str, ...]:
    """Seeded shuffle, then each document goes to the split its middle character falls in (train: the first 80% of
    the characters, validation the next 10%, test the rest); a split left empty takes one from the largest."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    total = sum(len(d) for d in docs)
    edges = (SHARES["train"] * total, (SHARES["train"] + SHARES["validation"]) * total)
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    seen = 0
    for i in order:
        middle = seen + len(docs[i]) / 2
        assigned["train" if middle < edges[0] else "validation" if middle < edges[1] else "test"].append(i)
        seen += len(docs[i])
    for name in SPLITS:
        if not assigned[name]:
            donor = max(SPLITS, key=lambda s: len(assigned[s]))
            assigned[name].append(assigned[donor].pop())
    return tuple(docs[i] for i in sorted(assigned[split]))


def load_corpus(name: str, split: str, seed: int = 0) -> Corpus:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}.", f"use one of {', '.join(SPLITS)}.")
    if name == "wikipedia":
        docs = wikipedia_documents()
    elif name == "botchan":
        docs = botchan_documents()
    elif name.endswith(".txt"):
        docs = _user_documents(Path(name))
    else:
        raise DataError(f"Unknown text {name!r}.", f"use one of {', '.join(CORPORA)}, or a .txt file.")
    return Corpus(Path(name).stem if name.endswith(".txt") else name, split, split_documents(docs, split, seed))


def token_windows(corpus: Corpus, encode, length: int, bos: int | None = None, limit: int = 0) -> list[list[int]]:
    """Non-overlapping windows of `length` token ids over the documents, each document's tokens in order (a window
    never spans two documents; a document's last partial window is kept if it has 16 tokens at least). With `bos`,
    every window starts with it (length - 1 text tokens). `limit`: at most this many windows (0: all)."""
    body = length - (bos is not None)
    out = []
    for doc in corpus.documents:
        ids = encode(doc)
        for i in range(0, len(ids), body):
            chunk = ids[i:i + body]
            if len(chunk) < 16:
                continue
            out.append(([bos] if bos is not None else []) + chunk)
            if limit and len(out) >= limit:
                return out
    return out
