"""Android: .tflite files MediaPipe Tasks loads as they are (TextClassifier, TextEmbedder, ImageClassifier).

MediaPipe does not take our plain files: its BERT text tasks want three int32 inputs named by the metadata ids,
mask, segment_ids, and TFLite Model Metadata with a BertTokenizer unit (vocab.txt); its image tasks want NHWC
float pixels with NormalizationOptions; classifiers want scores (softmax here) with labels.txt on the output. So the
app file wraps the canonical model (the same weights as the plain file) in that signature, converts it as the
plain fp32 file is converted, quantizes the int8 one with the plain int8 recipe, and writes the metadata
(export/tflite_metadata.py) with the card inside.

MediaPipe's BertTokenizer lowercases and splits CJK characters as BERT does, but does not strip accents (measured:
every difference on rotten_tomatoes' test split and the adversarial texts is that, and nothing else). For a model
whose tokenizer strips them, the app strips them before calling MediaPipe (`app_text`, one line in the README's
Kotlin), and the check runs MediaPipe on the text exactly so.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import Dataset
from ..export.card import Card
from ..export.tflite import convert_module, quantize
from ..export.tflite_metadata import LABELS_FILE, VOCAB_FILE, Annotation, TensorMeta, annotate
from ..store import atomic_write_bytes
from .base import App, Built

PRECISIONS = ("fp32", "int8")  # precision of the plain records -> app files of the same name
BERT_INPUTS = ("ids", "mask", "segment_ids")  # the tensor names MediaPipe's BERT preprocessor looks up
BERT_MEANINGS = ("token ids: [CLS] text [SEP], padded with 0", "1 for each real token, 0 for padding",
                 "token type ids: all 0 for one text (not read by this model)")


class TextWrapper(torch.nn.Module):
    """ids, mask, segment_ids (int32 [1, S]) -> label probabilities, or the embedding."""

    def __init__(self, model, probabilities: bool):
        super().__init__()
        self.model, self.probabilities = model, probabilities

    def forward(self, ids, mask, segment_ids):
        # A single-text model ignores segment ids; adding them times zero keeps the input in the converted graph,
        # where MediaPipe counts three.
        out = self.model(ids.long() + 0 * segment_ids.long(), mask.long())
        return torch.softmax(out, -1) if self.probabilities else out


class ImageWrapper(torch.nn.Module):
    """pixels NHWC float32 [1, H, W, 3], already normalised by MediaPipe -> label probabilities, or the embedding;
    a one-channel model sees the mean of R, G and B."""

    def __init__(self, model, channels: int, probabilities: bool):
        super().__init__()
        self.model, self.channels, self.probabilities = model, channels, probabilities

    def forward(self, pixels):
        if self.channels == 1:
            pixels = pixels.mean(-1, keepdim=True)
        out = self.model(pixels.permute(0, 3, 1, 2))
        return torch.softmax(out, -1) if self.probabilities else out


def strip_accents(text: str) -> str:
    """BERT's accent stripping: decompose (NFD), drop the combining marks."""
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def app_text(card: Card, text: str) -> str:
    """A text as the app hands it to MediaPipe: accents stripped where the model's tokenizer strips them."""
    return strip_accents(text) if card.tokenizer is not None and card.tokenizer.strips_accents else text


def task_of(card: Card) -> str:
    return ("Text" if card.modality == "text" else "Image") + ("Classifier" if card.labels else "Embedder")


def float_file(model, card: Card) -> tuple[bytes, Annotation]:
    """The app's fp32 flatbuffer (unannotated) and what its metadata says."""
    model = model.eval()
    if card.modality == "text":
        sample = {n: torch.zeros(1, card.max_len, dtype=torch.int32) for n in BERT_INPUTS}
        sample["mask"][:, :2] = 1
        inputs = [TensorMeta(n, m) for n, m in zip(BERT_INPUTS, BERT_MEANINGS)]
        content = convert_module(TextWrapper(model, bool(card.labels)), sample)
    else:
        img = card.image
        sample = {"pixels": torch.rand(1, img.height, img.width, 3)}
        inputs = [TensorMeta("image", f"RGB pixels, {img.height}x{img.width}, normalised (pixel - mean) / std",
                             image=img)]
        content = convert_module(ImageWrapper(model, img.channels, bool(card.labels)), sample)
    output = TensorMeta("probability" if card.labels else "embedding",
                        "one probability per label (softmax)" if card.labels else card.output.get("meaning", ""),
                        labels=bool(card.labels))
    return content, Annotation(inputs, [output], bert_tokenizer=card.modality == "text")


