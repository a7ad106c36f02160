"""A decoder in a fixed-shape format (TFLite, CoreML): prefill and decode graphs over one external KV cache.

A fixed-shape file cannot grow its cache as ONNX's cached decoder does, so a causal LM goes to these formats as the
two graphs LiteRT-LM runs (models/causal.py FixedCacheDecoder): `prefill` of T tokens and `decode` of one, both
taking and giving every layer's cache of C slots (`kv_cache_k_N`, `kv_cache_v_N`), the new tokens' positions
(`input_pos`) saying where they go. Both graphs go into one file, since an app holds one cache for both: TFLite
as two signatures, CoreML as one stateful function whose token axis is flexible and whose cache is Core ML states
(export/coreml.py). The check runs the real tokens it is given through prefill, then one decode step fed prefill's
cache and its greedy token, each graph against its PyTorch module.

T is the caller's static sequence length (`--static 1xT`) or the format's default (128 tokens), C the model's
context up to DEFAULT_CONTEXT slots: the cache's bytes and every decode step's attention grow with C.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import ExportError
from ..models.signature import Graph, named_forward
from .base import Format, Written, artifact_size
from .loop import GraphSet, Reference, SetContext

DEFAULT_CONTEXT = 1024


class FixedCacheSet(GraphSet):
    kind = None  # the plain artifact of a decoder in a fixed-shape format
    batch = 1
    stores_sparse = False

    @classmethod
    def applies(cls, model, fmt: Format) -> bool:
        return fmt.static_only and hasattr(model, "fixed_cache_graphs")

    def __init__(self, model, fmt: Format, static_shape: Optional[tuple[int, int]] = None):
        self.model = model
        if static_shape is not None and static_shape[0] != 1:
            raise ExportError(f"A language model's {fmt.name} file decodes one sequence at a time; "
                              f"--static asked for batch {static_shape[0]}.", "use --static 1xT (T: prefill tokens).")
        self.context = min(model.spec.max_positions, DEFAULT_CONTEXT)
        self.prefill = static_shape[1] if static_shape else min(fmt.default_seq, self.context // 2)
        if not 1 <= self.prefill < self.context:
            raise ExportError(f"Prefill of {self.prefill} tokens does not fit a context of {self.context}.",
                              f"use --static 1xT with T below {self.context}.")
        self.modules = model.fixed_cache_graphs(self.prefill, self.context)
        self.graphs = {name: Graph(named_forward(m, m.io.input_names, m.io.output_names), m.io)
                       for name, m in self.modules.items()}

    def reference(self, inputs: tuple[torch.Tensor, ...]) -> Reference:
        """Prefill on the first example's tokens (padded or cut to T), then one decode step of prefill's greedy
        token after them, fed prefill's cache."""
        ids = inputs[0][0][: self.prefill].to(torch.int32)
        n = len(ids)
        tokens = torch.full((1, self.prefill), self.modules["prefill"].io.inputs[0].pad, dtype=torch.int32)
        tokens[0, :n] = ids
        cache = {t.name: torch.zeros(t.axes) for t in self.modules["prefill"].io.inputs[2:]}
        prefill = {"tokens": tokens, "input_pos": torch.arange(self.prefill, dtype=torch.int32), **cache}
        chain: Reference = {}
        with torch.no_grad():
            out = dict(zip(self.graphs["prefill"].io.output_names, self.modules["prefill"](*prefill.values())))
            chain["prefill"] = (prefill, out)
            nxt = int(out["logits"][0, n - 1].argmax())
            decode = {"tokens": torch.tensor([[nxt]], dtype=torch.int32),
                      "input_pos": torch.tensor([n], dtype=torch.int32),
                      **{k: v for k, v in out.items() if k != "logits"}}
            chain["decode"] = (decode, dict(zip(self.graphs["decode"].io.output_names,
                                                self.modules["decode"](*decode.values()))))
        return chain

    def file_name(self, stem: str, fmt: Format, precision: str, graph: str) -> str:
        return f"{stem}.{fmt.suffix(precision)}{fmt.extension}"  # both graphs in one file: they share one cache

    def records(self, ctx: SetContext, precision: str, written: list[Written],
                checks: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """One record per file: the prefill graph's logits check as the file's parity (the decode step's beside
        it), and the cache the file was built for."""
        records = []
        for path in dict.fromkeys(w.path for w in written):
            graphs = [w for w in written if w.path == path]
            main = graphs[0].graph
            records.append({
                "file": path.name, "variant": ctx.stem, "format": ctx.fmt.name, "precision": precision,
                "size_bytes": artifact_size(path), "sha256": ctx.fmt.content_sha256(path),
                "parity_vs_pytorch": {**checks[main]["logits"], "execution": ctx.runtime.execution()},
                "parity_execution": ctx.runtime.execution(),
                "graphs": {w.graph: {"signature": w.signature, "tokens": self.prefill if w.graph == "prefill" else 1,
                                     "logits": checks[w.graph]["logits"],
                                     "cache_max_abs_diff": max((r["max_abs_diff"] for k, r in checks[w.graph].items()
                                                                if k != "logits"), default=0.0)}
                           for w in graphs},
                "kv_cache": {"context": self.context, "prefill_tokens": self.prefill,
                             "layout": "kv_cache_k_N / kv_cache_v_N in and out, (1, kv_heads, context, head_dim)"},
                **ctx.fmt.record_extras(ctx.plan, precision), **ctx.fmt.describe(path)})
        return records

