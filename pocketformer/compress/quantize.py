"""Quantization in PyTorch through neural-compressor 3.x, accuracy-aware, refusing what it cannot ship.

`neural_compressor.torch.quantization.autotune` tries the candidate configs in order (most aggressive first) and stops
at the first whose validation metric stays within the recipe's tolerable loss of the float model. Weight-only round-
to-nearest (RTN) is the scheme: on CPUs without int8 dot products (METHODS.md) int8 buys size, not speed, and the
weights are what the formats store in int8. The result stays a canonical float model whose every Linear weight lies on
the chosen int grid (dequantized from neural-compressor's packed weights), so save/load and all three exporters carry
it unchanged, and each format's native int8 (ORT per-channel dynamic, ai-edge-quantizer, coremltools linear) stores
the same grid. `ModelConfig.quantization` records what was done.

The traps METHODS.md lists are guarded, not trusted: whatever the config, the quantized model is compared with the
float model on the validation split (label agreement for a classifier, embedding cosine otherwise) and refused below
`min_agreement`, with the figure. The canonical model has no unused modules (importers drop the pooler), so
neural-compressor never sees a branch that calibration does not reach.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..errors import PocketformerError
from ..models.canonical import CanonicalTransformer
from ..progress import info, quiet
from ..train import predict
from ..space import searchable
from .base import Context, Stage, StageConfig, StageResult


class QuantizationRefused(PocketformerError):
    """The quantized model falls below the recipe's accuracy or agreement floor."""


class WeightCandidate(StageConfig):
    bits: Literal[2, 3, 4, 8] = Field(8, description="bits per weight")
    group_size: int = Field(-1, description="weights per scale along the input axis; -1 = one scale per output "
                                            "channel")
    mse_search: bool = Field(False, description="search each clipping range for the least squared error")


class QuantizeConfig(StageConfig):
    candidates: list[WeightCandidate] = Field(
        default_factory=lambda: [WeightCandidate(bits=8, group_size=-1),
                                 WeightCandidate(bits=8, group_size=-1, mse_search=True)],
        description="weight-only RTN configs to try, in order; the first within `tolerable_loss` wins",
        json_schema_extra=searchable(choices=[[{"bits": 8, "group_size": -1}],
                                              [{"bits": 4, "group_size": 32}],
                                              [{"bits": 4, "group_size": 32, "mse_search": True}]]))
    tolerable_loss: float = Field(1.0, ge=0, le=100, description="validation accuracy points the quantized model "
                                                                 "may lose (embedding models: cosine x 100)")
    min_agreement: float = Field(0.97, ge=0, le=1, description="refuse below this agreement with the float model "
                                                               "on the validation split (labels, or cosine)")
    eval_examples: int = Field(0, ge=0, description="validation examples scored per trial (0 = all)")


def _quiet():
    """neural-compressor prints its config and logs every layer it quantizes."""
    return quiet("neural_compressor")


def _rtn(candidate: WeightCandidate):
    from neural_compressor.torch.quantization import RTNConfig

    return RTNConfig(bits=candidate.bits, group_size=candidate.group_size, use_sym=True,
                     use_mse_search=candidate.mse_search, use_layer_wise=False)


