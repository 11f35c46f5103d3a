"""The tables of the experiments (:mod:`bundle.experiments` runs them): per row (method) and column (task or
training fraction) the mean +- sample sd over seeds of Dice / IoU / the oracle slot / validation Dice, per class and
per density stratum, the nuclei metrics (PQ, DQ, SQ, AJI, F1, pooled F1, count error; PQ per class and stratum),
Dice minus the ``supervised`` row's of the same seed (mean, sd, seeds higher / paired), and the prompt-sensitivity
heatmaps side by side.

    mean +- sd = mean_k d_k, sqrt(sum_k (d_k - mean)^2 / (n - 1)),  d_k = Dice(row, seed k) - Dice(supervised, seed k)
"""

from __future__ import annotations

import os

import numpy as np

from bundle.io import save_png
from bundle.sensitivity import read_grid_csv, render_heatmap


def _stat(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _get(summary: dict, *keys):
    for k in keys:
        summary = summary.get(k) if isinstance(summary, dict) else None
    return summary


def table(rows: list[dict], columns: list[str], results: dict, title: str, notes: list[str]) -> str:
    """Markdown: one row per method, Dice / IoU (mean ± sd over seeds) per column, the oracle slot's Dice, the final
    validation Dice, then per-class (T2) and per-density-stratum (T1) Dice where the evaluation has them."""
    head = "| Method | " + " | ".join(f"{c} Dice | {c} IoU | {c} oracle Dice | {c} val Dice" for c in columns) + " |"
    lines = [f"### {title}", "", head, "|---" * (1 + 4 * len(columns)) + "|"]
    for method in rows:
        cells = []
        for c in columns:
            runs = results.get((method["name"], c), [])
            cells += [_stat([_get(s, "overall", "dice") for s in runs]), _stat([_get(s, "overall", "iou") for s in runs]),
                      _stat([_get(s, "overall", "oracle_dice") for s in runs]), _stat([s.get("val_dice") for s in runs])]
        n = max((len(results.get((method["name"], c), [])) for c in columns), default=0)
        lines.append(f"| {method['label']} (n={n}) | " + " | ".join(cells) + " |")
    cells = []
    for c in columns:  # the trivial reference: the whole image predicted as target
        ref = next((s["all_foreground"] for (m, cc), runs in results.items() if cc == c for s in runs
                    if s.get("all_foreground")), None)
        cells += ([f"{ref['dice']:.3f}", f"{ref['iou']:.3f}"] if ref else ["-", "-"]) + ["", ""]
    lines.append("| *(reference) whole image predicted as target* | " + " | ".join(cells) + " |")
    for section, what in (("per_class", "class (T2: mean over (image, class) items)"), ("per_stratum", "density stratum")):
        for c in columns:
            lines += group_table(rows, results, c, section, "dice", f"Dice per {what}, {c}:")
    lines += nuclei_table(rows, columns, results)
    return "\n".join(lines + paired_differences(rows, columns, results) + [""] + notes) + "\n"


NUCLEI_COLUMNS = (("PQ", "pq"), ("DQ", "dq"), ("SQ", "sq"), ("AJI", "aji"), ("F1", "f1"),
                  ("count rel. error", "count_rel_error"))


def nuclei_table(rows: list[dict], columns: list[str], results: dict) -> list[str]:
    """Markdown lines of the nuclei metrics (bundle.evaluation, mean over items, then mean ± sd over seeds): per
    column PQ, DQ, SQ, AJI, detection F1 at IoU 0.5, the pooled F1 and the relative count error; then PQ per class
    and per density stratum. No lines when no evaluation has them (the organ task, or summaries written before)."""
    out = []
    for c in columns:
        if not any(_get(s, "overall", "pq") is not None for m in rows for s in results.get((m["name"], c), [])):
            continue
        out += ["", f"Nuclei, {c} (per item, then mean over items; F1 pooled: the test split's TP / FP / FN summed):",
                "", "| Method | " + " | ".join(h for h, _ in NUCLEI_COLUMNS) + " | F1 pooled |",
                "|---" * (2 + len(NUCLEI_COLUMNS)) + "|"]
        for m in rows:
            runs = results.get((m["name"], c), [])
            cells = [_stat([_get(s, "overall", k) for s in runs]) for _, k in NUCLEI_COLUMNS]
            cells.append(_stat([_get(s, "overall", "nuclei_pooled", "f1") for s in runs]))
            out.append(f"| {m['label']} | " + " | ".join(cells) + " |")
        for section, what in (("per_class", "class"), ("per_stratum", "density stratum")):
            out += group_table(rows, results, c, section, "pq", f"PQ per {what}, {c}:")
    return out


def group_table(rows: list[dict], results: dict, column: str, section: str, metric: str, title: str) -> list[str]:
    """Markdown lines: ``metric`` (mean ± sd over seeds) of each row in every group of ``section`` (``per_class``,
    ``per_stratum``) that has it in ``column``; no lines when no group does."""
    groups = sorted({g for m in rows for s in results.get((m["name"], column), [])
                     for g, v in (s.get(section) or {}).items() if metric in v})
    if not groups:
        return []
    out = ["", title, "", "| Method | " + " | ".join(groups) + " |", "|---" * (1 + len(groups)) + "|"]
    for m in rows:
        runs = results.get((m["name"], column), [])
        out.append(f"| {m['label']} | " + " | ".join(_stat([_get(s, section, g, metric) for s in runs])
                                                  for g in groups) + " |")
    return out


def paired_differences(rows: list[dict], columns: list[str], results: dict, reference: str = "supervised") -> list[str]:
    """Markdown lines: each trained row's test Dice minus the ``reference`` row's of the same seed (same
    initialisation, data order and prompts), mean ± sd over the seeds both have, and on how many seeds the row is
    higher. Seed-to-seed spread is shared by both rows, so this says whether a small gap is consistent. No lines
    without the reference row, or with fewer than two paired seeds anywhere."""
    if reference not in {m["name"] for m in rows}:
        return []
    ref = {c: {s["seed"]: _get(s, "overall", "dice") for s in results.get((reference, c), [])} for c in columns}
    out = []
    for m in rows:
        if m["name"] == reference:
            continue
        cells = []
        for c in columns:
            diffs = [_get(s, "overall", "dice") - ref[c][s["seed"]] for s in results.get((m["name"], c), [])
                     if ref[c].get(s["seed"]) is not None]
            cells.append(f"{_stat(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)})" if len(diffs) > 1 else "-")
        if any(cell != "-" for cell in cells):
            out.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    if not out:
        return []
    label = next(m["label"] for m in rows if m["name"] == reference)
    return ["", f"Dice minus {label} of the same seed (mean ± sd over paired seeds; seeds where higher / paired):", "",
            "| Method | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|", *out]


def heatmaps(rows: list[dict], results: dict, column: str, path: str) -> str | None:
    """The prompt-sensitivity heatmaps of the methods side by side, as one PNG: each method's grid is the mean of its
    runs' grids (every seed that has one), titled with the method's label, the items and the seeds it averages."""
    tiles = []
    for m in rows:
        runs = [(s, os.path.join(s["bundle_root"], "eval", "evaluation", "prompt_sensitivity.csv"))
                for s in results.get((m["name"], column), [])]
        runs = [(s, csv) for s, csv in runs if os.path.isfile(csv)]
        if not runs:
            continue
        grid = np.mean([read_grid_csv(csv) for _, csv in runs], axis=0)
        items = _get(runs[0][0], "sensitivity", "n_images")
        title = f"{m['label']}: Dice, mean over {items} items x {len(runs)} run{'s' if len(runs) > 1 else ''}"
        tiles.append(np.asarray(render_heatmap(grid, title).convert("RGB")))
    if not tiles:
        return None
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 8), (0, 0)), constant_values=255) for t in tiles]
    return save_png(np.concatenate(tiles, axis=1), path)
