"""LM text: the built-in corpora are real prose read offline, split deterministically with no document in two splits;
a user's .txt splits the same way; token windows; the refusals."""

from __future__ import annotations

import pytest

from pocketformer.errors import DataError
from pocketformer.text import SPLITS, load_corpus, split_documents, token_windows, wiki_prose


@pytest.mark.parametrize("name", ["wikipedia", "botchan"])
def test_builtin_corpus_splits(name):
    parts = {s: load_corpus(name, s) for s in SPLITS}
    docs = [set(parts[s].documents) for s in SPLITS]
    assert all(docs) and not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])
    total = sum(p.chars for p in parts.values())
    assert 0.7 < parts["train"].chars / total < 0.9
    assert load_corpus(name, "test").documents == parts["test"].documents  # deterministic
    assert load_corpus(name, "test", seed=1).documents != parts["test"].documents or name == "botchan"
    text = "\n".join(parts["test"].documents)
    assert "{{" not in text and "<ref" not in text and "Project Gutenberg" not in text
    assert text.count(" the ") > 100  # English prose


def test_wiki_markup_to_prose():
    raw = ("'''Albedo''' is the [[reflection (physics)|reflectivity]] of a surface.<ref>Some book</ref> "
           "{{Infobox|a={{nested}}}} See [[Earth]].\n[[Category:Physics]]\n== History ==\n* item")
    assert wiki_prose(raw) == "Albedo is the reflectivity of a surface.  See Earth.\n\nHistory\nitem"


def test_user_text_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(f"Paragraph {i} " + "word " * (20 + i) for i in range(30)))
    parts = [load_corpus(str(f), s) for s in SPLITS]
    assert sum(len(p.documents) for p in parts) == 30 and all(p.documents for p in parts)
    f.write_text("only one paragraph")
    with pytest.raises(DataError, match="train, validation and test need 3"):
        load_corpus(str(f), "train")
    with pytest.raises(DataError, match="Unknown text 'novels'"):
        load_corpus("novels", "train")


def test_split_gives_every_split_a_document():
    docs = tuple("x" * n for n in (1000, 10, 10))
    assert all(split_documents(docs, s, 0) for s in SPLITS)


def test_token_windows():
    corpus = load_corpus("botchan", "validation")
    encode = lambda text: [ord(c) % 250 for c in text]  # noqa: E731 - a stand-in tokenizer: one id per character
    wins = token_windows(corpus, encode, 64, bos=1, limit=10)
    assert len(wins) == 10 and all(len(w) == 64 and w[0] == 1 for w in wins)
    assert wins[0][1:] == encode(corpus.documents[0])[:63]
