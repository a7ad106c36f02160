"""A causal LM's exported file driven on its runtime: prefill, cached decode steps, greedy generation, perplexity,
and timings (prefill tokens/s at a prompt length, decode tokens/s at batch 1, time to first token).

Written once over the runtime contract (a Session runs feeds by name): the file's graph takes the new tokens, the
mask over past + new tokens, their positions and each layer's past keys and values (`past_key_values.N.key`), and
gives each layer's present (`present.N.key`) and the logits, as CausalLMConfig.inputs()/outputs() declare.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..errors import TargetError
from .runtime import Session

PAST, PRESENT = "past_key_values.", "present."


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


class Decoder:
    """Greedy decoding and scoring through one opened cached-decoder graph."""

    def __init__(self, session: Session):
        self.session = session
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

    def generate(self, prompt: list[int], new_tokens: int, eos: Iterable[int] = (),
                 timings: bool = False):
        """Greedy token ids after `prompt` (batch 1), stopping after an eos id; with `timings`, also a Timings."""
        eos = set(eos)
        t0 = time.perf_counter()
        logits, past = self.step(np.asarray([prompt]), self.empty_past(1))
        prefill = (time.perf_counter() - t0) * 1000
        out, steps = [], []
        for i in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos or i == new_tokens - 1:
                break
            t0 = time.perf_counter()
            logits, past = self.step(np.asarray([[nxt]]), past)
            steps.append((time.perf_counter() - t0) * 1000)
        return (out, Timings(len(prompt), prefill, steps)) if timings else out

    def nll(self, windows: list[list[int]]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood over the windows (each run as one prefill) and the count of
        predicted tokens."""
        total, count = 0.0, 0
        for w in windows:
            logits, _ = self.step(np.asarray([w]), self.empty_past(1))
            lg = logits[0, :-1].astype(np.float64)
            lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
            total += float((lse - lg[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
        return total, count


def perplexity(decoder: Decoder, windows: list[list[int]]) -> float:
    total, count = decoder.nll(windows)
    return math.exp(total / count)


def token_match(a: list[int], b: list[int]) -> dict[str, float]:
    """How far two greedy continuations agree: the share of positions equal, and the first position they part."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), n)
    return {"tokens": n, "match": sum(x == y for x, y in zip(a, b)) / max(1, n), "first_divergence": first}