class MediaPipeApp(App):
    name, format, client = "android", "tflite", "MediaPipe Tasks (TextClassifier / ImageClassifier)"

    def build(self, model, card: Card, plain: list[dict[str, Any]], art_dir: Path, folder: Path) -> list[Built]:
        records = {r["precision"]: r for r in plain if r["format"] == "tflite" and not r.get("kind")}
        wanted = [p for p in PRECISIONS if p in records]
        content, annotation = float_file(model, card)
        built = []
        for precision in wanted:
            path = folder / records[precision]["file"]
            if precision == "fp32":
                data = content
            else:
                quantize(folder / "float.tflite", path, precision, float_content=content)
                data = path.read_bytes()
            atomic_write_bytes(path, annotate(data, card, annotation))
            extras = {"size_bytes": path.stat().st_size, "task": task_of(card)}
            if card.modality == "text" and card.tokenizer.strips_accents:
                extras["app_preprocessing"] = "strip accents (NFD, drop combining marks) before MediaPipe"
            built.append(Built(path.name, precision, records[precision]["file"], extras))
        return built

    def _task(self, path: Path, card: Card):
        from mediapipe.tasks.python import text, vision
        from mediapipe.tasks.python.core.base_options import BaseOptions

        base = BaseOptions(model_asset_path=str(path))
        if card.modality == "text":
            if card.labels:
                return text.TextClassifier.create_from_options(
                    text.TextClassifierOptions(base_options=base, max_results=-1))
            return text.TextEmbedder.create_from_options(text.TextEmbedderOptions(base_options=base))
        if card.labels:
            return vision.ImageClassifier.create_from_options(
                vision.ImageClassifierOptions(base_options=base, max_results=-1))
        return vision.ImageEmbedder.create_from_options(vision.ImageEmbedderOptions(base_options=base))

    def client_outputs(self, folder: Path, built: Built, card: Card, ds: Dataset) -> np.ndarray:
        import mediapipe as mp

        rows = []
        with self._task(folder / built.file, card) as task:
            examples = [app_text(card, t) for t in ds.texts] if card.modality == "text" else \
                [_pixels(x) for x in ds.images]
            for x in examples:
                if card.modality != "text":
                    x = mp.Image(image_format=mp.ImageFormat.SRGB, data=x)
                if card.labels:
                    result = task.classify(x)
                    row = np.zeros(len(card.labels))
                    for c in result.classifications[0].categories:
                        row[c.index] = c.score
                else:
                    row = np.asarray(task.embed(x).embeddings[0].embedding, np.float64)
                rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(card.labels) or int(card.output["dim"])))

    def client_name(self) -> str:
        import mediapipe as mp

        return f"MediaPipe {mp.__version__} Tasks (Python, CPU)"

    def readme(self, card: Card, built: list[Built]) -> str:
        return readme(card, built)


