"""The run's report: JSON for tools, Markdown for people, and a Pareto plot of accuracy against latency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .store import read_compress, read_manifest, write_json


def add_ratios(rows: list[dict[str, Any]], reference_variant: str = "baseline.fp32") -> None:
    """speedup_vs_fp32 and size_ratio_vs_fp32 against the reference row of the same target (same run)."""
    refs = {r["target"]: r for r in rows if r["variant"] == reference_variant}
    for r in rows:
        ref = refs.get(r["target"])
        r["speedup_vs_fp32"] = (ref["latency_p50_ms"] / r["latency_p50_ms"]
                                if ref and ref.get("latency_p50_ms") and r.get("latency_p50_ms") else None)
        r["size_ratio_vs_fp32"] = ref["size_mb"] / r["size_mb"] if ref else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not beaten by another on both lower latency and higher accuracy."""
    front = []
    for i, (lat, acc) in enumerate(points):
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str, latency: str = "latency_p50_ms") -> None:
    """Accuracy against latency (the `latency` field: p50, or the mean where exits make latency vary per example),
    one colour per target, each target's Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Quality is the task's: accuracy where the model predicts labels, else agreement with the uncompressed model
    # (an embedding model: mean cosine x 100).
    quality = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "agreement_with_reference"
    rows = [r for r in rows if r.get(quality) is not None and r.get(latency)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for target in sorted({r["target"] for r in rows}):
        sub = [r for r in rows if r["target"] == target]
        pts = [(r[latency], r[quality]) for r in sub]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=target, s=36)
        on_front = pareto_front(pts)
        for i, (r, (x, y)) in enumerate(zip(sub, pts)):  # many points: name only those on the front
            if len(sub) <= 12 or i in on_front:
                ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = sorted(pts[i] for i in on_front)
        ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", linewidth=0.8)
    ax.set_xlabel(f"latency {'p50' if latency == 'latency_p50_ms' else 'mean'} (ms, batch 1)")
    ax.set_ylabel("test accuracy (%)" if quality == "accuracy" else "cosine with the uncompressed model (x100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure to `path` whole (a temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _drop(r: dict[str, Any]) -> str:
    if r.get("accuracy_drop") is None:
        return "-"
    interval = r.get("accuracy_drop_interval")
    confidence = f"{r['confidence']:.0%}: " if r.get("confidence") else ""
    return f"{r['accuracy_drop']:+.2f}" + (f" ({confidence}{interval[0]:+.2f}..{interval[1]:+.2f})" if interval
                                            else "")


def _check_verdict(c: dict[str, Any]) -> str:
    """A row's or a budget check's verdict; those validated before verdicts existed hold only pass: true/false."""
    return c.get("verdict") or ("PASS" if c.get("pass") else "FAIL")


def _verdict(r: dict[str, Any]) -> str:
    """The row's verdict, and which budget decided it when it is not PASS."""
    verdict = _check_verdict(r)
    named = [k for k, c in r.get("budgets", {}).items() if _check_verdict(c) == verdict]
    return verdict if verdict == "PASS" else f"{verdict}: {', '.join(named)}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | target | runtime | threads | n | accuracy % | drop, pts (interval) | agreement % | p50 ms | "
             "p90 ms | size MB | speedup | size ratio | peak RSS MB | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['target']} | {r['runtime']} | {r['threads']} | {r.get('examples', '-')} | "
                     f"{_fmt(r.get('accuracy'))} | {_drop(r)} | "
                     f"{_fmt(r.get('agreement_with_reference'))} | {_fmt(r.get('latency_p50_ms'), '.1f')} | "
                     f"{_fmt(r.get('latency_p90_ms'), '.1f')} | {_fmt(r['size_mb'], '.1f')} | "
                     f"{_ratio(r.get('speedup_vs_fp32'))} | {_ratio(r.get('size_ratio_vs_fp32'))} | "
                     f"{_fmt(r.get('peak_rss_mb'), '.0f')} | {_verdict(r)} |")
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """The validation table a report's kind of model is read by: a language model's, or the encoders'."""
    rows = report["validation"]
    return lm_validation_table(rows) if report.get("kind") == "causal_lm" else markdown_table(rows)


