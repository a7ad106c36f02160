"""The iOS app folder: Core ML packages an app adds to Xcode as they are, with the card inside.

A classifier becomes a Core ML classifier (ct.ClassifierConfig over the softmax of the logits): its outputs are
classLabel and classLabel_probs, which Xcode's generated class and Vision's classification requests read. An
embedding model stays a plain package whose output is `embedding`. Each package is converted the way its plain
artifact was (compute precision, int8 weights or palette, sparse storage: export.coreml.convert_like). Core ML has no
tokenizer, so the checkpoint's tokenizer files go into `tokenizer/` for the app's own WordPiece tokenizer. Off macOS
the packages run in the MIL reference execution (targets/coreml_ref.py), which checks the graph and weights, not a
device.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..data import Dataset, Encoder
from ..errors import ExportError
from ..export import coreml
from ..export.base import artifact_size
from ..export.card import Card
from ..targets.coreml_ref import execution
from ..targets.runtime import get_runtime
from .base import App, Built

# fp16 is what the Neural Engine computes in (fp32 runs on the CPU or GPU only); int8 stores the same fp16 program's
# weights in half the bytes (decompressed to fp16 on load). fp32 only when neither was exported.
PRECISIONS = ("fp16", "int8")
FALLBACK = ("fp32",)
TOKENIZER = "tokenizer"  # the folder in the app folder holding the tokenizer files
PACKAGE = "model.{precision}.mlpackage"
EMBEDDING = "embedding"  # an embedding package's output


class Probabilities(torch.nn.Module):
    """The classifier with softmax on its logits: what a Core ML classifier maps to its labels."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(*inputs), dim=-1)


def example_inputs(model, record: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """Inputs of one example at the plain package's shapes (tracing reads shapes, not values)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for spec in model.config.inputs():
        shape = [1] + list(record["inputs"][spec.name][1:])
        out.append(torch.rand(shape, generator=g) if spec.dtype.startswith("float")
                   else torch.ones(shape, dtype=torch.long))
    return tuple(out)


def copy_tokenizer(card: Card, folder: Path) -> Optional[Path]:
    """The checkpoint's tokenizer files in folder/tokenizer/, with vocab.txt (written from tokenizer.json when the
    checkpoint has none): what a WordPiece tokenizer in the app reads."""
    if card.tokenizer is None:
        return None
    dest = folder / TOKENIZER
    dest.mkdir(parents=True, exist_ok=True)
    for name, path in sorted(card.tokenizer.files.items()):
        shutil.copyfile(path, dest / name)
    if not (dest / "vocab.txt").is_file():
        (dest / "vocab.txt").write_bytes(card.tokenizer.vocab_txt())
    return dest


class CoreMLApp(App):
    name = "ios"
    format = "coreml"
    client = "Core ML"
    # The reference execution takes about a second per MiniLM example at 128 tokens, and every file also runs the
    # adversarial texts twice (app and plain): 12 examples keep a MiniLM check of fp16 + int8 near a minute.
    check_examples = 12

    def build(self, model, card: Card, plain: list[dict[str, Any]], art_dir: Path, folder: Path) -> list[Built]:
        by_precision = {r["precision"]: r for r in plain}
        chosen = [p for p in PRECISIONS if p in by_precision] or [p for p in FALLBACK if p in by_precision]
        if not chosen:
            raise ExportError(f"{art_dir} has no fp16, int8 or fp32 Core ML package to build the iOS app from.",
                              "export with `--to coreml` first.")
        copy_tokenizer(card, folder)
        module = Probabilities(model).eval() if card.labels else model.eval()
        outputs = ["probabilities"] if card.labels else [EMBEDDING]
        built = []
        for precision in chosen:
            record = by_precision[precision]
            path = folder / PACKAGE.format(precision=precision)
            program = coreml.convert_like(record, module, example_inputs(model, record), model.input_names,
                                          outputs, classes=list(card.labels) or None)
            with coreml.quiet():
                program.save(str(path))
            coreml.write_card(path, card, tokenizer_dir=TOKENIZER)
            spec = coreml.read_spec(path)
            extras: dict[str, Any] = {"size_bytes": artifact_size(path), "outputs": [o.name for o in
                                                                                     spec.description.output],
                                      "compute_precision": (record.get("coreml") or {}).get("compute_precision")}
            if card.labels:
                extras["classifier"] = {"labels": coreml.class_labels(spec),
                                        "predicted_feature": spec.description.predictedFeatureName,
                                        "probabilities": spec.description.predictedProbabilitiesName}
            built.append(Built(path.name, precision, record["file"], extras))
        return built

    def client_outputs(self, folder: Path, built: Built, card: Card, ds: Dataset) -> np.ndarray:
        """Each example alone (Core ML classifiers take one) through the package; text tokenized by pocketformer's
        Encoder from the folder's own tokenizer files, as the app's tokenizer must. Classifiers: each label's
        probability from classLabel_probs, in the card's label order."""
        session = get_runtime("coreml-mil-reference").open(folder / built.file, 1)
        enc = Encoder(folder / TOKENIZER, card.max_len) if card.modality == "text" else Encoder(None)
        rows = []
        for i in range(len(ds)):
            inputs = enc.encode(ds, np.array([i]), pad_to=session.static_seq)
            out = session.run({n: t.numpy() for n, t in zip(session.input_names, inputs)})
            if card.labels:
                probs = out[built.extras["classifier"]["probabilities"]]
                rows.append([probs[label] for label in card.labels])
            else:
                rows.append(np.asarray(out[EMBEDDING], np.float64).reshape(-1))
        return np.asarray(rows, np.float64)

    def client_name(self) -> str:
        version = coreml.coremltools().__version__
        if execution() == "Apple Core ML runtime":
            return f"Core ML (coremltools {version}, Apple runtime on macOS)"
        return f"Core ML reference execution (coremltools {version}, MIL on Linux, not the device)"

    def readme(self, card: Card, built: list[Built]) -> str:
        return readme(card, built, self.client_name())


