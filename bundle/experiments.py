"""The experiments behind docs/results.md, as library functions (``scripts/run_experiments.py`` is their command
line; ``make results`` runs it): the sets of rows (configs/experiments/*.yaml) and columns, one run = train
(unless done) and evaluate one method on one task, column and seed, in ``<bundle_root_base>/<task>/f<fraction>/
<experiment>/seed<k>``; the validation Dice read from the run's MLflow store with MLflow's client; the final
epoch evaluated from the run's configs by MONAI's ConfigParser; and the tables: per row and column the mean +-
sample sd over seeds, Dice minus the ``supervised`` row's of the same seed (mean, sd, seeds higher / paired),
and the prompt-sensitivity heatmaps side by side.

    mean +- sd = mean_k d_k, sqrt(sum_k (d_k - mean)^2 / (n - 1)),  d_k = Dice(row, seed k) - Dice(supervised, seed k)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import yaml

from bundle.io import save_png
from bundle.sensitivity import read_grid_csv, render_heatmap
from bundle.tracking import sqlite_uri

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "configs", "experiments")

# set name -> (method configs = table rows, column configs or None). Columns default to one per task.
SETS = {
    "main": (["zero_shot", "supervised", "sampo"], None),
    "testbed": (["zero_shot", "supervised", "sampo"], ["fraction_10", "fraction_100"]),
    "ablation_terms": (["supervised", "po1_sup", "po2_sup", "po1_po2", "sampo"], None),
    "prompt_sets": (["supervised", "sampo", "supervised_n8", "sampo_n8"], None),
    "lambda_dw": (["lambda_dw_0.1", "lambda_dw_0.5", "lambda_dw_1", "lambda_dw_2"], None),
    "lora_rank": (["lora_rank_4", "lora_rank_8", "lora_rank_32", "lora_rank_64"], None),
    "beta": (["beta_0.01", "beta_0.1", "beta_1", "beta_10", "beta_100"], None),
    # where the reward is computed (bundle/dpo.py): the papers' image mean against the disagreement region
    "reward_region": (["supervised", "sampo", "sampo_disagreement", "sampo_disagreement_d2"], None),
    # issue 20's comparison: both supervised anchors (BCE on the mined masks; paper 003's focal + Dice) against
    # SAMPO with each reward region, the same steps, prompts and seeds per row
    "comparison": (["supervised", "va_supervised_10", "sampo", "sampo_disagreement"], None),
    # the three-term ablations with the chosen region (train.yaml's default since issue 20)
    "ablation_terms_disagreement": (["supervised", "po1_sup_disagreement", "po2_sup_disagreement",
                                     "po1_po2_disagreement", "sampo_disagreement"], None),
    # paper 003's virtual annotator with the chosen region beside its supervised start
    "va_disagreement": (["va_supervised_10", "va_aligned_10_disagreement", "sampo_disagreement"], None),
    # issue 20 section 3: the loss on G's grid against the decoder's (loss_size)
    "loss_grid": (["sampo_disagreement", "sampo_disagreement_grid"], None),
    "beta_disagreement": (["sampo_disagreement_beta_0.03", "sampo_disagreement", "sampo_disagreement_beta_0.3",
                           "sampo_disagreement_beta_1"], None),
    "fractions": (["zero_shot", "supervised", "sampo"], ["fraction_10", "fraction_20", "fraction_30", "fraction_100"]),
    # paper 003 (docs/virtual_annotator.md): the va_* rows fix their own labelled fraction; run with
    # --train_fraction 10 so that the SAMPO row is the 10 % run of the main table (shared, not trained twice)
    "va": (["va_supervised_10", "va_aligned_10", "sampo", "va_supervised_100"], None),
    "va_raters": (["va_supervised_10", "va_best_10", "va_rating_10", "va_aligned_10"], None),
}
# sweep set -> (the key it varies, whether that key acts on the preference terms only): rows that leave the key to
# train.yaml are labelled with train.yaml's value
SWEPT = {"beta": ("beta", True), "beta_disagreement": ("beta", True), "lambda_dw": ("lambda_dw", True), "prompt_sets": ("n_prompt_sets", False)}


def experiment_meta(name: str) -> dict:
    path = os.path.join(EXPERIMENTS, f"{name}.yaml")
    if not os.path.isfile(path):
        raise SystemExit(f"no experiment config {path}")
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    meta = cfg.get("experiment", {})
    overlays = [os.path.join(REPO, "configs", f"{o}.yaml") for o in meta.get("overlays", [])]
    for o in overlays:  # e.g. semi_supervised: between the task config and the experiment's own keys
        if not os.path.isfile(o):
            raise SystemExit(f"{path}: overlay {o} not found")
    return {"name": name, "path": path, "label": meta.get("label", name), "train": meta.get("train", True), "cfg": cfg,
            "overlays": overlays}


def label_swept_key(methods: list[dict], set_name: str, defaults: dict) -> None:
    """In a sweep set (``SWEPT``), append train.yaml's value of the swept key to the label of each row whose config
    leaves it to train.yaml; not to rows without a preference term when the key acts on those terms only."""
    if set_name not in SWEPT:
        return
    key, preference_only = SWEPT[set_name]
    for m in methods:
        preference = m["cfg"].get("use_po1", True) or m["cfg"].get("use_po2", True)
        if key not in m["cfg"] and (preference or not preference_only):
            m["label"] += f" ({key}={defaults.get(key)}, train.yaml)"


def overlay_paths(names: list[str] | None) -> list[str]:
    """``--overlay`` names (configs/experiments/NAME.yaml, e.g. paper) or paths -> config files, checked."""
    paths = []
    for name in names or []:
        path = name if name.endswith((".yaml", ".yml", ".json")) else os.path.join(EXPERIMENTS, f"{name}.yaml")
        if not os.path.isfile(path):
            raise SystemExit(f"--overlay {name}: no config {path}")
        paths.append(os.path.abspath(path))
    return paths


def final_epoch(args, method: dict) -> int:
    """The epoch of a run's final training state: max_epochs, plus the alignment epochs of a two-stage run
    (configs/semi_supervised.yaml's ``stage2_epochs``, evaluated by MONAI's ConfigParser from the run's own config
    files and overrides: an integer or an expression such as ``$2 * @max_epochs``)."""
    epochs = max_epochs_of(args)
    if not method.get("overlays"):
        return epochs
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(REPO, "configs", "train.yaml"), *method["overlays"], *overlay_paths(args.overlay),
                        method["path"]])
    parser["max_epochs"] = epochs
    for item in args.override or []:
        key, _, value = item.partition("=")
        if key == "stage2_epochs":
            parser[key] = yaml.safe_load(value)
    try:
        return epochs + int(parser.get_parsed_content("stage2_epochs"))
    except Exception as e:
        raise SystemExit(f"{method['name']}: stage2_epochs {parser['stage2_epochs']!r} does not evaluate to an integer "
                         f"({type(e).__name__}: {e}): pass --override stage2_epochs=N") from None


def task_configs(task: str) -> tuple[list[str], list[str], str]:
    """Config files, extra overrides and a column title for ``--task`` (a configs/tasks/ name, or t1/t2/organ)."""
    path = os.path.join(REPO, "configs", "tasks", f"{task}.yaml")
    if os.path.isfile(path):
        name = task.replace("_", "-").upper().replace("CONSEP", "CoNSeP").replace("PANNUKE", "PanNuke")
        return [path], [], name
    if task in ("t1", "t2", "organ"):
        return [], ["--task", task], f"synthetic-{task.upper()}"
    raise SystemExit(f"--task {task}: neither configs/tasks/{task}.yaml nor one of t1, t2, organ")


def _config_arg(files: list[str]) -> str:
    return "[" + ",".join(repr(f) for f in files) + "]"


def _overrides(args) -> list[str]:
    out = []
    for key in ("datalist", "model_size", "max_epochs", "image_size", "learning_rate", "batch_size", "val_interval"):
        value = getattr(args, key)
        if value is not None:
            out += [f"--{key}", str(value)]
    for item in args.override or []:
        key, _, value = item.partition("=")
        out += [f"--{key}", value]
    return out


def run(cmd: list[str], log: str, env: dict, dry_run: bool) -> None:
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {line}", flush=True)
    if dry_run:
        return
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"  -> rc {proc.returncode} in {time.time() - start:.0f} s (log: {log})", flush=True)
    if proc.returncode != 0:
        with open(log, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"command failed (rc {proc.returncode}): {line}\n{tail}")


def max_epochs_of(args) -> int:
    """--max_epochs, else that of the last --overlay setting it (paper: 10), else train.yaml's."""
    if args.max_epochs is not None:
        return args.max_epochs
    epochs = None
    for path in [os.path.join(REPO, "configs", "train.yaml"), *overlay_paths(args.overlay)]:
        with open(path, encoding="utf-8") as f:
            epochs = (yaml.safe_load(f) or {}).get("max_epochs", epochs)
    return int(epochs)