def budget_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Every budget check, one bullet each, with its interval and, for INCONCLUSIVE, what would settle it."""
    from .verdict import check_line

    return [f"- {r['variant']} on {r['target']}: {check_line(name, c)}" for r in rows
            for name, c in r.get("budgets", {}).items() if "verdict" in c]


def _legacy_verdict(a: dict[str, Any]) -> str:
    legacy = a.get("legacy_runtime")
    if not legacy:
        return "-"
    if legacy.get("outputs_agree"):
        return f"runs, agrees (cos {legacy['cosine']:.4f})"
    if legacy.get("loads") and legacy.get("runs", True) and legacy.get("cosine") is not None:
        return f"**SILENTLY WRONG** (cos {legacy['cosine']:.3f})"
    return "fails: " + (legacy.get("error") or "").replace("|", "/")[:90]


def cross_format_table(artifacts: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    by_file: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r)
    lines = ["| file | format | precision | size MB | ops | parity run by | max abs diff | cosine | accuracy % (target, n) "
             "| p50 ms | tflite-runtime 2.14 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in artifacts:
        p = a["parity_vs_pytorch"]
        vals = by_file.get(a["file"], [])
        acc = "; ".join(f"{v['accuracy']:.2f} ({v['target']}, {v['examples']})" for v in vals
                        if v.get("accuracy") is not None) or "-"
        lat = "; ".join(f"{v['latency_p50_ms']:.1f}" + ("" if v.get("latency_measured_on") == "target" else " (host)")
                        for v in vals if v.get("latency_p50_ms") is not None) or "-"
        lines.append(f"| {a['file']} | {a['format']} | {a['precision']} | {a['size_bytes'] / 1e6:.1f} | "
                     f"{sum(a['ops'].values())} | {a.get('parity_execution', '-')} | "
                     f"{p['max_abs_diff']:.2e} | {p['cosine']:.6f} | {acc} | {lat} | {_legacy_verdict(a)} |")
    return "\n".join(lines)


def app_table(apps: list[dict[str, Any]]) -> str:
    """One row per app file: client, agreement with the plain artifact, accuracies, adversarial texts differing."""
    lines = ["| app file | client | vs plain file | n | label agreement % | max score diff | accuracy %, app / plain "
             "| adversarial texts with another label |", "|---|---|---|---|---|---|---|---|"]
    for e in apps:
        if "refused" in e:
            lines.append(f"| app/{e['app']}/ | {e['client']} | not built: {e['refused']} | | | | | |")
            continue
        for f in e["files"]:
            v = f["vs_plain"]
            adv = f.get("adversarial") or []
            differ = sum(1 for a in adv if a.get("same_label") is False)
            agree = (_fmt(v["label_agreement"] * 100) if "label_agreement" in v
                     else f"cosine {v['cosine']:.6f}")
            acc = (f"{v['client_accuracy']:.2f} / {v['plain_accuracy']:.2f}" if "client_accuracy" in v else "-")
            lines.append(f"| app/{e['app']}/{f['file']} | {f['client']} | {f['plain']} | {v['examples']} | {agree} | "
                         f"{_fmt(v.get('max_score_diff'), '.2e')} | {acc} | "
                         f"{f'{differ} of {len(adv)}' if adv else '-'} |")
    return "\n".join(lines)


def latency_targets(stages: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each latency-targeted stage's prediction beside what validation measured on its target: the compressed
    model's file of the table's precision against the baseline's, and whether the target was met (and by how much
    it was missed)."""
    out = []
    for s in stages:
        lt = (s.get("details") or {}).get("latency_target")
        if not lt:
            continue
        prec, target = lt["precision"], lt["target"]
        row = {"stage": s["stage"], "target": target, "precision": prec, "asked": lt["asked"],
               "budget_ms": lt["budget_ms"], "predicted_ms": lt["predicted_ms"],
               "predicted_speedup": lt["predicted_speedup"], "measured_ms": None, "measured_speedup": None,
               "met": None, "missed_by_pct": None}
        found = {r["variant"]: r for r in rows if r.get("target") == target and r.get("latency_p50_ms")}
        model, base = found.get(f"model.{prec}"), found.get(f"baseline.{prec}")
        if model is not None:
            row["measured_ms"] = model["latency_p50_ms"]
            row["prediction_error"] = lt["predicted_ms"] / model["latency_p50_ms"] - 1
            if base is not None:
                row["measured_speedup"] = base["latency_p50_ms"] / model["latency_p50_ms"]
            speedup = lt["asked"].get("speedup")
            if speedup is not None and row["measured_speedup"] is not None:
                row["met"] = row["measured_speedup"] >= speedup
                row["missed_by_pct"] = max(0.0, 100 * (1 - row["measured_speedup"] / speedup))
            elif speedup is None:
                row["met"] = row["measured_ms"] <= lt["budget_ms"]
                row["missed_by_pct"] = max(0.0, 100 * (row["measured_ms"] / lt["budget_ms"] - 1))
        out.append(row)
    return out


