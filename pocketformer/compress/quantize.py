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
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from ..errors import PocketformerError
from ..models.canonical import CanonicalTransformer
from ..progress import info, quiet
from ..train import evaluate, predict
from .base import Context, Stage, StageConfig


class QuantizationRefused(PocketformerError):
    """The quantized model falls below the recipe's accuracy or agreement floor."""


class WeightCandidate(StageConfig):
    bits: Literal[2, 3, 4, 8] = 8
    group_size: int = Field(-1, description="weights per scale along the input axis; -1 = one scale per output "
                                            "channel")
    mse_search: bool = Field(False, description="search each clipping range for the least squared error")


class QuantizeConfig(StageConfig):
    candidates: list[WeightCandidate] = Field(
        default_factory=lambda: [WeightCandidate(bits=8, group_size=-1),
                                 WeightCandidate(bits=8, group_size=-1, mse_search=True)],
        description="weight-only RTN configs to try, in order; the first within `tolerable_loss` wins")
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


def agreement(model: CanonicalTransformer, reference_out: torch.Tensor, data, encoder) -> float:
    """Share of equal labels (classifier) or mean cosine of embeddings with the float model's outputs."""
    out = predict(model, data, encoder)
    if model.classifier is not None:
        return float((out.argmax(-1) == reference_out.argmax(-1)).float().mean())
    return float(F.cosine_similarity(out, reference_out, dim=-1).mean())


class Quantize(Stage):
    name = "quantize"
    summary = "weight-only int quantization through neural-compressor autotune, refused below the floor"
    Config = QuantizeConfig

    def apply(self, model: CanonicalTransformer, ctx: Context) -> CanonicalTransformer:
        cfg: QuantizeConfig = self.config
        with _quiet():
            from neural_compressor.torch.quantization import TuningConfig, autotune
        data = ctx.validation.head(cfg.eval_examples) if cfg.eval_examples else ctx.validation
        model = model.eval()
        float_out = predict(model, data, ctx.encoder)

        def metric(m: nn.Module) -> float:  # higher is better, as autotune expects
            m.eval()
            if model.classifier is not None:
                return evaluate(m, data, ctx.encoder)["accuracy"]
            return 100.0 * agreement(m, float_out, data, ctx.encoder)

        baseline = metric(model)
        # neural-compressor's tolerance is relative to the baseline: convert the recipe's points.
        relative = cfg.tolerable_loss / max(baseline, 1e-9)
        trials: list[dict] = []
        calls = [0]

        def scored(m: nn.Module) -> float:
            calls[0] += 1
            if calls[0] == 1:  # autotune scores the float model first
                return baseline
            value = metric(m)
            trials.append({"config": cfg.candidates[len(trials)].model_dump(), "metric": round(value, 4)})
            info(f"    trial {len(trials)}: {trials[-1]['config']} -> {value:.2f}")
            return value

        info(f"    float model: {baseline:.2f} on {len(data)} validation examples; tolerable loss "
             f"{cfg.tolerable_loss} points")
        with _quiet():
            quantized = autotune(copy.deepcopy(model), TuningConfig(
                config_set=[_rtn(c) for c in cfg.candidates], tolerable_loss=relative,
                max_trials=len(cfg.candidates)), eval_fn=scored)
        ctx.notes["quantize_trials"] = trials
        within = [i for i, t in enumerate(trials) if t["metric"] >= baseline - cfg.tolerable_loss - 1e-9]
        if quantized is None or not within:
            best = max((t["metric"] for t in trials), default=float("nan"))
            raise QuantizationRefused(
                f"no quantization candidate stays within {cfg.tolerable_loss} points of the float model "
                f"({baseline:.2f}; best candidate {best:.2f}).",
                "raise `tolerable_loss`, add a gentler candidate (8 bits, group_size -1), or drop the quantize stage.")
        # autotune stops at the first candidate within tolerance, and returns that model
        chosen = cfg.candidates[within[0]]
        weights = dequantized_weights(quantized)
        if not weights:
            raise QuantizationRefused("neural-compressor quantized no Linear of the model.",
                                      "report this with the model's pocketformer.json.")
        result = copy.deepcopy(model)
        modules = dict(result.named_modules())
        with torch.no_grad():
            for name, w in weights.items():
                modules[name].weight.copy_(w.to(modules[name].weight.dtype))
        result.eval()
        agree = agreement(result, float_out, data, ctx.encoder)
        value = metric(result)
        info(f"    quantized ({chosen.bits}-bit, group {chosen.group_size}): {value:.2f} "
             f"(float {baseline:.2f}), agreement with float {agree:.4f} on {len(data)} validation examples")
        if agree < cfg.min_agreement:
            raise QuantizationRefused(
                f"the {chosen.bits}-bit model agrees with the float model on only {agree:.4f} of "
                f"{len(data)} validation examples, below the recipe's floor {cfg.min_agreement}.",
                "use 8 bits with group_size -1, lower `min_agreement` knowingly, or drop the quantize stage.")
        result.spec.quantization = {"library": f"neural-compressor {_inc_version()}", "scheme": "weight_only_rtn",
                                    "bits": chosen.bits, "group_size": chosen.group_size, "symmetric": True,
                                    "mse_search": chosen.mse_search, "linears": len(weights),
                                    "float_metric": round(baseline, 4), "quantized_metric": round(value, 4),
                                    "agreement": round(agree, 6), "validation_examples": len(data)}
        ctx.notes["quantization"] = result.spec.quantization
        return result


def _inc_version() -> str:
    from importlib.metadata import version

    return version("neural_compressor")
