"""The logged preference terms of finished experiment runs, early against late: what the loss did, not what it scored.

    python scripts/training_terms.py --runs ../sampo_runs --task consep_t1 consep_t2 --methods supervised sampo \
        --train_fraction 10 --seeds 0 1 2 --steps 9

For each task and method, the mean over seeds of each term's mean over the first and over the last ``--steps``
iterations, read from the run's MLflow store (``<runs>/<task>/f<fraction>/<method>/seed<k>/eval/mlflow.db``, where
``scripts/run_experiments.py`` puts it), as a Markdown table. The names are the DPO core's (bundle/dpo.py):
``margins`` is beta * (r_w - r_l) averaged over the valid pairs, ``accuracies`` the share of pairs with r_w > r_l,
``pairs`` the valid pairs per step, ``disagreement_fraction`` their mean |y_w xor y_l| / P. Runs made before the core
logged ``margins`` and ``accuracies`` as ``reward_margin`` and ``preference_accuracy``: those are read under the new
names (:data:`OLD_NAMES`), so the tables of docs/results.md stay reproducible from the stored runs. A supervised run
logs the same terms without training on them, which is the comparison.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys

TERMS = ("margins", "accuracies", "pairs", "disagreement_fraction", "po1", "po2", "sup")
OLD_NAMES = {"margins": "reward_margin", "accuracies": "preference_accuracy"}  # what runs before bundle/dpo.py logged


def run_terms(db: str, steps: int) -> dict[str, tuple[float, float, int]]:
    """term -> (mean of the first ``steps`` values, mean of the last ``steps``, number of steps) of the run in ``db``."""
    if not os.path.isfile(db):
        raise FileNotFoundError(f"{db}: no MLflow store there; run scripts/run_experiments.py for this row first")
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        out = {}
        for term in TERMS:
            values = []
            for key in (term, OLD_NAMES.get(term)):
                if key and not values:
                    values = [v for (v,) in con.execute("SELECT value FROM metrics WHERE key = ? ORDER BY step", (key,))]
            if values:
                out[term] = (statistics.mean(values[:steps]), statistics.mean(values[-steps:]), len(values))
    return out


def table(runs: str, tasks, methods, fraction: int, seeds, steps: int) -> str:
    lines = [f"| task | method | {' | '.join(f'{t} first / last' for t in TERMS)} |",
             "|---|---|" + "---|" * len(TERMS)]
    total = 0  # the most iterations any run logged
    for task in tasks:
        for method in methods:
            per_seed = [run_terms(os.path.join(runs, task, f"f{fraction}", method, f"seed{s}", "eval", "mlflow.db"), steps)
                        for s in seeds]
            total = max([total] + [v[2] for r in per_seed for v in r.values()])
            cells = []
            for term in TERMS:
                if all(term in r for r in per_seed):
                    first = statistics.mean(r[term][0] for r in per_seed)
                    last = statistics.mean(r[term][1] for r in per_seed)
                    cells.append(f"{first:.3f} / {last:.3f}")
                else:
                    cells.append("-")
            lines.append(f"| {task} | {method} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Mean over seeds {' '.join(map(str, seeds))} of each term's mean over the first and the last {steps} "
                 f"of {total} iterations.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="../sampo_runs", help="scripts/run_experiments.py's --bundle_root_base")
    p.add_argument("--task", nargs="+", default=["consep_t1"])
    p.add_argument("--methods", nargs="+", default=["supervised", "sampo"], help="experiment config names")
    p.add_argument("--train_fraction", type=int, default=10)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=9, help="iterations averaged at each end (default 9)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    try:
        print(table(args.runs, args.task, args.methods, args.train_fraction, args.seeds, args.steps))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
