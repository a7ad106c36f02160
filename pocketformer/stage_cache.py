"""Running a recipe's stages with their cache: each stage's result is stored under cache_root()/stages by a key
over its input, teacher, settings, code and library versions and the run's data (stage_key), so a re-run, or an
interrupted run started again, reuses what finished. Shared by the encoder pipeline and the language models'."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from .compress import Context, Stage, StageReport
from .models import load, save
from .models.io import file_sha256, is_canonical
from .progress import info
from .recipe import Recipe
from .store import cache_root, digest, package_versions, versions, write_json
from .train import seed_everything


def data_source(recipe: Recipe) -> str:
    """The recipe's data as any later command finds it, whatever its working directory: a file by absolute path,
    a built-in by name."""
    data = recipe.resolve_data()
    return str(Path(data).resolve()) if data.endswith((".csv", ".jsonl", ".txt")) else data


def data_key(data: str) -> str:
    """The data in a cache key: a file by its contents (an edited file must not reuse stages trained on the old
    one), a built-in by name."""
    if data.endswith((".csv", ".jsonl", ".txt")) and Path(data).is_file():
        return f"sha256:{file_sha256(Path(data))}"
    return data


def stage_key(stage: Stage, input_key: str, teacher_key: str, recipe: Recipe, data_key: str,
              extra: Optional[dict[str, Any]] = None) -> str:
    """The cache key of one stage's result: what it ran on (the input model and the teacher, by their keys), what the
    stage is (name, settings, code version, the versions of the libraries it calls), and the run's data and
    settings, and whatever else the stage says its result depends on (`extra`: Stage.key_inputs, e.g. the latency
    table it prunes by). A stage whose code changed bumps its version, so its old results are never served."""
    return digest({**({"extra": extra} if extra else {}), "input": input_key, "teacher": teacher_key,
                   "stage": stage.name, "stage_version": stage.version,
                   "config": stage.config.key_settings(), "libraries": package_versions(*stage.libraries),
                   "data": data_key, "seed": recipe.seed, "max_len": recipe.max_len, "batch_size": recipe.batch_size,
                   "versions": versions()})


def run_stages(model, stages, ctx: Context, input_key: str, recipe: Recipe, tokenizer_dir: Path,
               section: str, teacher_key: str, measures) -> tuple[Any, list[dict], str]:
    """Apply stages in order, each cached under cache_root()/stages by stage_key; `teacher_key` is the key of
    ctx.teacher (the input model's for `prepare`, the baseline's for `stages`). `measures`: (measure, score) of
    the model's kind: measure(model) -> params, macs, size_bytes, layers; score(model) -> the report's validation
    figure (StageReport's validation_accuracy or validation_perplexity)."""
    measure, score = measures
    reports = []
    key = input_key
    data = data_key(data_source(recipe))
    for i, stage in enumerate(stages):
        cfg = stage.config.model_dump()
        key = stage_key(stage, key, teacher_key, recipe, data, stage.key_inputs(model, ctx))
        cached = cache_root() / "stages" / f"{stage.name}-{key[:20]}"
        before = measure(model)
        if is_canonical(cached) and (cached / "stage.json").is_file():
            model, _ = load(cached)
            report = json.loads((cached / "stage.json").read_text())
            report["cached"] = True
            report.setdefault("size_bytes_before", before["size_bytes"])  # caches written before sizes were kept
            report.setdefault("size_bytes_after", measure(model)["size_bytes"])
            info(f"[{section} {i + 1}/{len(stages)}] {stage.name}: reused cached result ({cached})")
        else:
            info(f"[{section} {i + 1}/{len(stages)}] {stage.name}: {stage.summary}")
            seed_everything(recipe.seed)
            t0 = time.monotonic()
            result = stage.apply(model, ctx)
            model = result.model
            seconds = time.monotonic() - t0
            after = measure(model)
            report = StageReport(stage=stage.name, config=cfg, params_before=before["params"],
                                 params_after=after["params"], macs_before=before["macs"], macs_after=after["macs"],
                                 size_bytes_before=before["size_bytes"], size_bytes_after=after["size_bytes"],
                                 layers_after=after["layers"], seconds=seconds, details=result.details,
                                 **score(model)).model_dump()
            save(model, cached, {"stage": stage.name, "cache_key": key}, tokenizer_dir=tokenizer_dir)
            write_json(cached / "stage.json", report)
        acc, ppl = report.get("validation_accuracy"), report.get("validation_perplexity")
        info(f"    params {report['params_before']:,} -> {report['params_after']:,}, MACs@{recipe.max_len} "
             f"{report['macs_before'] / 1e6:.0f}M -> {report['macs_after'] / 1e6:.0f}M, weights "
             f"{report['size_bytes_before'] / 1e6:.1f} -> {report['size_bytes_after'] / 1e6:.1f} MB"
             + (f", validation accuracy {acc:.2f}%" if acc is not None else "")
             + (f", validation perplexity {ppl:.2f}" if ppl is not None else ""))
        reports.append(report)
    return model, reports, key