def latency_target_line(t: dict[str, Any]) -> str:
    """`prune aimed at 2x on host-ort (fp32): predicted 8.10 ms (2.00x), measured 8.52 ms (1.93x): MISSED by 3.5%`."""
    asked = f"{t['asked']['speedup']:g}x" if t["asked"].get("speedup") is not None else \
        f"{t['asked']['latency_ms']:g} ms"
    text = (f"{t['stage']} aimed at {asked} on {t['target']} ({t['precision']}): predicted {t['predicted_ms']:.2f} ms "
            f"({t['predicted_speedup']:.2f}x)")
    if t["measured_ms"] is None:
        return text + f"; not measured: validate on {t['target']} to measure it"
    text += f", measured {t['measured_ms']:.2f} ms"
    if t["measured_speedup"] is not None:
        text += f" ({t['measured_speedup']:.2f}x against the baseline's file)"
    return text + (": met" if t["met"] else f": MISSED by {t['missed_by_pct']:.1f}%")


def write_report(out_dir: Path) -> dict[str, Any]:


    out_dir = Path(out_dir)
    meta = read_compress(out_dir)
    rows = []
    for f in sorted((out_dir / "validation").glob("*.json")):
        rows.extend(json.loads(f.read_text())["rows"])
    artifacts = read_manifest(out_dir / "artifacts")
    if meta.get("kind") == "causal_lm":  # a language model's own figures (lm_pipeline.py)
        return write_lm_report(out_dir, meta, rows, artifacts)
    add_ratios(rows)
    app_file = out_dir / "app" / "app.json"
    apps = json.loads(app_file.read_text()) if app_file.is_file() else []
    targeted = latency_targets(meta["stages"], rows)
    report = {"recipe": meta["recipe"], "recipe_sha256": meta["recipe_sha256"], "versions": meta["versions"],
              "input": meta["input"], "stages": meta["prepare"] + meta["stages"], "baseline": meta["baseline"],
              "model": meta["model"], "artifacts": artifacts, "validation": rows, "apps": apps,
              "latency_targets": targeted}
    write_json(out_dir / "report.json", report)
    if rows:
        plot_pareto(rows, out_dir / "pareto.png", f"{meta['recipe']['name']}: accuracy vs latency")
    b, m = meta["baseline"], meta["model"]
    md = [f"# pocketformer report: {meta['recipe']['name']}", "",
          f"Input: `{meta['input']['path']}`; data: {meta['recipe']['data']}; seed {meta['recipe']['seed']}; "
          f"recipe sha256 `{meta['recipe_sha256'][:16]}`.", "",
          "## Model", "",
          "| | params | MACs (batch 1, max_len) | layers | heads | FFN widths |", "|---|---|---|---|---|---|"]
    for name, d in (("baseline", b), ("compressed", m)):
        md.append(f"| {name} | {d['params']:,} | {d['macs'] / 1e6:,.0f}M | {len(d['layers'])} | "
                  f"{sum(l['heads'] for l in d['layers'])} | {', '.join(str(l['ffn']) for l in d['layers'])} |")
    md += ["", "## Stages", "", "| stage | params after | MACs after | validation accuracy % | seconds | cached |",
           "|---|---|---|---|---|---|"]
    for s in report["stages"]:
        md.append(f"| {s['stage']} | {s['params_after']:,} | {s['macs_after'] / 1e6:,.0f}M | "
                  f"{_fmt(s.get('validation_accuracy'))} | {s['seconds']:.0f} | {s.get('cached', False)} |")
    if targeted:
        md += ["", "## Latency targets: predicted by the table, measured on the target", "",
               *[f"- {latency_target_line(t)}" for t in targeted], "",
               "Predicted: the target's latency table (`pocketformer profile`), calibrated on whole models; measured: "
               "validation's p50 of the compressed model's file of that precision on the target's runtime."]
    md += ["", "## Artifacts: one checkpoint, every format", "", cross_format_table(artifacts, rows), "",
           "Parity: each file run on real test inputs by the named execution and compared with PyTorch. Accuracy "
           "and latency: from validation on the target named (n = test examples); latency only where the "
           "runtime exists here, and for non-host targets it is this host running the target's runtime and "
           "threads, not the device. CoreML on Linux: MIL reference execution, not Apple runtime; no latency.", ""]
    md += ["", "## Validation on targets (test split, target runtime)", "", markdown_table(rows), "",
           "Latency: median (p50) and p90 of repeated batch-1 runs after warm-up, in a fresh process at the "
           "target's thread count; speedup and size ratio against `baseline.fp32` on the same target.", "",
           "Verdicts: PASS when the whole interval of the measured value is within the budget (the accuracy drop: "
           "paired with the uncompressed model on the same n test examples; latency: the p50's interval over the "
           "repeated runs), FAIL when the whole interval is over it, INCONCLUSIVE when it straddles the budget.", "",
           *budget_lines(rows), ""]
    if rows:
        md += ["![accuracy vs latency](pareto.png)", ""]
    if apps:
        md += ["## App folders: the files apps load, run in their clients", "", app_table(apps), "",
               "Each app file ran in the named client on the test split and was compared with the plain artifact of "
               "the same precision in its own runtime (fed by pocketformer's tokenizer); any label disagreement "
               "fails the export. Adversarial texts (accents, truncation, empty input) are reported, not judged: "
               "see app/app.json.", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return report


# -- a language model's report (lm_pipeline.py's runs) ------------------------------------------------------------

def lm_validation_table(rows: list[dict[str, Any]]) -> str:
    """Per file and target: perplexity and its change, token match, prefill and decode speed, size, memory."""
    lines = ["| file | target | runtime | threads | perplexity | change % (interval) | token match % | first divergence "
             "| prefill tok/s | TTFT ms | decode tok/s | size MB | peak RSS MB | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("budgets", {}).get("perplexity_increase_pct", {})
        interval = f" ({check['low']:+.1f}..{check['high']:+.1f})" if check.get("low") is not None else ""
        lines.append(f"| {r['file']} | {r['target']} | {r['runtime']} | {r['threads']} | {r['perplexity']:.2f} | "
                     f"{r['perplexity_increase_pct']:+.2f}{interval} | {r['token_match'] * 100:.1f} | "
                     f"{r['first_divergence']} | {_fmt(r.get('prefill_tokens_per_s'), '.0f')} | "
                     f"{_fmt(r.get('ttft_ms'), '.0f')} | {_fmt(r.get('decode_tokens_per_s'), '.1f')} | "
                     f"{r['size_mb']:.1f} | {_fmt(r.get('peak_rss_mb'), '.0f')} | {_verdict(r)} |")
    return "\n".join(lines)


def plot_lm(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity against decode time per token, one colour per target, each target's Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("decode_ms_p50")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for target in sorted({r["target"] for r in rows}):
        sub = [r for r in rows if r["target"] == target]
        pts = [(r["decode_ms_p50"], r["perplexity"]) for r in sub]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=target, s=36)
        for r, (x, y) in zip(sub, pts):
            ax.annotate(f"{r['format']} {r['precision']}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        front = sorted(pts[i] for i in pareto_front([(x, -y) for x, y in pts]))
        ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--", linewidth=0.8)
    ax.set_xlabel("decode time per token, p50 (ms, batch 1)")
    ax.set_ylabel("perplexity on the test text (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def write_lm_report(out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]],
                    artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    report = {"recipe": meta["recipe"], "recipe_sha256": meta["recipe_sha256"], "versions": meta["versions"],
              "input": meta["input"], "kind": meta["kind"], "stages": meta.get("stages", []),
              "baseline": meta["baseline"],
              "model": meta["model"], "artifacts": artifacts, "validation": rows, "latency_targets": []}
    write_json(out_dir / "report.json", report)
    if any(r.get("decode_ms_p50") for r in rows):
        plot_lm(rows, out_dir / "pareto.png", f"{meta['recipe']['name']}: perplexity vs decode time")
    b, m, stages = meta["baseline"], meta["model"], meta.get("stages", [])

    def shape(d: dict[str, Any]) -> str:
        return (f"{d['params']:,} parameters, {len(d['layers'])} layers ({sum(la['kv_heads'] for la in d['layers'])}"
                f" key-value heads, {sum(la['heads'] for la in d['layers'])} query heads, FFN "
                f"{sum(la['ffn'] for la in d['layers']):,} neurons), validation perplexity "
                f"{_fmt(d['validation_perplexity'])} (PyTorch)")
    md = [f"# pocketformer report: {meta['recipe']['name']}", "",
          f"Input: `{meta['input']['path']}`; text: {meta['data']}; seed {meta['recipe']['seed']}; recipe sha256 "
          f"`{meta['recipe_sha256'][:16]}`.", "", "## Model", "",
          f"{m['family']} causal LM, vocabulary {m['vocab_size']:,}, context {m['context']:,}.", "",
          f"- baseline (imported): {shape(b)}"]
    if stages:
        md += [f"- compressed: {shape(m)}", "", "| stage | params | prefill MACs | weights MB | validation "
               "perplexity | seconds |", "|---|---|---|---|---|---|"]
        for st in stages:
            md.append(f"| {st['stage']}{' (cached)' if st.get('cached') else ''} | {st['params_before']:,} -> "
                      f"{st['params_after']:,} | {st['macs_before'] / 1e6:.0f}M -> {st['macs_after'] / 1e6:.0f}M | "
                      f"{st['size_bytes_before'] / 1e6:.1f} -> {st['size_bytes_after'] / 1e6:.1f} | "
                      f"{_fmt(st.get('validation_perplexity'))} | {st['seconds']:.0f} |")
    else:
        md.append("- no compression stages ran: this run imports, exports and validates")
    md += ["", "## Artifacts: one checkpoint, every format", "",
          "| file | format | precision | size MB | KV cache | parity run by | max abs diff | cosine |",
          "|---|---|---|---|---|---|---|---|"]
    for a in artifacts:
        p = a["parity_vs_pytorch"]
        cache = (f"{a['kv_cache']['context']} slots, prefill {a['kv_cache']['prefill_tokens']}" if "kv_cache" in a
                 else "grows (past/present)")
        md.append(f"| {a['file']} | {a['format']} | {a['precision']} | {a['size_bytes'] / 1e6:.1f} | {cache} | "
                  f"{p.get('execution', '-')} | {p['max_abs_diff']:.2e} | {p['cosine']:.6f} |")
    md += ["", "## Validation on targets (test text, target runtime)", "", lm_validation_table(rows), "",
           "Perplexity: next-token perplexity on the test windows, its change paired window by window with the "
           "uncompressed model in PyTorch. Token match: greedy continuations compared with PyTorch's, token by "
           "token. Prefill: the prompt's tokens/s and time to first token; decode: the median time per generated "
           "token at batch 1; both in a fresh process at the target's threads after warm-up. CoreML off macOS runs "
           "in the MIL reference execution: no speed is measured.", "", *budget_lines(rows), ""]
    if any(r.get("decode_ms_p50") for r in rows):
        md += ["![perplexity vs decode time](pareto.png)", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return report


# -- a search's report (search.py writes search.json; this draws and tabulates it) ---------------------------------

def _trial_latency(t: dict[str, Any]):
    """(ms, how): measured on the target where it was, else the table's prediction."""
    if t.get("measured_ms") is not None:
        return t["measured_ms"], "measured"
    if t.get("predicted_ms") is not None:
        return t["predicted_ms"], "predicted"
    return None, "-"


def plot_search(summary: dict[str, Any], path: Path) -> None:
    """Validation accuracy drop against latency for every file of every complete trial (filled: measured on the
    target; hollow: predicted by the table; a marker per precision), marker area by file size, the Pareto front
    joined, the chosen model starred, the budget drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in summary["points"] if _trial_latency(p)[0] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = [p["size_mb"] for p in points] or [1.0]
    scale = 300.0 / max(sizes)
    markers = dict(zip(summary["precisions"], "osv^Dp"))
    for precision, marker in markers.items():
        for how, filled in (("measured", True), ("predicted", False)):
            sub = [p for p in points if p["precision"] == precision and _trial_latency(p)[1] == how]
            if sub:
                ax.scatter([_trial_latency(p)[0] for p in sub], [p["accuracy_drop"] for p in sub], marker=marker,
                           s=[max(12.0, p["size_mb"] * scale) for p in sub], alpha=0.6,
                           label=f"{precision}, latency {how}", facecolors="C0" if filled else "none",
                           edgecolors="C0")
    on_front = [p for p in points if p["id"] in summary["pareto"]]
    front = sorted((_trial_latency(p)[0], p["accuracy_drop"]) for p in on_front)
    if front:
        ax.plot([f[0] for f in front], [f[1] for f in front], "--", color="C1", linewidth=1, label="Pareto front")
    for p in on_front:
        ax.annotate(p["id"], (_trial_latency(p)[0], p["accuracy_drop"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    chosen = next((p for p in points if p["id"] == summary.get("chosen_id")), None)
    if chosen is not None:
        ax.scatter([_trial_latency(chosen)[0]], [chosen["accuracy_drop"]], marker="*", s=220, color="C3",
                   label=f"chosen ({chosen['id']})", zorder=5)
    ref = summary["reference"]
    if ref.get("measured_ms"):
        ax.scatter([ref["measured_ms"]], [0.0], marker="D", color="k", s=30, label="reference (fp32)")
    ax.axhline(summary["search"]["max_drop"], color="C2", linewidth=0.8, label="accuracy budget")
    if summary["search"].get("max_latency_ms"):
        ax.axvline(summary["search"]["max_latency_ms"], color="C2", linewidth=0.8, linestyle=":")
    target = summary["target"]
    ax.set_xlabel(f"latency on {target['name']} (ms, p50, batch {target['batch']}, {target['threads']} threads)")
    ax.set_ylabel("accuracy drop, validation split (pts)")
    ax.set_title(f"search on {target['name']}: {len(summary['trials'])} trials, {len(points)} files "
                 "(marker area: file size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def search_markdown(summary: dict[str, Any]) -> str:
    spec, target, ref = summary["search"], summary["target"], summary["reference"]
    lines = [f"# Search on {target['name']}", "",
             f"Budget: accuracy drop at most {spec['max_drop']:g} pts (validation split, confirmed on the test split)"
             + (f", latency at most {spec['max_latency_ms']:g} ms" if spec.get("max_latency_ms") else "")
             + (f", size at most {spec['max_size_mb']:g} MB" if spec.get("max_size_mb") else "") + ".",
             f"Trials: {len(summary['trials'])} ({summary['parallel']} at a time, {summary['where']}, "
             f"{summary['threads_per_trial']} PyTorch threads each), each scored at "
             f"{', '.join(summary['precisions'])}: {len(summary['points'])} files; this run "
             f"{summary['seconds_this_run']:.0f} s for {summary['trials_this_run']} trials; CPU {summary['cpu']}.",
             f"Reference (the recipe's model after `prepare`): validation {ref['validation_accuracy']:.2f}%, test "
             f"{ref['test_accuracy']:.2f}%, {_fmt(ref.get('measured_ms'))} ms measured, {ref['size_mb']:.1f} MB.",
             "Latency: measured on the target (lowest p50 of fresh-process runs, files in turn) for the Pareto front "
             "and the fastest files within budget; the others show the latency table's prediction.", ""]
    chosen = summary.get("chosen_id")
    if chosen is not None:
        p = next(p for p in summary["points"] if p["id"] == chosen)
        ms, how = _trial_latency(p)
        c = summary["confirmation"]
        speed = f" ({ref['measured_ms'] / ms:.2f}x the reference)" if ref.get("measured_ms") and how == "measured" \
            else ""
        lines += ["## Chosen", "", f"Trial {p['number']}: {p.get('composition', '')} @ {p['precision']}: "
                  f"{ms:.2f} ms {how}{speed}, {p['size_mb']:.1f} MB, validation drop {p['accuracy_drop']:+.2f} pts.",
                  "", f"Confirmed on the test split: {c['statement']}.", "",
                  f"Recipe: `{summary['chosen_recipe']}` (`pocketformer run` makes it again).", ""]
    else:
        lines += ["## No model within budget", "", "Nearest misses:", ""]
        for p in summary.get("nearest_misses", []):
            ms, how = _trial_latency(p)
            lines.append(f"- trial {p['number']}: {p.get('composition', '')} @ {p['precision']}: drop "
                         f"{p['accuracy_drop']:+.2f} pts, {_fmt(ms)} ms {how}, {p['size_mb']:.1f} MB")
        lines.append("")
    lines += ["## Trials", "", "Each trial's files, one row each; the study learned from its best one (told).", "",
              "| trial | composition | precision | status | validation drop (pts) | latency ms | latency | size MB | "
              "Pareto | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in summary["trials"]:
        files = [p for p in summary["points"] if p["number"] == t["number"]]
        rows = [(p["precision"], "complete" + (" (told)" if p["precision"] == t.get("told") else ""), p)
                for p in files]
        rows += [(precision, f"refused: {why}", {}) for precision, why in t.get("refused", {}).items()]
        if not files:
            rows.insert(0, ("", t["status"] + (f": {t['reason']}" if t.get("reason") else ""), {}))
        for i, (precision, status, p) in enumerate(rows):
            ms, how = _trial_latency(p) if p else (None, "")
            mark = "yes" if p and p["id"] in summary["pareto"] else ""
            number = str(t["number"]) if i == 0 else ""
            if p and p["id"] == chosen:
                number, precision = f"**{t['number']} (chosen)**", f"**{precision}**"
            lines.append(f"| {number} | {t.get('composition', '') if i == 0 else ''} | {precision} | "
                         f"{status.replace('|', '/')} | {_fmt(p.get('accuracy_drop'), '+.2f')} | {_fmt(ms)} | {how} | "
                         f"{_fmt(p.get('size_mb'), '.1f')} | {mark} | "
                         f"{_fmt(t.get('seconds'), '.0f') if i == 0 else ''} |")
    lines += ["", f"Plot: `pareto-{target['name']}.png`.", ""]
    return "\n".join(lines)


def write_search_report(out_dir: Path, summary: dict[str, Any]) -> None:
    from .store import atomic_write_bytes

    plot_search(summary, Path(out_dir) / f"pareto-{summary['target']['name']}.png")
    atomic_write_bytes(Path(out_dir) / "report.md", search_markdown(summary).encode())
