"""A causal LM's exported file driven on its runtime: prefill, cached decode steps, greedy generation, perplexity,
and timings (prefill tokens/s at a prompt length, decode tokens/s at batch 1, time to first token).

Written once over the runtime contract (a Session runs feeds by name) for the two layouts the exporters write:
ONNX's cached decoder of dynamic shapes (new tokens, mask, positions and each layer's past keys and values in; each
layer's present and the logits out: CausalLMConfig.inputs()/outputs()), and a fixed-shape file's `prefill` and
`decode` signatures over a cache of fixed length (CausalLMConfig.fixed_cache_io). `open_lm` picks by the file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ..errors import TargetError
from .runtime import Session

PAST, PRESENT, CACHE = "past_key_values.", "present.", "kv_cache_"


@dataclass
class Timings:
    prompt_tokens: int
    prefill_ms: float  # = time to first token (the prefill's logits give it)
    decode_ms: list[float]  # one per generated token after the first

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / (self.prefill_ms / 1000)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000 / float(np.median(self.decode_ms)) if self.decode_ms else math.nan


class LMDriver:
    """Greedy decoding and scoring written once over two steps a file's graphs give: prefill a prompt (logits of
    every prompt token) and decode one token after it."""

    path: Path

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, Any]:
        """Logits (len(prompt), vocab) of a prompt on an empty cache, and the cache after it."""
        raise NotImplementedError

    def decode(self, token: int, cache: Any) -> tuple[np.ndarray, Any]:
        """Logits (vocab,) of one token after the cache, and the cache after it."""
        raise NotImplementedError

    def generate(self, prompt: list[int], new_tokens: int, eos: Iterable[int] = (),
                 timings: bool = False, stream: Optional[Callable[[int], None]] = None):
        """Greedy token ids after `prompt` (batch 1), stopping after an eos id; with `timings`, also a Timings;
        `stream` is called with each token as it comes."""
        eos = set(eos)
        t0 = time.perf_counter()
        logits, cache = self.prefill(prompt)
        prefill = (time.perf_counter() - t0) * 1000
        last = logits[-1]
        out, steps = [], []
        for i in range(new_tokens):
            nxt = int(last.argmax())
            out.append(nxt)
            if stream is not None:
                stream(nxt)
            if nxt in eos or i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            last, cache = self.decode(nxt, cache)
            steps.append((time.perf_counter() - t0) * 1000)
        return (out, Timings(len(prompt), prefill, steps)) if timings else out

    def nll(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over the windows (each prefilled on an empty cache) and the
        count of predicted tokens."""
        total, count = 0.0, 0
        for w in windows:
            lg = np.asarray(self.prefill(w)[0][:-1], dtype=np.float64)
            lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
            total += float((lse - lg[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
        return total, count


class Decoder(LMDriver):
    """A cached-decoder graph of dynamic shapes (ONNX): new tokens, the mask over past + new tokens, their positions
    and each layer's past keys and values (`past_key_values.N.key`) in; each layer's present and the logits out."""

    def __init__(self, session: Session):
        self.session, self.path = session, session.path
        self.past_names = [n for n in session.input_names if n.startswith(PAST)]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in session.inputs]
        if missing or not self.past_names:
            raise TargetError(f"{session.path.name} is not a cached decoder (no {', '.join(missing) or 'past_key_values'} "
                              "input).", "export the language model with `pocketformer export`.")
        self.shapes = {n: session.inputs[n] for n in self.past_names}

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, dims[1], 0, dims[3]), dtype=self.session.dtypes[n])
                for n, dims in self.shapes.items()}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray], mask: Optional[np.ndarray] = None
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of the new tokens `ids` (batch, n) and the cache after them."""
        b, n = ids.shape
        past_len = next(iter(past.values())).shape[2]
        if mask is None:
            mask = np.ones((b, past_len + n), dtype=np.int64)
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask,
                 "position_ids": np.broadcast_to(np.arange(past_len, past_len + n, dtype=np.int64), (b, n)).copy(),
                 **past}
        out = self.session.run(feeds)
        present = {PAST + k[len(PRESENT):]: v for k, v in out.items() if k.startswith(PRESENT)}
        return out["logits"], present

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, Any]:
        logits, past = self.step(np.asarray([prompt]), self.empty_past(1))
        return logits[0], past

    def decode(self, token: int, cache: Any) -> tuple[np.ndarray, Any]:
        logits, past = self.step(np.asarray([[token]]), cache)
        return logits[0, -1], past


class FixedCacheDriver(LMDriver):
    """A fixed-shape file's two signatures over one cache of C slots (models/causal.py FixedCacheDecoder): `prefill`
    takes T tokens at positions input_pos, `decode` one; both take and give every layer's cache (`kv_cache_k_N`).
    A prompt is prefilled in chunks of T (the last padded at its end); tokens that would run a chunk past the last
    slot go through `decode` one by one."""

    def __init__(self, prefill: Session, decode: Session):
        self.prefill_session, self.decode_session, self.path = prefill, decode, prefill.path
        self.cache_names = [n for n in prefill.input_names if n.startswith(CACHE)]
        self.chunk = int(prefill.inputs["tokens"][1])
        self.context = int(prefill.inputs[self.cache_names[0]][2])

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros(self.prefill_session.inputs[n], dtype=self.prefill_session.dtypes[n])
                for n in self.cache_names}

    def _run(self, session: Session, tokens: list[int], start: int, cache: dict[str, np.ndarray]):
        n = session.inputs["tokens"][1]
        if start + n > self.context:
            raise TargetError(f"{self.path.name} holds {self.context} tokens of context; this needs "
                              f"{start + len(tokens)}.", "use a shorter prompt or fewer new tokens, or export with a "
                              "longer context.")
        ids = np.zeros((1, n), dtype=np.int32)
        ids[0, :len(tokens)] = tokens
        out = session.run({"tokens": ids, "input_pos": np.arange(start, start + n, dtype=np.int32), **cache})
        return out["logits"][0, :len(tokens)], {k: out[k] for k in self.cache_names}

    def prefill(self, prompt: list[int]) -> tuple[np.ndarray, Any]:
        cache, pieces, start = self.empty_cache(), [], 0
        while start < len(prompt):
            if start + self.chunk <= self.context:
                logits, cache = self._run(self.prefill_session, prompt[start:start + self.chunk], start, cache)
            else:
                logits, cache = self._run(self.decode_session, prompt[start:start + 1], start, cache)
            pieces.append(logits)
            start += len(logits)
        return np.concatenate(pieces), (cache, len(prompt))

    def decode(self, token: int, cache: Any) -> tuple[np.ndarray, Any]:
        tensors, position = cache
        logits, tensors = self._run(self.decode_session, [token], position, tensors)
        return logits[-1], (tensors, position + 1)


def open_lm(runtime, path: Path, threads: int) -> LMDriver:
    """The driver for a language-model file on `runtime` (a targets runtime), chosen by the file's own inputs:
    a cached decoder of dynamic shapes, or prefill and decode signatures over a fixed cache."""
    first = runtime.open(path, threads)
    if any(n.startswith(PAST) for n in first.input_names):
        return Decoder(first)
    if "tokens" in first.inputs and any(n.startswith(CACHE) for n in first.input_names):
        prefill, decode = runtime.open_graphs([(Path(path), "prefill"), (Path(path), "decode")], threads)
        return FixedCacheDriver(prefill, decode)
    raise TargetError(f"{Path(path).name} is not a language model pocketformer exported (no past_key_values or "
                      "kv_cache inputs).", "export the language model with `pocketformer export`.")


def perplexity(decoder: Decoder, windows: list[list[int]]) -> float:
    total, count = decoder.nll(windows)
    return math.exp(total / count)


def token_match(a: list[int], b: list[int]) -> dict[str, float]:
    """How far two greedy continuations agree: the share of positions equal, and the first position they part."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), n)
    return {"tokens": n, "match": sum(x == y for x, y in zip(a, b)) / max(1, n), "first_divergence": first}
