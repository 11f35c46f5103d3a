"""scripts/run_experiments.py: seeds, aggregation over seeds, validation Dice read back from MLflow."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.experiment_tables import paired_differences, table
from bundle.experiments import experiment_meta, final_epoch, validation_dice

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_experiments.py"
spec = importlib.util.spec_from_file_location("run_experiments", SCRIPT)
rx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rx)


def test_dry_run_trains_every_seed_and_evaluates_zero_shot_once(tmp_path):
    dry = subprocess.run([sys.executable, str(SCRIPT), "--set", "main", "--task", "t1", "--seeds", "3", "4",
                          "--bundle_root_base", str(tmp_path), "--model_size", "tiny", "--max_epochs", "1", "--dry_run"],
                         capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert dry.returncode == 0, dry.stderr
    lines = [ln for ln in dry.stdout.splitlines() if ln.startswith("$ ")]
    trains = [ln for ln in lines if "run training" in ln]
    assert len(trains) == 4 and len(lines) == 9  # 2 methods x 2 seeds trained + evaluated, zero-shot evaluated once
    assert sum(f"supervised/seed{s} " in ln and f"--seed {s}" in ln for ln in trains for s in (3, 4)) == 2
    assert "zero_shot/seed3" in lines[0] and not any("zero_shot/seed4" in ln for ln in lines)


def _summary(dice, val=None, per_class=None):
    return {"overall": {"dice": dice, "iou": dice / 2, "oracle_dice": dice + 0.1}, "val_dice": val,
            "per_class": {k: {"dice": v} for k, v in (per_class or {}).items()}}


def test_table_reports_mean_and_sample_sd_over_seeds_and_per_class_cells():
    rows = [{"name": "sup", "label": "Supervised"}, {"name": "zs", "label": "Zero-shot"}]
    results = {("sup", "T2"): [_summary(0.5, 0.4, {"a": 0.2}), _summary(0.7, 0.6, {"a": 0.4})],
               ("zs", "T2"): [_summary(0.1, None, {"a": 0.05})]}
    text = table(rows, ["T2"], results, "t", [])
    sup = next(ln for ln in text.splitlines() if ln.startswith("| Supervised (n=2)"))
    assert "0.600 ± 0.141" in sup and "0.300 ± 0.071" in sup and "0.700 ± 0.141" in sup and "0.500 ± 0.141" in sup
    assert "| Zero-shot (n=1) | 0.100 | 0.050 | 0.200 | - |" in text
    assert "| Supervised | 0.300 ± 0.141 |" in text and "| Zero-shot | 0.050 |" in text


def _nuclei_summary(pq, f1_pooled, per_class):
    overall = {"dice": 0.5, "iou": 0.3, "pq": pq, "dq": pq + 0.1, "sq": 0.8, "aji": pq - 0.1, "f1": pq + 0.2,
               "count_rel_error": 0.25, "nuclei_pooled": {"f1": f1_pooled}}
    return {"overall": overall, "per_class": {k: {"dice": 0.5, "pq": v} for k, v in per_class.items()},
            "per_stratum": {"sparse": {"dice": 0.4, "pq": pq}}}


def test_table_reports_nuclei_metrics_per_method_class_and_stratum():
    rows = [{"name": "sup", "label": "Supervised"}, {"name": "dis", "label": "SAMPO"}]
    results = {("sup", "T2"): [_nuclei_summary(0.3, 0.5, {"a": 0.2}), _nuclei_summary(0.5, 0.7, {"a": 0.4})],
               ("dis", "T2"): [_nuclei_summary(0.6, 0.8, {"a": 0.6})]}
    text = table(rows, ["T2"], results, "t", [])
    block = text[text.index("Nuclei, T2"):]
    assert "| Method | PQ | DQ | SQ | AJI | F1 | count rel. error | F1 pooled |" in block
    # PQ 0.4 ± 0.141, DQ 0.5 ± 0.141, SQ 0.8 ± 0, AJI 0.3 ± 0.141, F1 0.6 ± 0.141, count 0.25 ± 0, pooled 0.6 ± 0.141
    assert ("| Supervised | 0.400 ± 0.141 | 0.500 ± 0.141 | 0.800 ± 0.000 | 0.300 ± 0.141 | 0.600 ± 0.141 | "
            "0.250 ± 0.000 | 0.600 ± 0.141 |") in block
    assert "| SAMPO | 0.600 | 0.700 | 0.800 | 0.500 | 0.800 | 0.250 | 0.800 |" in block
    assert "PQ per class, T2:" in block and "| Supervised | 0.300 ± 0.141 |" in block and "| SAMPO | 0.600 |" in block
    assert "PQ per density stratum, T2:" in block
    # summaries without nuclei metrics (the organ task, older evaluations): no nuclei section
    assert "Nuclei" not in table(rows, ["T2"], {("sup", "T2"): [_summary(0.5)]}, "t", [])


def test_reevaluate_evaluates_finished_runs_and_never_trains(tmp_path):
    base = [sys.executable, str(SCRIPT), "--set", "main", "--configs", "supervised", "--task", "t1",
            "--bundle_root_base", str(tmp_path), "--model_size", "tiny", "--max_epochs", "1"]
    dry = subprocess.run(base + ["--reevaluate", "--dry_run"], capture_output=True, text=True, timeout=60,
                         encoding="utf-8")
    assert dry.returncode == 0, dry.stderr
    lines = [ln for ln in dry.stdout.splitlines() if ln.startswith("$ ")]
    assert len(lines) == 1 and "run evaluating" in lines[0] and "checkpoint_epoch=1.pt" in lines[0]
    # for real, a run that was never trained is refused, naming its final state, and nothing is trained
    real = subprocess.run(base + ["--reevaluate"], capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert real.returncode != 0 and "checkpoint_epoch=1.pt: --reevaluate evaluates finished runs only" in real.stderr
    assert not list(tmp_path.rglob("*.pt"))


def test_validation_dice_is_the_last_epoch_logged(tmp_path):
    """A real MLflow store (what a training run writes), read through MLflow's client: the last validated epoch wins,
    not the last written row; an evaluation run in the same store (no val_mean_dice) is ignored."""
    from mlflow.tracking import MlflowClient

    from bundle.tracking import sqlite_uri

    (tmp_path / "eval").mkdir()
    client = MlflowClient(tracking_uri=sqlite_uri(str(tmp_path / "eval" / "mlflow.db")))
    train = client.create_run(client.create_experiment("training"), run_name="train").info.run_id
    for step, value, stamp in ((1, 0.2, 5), (3, 0.6, 6), (2, 0.4, 9)):
        client.log_metric(train, "val_mean_dice", value, timestamp=stamp, step=step)
    client.log_metric(train, "train_loss", 9.0, step=4)
    evaluation = client.create_run(client.create_experiment("evaluation"), run_name="eval").info.run_id
    client.log_metric(evaluation, "dice", 0.9, step=9)
    assert validation_dice(str(tmp_path)) == pytest.approx(0.6)
    assert validation_dice(str(tmp_path / "missing")) is None


def test_bad_jobs_and_a_root_inside_the_repository_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--jobs must be >= 1"):
        rx.parse_args(["--bundle_root_base", str(tmp_path), "--jobs", "0"])
    with pytest.raises(SystemExit, match="outside the repository"):
        rx.parse_args(["--bundle_root_base", str(REPO / "runs")])


def test_paper_overlay_reaches_every_run_before_the_rows_own_keys(tmp_path):
    dry = subprocess.run([sys.executable, str(SCRIPT), "--set", "lora_rank", "--configs", "lora_rank_4", "--task", "t1",
                          "--bundle_root_base", str(tmp_path), "--overlay", "paper", "--dry_run"],
                         capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert dry.returncode == 0, dry.stderr
    train, evaluate = [ln for ln in dry.stdout.splitlines() if ln.startswith("$ ")]
    configs = re.search(r"--config_file (\S+)", train).group(1)
    # paper.yaml after train.yaml, before the row's config (lora_rank_4 wins over the paper's rank 64)
    assert configs.index("train.yaml") < configs.index("paper.yaml") < configs.index("lora_rank_4.yaml")
    assert "checkpoint_epoch=10.pt" in evaluate  # the paper's 10 epochs: the final state evaluated
    with pytest.raises(SystemExit, match="--overlay nope: no config"):
        rx.parse_args(["--bundle_root_base", str(tmp_path), "--overlay", "nope"])


def test_heatmap_figure_averages_each_methods_seeds_and_names_the_method(tmp_path):
    from PIL import Image

    from bundle.sensitivity import render_heatmap, write_grid_csv

    def run(name, grid):
        root = tmp_path / name
        (root / "eval" / "evaluation").mkdir(parents=True)
        write_grid_csv(np.asarray(grid, dtype=float), str(root / "eval" / "evaluation" / "prompt_sensitivity.csv"))
        return {"bundle_root": str(root), "sensitivity": {"n_images": 7}}

    rows = [{"name": "sup", "label": "Supervised"}, {"name": "none", "label": "No grid"},
            {"name": "zs", "label": "Base"}]
    results = {("sup", "T1"): [run("s0", [[0.2, 0.4]]), run("s1", [[0.6, 0.8]])],
               ("zs", "T1"): [run("z", [[0.1, 0.1]])], ("none", "T1"): [{"bundle_root": str(tmp_path / "missing")}]}
    figure = np.asarray(Image.open(rx.heatmaps(rows, results, "T1", str(tmp_path / "fig.png"))).convert("RGB"))
    first = render_heatmap(np.array([[0.4, 0.6]]), "Supervised: Dice, mean over 7 items x 2 runs")
    first = np.asarray(first.convert("RGB"))
    second = np.asarray(render_heatmap(np.array([[0.1, 0.1]]), "Base: Dice, mean over 7 items x 1 run").convert("RGB"))
    assert figure.shape[1] == first.shape[1] + second.shape[1] + 16  # two panels (the run without a grid has none)
    assert (figure[:, :first.shape[1]] == first).all()
    assert (figure[:, first.shape[1] + 8:first.shape[1] + 8 + second.shape[1]] == second).all()


def test_sweep_rows_name_the_value_they_took_from_train_yaml():
    defaults = {"beta": 0.1, "lambda_dw": 1.0, "n_prompt_sets": 4}

    def rows(*names):
        return [experiment_meta(n) for n in names]

    beta = rows("supervised", "sampo", "beta_1")
    rx.label_swept_key(beta, "beta", defaults)
    assert [m["label"] for m in beta] == ["Supervised LoRA (SUP only)", "SAMPO (PO1+PO2+SUP) (beta=0.1, train.yaml)",
                                          "SAMPO beta=1"]
    dw = rows("sampo", "lambda_dw_2")
    rx.label_swept_key(dw, "lambda_dw", defaults)
    assert [m["label"] for m in dw] == ["SAMPO (PO1+PO2+SUP) (lambda_dw=1.0, train.yaml)", "SAMPO lambda_dw=2"]
    sets = rows("supervised", "sampo_n8")
    rx.label_swept_key(sets, "prompt_sets", defaults)
    assert sets[0]["label"] == "Supervised LoRA (SUP only) (n_prompt_sets=4, train.yaml)"
    assert sets[1]["label"] == "SAMPO, 8 prompt sets"
    main = rows("sampo")
    rx.label_swept_key(main, "main", defaults)
    assert main[0]["label"] == "SAMPO (PO1+PO2+SUP)"


def test_paired_differences_pair_runs_by_seed_and_count_the_seeds_where_higher():
    def run(seed, dice):
        return {"bundle_root": f"/runs/consep_t1/f10/x/seed{seed}", "seed": seed, "overall": {"dice": dice}}

    rows = [{"name": "supervised", "label": "SUP"}, {"name": "sampo", "label": "SAMPO"}, {"name": "zs", "label": "ZS"}]
    results = {("supervised", "T1"): [run(0, 0.40), run(1, 0.50), run(2, 0.60)],
               ("sampo", "T1"): [run(2, 0.61), run(0, 0.38), run(1, 0.47)],  # out of order: paired by seed
               ("zs", "T1"): [run(0, 0.02)]}
    lines = paired_differences(rows, ["T1"], results)
    assert "| SAMPO | -0.013 ± 0.021 (1/3) |" in lines  # -0.02, -0.03, +0.01
    assert "| ZS | - |" not in lines and not any(ln.startswith("| ZS") for ln in lines)  # one seed: no spread
    assert paired_differences(rows[1:], ["T1"], results) == []  # no reference row
    assert "Dice minus SUP of the same seed" in table(rows, ["T1"], results, "t", [])


@pytest.mark.parametrize("override, final", [(None, 18), ("stage2_epochs=4", 10), ("stage2_epochs=$3 * @max_epochs", 24)])
def test_the_final_epoch_of_a_two_stage_run_is_evaluated_from_its_configs(override, final):
    """semi_supervised.yaml's stage2_epochs ($2 * @max_epochs) as MONAI evaluates it, an override winning; a plain
    method ends at max_epochs."""
    argv = ["--bundle_root_base", "/tmp/runs", "--max_epochs", "6"] + (["--override", override] if override else [])
    args = rx.parse_args(argv)
    assert final_epoch(args, experiment_meta("va_aligned_10")) == final
    assert final_epoch(args, experiment_meta("sampo")) == 6
