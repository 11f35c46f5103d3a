"""Run a set of baseline / ablation experiments (configs/experiments/*.yaml) over seeds: train each, evaluate it on
the test split with configs/evaluate.yaml, and write markdown tables in the papers' layout (rows = methods, columns
= Dice / IoU per task or per training fraction), as mean +- standard deviation over the seeds.

    python scripts/run_experiments.py --set main --task consep_t1 consep_t2 --seeds 0 1 2 \
        --datalist /tmp/consep_prepared/datalist.json --bundle_root_base /tmp/sampo_runs \
        --model_size tiny --max_epochs 4 --output /tmp/sampo_runs/main.md

Each run lives in ``<bundle_root_base>/<task>/f<fraction>/<experiment>/seed<k>`` (its models/, eval/mlflow.db and
eval/evaluation/). A run whose final training state ``models/checkpoint_epoch=<max_epochs>.pt`` exists is not
trained again, and its evaluation is reused when ``eval/evaluation/summary.json`` exists (``--force`` redoes both;
``--reevaluate`` redoes the evaluation only, e.g. for metrics added since, and never trains).
A method that does not train (zero-shot) is evaluated once (the first seed): it has nothing random to average.
``--task t1`` / ``t2`` without a task config trains on the embedded synthetic set. ``--jobs J`` runs J trainings at
once (give each ``--threads 1``). An experiment config may name ``overlays`` (e.g. ``semi_supervised``: paper
003's two-stage schedule, whose final state is at ``max_epochs + stage2_epochs``; docs/virtual_annotator.md).
Besides the test scores, each row reports the validation Dice of the final epoch (from the run's MLflow store): what
hyperparameters are chosen on (docs/results.md, "What was tried before concluding"). A set with a ``supervised`` row
also gets each row's Dice minus supervised's of the same seed, and one with the prompt-sensitivity grid a figure of
every method's grid averaged over its seeds.
``--overlay paper`` runs every row with the papers' settings (configs/experiments/paper.yaml: ViT-B, batch 14,
10 epochs, ...): a settings overlay after the task config, before the row's and column's own keys, which win.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

from bundle.experiment_tables import heatmaps, table
from bundle.experiments import REPO, SETS, experiment_meta, label_swept_key, max_epochs_of, one, overlay_paths, task_configs

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=sorted(SETS), default="main", help="which experiments (default main)")
    p.add_argument("--configs", nargs="+", help="experiment config names instead of a set's rows")
    p.add_argument("--task", nargs="+", default=["t1"], help="configs/tasks/ names (consep_t1 ...) or t1/t2/organ")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of each trained method (default 0)")
    p.add_argument("--datalist", help="prepared datalist.json (default: the task config's / synthetic)")
    p.add_argument("--bundle_root_base", required=True, help="folder of the runs (never the repository)")
    p.add_argument("--model_size", help="vit_b | small | tiny (default: train.yaml's base)")
    p.add_argument("--max_epochs", type=int)
    p.add_argument("--image_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--val_interval", type=int)
    p.add_argument("--train_fraction", type=int, default=100, help="training fraction unless the set varies it")
    p.add_argument("--overlay", action="append", metavar="NAME",
                   help="settings overlay for every run: configs/experiments/NAME.yaml (paper: the papers' batch 14, "
                        "10 epochs, ViT-B ...) or a config path (repeatable)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="more bundle overrides (repeatable)")
    p.add_argument("--checkpoint", choices=["final", "best"], default="final",
                   help="evaluate the final training state (equal budget, default) or best_model.pt")
    p.add_argument("--eval_max_images", type=int, help="evaluate the first N test images only")
    p.add_argument("--sensitivity_max_images", type=int, help="prompt-sensitivity grid on the first N items only")
    p.add_argument("--no_sensitivity", action="store_true")
    p.add_argument("--threads", type=int, help="OMP/torch threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--force", action="store_true", help="train and evaluate again even when results exist")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate finished runs again (e.g. for metrics added since) and never train; a run whose "
                        "final state is missing is an error")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--output", help="markdown table (default <bundle_root_base>/<set>.md); a .json and, with the "
                                    "sensitivity grid, a .png of the heatmaps are written beside it")
    args = p.parse_args(argv)
    if os.path.abspath(args.bundle_root_base).startswith(REPO + os.sep):
        raise SystemExit("--bundle_root_base must be outside the repository")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    overlay_paths(args.overlay)  # a missing overlay stops here, before any run
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # the commands and their return codes (bundle.experiments.run) on stdout, one line each
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    row_names, col_names = SETS[args.set]
    methods = [experiment_meta(n) for n in (args.configs or row_names)]
    with open(os.path.join(REPO, "configs", "train.yaml"), encoding="utf-8") as f:
        defaults = yaml.safe_load(f)
    label_swept_key(methods, args.set, defaults)
    columns = [experiment_meta(n) for n in col_names] if col_names else [None]
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing may reach the network
    env.setdefault("DO_NOT_TRACK", "true")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    jobs, titles = [], []
    for task in args.task:
        tname = task_configs(task)[2]
        for col in columns:
            title = tname if col is None else f"{tname} {col['cfg'].get('train_fraction')}%"
            titles.append(title)
            for method in methods:
                for seed in args.seeds if method["train"] else args.seeds[:1]:
                    jobs.append(((method["name"], title), (args, task, method, col, seed, env)))
    with ThreadPoolExecutor(max_workers=1 if args.dry_run else args.jobs) as pool:
        done = [(key, pool.submit(one, *call)) for key, call in jobs]
    results: dict = {}
    for key, future in done:
        results.setdefault(key, []).append(future.result())
    if args.dry_run:
        return 0
    any_summary = results[jobs[0][0]][0]
    params = any_summary.get("params", {})
    notes = [
        f"Test split: {any_summary.get('n_images')} images per task"
        + (f" (first {args.eval_max_images})" if args.eval_max_images else "")
        + f"; model {params.get('model_size')} at {params.get('image_size')} px, initialisation "
        f"{params.get('initialisation')}; checkpoint: {args.checkpoint}; max_epochs {max_epochs_of(args)}; "
        f"seeds {' '.join(map(str, args.seeds))} (mean ± sample sd; n = runs per cell).",
        "Command: `python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])]) + "`",
    ]
    text = table(methods, titles, results, f"Set `{args.set}`", notes)
    out = args.output or os.path.join(args.bundle_root_base, f"{args.set}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from bundle.io import atomic_write, save_json

    with atomic_write(out, "w", encoding="utf-8") as f:
        f.write(text)
    save_json({f"{m}|{c}": runs for (m, c), runs in results.items()}, os.path.splitext(out)[0] + ".json", default=str)
    figure = None if args.no_sensitivity else heatmaps(methods, results, titles[0], os.path.splitext(out)[0] + ".png")
    print(text)
    print(f"table: {out}" + (f"\nheatmaps ({titles[0]}, mean over seeds): {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
