"""The app contract: a folder an app developer drops into a project, per client, checked in that client.

An App builds, from the plain checked artifacts of one format, the files a client loads as they are (MediaPipe
Tasks on Android, Core ML on iOS, ONNX Runtime in a desktop or server app), with the card (export/card.py) inside,
and a README with the few lines that load them. It says how to run its files in the real client here
(`client_outputs`), and the driver (`build_app`) checks them against the plain artifact of the same precision in its
own runtime on the test split: label agreement (classifiers) or cosine (embeddings), the largest score difference,
and each one's accuracy. A disagreement fails the build and nothing replaces the folder. Adversarial texts (accents,
truncation, padding, empty input) run through both as well and are reported, not judged: they show where the app's
tokenizer and the model's own differ.

An App registers itself in APPS by subclassing; a new client is one module plus its test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np

from ..data import Dataset, Encoder
from ..errors import ExportError
from ..export.card import Card
from ..progress import info, progress_bar

APPS: dict[str, "App"] = {}
APP_DIR = "app"  # OUT/app/<app name>/
APP_FILE = "app.json"  # OUT/app/app.json: what was built and how it agreed

# Texts where an app's tokenizer may part from the model's own: accents (strip_accents), case, truncation past
# max_len, padding (very short and empty inputs), whitespace, punctuation, CJK and emoji, unknown words.
ADVERSARIAL_TEXTS = (
    "Café crème, naïve façade: a déjà vu of Amélie.",
    "ÉNORMÉMENT BIEN, Über-cool, Ångström-precise.",
    "",
    "ok",
    "   spaced\tout\n\nlines   ",
    "A masterpiece!!! (Not.) -- 10/10?? #overrated @critics",
    "这部电影很好看 and 映画は最高でした",
    "😀 loved it 👍🏽 but the ending 💔",
    "supercalifragilisticexpialidocious antidisestablishmentarianism zxqvbnm",
    " ".join(["a long review that goes on and on past the model's longest input"] * 40) + " but the end is bad.",
)


@dataclass
class Built:
    """One file of an app folder: its name in the folder, the precision, and the plain artifact it wraps."""

    file: str
    precision: str
    plain: str  # the plain artifact's file name in OUT/artifacts
    extras: dict[str, Any]


class App(ABC):
    name: ClassVar[str]  # the folder's name under OUT/app/ ("android", "ios", "onnx")
    format: ClassVar[str]  # the format of the plain artifacts it builds from
    client: ClassVar[str]  # what loads it in an app, as a README names it
    # Test examples the check runs per file; None: all (a reference interpreter that takes seconds runs a few).
    check_examples: ClassVar[Optional[int]] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            APPS[cls.name] = cls()

    def refuses(self, card: Card) -> Optional[str]:
        """Why this app cannot be built for the model (one line), or None. Every client's app tokenizes text with
        a WordPiece (BERT) vocabulary, so a text model whose tokenizer is not one is refused here, once."""
        if card.modality == "text" and (card.tokenizer is None or not card.tokenizer.wordpiece):
            return ("the checkpoint has no WordPiece tokenizer (tokenizer.json with a BertNormalizer), so an app "
                    "could not turn text into the model's token ids")
        return None

    @abstractmethod
    def build(self, model, card: Card, plain: list[dict[str, Any]], art_dir: Path, folder: Path) -> list[Built]:
        """Write the app's files into `folder` (a staging folder) from the plain checked artifacts `plain` (their
        artifacts.json records, in `art_dir`) and the canonical `model`; return what was written."""

    @abstractmethod
    def client_outputs(self, folder: Path, built: Built, card: Card, ds: Dataset) -> np.ndarray:
        """Run `built` in the real client on every example of `ds` (texts, or images in 0..1 that are exactly
        k/255): classifiers' label probabilities (N, labels), embedding models' vectors (N, dim)."""

    @abstractmethod
    def client_name(self) -> str:
        """What ran `client_outputs`, with its version (and "reference execution" where it is not the device's)."""

    @abstractmethod
    def readme(self, card: Card, built: list[Built]) -> str:
        """The folder's README.md: what each file is, and the few lines of Kotlin / Swift / Python that load it."""


# -- the driver ----------------------------------------------------------------------------------------------------

def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def as_app_sees(ds: Dataset) -> Dataset:
    """The data as an app feeds it: images quantised to 8-bit pixels (k/255), so both sides see the same input."""
    if ds.images is None:
        return ds
    return Dataset(ds.name, ds.split, ds.labels, ds.label_names, None,
                   (np.round(np.clip(ds.images, 0, 1) * 255) / 255).astype(np.float32))


def plain_outputs(path: Path, fmt: str, card: Card, ds: Dataset, enc: Encoder) -> np.ndarray:
    """The plain artifact's outputs in its own runtime, as the client reports them (probabilities for a
    classifier)."""
    from ..targets.runtime import runtime_for_format

    session = runtime_for_format(fmt).open(path, 1)
    bs = session.static_batch or 32
    outs = []
    for _, inputs in enc.batches(ds, bs, pad_to=session.static_seq):
        outs.append(session.output({k: v.numpy() for k, v in zip(session.input_names, inputs)}))
    out = np.concatenate(outs).astype(np.float64)
    return softmax(out) if card.labels else out


def compare(card: Card, client: np.ndarray, plain: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
    """How the client's outputs agree with the plain artifact's: labels and the largest probability difference
    (classifiers), or the cosine (embeddings); each one's accuracy where the data has labels."""
    client, plain = np.asarray(client, np.float64), np.asarray(plain, np.float64)
    r: dict[str, Any] = {"examples": int(len(plain))}
    if card.labels:
        same = client.argmax(-1) == plain.argmax(-1)
        r.update(label_agreement=float(same.mean()), disagreeing=[int(i) for i in np.flatnonzero(~same)[:20]],
                 max_score_diff=float(np.abs(client - plain).max()))
        if labels is not None:
            r.update(client_accuracy=float((client.argmax(-1) == labels).mean() * 100),
                     plain_accuracy=float((plain.argmax(-1) == labels).mean() * 100))
    else:
        from ..models.tasks import cosine_rows

        cos = cosine_rows(plain, client)
        r.update(cosine=float(cos.mean()), min_cosine=float(cos.min()))
    return r


def agrees(card: Card, r: dict[str, Any]) -> bool:
    return r["label_agreement"] == 1.0 if card.labels else r["min_cosine"] >= 0.999


def adversarial(app: App, folder: Path, built: Built, card: Card, art_dir: Path, enc: Encoder) -> list[dict]:
    """Each adversarial text through the client and through the plain artifact with the model's own tokenizer."""
    texts = list(ADVERSARIAL_TEXTS)
    ds = Dataset("adversarial", "test", np.zeros(len(texts), np.int64), list(card.labels) or ["-"], texts=texts)
    client = app.client_outputs(folder, built, card, ds)
    plain = plain_outputs(art_dir / built.plain, app.format, card, ds, enc)
    rows = []
    for text, c, p in zip(texts, client, plain):
        row = {"text": text if len(text) <= 80 else text[:77] + "...", "chars": len(text)}
        if card.labels:
            row.update(same_label=bool(c.argmax() == p.argmax()), max_score_diff=float(np.abs(c - p).max()))
        else:
            row.update(cosine=float(np.dot(c, p) / (np.linalg.norm(c) * np.linalg.norm(p) + 1e-12)))
        rows.append(row)
    return rows


def build_app(app: App, model, card: Card, plain: list[dict[str, Any]], out_dir: Path, ds: Dataset,
              enc: Encoder) -> dict[str, Any]:
    """Build `app`'s folder under OUT/app/, check every file in the client against its plain artifact on `ds`
    (the test split), and put the folder in place only if all agree. Returns the app's record for app.json."""
    art_dir = out_dir / "artifacts"
    final = out_dir / APP_DIR / app.name
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{app.name}.staging-", dir=final.parent))
    try:
        built = app.build(model, card, plain, art_dir, staging)
        seen = as_app_sees(ds)
        if app.check_examples:
            seen = seen.head(app.check_examples)
        files = []
        for b in built:
            with progress_bar(f"{app.name}/{b.file} in {app.client_name()}", 1) as advance:
                client = app.client_outputs(staging, b, card, seen)
                advance()
            reference = plain_outputs(art_dir / b.plain, app.format, card, seen, enc)
            r = {"file": b.file, "precision": b.precision, "plain": b.plain, **b.extras,
                 "client": app.client_name(), "split": seen.split,
                 "vs_plain": compare(card, client, reference, seen.labels if card.labels else None)}
            if card.modality == "text":
                r["adversarial"] = adversarial(app, staging, b, card, art_dir, enc)
            info("    " + app_line(app.name, r))
            if not agrees(card, r["vs_plain"]):
                raise ExportError(f"app/{app.name}/{b.file} disagrees with {b.plain} in {app.client_name()}: "
                                  + app_line(app.name, r).split(": ", 1)[1] + ".",
                                  "report this with the model's pocketformer.json; the plain artifacts are "
                                  "unaffected.")
            files.append(r)
        (staging / "README.md").write_text(app.readme(card, built))
        (staging / "card.json").write_text(json.dumps(card.to_json(), indent=2, sort_keys=True))
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"app": app.name, "client": app.client, "format": app.format, "folder": f"{APP_DIR}/{app.name}",
            "files": files}


def app_line(name: str, r: dict[str, Any]) -> str:
    """One checked app file: agreement with its plain artifact, and accuracies."""
    v = r["vs_plain"]
    if "label_agreement" in v:
        acc = (f", accuracy {v['client_accuracy']:.2f}% vs {v['plain_accuracy']:.2f}%"
               if "client_accuracy" in v else "")
        what = (f"labels agree on {v['label_agreement']:.2%} of {v['examples']} {r['split']} examples, max score "
                f"difference {v['max_score_diff']:.2e}{acc}")
    else:
        what = f"cosine {v['cosine']:.6f} (lowest {v['min_cosine']:.6f}) on {v['examples']} {r['split']} examples"
    return f"app/{name}/{r['file']} in {r['client']} vs {r['plain']}: {what}"