def _pixels(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) image in 0..1 as the 8-bit RGB picture an app holds: round(x * 255), gray as three channels."""
    hwc = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return np.ascontiguousarray(np.repeat(hwc, 3, axis=2) if hwc.shape[2] == 1 else hwc)


def readme(card: Card, built: list[Built]) -> str:
    task = task_of(card)
    first = built[-1].file if built else "model.fp32.tflite"
    files = "\n".join(f"- `{b.file}`: {b.precision} ({b.extras.get('size_bytes', 0) / 1e6:.1f} MB), made from "
                      f"`artifacts/{b.plain}`, checked against it in MediaPipe." for b in built)
    inside = [f"TFLite Model Metadata: {card.description()}", "`pocketformer.json`: the card (labels, inputs, "
              "output, provenance)"]
    if card.labels:
        inside.append(f"`{LABELS_FILE}` on the output: {', '.join(card.labels)} (in output order)")
    if card.tokenizer is not None:
        t = card.tokenizer
        inside.append(f"`{VOCAB_FILE}` in a BertTokenizer unit: WordPiece, lowercase {t.lowercase}, strip accents "
                      f"{t.strips_accents}, up to {card.max_len} tokens with [CLS] and [SEP] (longer texts are cut)"
                      + ("; MediaPipe's tokenizer does not strip accents, so the code below strips them first "
                         "(without it, accented words tokenize differently and scores move)" if t.strips_accents
                         else ""))
    if card.image is not None:
        im = card.image
        inside.append(f"image input {im.height}x{im.width} RGB, normalised (pixel - {list(im.mean)}) / "
                      f"{list(im.std)}" + (" and averaged to gray inside the model" if im.channels == 1 else ""))
    kotlin, python = _snippets(card, task, first)
    return (f"# {card.name} for Android (MediaPipe Tasks {task})\n\n"
            f"Copy a `.tflite` into `app/src/main/assets/` and load it with MediaPipe Tasks "
            f"(`com.google.mediapipe:tasks-{'text' if card.modality == 'text' else 'vision'}`). Each file is whole: "
            f"tokenizer, labels and card are inside.\n\n## Files\n\n{files}\n\n## Inside each file\n\n"
            + "\n".join(f"- {line}" for line in inside)
            + f"\n\n## Kotlin\n\n```kotlin\n{kotlin}\n```\n\n## Python\n\n```python\n{python}\n```\n")


def _snippets(card: Card, task: str, file: str) -> tuple[str, str]:
    package = "text" if card.modality == "text" else "vision"
    strips = card.tokenizer is not None and card.tokenizer.strips_accents
    if card.modality == "text":
        arg = "strip_accents(text)" if strips else "text"
        kt_arg = "stripAccents(text)" if strips else "text"
        py_in = "\ntext = \"a charming, funny film\"\n"
        if strips:
            py_in += ("\nimport unicodedata\n\ndef strip_accents(s):  # as the model's tokenizer does; MediaPipe's "
                      "does not\n    return \"\".join(c for c in unicodedata.normalize(\"NFD\", s) "
                      "if unicodedata.category(c) != \"Mn\")\n")
    else:
        arg, kt_arg = "mp_image", "BitmapImageBuilder(bitmap).build()"
        py_in = ("\nimport mediapipe as mp\nmp_image = mp.Image.create_from_file(\"picture.png\")  # any size: "
                 "MediaPipe resizes")
    if card.labels:
        call, kt_call = "classify", "classify"
        kt_result = ".classificationResult().classifications()[0].categories()  // score and categoryName per label"
        py_result = ".classifications[0].categories:\n    print(c.category_name, c.score)"
        py_loop = "for c in "
    else:
        call, kt_call = "embed", "embed"
        kt_result = ".embeddingResult().embeddings()[0].floatEmbedding()"
        py_result = ".embeddings[0].embedding)"
        py_loop = "print("
    kt_import = f"com.google.mediapipe.tasks.{package}.{task[0].lower()}{task[1:].lower()}.{task}"
    if card.modality != "text":
        kt_import += "\nimport com.google.mediapipe.framework.image.BitmapImageBuilder"
    kt_text = ""
    if card.modality == "text":
        kt_text = "val text = \"a charming, funny film\"\n"
        if strips:
            kt_import += "\nimport java.text.Normalizer"
            kt_text = ("// The model's tokenizer strips accents; MediaPipe's does not: strip them first.\n"
                       "fun stripAccents(s: String) =\n"
                       "    Normalizer.normalize(s, Normalizer.Form.NFD).replace(Regex(\"\\\\p{Mn}+\"), \"\")\n\n"
                       + kt_text)
    kotlin = (f"import {kt_import}\n\n{kt_text}"
              f"val model = {task}.createFromFile(context, \"{file}\")\n"
              f"val result = model.{kt_call}({kt_arg}){kt_result}")
    python = (f"from mediapipe.tasks.python import {package}\n"
              f"from mediapipe.tasks.python.core.base_options import BaseOptions\n{py_in}\n"
              f"model = {package}.{task}.create_from_options({package}.{task}Options(\n"
              f"    base_options=BaseOptions(model_asset_path=\"{file}\")"
              + (", max_results=-1" if card.labels else "") + "))\n"
              f"{py_loop}model.{call}({arg}){py_result}")
    return kotlin, python