def validation_dice(root: str) -> float | None:
    """The ``val_mean_dice`` of the last validated epoch the run logged to its MLflow store (``<root>/eval/mlflow.db``,
    read with MLflow's client), or None."""
    db = os.path.join(root, "eval", "mlflow.db")
    if not os.path.isfile(db):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sqlite_uri(db))
    history = [m for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
               for m in client.get_metric_history(r.info.run_id, "val_mean_dice")]
    return float(max(history, key=lambda m: (m.step, m.timestamp)).value) if history else None


def one(args, task: str, method: dict, column: dict | None, seed: int, env: dict) -> dict:
    """Train (unless zero-shot or already done) and evaluate one method on one task / column / seed; return the
    evaluation summary (plus ``bundle_root``, ``seed`` and ``val_dice``)."""
    files, task_over, _ = task_configs(task)
    base = [os.path.join(REPO, "configs", "train.yaml"), *files, *method.get("overlays", []), *overlay_paths(args.overlay)]
    exp_files = [method["path"]] + ([column["path"]] if column else [])
    fraction = (column or method)["cfg"].get("train_fraction", args.train_fraction)
    root = os.path.join(args.bundle_root_base, task, f"f{fraction}", method["name"], f"seed{seed}")
    common = [*task_over, *_overrides(args), "--train_fraction", str(fraction), "--seed", str(seed)]
    mono = [sys.executable, "-m", "monai.bundle", "run"]
    final = os.path.join(root, "models", f"checkpoint_epoch={final_epoch(args, method)}.pt")
    if method["train"] and args.reevaluate and not args.dry_run and not os.path.isfile(final):
        raise FileNotFoundError(f"{final}: --reevaluate evaluates finished runs only; train it first (drop "
                                "--reevaluate)")
    if method["train"] and not args.reevaluate and (args.force or not os.path.isfile(final)):
        run([*mono, "training", "--config_file", _config_arg(base + exp_files), "--bundle_root", root, *common],
            os.path.join(root, "train.log"), env, args.dry_run)
    summary_path = os.path.join(root, "eval", "evaluation", "summary.json")
    if args.force or args.reevaluate or not os.path.isfile(summary_path):
        ev = []  # zero-shot: the experiment config's eval_checkpoint '' (the initial network)
        if method["train"]:
            ckpt = final if args.checkpoint == "final" else os.path.join(root, "models", "best_model.pt")
            ev += ["--eval_checkpoint", ckpt]
        if args.eval_max_images is not None:
            ev += ["--eval_max_images", str(args.eval_max_images)]
        if args.sensitivity_max_images is not None:
            ev += ["--sensitivity_max_images", str(args.sensitivity_max_images)]
        if args.no_sensitivity:
            ev += ["--sensitivity", "False"]
        cfgs = base + [os.path.join(REPO, "configs", "evaluate.yaml")] + exp_files  # experiment keys win
        run([*mono, "evaluating", "--config_file", _config_arg(cfgs), "--bundle_root", root, *common, *ev],
            os.path.join(root, "evaluate.log"), env, args.dry_run)
    if args.dry_run:
        return {}
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    summary["bundle_root"], summary["seed"] = root, seed
    summary["val_dice"] = validation_dice(root) if method["train"] else None
    return summary


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
            groups = sorted({g for m in rows for s in results.get((m["name"], c), []) for g in (s.get(section) or {})})
            if not groups:
                continue
            lines += ["", f"Dice per {what}, {c}:", "", "| Method | " + " | ".join(groups) + " |",
                      "|---" * (1 + len(groups)) + "|"]
            for m in rows:
                runs = results.get((m["name"], c), [])
                lines.append(f"| {m['label']} | " + " | ".join(_stat([_get(s, section, g, "dice") for s in runs])
                                                            for g in groups) + " |")
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
            groups = sorted({g for m in rows for s in results.get((m["name"], c), [])
                             for g, v in (s.get(section) or {}).items() if "pq" in v})
            if not groups:
                continue
            out += ["", f"PQ per {what}, {c}:", "", "| Method | " + " | ".join(groups) + " |",
                    "|---" * (1 + len(groups)) + "|"]
            for m in rows:
                runs = results.get((m["name"], c), [])
                out.append(f"| {m['label']} | " + " | ".join(_stat([_get(s, section, g, "pq") for s in runs])
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
