"""TFLite Model Metadata: what a .tflite says about itself to an app (MediaPipe Tasks, TFLite Support, Android
Studio's model viewer), written and read without their populator (mediapipe 1.2's metadata_writers cannot import).

The convention, as mediapipe/tasks/python/metadata/metadata.py writes it: a ModelMetadata flatbuffer (file
identifier "M001") in a buffer named "TFLITE_METADATA" in the model's `metadata` list; the files it names
(labels.txt, vocab.txt, ...) appended after the model as a zip archive of stored (uncompressed) entries. Ours also
carries the whole card as `pocketformer.json`. Same model and card in, same bytes out: the archive's timestamps are
fixed.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .card import Card

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
MODEL_IDENTIFIER = b"TFL3"
CARD_FILE = "pocketformer.json"
LABELS_FILE = "labels.txt"
VOCAB_FILE = "vocab.txt"
FLATBUFFER_LIMIT = 2 ** 31 - 2 ** 24  # a flatbuffer addresses 2 GB; keep room for the graph itself
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: a fixed stamp makes the bytes reproducible


@dataclass
class TensorMeta:
    """One input or output as the metadata describes it. `image`: the card's image entry (ImageProperties and
    NormalizationOptions on an input); `labels`: the output's axis is the card's labels (labels.txt)."""

    name: str
    description: str = ""
    image: Any = None
    labels: bool = False


@dataclass
class Annotation:
    """What goes into one file: its tensors in the file's input/output order, whether the inputs take text through
    a BertTokenizer (vocab.txt), and the files to embed beyond those the metadata names."""

    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    bert_tokenizer: bool = False
    extra_files: dict[str, bytes] = field(default_factory=dict)


def card_files(card: Card) -> dict[str, bytes]:
    """The files a card embeds: the card itself, the labels of a classifier, the vocabulary of a text model."""
    files = {CARD_FILE: json.dumps(card.to_json(), indent=2, sort_keys=True).encode("utf-8")}
    if card.labels:
        files[LABELS_FILE] = card.labels_txt()
    if card.tokenizer is not None and card.tokenizer.wordpiece:
        files[VOCAB_FILE] = card.tokenizer.vocab_txt()
    return files


def metadata_buffer(card: Card, annotation: Annotation) -> bytes:
    """The ModelMetadata flatbuffer (identifier M001) of a file described by `annotation`."""
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md

    def associated(name: str, description: str, kind: int):
        f = md.AssociatedFileT()
        f.name, f.description, f.type = name, description, kind
        return f

    def tensor(t: TensorMeta):
        m = md.TensorMetadataT()
        m.name, m.description = t.name, t.description
        m.content = md.ContentT()
        if t.image is not None:
            props = md.ImagePropertiesT()
            props.colorSpace = md.ColorSpaceType.RGB
            m.content.contentPropertiesType = md.ContentProperties.ImageProperties
            m.content.contentProperties = props
            norm = md.NormalizationOptionsT()
            norm.mean, norm.std = list(map(float, t.image.mean)), list(map(float, t.image.std))
            if len(norm.mean) == 1:  # the app feeds RGB; a gray model averages the channels inside the file
                norm.mean, norm.std = norm.mean * 3, norm.std * 3
            unit = md.ProcessUnitT()
            unit.optionsType, unit.options = md.ProcessUnitOptions.NormalizationOptions, norm
            m.processUnits = [unit]
            stats = md.StatsT()
            stats.max, stats.min = [255.0], [0.0]
            m.stats = stats
        else:
            m.content.contentPropertiesType = md.ContentProperties.FeatureProperties
            m.content.contentProperties = md.FeaturePropertiesT()
            m.stats = md.StatsT()
        if t.labels and card.labels:
            m.associatedFiles = [associated(LABELS_FILE, "Label names, one a line, in output order.",
                                            md.AssociatedFileType.TENSOR_AXIS_LABELS)]
        return m

    sub = md.SubGraphMetadataT()
    sub.name = card.variant
    sub.inputTensorMetadata = [tensor(t) for t in annotation.inputs]
    sub.outputTensorMetadata = [tensor(t) for t in annotation.outputs]
    if annotation.bert_tokenizer and card.tokenizer is not None:
        options = md.BertTokenizerOptionsT()
        options.vocabFile = [associated(VOCAB_FILE, "WordPiece vocabulary, one token a line, in id order.",
                                        md.AssociatedFileType.VOCABULARY)]
        unit = md.ProcessUnitT()
        unit.optionsType, unit.options = md.ProcessUnitOptions.BertTokenizerOptions, options
        sub.inputProcessUnits = [unit]
    model = md.ModelMetadataT()
    model.name, model.description = card.name, card.description()
    model.version = str(card.provenance.get("pocketformer", ""))
    model.author, model.license = "pocketformer", ""
    model.subgraphMetadata = [sub]
    model.associatedFiles = [associated(CARD_FILE, "The pocketformer card: labels, tokenizer, inputs, output, "
                                                   "provenance (JSON).", md.AssociatedFileType.DESCRIPTIONS)]
    # The oldest metadata parser that reads every field used: BertTokenizerOptions came with 1.1.0.
    model.minParserVersion = "1.1.0" if sub.inputProcessUnits else "1.0.0"
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=METADATA_IDENTIFIER)
    return bytes(builder.Output())


def inline_buffers(model, content: bytes) -> bool:
    """Move buffers stored after the flatbuffer (offset/size, as ai-edge-quantizer writes them) into it, so that
    re-packing keeps their data; False when the weights are too big for an inline flatbuffer (2 GB)."""
    if len(content) >= FLATBUFFER_LIMIT:
        return False
    for b in model.buffers:
        if b.offset > 1:  # 0 and 1 mean "no external data"
            b.data = np.frombuffer(content, np.uint8, count=int(b.size), offset=int(b.offset))
            b.offset = b.size = 0
    return True


def embed(content: bytes, metadata: bytes, files: dict[str, bytes]) -> Optional[bytes]:
    """The model `content` with `metadata` as its TFLITE_METADATA (replacing any) and `files` as its appended
    archive (replacing any); None when the weights are too big to re-pack (2 GB)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    if not inline_buffers(model, content):
        return None
    entry = next((m for m in model.metadata or [] if m.name in (METADATA_NAME, METADATA_NAME.encode())), None)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata, np.uint8)
    model.buffers = list(model.buffers or [])
    if entry is None:
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
        model.metadata = list(model.metadata or []) + [entry]
    else:
        model.buffers[entry.buffer] = buffer
    builder = flatbuffers.Builder(len(content) + len(metadata) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=MODEL_IDENTIFIER)
    out = io.BytesIO()
    out.write(builder.Output())
    # Appending a zip to other bytes: its offsets count from the start of the file, as MediaPipe's reader wants.
    with zipfile.ZipFile(out, "a", zipfile.ZIP_STORED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.external_attr = 0o644 << 16
            zf.writestr(info, files[name])
    return out.getvalue()


def annotate(content: bytes, card: Card, annotation: Annotation) -> Optional[bytes]:
    """`content` carrying `card` as TFLite Model Metadata with its files; None when it cannot be re-packed."""
    return embed(content, metadata_buffer(card, annotation), {**card_files(card), **annotation.extra_files})


def embedded_files(content: bytes) -> dict[str, bytes]:
    """The files appended to a .tflite (name -> bytes); {} when it carries none."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            return {name: zf.read(name) for name in zf.namelist()}
    except zipfile.BadZipFile:
        return {}


def read_metadata(content: bytes):
    """The file's ModelMetadataT, or None when it carries no TFLITE_METADATA."""
    from ai_edge_litert import schema_py_generated as schema
    from mediapipe.tasks.metadata import metadata_schema_py_generated as md

    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            data = model.Buffers(entry.Buffer()).DataAsNumpy()
            return md.ModelMetadataT.InitFromPackedBuf(bytearray(np.asarray(data, np.uint8).tobytes()), 0)
    return None


def read_card(content: bytes) -> Optional[dict[str, Any]]:
    """The card a .tflite carries (its pocketformer.json), plus where its tokenizer is; None when it has none."""
    files = embedded_files(content)
    if CARD_FILE not in files:
        return None
    card = json.loads(files[CARD_FILE])
    if card.get("tokenizer"):
        card["tokenizer_location"] = "embedded" if VOCAB_FILE in files else "beside: " + str(card.get("tokenizer_dir"))
    return card
