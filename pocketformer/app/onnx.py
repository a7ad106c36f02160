"""ONNX Runtime app folder: the plain ONNX files with their card, and for WordPiece text models a text-in file.

The text-in file (`model.<precision>.text.onnx`) takes raw text, a string tensor [N], and runs onnxruntime-extensions'
BertTokenizer before the model, so a desktop, server or web app needs no tokenizer of its own: a classifier returns
`label` (string [N]), `label_index` [N] and `probabilities` [N, labels]; an embedding model its `embedding`. The
tokenizer is set to the checkpoint's normalisation (lowercase, strip_accents: onnxruntime-extensions' default does
not follow BERT's "strip accents when lowercasing" rule) and truncates at the card's max_len.

BertTokenizer encodes one text per call, so the file loops over the N texts, pads each to max_len, then cuts the
batch to its longest text: the model sees the same ids, mask and padding width as the plain file fed by
pocketformer's Encoder, which keeps int8's per-batch activation ranges the same too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import TensorProto, compose, helper

from ..data import Dataset, Encoder
from ..export.card import Card
from ..export.onnx import annotate_onnx
from .base import App, Built, plain_outputs

PRECISIONS = ("fp32", "int8")
TOKENIZER_FOLDER = "tokenizer"
CONTRIB = "ai.onnx.contrib"  # onnxruntime-extensions' op domain
TEXT = "text"
BATCH = 32  # texts per run when checking; plain_outputs runs the plain file in batches of 32 too
# the model's inputs as BertTokenizer's outputs
FROM_TOKENIZER = {"input_ids": "input_ids", "attention_mask": "attention_mask", "segment_ids": "token_type_ids"}


def extensions() -> tuple[Optional[Any], Optional[str]]:
    """onnxruntime_extensions, or None and why not."""
    try:
        import onnxruntime_extensions
    except ImportError as e:
        return None, f"onnxruntime-extensions is not installed here ({e}); `pip install onnxruntime-extensions`"
    return onnxruntime_extensions, None


def text_in_refusal(card: Card) -> Optional[str]:
    """Why the model gets no text-in file (one line), or None."""
    if card.modality != "text":
        return "not a text model"
    if card.tokenizer is None or card.tokenizer.kind != "wordpiece":
        return "the checkpoint's tokenizer is not a WordPiece (BERT) one onnxruntime-extensions' BertTokenizer mirrors"
    unknown = [t["name"] for t in card.inputs if t["name"] not in FROM_TOKENIZER]
    if unknown:
        return f"the model takes {', '.join(unknown)}, which a tokenizer does not make"
    return extensions()[1]


def tokenizer_graph(card: Card, opsets: dict[str, int], ir_version: int) -> onnx.ModelProto:
    """text [N] (strings) -> the model's inputs [N, longest], as card.tokenizer encodes them: [CLS] text [SEP],
    truncated to max_len, padded with the pad id (mask 0). `opsets`: the model's, which the graph must share (ORT's
    quantizer may already import the extensions' domain, at its own version)."""
    tok = card.tokenizer
    vocab = tok.vocab()
    pad_id = vocab.index(tok.pad)
    max_len = int(card.max_len)
    ints = {n: helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
            (("tk_zero", 0), ("tk_axis0", 0), ("tk_axis1", 1), ("tk_max_len", max_len))}
    # one text per iteration: BertTokenizer takes one text (or a pair)
    body = [
        helper.make_node("Unsqueeze", ["tk_i", "tk_axis0"], ["tk_i1"]),
        helper.make_node("Gather", [TEXT, "tk_i1"], ["tk_one"], axis=0),
        helper.make_node("BertTokenizer", ["tk_one"], ["tk_ids", "tk_types", "tk_mask", "tk_offsets"], domain=CONTRIB,
                         vocab_file="\n".join(vocab), do_lower_case=int(tok.lowercase),
                         strip_accents=int(tok.strips_accents), unk_token=tok.unk, sep_token=tok.sep,
                         pad_token=tok.pad, cls_token=tok.cls, max_length=max_len),
        helper.make_node("Shape", ["tk_ids"], ["tk_n"]),
        helper.make_node("Sub", ["tk_max_len", "tk_n"], ["tk_short"]),
        helper.make_node("Concat", ["tk_zero", "tk_short"], ["tk_pads"], axis=0),
        helper.make_node("Pad", ["tk_ids", "tk_pads", "tk_pad_id"], ["tk_ids_row"]),
        helper.make_node("Pad", ["tk_mask", "tk_pads", "tk_zero_scalar"], ["tk_mask_row"]),
        helper.make_node("Pad", ["tk_types", "tk_pads", "tk_zero_scalar"], ["tk_types_row"]),
        helper.make_node("Identity", ["tk_cond"], ["tk_cond_out"]),
    ]
    body_graph = helper.make_graph(
        body, "one_text",
        [helper.make_tensor_value_info("tk_i", TensorProto.INT64, []),
         helper.make_tensor_value_info("tk_cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("tk_cond_out", TensorProto.BOOL, []),
         *(helper.make_tensor_value_info(n, TensorProto.INT64, [max_len])
           for n in ("tk_ids_row", "tk_mask_row", "tk_types_row"))],
        [ints["tk_zero"], ints["tk_axis0"], ints["tk_max_len"],
         helper.make_tensor("tk_pad_id", TensorProto.INT64, [], [pad_id]),
         helper.make_tensor("tk_zero_scalar", TensorProto.INT64, [], [0])])
    nodes = [
        helper.make_node("Shape", [TEXT], ["tk_count1"]),
        helper.make_node("Squeeze", ["tk_count1", "tk_axis0"], ["tk_count"]),
        helper.make_node("Loop", ["tk_count", ""], ["tk_ids_full", "tk_mask_full", "tk_types_full"], body=body_graph),
        # cut the padding every text of the batch has: the batch's longest text sets the width
        helper.make_node("ReduceSum", ["tk_mask_full", "tk_axis1"], ["tk_lengths"], keepdims=0),
        helper.make_node("ReduceMax", ["tk_lengths"], ["tk_width0"], keepdims=1),
        helper.make_node("Max", ["tk_width0", "tk_axis1"], ["tk_width"]),  # an empty batch: width 1
    ]
    names = {t["name"] for t in card.inputs}
    full = {"input_ids": "tk_ids_full", "attention_mask": "tk_mask_full", "token_type_ids": "tk_types_full"}
    for name in [t["name"] for t in card.inputs]:
        nodes.append(helper.make_node("Slice", [full[FROM_TOKENIZER[name]], "tk_zero", "tk_width", "tk_axis1"],
                                      [f"tk_{name}"]))
    graph = helper.make_graph(
        nodes, "tokenizer", [helper.make_tensor_value_info(TEXT, TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info(f"tk_{n}", TensorProto.INT64, ["batch", "seq"]) for n in sorted(names)],
        [ints["tk_zero"], ints["tk_axis0"], ints["tk_axis1"]])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opsets[""]),
                                                   helper.make_opsetid(CONTRIB, opsets.get(CONTRIB, 1))],
                             ir_version=ir_version)