def readme(card: Card, built: list[Built], checked_in: str) -> str:
    """What the folder holds and the Swift that loads a package, feeds it and reads its outputs."""
    lines = [f"# {card.name}: iOS (Core ML)", "", card.description(), "", "## Files", ""]
    for b in built:
        what = ("Core ML classifier: outputs `classLabel` (the most probable label) and `classLabel_probs` "
                "(label -> probability)" if card.labels else
                f"Core ML model: output `{EMBEDDING}` ({card.output.get('meaning')}, {card.output.get('dim')} values"
                + (", L2-normalised)" if card.output.get("normalized") else ")"))
        lines.append(f"- `{b.file}`: {b.precision} ({b.extras.get('size_bytes', 0) / 1e6:.1f} MB), {what}; made "
                     f"as `artifacts/{b.plain}` was.")
    if card.tokenizer:
        lines.append(f"- `{TOKENIZER}/`: the tokenizer files ({', '.join(sorted({*card.tokenizer.files, 'vocab.txt'}))})"
                     ": Core ML has no tokenizer, the app tokenizes.")
    lines += ["- `card.json`: what the packages say about the model (also in each package's metadata, "
              "`pocketformer.*` keys, which `pocketformer inspect` shows).", "",
              "fp16 is what the Neural Engine computes in; int8 holds the same program with int8 weights, half the "
              "size, decompressed to fp16 when the model loads (smaller, not faster). Pick int8 when the app's size "
              "matters, fp16 otherwise.", ""]
    if card.labels:
        lines += ["## Labels", "", "In probability order: " + ", ".join(f"`{x}`" for x in card.labels) + ".", ""]
    inputs = ", ".join(f"`{t['name']}` ({t['meaning']})" for t in card.inputs)
    lines += ["## Inputs", "", f"One example at a time, at the packages' fixed shape: {inputs}.", ""]
    tok = card.tokenizer
    if tok:
        seq = card.max_len
        lines += ["## Tokenizer", "",
                  f"WordPiece, lowercase {tok.lowercase}, strip accents {tok.strips_accents}; `{tok.cls}` text "
                  f"`{tok.sep}`, at most {seq} tokens, padded with `{tok.pad}` and attention mask 0. Any BERT "
                  "tokenizer reading `tokenizer/vocab.txt` with these settings gives the model's own token ids "
                  "(e.g. swift-transformers' BertTokenizer).", ""]
    lines += ["## Swift", "", "```swift", "import CoreML", ""]
    first = built[0].file.removesuffix(".mlpackage") if built else "model.fp16"
    lines += [f"// Xcode compiles {first}.mlpackage into {first}.mlmodelc in the app bundle.",
              f'let url = Bundle.main.url(forResource: "{first}", withExtension: "mlmodelc")!',
              "let model = try MLModel(contentsOf: url)"]
    if tok:
        seq = card.max_len
        lines += ["", "// The app's tokenizer, from the vocabulary in tokenizer/ (swift-transformers' Tokenizers).",
                  'let folder = Bundle.main.url(forResource: "tokenizer", withExtension: nil)!',
                  "let tokenizer = try await AutoTokenizer.from(modelFolder: folder)  // a BertTokenizer from vocab",
                  f"let ids = Array(tokenizer.encode(text: text).prefix({seq}))  // {tok.cls} ... {tok.sep}",
                  f"let inputIds = try MLMultiArray(shape: [1, {seq}], dataType: .int32)",
                  f"let mask = try MLMultiArray(shape: [1, {seq}], dataType: .int32)",
                  f"let pad = tokenizer.convertTokenToId(\"{tok.pad}\") ?? 0",
                  f"for i in 0..<{seq} {{",
                  "    inputIds[i] = NSNumber(value: i < ids.count ? ids[i] : pad)",
                  "    mask[i] = NSNumber(value: i < ids.count ? 1 : 0)",
                  "}",
                  "let features = try MLDictionaryFeatureProvider(dictionary: [",
                  '    "input_ids": MLFeatureValue(multiArray: inputIds),',
                  '    "attention_mask": MLFeatureValue(multiArray: mask)])']
    else:
        shape = ", ".join(str(d) for d in ([1, card.image.channels, card.image.height, card.image.width]
                                           if card.image else [1]))
        lines += ["", "// pixel_values: the image resized, each 0..255 pixel as the card's image entry says.",
                  f"let pixels = try MLMultiArray(shape: [{shape}], dataType: .float32)",
                  "let features = try MLDictionaryFeatureProvider(dictionary: [",
                  '    "pixel_values": MLFeatureValue(multiArray: pixels)])']
    lines += ["let out = try model.prediction(from: features)"]
    if card.labels:
        lines += ['let label = out.featureValue(for: "classLabel")!.stringValue',
                  'let probabilities = out.featureValue(for: "classLabel_probs")!.dictionaryValue  // label -> p']
    else:
        lines += [f'let embedding = out.featureValue(for: "{EMBEDDING}")!.multiArrayValue!']
    lines += ["```", "", f"Checked in {checked_in} against the plain packages: see "
              "../app.json.", ""]
    return "\n".join(lines)
