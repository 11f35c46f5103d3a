"""The experiments behind docs/results.md, as library functions (``scripts/run_experiments.py`` is their command
line; ``make results`` runs it): the sets of rows (configs/experiments/*.yaml) and columns, one run = train
(unless done) and evaluate one method on one task, column and seed, in ``<bundle_root_base>/<task>/f<fraction>/
<experiment>/seed<k>``; the validation Dice read from the run's MLflow store with MLflow's client; the final
epoch evaluated from the run's configs by MONAI's ConfigParser. The tables are :mod:`bundle.experiment_tables`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time

import yaml

from bundle.tracking import sqlite_uri

logger = logging.getLogger(__name__)

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
    logger.info("$ %s", line)
    if dry_run:
        return
    os.makedirs(os.path.dirname(log), exist_ok=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    logger.info("  -> rc %d in %.0f s (log: %s)", proc.returncode, time.time() - start, log)
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