def head_graph(card: Card, output: str, opset: int, ir_version: int) -> onnx.ModelProto:
    """A classifier's logits -> probabilities (softmax), label_index and label (string)."""
    dim = len(card.labels)
    nodes = [helper.make_node("Softmax", [f"hd_{output}"], ["probabilities"], axis=-1),
             helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=-1, keepdims=0),
             helper.make_node("Gather", ["hd_labels", "label_index"], ["label"], axis=0)]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info(f"hd_{output}", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"]),
         helper.make_tensor_value_info("label_index", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor("hd_labels", TensorProto.STRING, [dim], [s.encode("utf-8") for s in card.labels])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def text_in_model(plain: Path, card: Card) -> onnx.ModelProto:
    """The plain ONNX file with card.tokenizer before it (and, for a classifier, softmax and the label after it)."""
    model = onnx.load(str(plain))
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    names = [t["name"] for t in card.inputs]
    merged = compose.merge_models(tokenizer_graph(card, opsets, model.ir_version), model,
                                  [(f"tk_{n}", n) for n in names])
    if card.labels:
        output = card.output["name"]
        merged = compose.merge_models(merged, head_graph(card, output, opsets[""], model.ir_version),
                                      [(output, f"hd_{output}")])
    del merged.metadata_props[:]  # annotate writes the card again
    seen = {(o.domain, o.version): o for o in merged.opset_import}  # merge_models repeats domains both import
    del merged.opset_import[:]
    merged.opset_import.extend(seen.values())
    return merged


def client_session(path: Path, ox):
    """An ONNX Runtime CPU session with onnxruntime-extensions' ops registered (a text-in file needs them)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if ox is not None:
        opts.register_custom_ops_library(ox.get_library_path())
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_texts(session, texts: list[str], card: Card, batch: int = BATCH) -> np.ndarray:
    """A text-in file's probabilities (classifier) or embeddings for `texts`, `batch` texts per run."""
    want = "probabilities" if card.labels else card.output["name"]
    outs = [session.run([want], {TEXT: np.asarray(texts[s:s + batch], dtype=object)})[0]
            for s in range(0, len(texts), batch)]
    return np.concatenate(outs).astype(np.float64)


class OnnxApp(App):
    name, format, client = "onnx", "onnx", "ONNX Runtime"

    def build(self, model, card: Card, plain: list[dict[str, Any]], art_dir: Path, folder: Path) -> list[Built]:
        records = {r["precision"]: r for r in plain if r.get("format") == self.format and r.get("kind") is None
                   and r.get("variant", card.variant) == card.variant and r["precision"] in PRECISIONS}
        if card.tokenizer is not None:
            (folder / TOKENIZER_FOLDER).mkdir()
            for name, path in sorted(card.tokenizer.files.items()):
                shutil.copyfile(path, folder / TOKENIZER_FOLDER / name)
        why_not = text_in_refusal(card)
        built = []
        for precision in [p for p in PRECISIONS if p in records]:
            source = records[precision]["file"]
            copy = f"model.{precision}.onnx"
            shutil.copyfile(art_dir / source, folder / copy)  # already annotated by the export loop
            if why_not is not None:
                built.append(Built(copy, precision, source, {"input": "tokens" if card.tokenizer else "pixels",
                                                             "text_in": f"none: {why_not}"}))
                continue
            text = f"model.{precision}.text.onnx"
            proto = text_in_model(folder / copy, card)
            (folder / text).write_bytes(proto.SerializeToString())
            annotate_onnx(folder / text, card, precision, {"pocketformer.input": "text"})
            built.append(Built(text, precision, source, {"input": "text", "plain_copy": copy,
                                                         "tokenizer": "onnxruntime-extensions BertTokenizer"}))
        return built

    def client_outputs(self, folder: Path, built: Built, card: Card, ds: Dataset) -> np.ndarray:
        if built.extras.get("input") == "text":
            ox, _ = extensions()
            return run_texts(client_session(folder / built.file, ox), list(ds.texts), card)
        # a plain copy: pocketformer's own Encoder on the tokenizer copied beside it
        enc = Encoder(folder / TOKENIZER_FOLDER if card.tokenizer else None, card.max_len or 128)
        return plain_outputs(folder / built.file, self.format, card, ds, enc)

    def client_name(self) -> str:
        import onnxruntime

        ox, _ = extensions()
        return f"ONNX Runtime {onnxruntime.__version__}" + \
            (f" + onnxruntime-extensions {ox.__version__}" if ox is not None else "")

    def readme(self, card: Card, built: list[Built]) -> str:
        return readme(card, built)


def readme(card: Card, built: list[Built]) -> str:
    """The folder's README.md."""
    text_in = [b for b in built if b.extras.get("input") == "text"]
    lines = [f"# {card.name} for ONNX Runtime", "", card.description(), "", "## Files", ""]
    for b in built:
        if b.extras.get("plain_copy"):
            lines.append(f"- `{b.extras['plain_copy']}`: the model ({b.precision}), taking "
                         + ", ".join(f"`{t['name']}`" for t in card.inputs) + f"; output `{card.output['name']}`.")
            lines.append(f"- `{b.file}`: the same model ({b.precision}) with its tokenizer inside: input `text` "
                         "(string [N]); " + ("outputs `label` (string [N]), `label_index` [N], `probabilities` "
                                             "[N, labels]." if card.labels else f"output `{card.output['name']}` "
                                                                                f"[N, {card.output.get('dim')}]."))
        else:
            lines.append(f"- `{b.file}`: the model ({b.precision}), taking "
                         + ", ".join(f"`{t['name']}`" for t in card.inputs) + f"; output `{card.output['name']}`"
                         + (f" ({b.extras['text_in']})." if "text_in" in b.extras else "."))
    if card.tokenizer:
        lines.append(f"- `{TOKENIZER_FOLDER}/`: the checkpoint's tokenizer files (also inside each .onnx file, "
                     "metadata key `pocketformer.tokenizer.json`).")
    lines += ["- `card.json`: what the model is (also in each file's metadata, keys `pocketformer.*`).", ""]
    if card.labels:
        lines += [f"Labels, in output order: {', '.join(card.labels)}.", ""]
    if card.tokenizer:
        t = card.tokenizer
        lines += [f"Tokenizer: WordPiece, lowercase {t.lowercase}, strip accents {t.strips_accents}, "
                  f"[CLS] text [SEP], at most {card.max_len} tokens.", ""]
    if card.image:
        i = card.image
        lines += [f"Image: {i.height}x{i.width}, {i.channels} channel(s), (pixel - {list(i.mean)}) / {list(i.std)} "
                  "on 0..255, channels first.", ""]
    lines += ["## Python", "", "```python", "import json", "import numpy as np", "import onnxruntime as ort"]
    if text_in:
        f = text_in[0].file
        lines += ["import onnxruntime_extensions", "", "opts = ort.SessionOptions()",
                  "opts.register_custom_ops_library(onnxruntime_extensions.get_library_path())",
                  f'session = ort.InferenceSession("{f}", opts, providers=["CPUExecutionProvider"])',
                  'labels = json.loads(session.get_modelmeta().custom_metadata_map["pocketformer.labels"])']
        if card.labels:
            lines += ['label, index, probs = session.run(None, {"text": np.array(["a fine film"], dtype=object)})',
                      "print(label[0], probs[0])"]
        else:
            lines += ['(vectors,) = session.run(None, {"text": np.array(["a fine film"], dtype=object)})']
    else:
        f = built[0].file if built else "model.fp32.onnx"
        lines += ["", f'session = ort.InferenceSession("{f}", providers=["CPUExecutionProvider"])',
                  "meta = session.get_modelmeta().custom_metadata_map",
                  'labels = json.loads(meta.get("pocketformer.labels", "[]"))']
        if card.image:
            lines += ["pixels = np.zeros((1, %d, %d, %d), np.float32)  # your image, normalised as above"
                      % (card.image.channels, card.image.height, card.image.width),
                      f'(out,) = session.run(None, {{"{card.inputs[0]["name"]}": pixels}})']
        else:
            lines += ["from tokenizers import Tokenizer", "", 'tok = Tokenizer.from_str(meta["pocketformer.tokenizer.json"])',
                      f"tok.enable_truncation({card.max_len}); tok.no_padding()",
                      'ids = np.array([tok.encode("a fine film").ids], np.int64)',
                      '(out,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})']
    lines += ["```", ""]
    if text_in:
        f = text_in[0].file
        lines += ["## C#", "", "```csharp", "using Microsoft.ML.OnnxRuntime;  // + Microsoft.ML.OnnxRuntime.Extensions",
                  "using Microsoft.ML.OnnxRuntime.Tensors;", "", "var opts = new SessionOptions();",
                  "opts.RegisterOrtExtensions();", f'using var session = new InferenceSession("{f}", opts);',
                  'var labels = session.ModelMetadata.CustomMetadataMap["pocketformer.labels"];  // a JSON list',
                  'var text = new DenseTensor<string>(new[] { "a fine film" }, new[] { 1 });',
                  'using var results = session.Run(new[] { NamedOnnxValue.CreateFromTensor("text", text) });', "```",
                  ""]
    return "\n".join(lines)