def dequantized_weights(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """Float weights of each of neural-compressor's packed weight-only linears, by module name: int weights times
    their scales, multiplied in float32 (its own `recover()` multiplies in the scales' fp16 and blurs the grid)."""
    weights = {}
    for name, m in quantized.named_modules():
        if not hasattr(m, "recover"):
            continue
        packed = m.unpack()
        ints, scales, zero = packed["int_weight"].float(), packed["scales"].float(), packed.get("zp")
        group = torch.arange(m.in_features) // (m.group_size if m.group_size > 0 else m.in_features)
        if zero is not None:
            ints = ints - zero.float()[:, group]
        weights[name] = ints * scales[:, group]
    return weights


def on_int_grid(model: CanonicalTransformer, quantized: nn.Module) -> tuple[CanonicalTransformer, int]:
    """A copy of the float model whose Linear weights are neural-compressor's, dequantized onto their int grid, and
    how many linears that is."""
    weights = dequantized_weights(quantized)
    if not weights:
        raise QuantizationRefused("neural-compressor quantized no Linear of the model.",
                                  "report this with the model's pocketformer.json.")
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            modules[name].weight.copy_(w.to(modules[name].weight.dtype))
    return result.eval(), len(weights)


class ExampleScoring:
    """An encoder's quantization scored on validation examples: its task's metric (accuracy, or embedding cosine
    with the float model) and agreement (labels, or cosine)."""

    def __init__(self, model, ctx: Context, limit: int):
        self.data = ctx.validation.head(limit) if limit else ctx.validation
        self.encoder, self.task = ctx.encoder, model.task
        self.metric, self.size = model.task.metric, f"{len(self.data)} validation examples"
        self.record = {"validation_examples": len(self.data)}

    def outputs(self, m: nn.Module) -> np.ndarray:
        return predict(m, self.data, self.encoder).numpy()

    def quality(self, out: np.ndarray, float_out: np.ndarray) -> float:
        return self.task.quality(out, self.data.labels, float_out)


class TextScoring:
    """A language model's quantization scored on validation text windows: quality = 100 x the float model's
    perplexity / the quantized model's (100 when equal: `tolerable_loss` 1 allows about 1% more perplexity);
    agreement = top-1 next-token agreement over every predicted position."""

    metric = "100 x float perplexity / perplexity"

    def __init__(self, model, ctx: Context, limit: int):
        windows = ctx.text.get("validation") or []
        self.windows = windows[:limit] if limit else windows
        self.targets = torch.cat([torch.tensor(w[1:]) for w in self.windows])
        self.size = f"{len(self.targets):,} validation tokens"
        self.record = {"validation_tokens": len(self.targets), "metric": self.metric}

    @torch.no_grad()
    def outputs(self, m: nn.Module) -> np.ndarray:
        return torch.cat([m(torch.tensor([w]))[0, :-1].float() for w in self.windows]).numpy()

    def perplexity(self, out: np.ndarray) -> float:
        return float(torch.exp(torch.nn.functional.cross_entropy(torch.from_numpy(out), self.targets)))

    def quality(self, out: np.ndarray, float_out: np.ndarray) -> float:
        return 100.0 * self.perplexity(float_out) / self.perplexity(out)


class Quantize(Stage[QuantizeConfig], name="quantize", version=1,
               summary="weight-only int quantization through neural-compressor autotune, refused below the floor "
                       "(a language model: scored by perplexity and next-token agreement on its text)"):
    libraries = ("torch", "neural-compressor")
    kinds = frozenset({"encoder", "causal_lm"})
    provides = frozenset({"quantized"})

    def apply(self, model: CanonicalTransformer, ctx: Context) -> StageResult:
        cfg = self.config
        model = model.eval()
        task = model.task
        scoring = TextScoring(model, ctx, cfg.eval_examples) if ctx.text else \
            ExampleScoring(model, ctx, cfg.eval_examples)
        float_out = scoring.outputs(model)

        def quality(m: nn.Module) -> float:  # in percent, higher is better, as autotune expects
            return scoring.quality(scoring.outputs(m), float_out)

        baseline = quality(model)
        info(f"    float model: {baseline:.2f} ({scoring.metric}) on {scoring.size}; tolerable loss "
             f"{cfg.tolerable_loss} points")
        quantized, trials = self._tune(model, quality, baseline)
        chosen = self._chosen(quantized, trials, baseline)
        result, linears = on_int_grid(model, quantized)
        out = scoring.outputs(result)
        agree, value = task.agreement(out, float_out), scoring.quality(out, float_out)
        info(f"    quantized ({chosen.bits}-bit, group {chosen.group_size}): {value:.2f} "
             f"(float {baseline:.2f}), agreement with float {agree:.4f} on {scoring.size}")
        if agree < cfg.min_agreement:
            raise QuantizationRefused(
                f"the {chosen.bits}-bit model agrees with the float model on only {agree:.4f} of "
                f"{scoring.size}, below the recipe's floor {cfg.min_agreement}.",
                "use 8 bits with group_size -1, lower `min_agreement` knowingly, or drop the quantize stage.")
        result.spec.quantization = {"library": f"neural-compressor {_inc_version()}", "scheme": "weight_only_rtn",
                                    "bits": chosen.bits, "group_size": chosen.group_size, "symmetric": True,
                                    "mse_search": chosen.mse_search, "linears": linears,
                                    "float_metric": round(baseline, 4), "quantized_metric": round(value, 4),
                                    "agreement": round(agree, 6), **scoring.record}
        return StageResult(result, {"trials": trials, "quantization": result.spec.quantization})

    def _tune(self, model: CanonicalTransformer, quality: Callable[[nn.Module], float],
              baseline: float) -> tuple[Optional[nn.Module], list[dict]]:
        """neural-compressor's autotune over the candidates, scored by `quality`: (its model, or None; every trial)."""
        cfg = self.config
        with _quiet():
            from neural_compressor.torch.quantization import TuningConfig, autotune
        # neural-compressor's tolerance is relative to the baseline: convert the recipe's points.
        relative = cfg.tolerable_loss / max(baseline, 1e-9)
        trials: list[dict] = []
        calls = [0]

        def scored(m: nn.Module) -> float:
            calls[0] += 1
            if calls[0] == 1:  # autotune scores the float model first
                return baseline
            value = quality(m)
            trials.append({"config": cfg.candidates[len(trials)].model_dump(), "metric": round(value, 4)})
            info(f"    trial {len(trials)}: {trials[-1]['config']} -> {value:.2f}")
            return value

        with _quiet():
            quantized = autotune(copy.deepcopy(model), TuningConfig(
                config_set=[_rtn(c) for c in cfg.candidates], tolerable_loss=relative,
                max_trials=len(cfg.candidates)), eval_fn=scored)
        return quantized, trials

    def _chosen(self, quantized: Optional[nn.Module], trials: list[dict], baseline: float) -> WeightCandidate:
        """The candidate autotune stopped at: the first within the tolerable loss (refused if none is)."""
        cfg = self.config
        within = [i for i, t in enumerate(trials) if t["metric"] >= baseline - cfg.tolerable_loss - 1e-9]
        if quantized is None or not within:
            best = max((t["metric"] for t in trials), default=float("nan"))
            raise QuantizationRefused(
                f"no quantization candidate stays within {cfg.tolerable_loss} points of the float model "
                f"({baseline:.2f}; best candidate {best:.2f}).",
                "raise `tolerable_loss`, add a gentler candidate (8 bits, group_size -1), or drop the quantize stage.")
        return cfg.candidates[within[0]]


def _inc_version() -> str:
    from importlib.metadata import version

    return version("neural_compressor")
