"""Evaluation (configs/evaluate.yaml, bundle/evaluation.py) and the prompt-sensitivity grid (bundle/sensitivity.py).

The end-to-end test builds a tiny SAM, perturbs it (so that a wrongly loaded or ignored checkpoint shows), saves it
as a CheckpointSaver-style ``models/best_model.pt`` in a fresh bundle_root and runs
``python -m monai.bundle run evaluating`` against the embedded synthetic set generated there.
"""

import csv
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from bundle.evaluation import item_nuclei_metrics, load_checkpoint, nuclei_split, subset, summarise, summary_metrics
from bundle.guidance import points_to_guidance
from bundle.metrics import STRATA, density_stratum, dice_iou
from bundle.networks import PromptableSAM, ReferencePolicy
from bundle.sensitivity import grid_prompts, prompt_grid, read_grid_csv, write_heatmap
from bundle.transforms.prompts import EvalPromptsd
from conftest import REPO

IMAGE_SIZE = 96
SYNTHETIC = "{'n_train': 2, 'n_val': 1, 'n_test': 3}"


def _tiny(seed=0, rank=4):
    torch.manual_seed(seed)
    return PromptableSAM("tiny", image_size=IMAGE_SIZE, lora_rank=rank)


def _perturb(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:  # what training changes: LoRA, prompt encoder and mask decoder (trained copies)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


# -- the grid -------------------------------------------------------------------------------------------------------
def test_grid_prompts_cover_every_cell_and_cell_3_3_is_the_protocol():
    target = np.zeros((40, 40), bool)
    target[10:20, 5:30] = True
    points, labels = grid_prompts(target, "img#0", seed=0)
    assert points.shape == (110, 20, 2) and labels.shape == (110, 20)
    for k, (n_pos, n_neg) in enumerate((p, n) for p in range(1, 11) for n in range(0, 11)):
        assert (labels[k] == 1).sum() == n_pos and (labels[k] == 0).sum() == n_neg
        xy = points[k][labels[k] >= 0].astype(int)
        assert target[xy[:, 1], xy[:, 0]].tolist() == [True] * n_pos + [False] * n_neg
    # the cell (3+, 3-) draws exactly EvalPromptsd's prompts for that item
    d = EvalPromptsd(3, 3, seed=0)({"name": "img", "target_class": 0, "label": torch.from_numpy(target[None])})
    cell = 2 * 11 + 3
    np.testing.assert_array_equal(points[cell][:6], d["points"].numpy())
    np.testing.assert_array_equal(labels[cell][:6], d["point_labels"].numpy())
    # seeded per item: the same key gives the same prompts, another key others
    np.testing.assert_array_equal(grid_prompts(target, "img#0")[0], points)
    assert not np.array_equal(grid_prompts(target, "other#0")[0], points)


def test_prompt_grid_shape_and_one_encoder_pass():
    net = _perturb(_tiny())
    calls = []
    hook = net._sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    image = torch.rand(3, 64, 64)
    target = torch.zeros(1, 64, 64)
    target[0, 20:40, 10:30] = 1
    grid = prompt_grid(net, image, target, "x#0")
    hook.remove()
    assert grid.shape == (10, 11)
    assert len(calls) == 1  # the image encoder runs once for all 110 prompt sets
    assert ((grid >= 0) & (grid <= 1)).all()
    # each cell is the Dice of the best predicted-IoU slot for that cell's prompts: check one cell by hand
    points, labels = grid_prompts(target[0].numpy() > 0, "x#0")
    cell = 2 * 11 + 3
    p, lab = torch.from_numpy(points[cell : cell + 1]), torch.from_numpy(labels[cell : cell + 1])
    with torch.no_grad():
        low, iou = net.decode(net.encode(image[None]), p[None], lab[None], input_size=(64, 64))
        logit = torch.nn.functional.interpolate(low[0, :, iou[0, 0].argmax()][:, None], size=(64, 64), mode="bilinear")
        # the cell's prompts through the single-tensor forward (what evaluation and deployment run) give the same
        # logits: the decoder sees each set's clicks plus one padding point, whatever the slots it is stored in
        forward = net(torch.cat([image[None], points_to_guidance(p, lab, (64, 64))], dim=1))
    assert grid[2, 3] == pytest.approx(dice_iou(logit[0, 0] > 0, target[0])[0], abs=1e-6)
    torch.testing.assert_close(logit, forward, atol=1e-5, rtol=0)


def test_heatmap_png_and_csv(tmp_path):
    grid = np.linspace(0, 1, 110).reshape(10, 11)
    path = write_heatmap(grid, str(tmp_path / "h.png"))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape[0] > 10 * 40 and img.shape[1] > 11 * 40
    # the top-left cell is dark (Dice 0), the bottom-right one yellow (Dice 1)
    assert img[40 + 5, 70 + 5].sum() < 250 and img[40 + 9 * 44 + 40, 70 + 10 * 44 + 40].sum() > 450


def test_heatmap_has_a_colour_scale(tmp_path):
    """Right of the grid a vertical bar runs from Dice 1 (yellow, top) to Dice 0 (dark purple, bottom)."""
    from bundle.sensitivity import _colour

    img = np.asarray(Image.open(write_heatmap(np.full((3, 4), 0.5), str(tmp_path / "h.png"))).convert("RGB")).astype(int)
    top, bottom = 40, 40 + 3 * 44 - 1
    right = img[top + 2 : bottom - 2, 70 + 4 * 44 :]  # everything right of the grid
    bar = [x for x in range(right.shape[1]) if len({tuple(p) for p in right[:, x]}) > 20]  # a colour ramp column
    assert bar, "no colour scale right of the grid"
    column = img[:, 70 + 4 * 44 + bar[len(bar) // 2]]
    assert np.abs(column[top + 2] - _colour(1.0)).sum() < 30 and np.abs(column[bottom - 2] - _colour(0.0)).sum() < 30


# -- grouping ---------------------------------------------------------------------------------------------------------
def test_summary_groups_list_exactly_what_is_present():
    rows = [
        {"name": "a", "class_name": "epithelial", "tissue": "colon", "stratum": density_stratum(19), "dice": 1.0, "iou": 1.0},
        {"name": "a", "class_name": "spindle", "tissue": "colon", "stratum": density_stratum(19), "dice": 0.0, "iou": 0.0},
        {"name": "b", "class_name": "epithelial", "tissue": "", "stratum": density_stratum(101), "dice": 0.5, "iou": 0.25},
    ]
    s = summarise(rows, "t2")
    assert s["n_items"] == 3 and s["n_images"] == 2
    assert s["overall"]["dice"] == pytest.approx(0.5)
    assert list(s["per_class"]) == ["epithelial", "spindle"]
    assert s["per_class"]["epithelial"] == {"dice": 0.75, "iou": 0.625, "n": 2}
    assert list(s["per_tissue"]) == ["colon"]
    assert list(s["per_stratum"]) == ["sparse", "crowded"]
    assert "per_class" not in summarise(rows, "t1")


# -- nuclei metrics ---------------------------------------------------------------------------------------------------
def _disc(shape, centre, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_item_nuclei_metrics_split_the_prediction_and_match_by_hand():
    """Two true nuclei; the prediction finds the first exactly, misses the second and adds a false one: by hand
    TP 1, FP 1, FN 1, so DQ = 1 / (1 + 1/2 + 1/2) = 0.5, SQ = 1, PQ = 0.5, F1 = 0.5, counts 2 / 2."""
    shape = (40, 60)
    a, b, c = _disc(shape, (10, 10), 5), _disc(shape, (30, 30), 5), _disc(shape, (10, 50), 5)
    true = np.zeros(shape, np.int32)
    true[a], true[b] = 7, 300  # ids need not be sequential
    pred = torch.from_numpy((a | c)[None].astype(np.float32))
    m = item_nuclei_metrics(pred, torch.from_numpy(true[None]), {"threshold": 0.5, "min_distance": 3, "min_size": 8})
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert (m["dq"], m["sq"], m["pq"], m["f1"]) == (pytest.approx(0.5), pytest.approx(1.0), pytest.approx(0.5),
                                                    pytest.approx(0.5))
    assert (m["true_count"], m["pred_count"], m["count_abs_error"]) == (2, 2, 0)
    # AJI: C = |a|, U = |a| + |b| (unpaired true) + |c| (unused prediction)
    assert m["aji"] == pytest.approx(a.sum() / (a.sum() + b.sum() + c.sum()))
    # two touching discs in one predicted blob are split by the watershed into two nuclei: both found
    touching = _disc(shape, (20, 20), 6) | _disc(shape, (20, 31), 6)
    true2 = np.zeros(shape, np.int32)
    true2[_disc(shape, (20, 20), 6)], true2[_disc(shape, (20, 31), 6) & ~_disc(shape, (20, 20), 6)] = 1, 2
    m2 = item_nuclei_metrics(torch.from_numpy(touching[None]), true2[None], {"min_distance": 3})
    assert (m2["tp"], m2["pred_count"]) == (2, 2)


def test_nuclei_split_config():
    assert nuclei_split(None) is None and nuclei_split({"enabled": False, "threshold": 0.5}) is None
    assert nuclei_split({"enabled": True, "threshold": 0.4, "min_size": 2}) == {"threshold": 0.4, "min_size": 2}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['min_dist'\].*min_distance"):
        nuclei_split({"min_dist": 3})


def test_evaluation_splits_nuclei_as_inference_does():
    """configs/evaluate.yaml's watershed parameters are inference's: the metrics score what users get."""
    from monai.bundle import ConfigParser

    ev = ConfigParser.load_config_file(str(REPO / "configs" / "evaluate.yaml"))["nuclei"]
    inf = ConfigParser.load_config_file(str(REPO / "configs" / "inference.yaml"))["nuclei"]
    assert {k: ev[k] for k in ("threshold", "min_distance", "min_size")} == \
        {k: inf[k] for k in ("threshold", "min_distance", "min_size")}


def test_summary_nuclei_means_per_group_and_pooled_f1():
    def row(cls, stratum, tp, fp, fn, pq):
        return {"name": cls + stratum, "class_name": cls, "tissue": "", "stratum": stratum, "dice": 0.5, "iou": 0.3,
                "pq": pq, "dq": pq, "sq": 1.0, "aji": pq, "f1": 2 * tp / (2 * tp + fp + fn), "tp": tp, "fp": fp,
                "fn": fn, "true_count": tp + fn, "pred_count": tp + fp, "count_abs_error": abs(fp - fn),
                "count_rel_error": abs(fp - fn) / (tp + fn)}
    rows = [row("epithelial", "sparse", 1, 0, 1, 0.6), row("epithelial", "crowded", 9, 1, 0, 0.8),
            row("spindle", "sparse", 0, 2, 2, 0.0)]
    s = summarise(rows, "t2")
    assert s["overall"]["pq"] == pytest.approx((0.6 + 0.8 + 0.0) / 3)
    assert s["per_class"]["epithelial"]["pq"] == pytest.approx(0.7) and s["per_class"]["spindle"]["pq"] == 0.0
    assert s["per_stratum"]["sparse"]["count_rel_error"] == pytest.approx((0.5 + 0.0) / 2)
    # pooled: TP 10, FP 3, FN 3 -> 20 / 26, not the mean of the per-item F1
    assert s["overall"]["nuclei_pooled"] == {"f1": pytest.approx(20 / 26), "precision": pytest.approx(10 / 13),
                                             "recall": pytest.approx(10 / 13), "tp": 10, "fp": 3, "fn": 3}
    metrics = summary_metrics(s)
    assert metrics["test_pq"] == pytest.approx(s["overall"]["pq"]) and metrics["test_f1_pooled"] == pytest.approx(20 / 26)
    assert metrics["test_pq/class/epithelial"] == pytest.approx(0.7)
    assert metrics["test_aji/stratum/crowded"] == pytest.approx(0.8)


def test_subset_keeps_all_classes_of_the_first_images():
    items = [{"name": n, "target_class": c} for n, c in (("a", 1), ("a", 2), ("b", 1), ("c", 3))]
    assert subset(items, 2) == items[:3]
    assert subset(items, None) == items


def test_subset_spreads_the_images_over_source_images():
    """Tiles of three source images, listed source by source: 3 images come from 3 sources, 4 from 3 too."""
    items = [{"name": f"s{s}_{k:03d}", "source": f"s{s}", "target_class": 1} for s in range(3) for k in range(4)]
    assert {i["source"] for i in subset(items, 3)} == {"s0", "s1", "s2"}
    assert [i["name"] for i in subset(items, 4)] == ["s0_000", "s0_001", "s1_000", "s2_000"]
    with pytest.raises(ValueError, match="eval_max_images must be a positive number of images or null"):
        subset(items, 0)


# -- networks -------------------------------------------------------------------------------------------------------
def test_checkpoint_formats_and_mismatch(tmp_path):
    trained = _perturb(_tiny())
    raw, state = tmp_path / "best_model.pt", tmp_path / "checkpoint_epoch=1.pt"
    torch.save(trained.state_dict(), raw)
    torch.save({"network": trained.state_dict(), "optimizer": {}}, state)
    x = torch.rand(1, 5, 64, 64)
    x[:, 3:] = 0
    x[0, 3, 30, 30] = 1
    for path in (raw, state):
        net = load_checkpoint(_tiny(seed=5), str(path))
        torch.testing.assert_close(net(x), trained(x))
    with pytest.raises(RuntimeError, match="does not fit the configured network"):
        load_checkpoint(_tiny(rank=8), str(raw))
    with pytest.raises(FileNotFoundError, match=f"checkpoint to evaluate not found: {tmp_path}/missing.pt"):
        load_checkpoint(_tiny(), str(tmp_path / "missing.pt"))


def test_reference_policy_is_the_initial_network():
    initial = _tiny()
    net = _perturb(_tiny())
    x = torch.rand(1, 5, 64, 64)
    x[:, 3:] = 0
    x[0, 3, 20, 20] = 1
    with torch.no_grad():
        torch.testing.assert_close(ReferencePolicy(net)(x), initial(x))
        assert not torch.allclose(net(x), initial(x))


# -- end to end -----------------------------------------------------------------------------------------------------
def _evaluate(bundle_root, *extra):
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "evaluating",
        "--config_file", str([str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "evaluate.yaml")]),
        "--bundle_root", str(bundle_root), "--model_size", "tiny", "--image_size", str(IMAGE_SIZE),
        "--lora_rank", "4", "--synthetic", SYNTHETIC, *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env)


@pytest.mark.slow
def test_evaluate_config_end_to_end(tmp_path):
    """t2 evaluation of a saved checkpoint: CSV, JSON, sensitivity grid, card and an MLflow run with all of them."""
    (tmp_path / "models").mkdir()
    net = _perturb(_tiny())
    torch.save(net.state_dict(), tmp_path / "models" / "best_model.pt")
    proc = _evaluate(tmp_path, "--task", "t2", "--sensitivity_max_images", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out_dir = tmp_path / "eval" / "evaluation"
    for name in ("results.csv", "summary.json", "prompt_sensitivity.csv", "prompt_sensitivity.png",
                 "prompt_robustness_card.md", "executed_config.yaml"):
        assert (out_dir / name).is_file(), name
    rows = list(csv.DictReader(open(out_dir / "results.csv", encoding="utf-8")))
    summary = json.load(open(out_dir / "summary.json", encoding="utf-8"))

    # one row per (test image, class present) -- exactly the classes present, by the label files
    datalist = json.load(open(tmp_path / "data" / "synthetic" / "datalist.json", encoding="utf-8"))
    expected, strata = set(), {}
    for item in datalist["test"]:
        label = np.load(tmp_path / "data" / "synthetic" / item["label"])
        for c in np.unique(label[1][label[1] > 0]):
            expected.add((item["name"], int(c)))
        strata[item["name"]] = density_stratum(len(np.unique(label[0])) - 1)
    assert {(r["name"], int(r["target_class"])) for r in rows} == expected
    names = datalist["classes"]
    assert set(summary["per_class"]) == {names[str(c)] for _, c in expected}
    assert sum(v["n"] for v in summary["per_class"].values()) == len(rows) == summary["n_items"]
    assert all(r["stratum"] == strata[r["name"]] for r in rows)
    assert set(summary["per_stratum"]) == {strata[n] for n, _ in expected} and set(summary["per_stratum"]) <= set(STRATA)
    assert list(summary["per_tissue"]) == ["synthetic"]
    assert summary["overall"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    t = np.array([float(r["target_fraction"]) for r in rows])
    assert ((t > 0) & (t < 1)).all() and all(0 <= float(r["pred_fraction"]) <= 1 for r in rows)
    assert summary["all_foreground"]["dice"] == pytest.approx(np.mean(2 * t / (1 + t)), abs=1e-5)
    # the oracle slot (best of the 3 masks) is never worse than the slot the IoU head picks
    assert all(float(r["oracle_dice"]) >= float(r["dice"]) - 1e-6 for r in rows)
    assert summary["overall"]["oracle_dice"] == pytest.approx(np.mean([float(r["oracle_dice"]) for r in rows]), abs=1e-5)
    # nuclei metrics per item, against the instances of the item's class; per class and stratum in the summary
    for r in rows:
        assert 0 <= float(r["pq"]) <= 1 and 0 <= float(r["aji"]) <= 1 and 0 <= float(r["f1"]) <= 1
        assert int(r["true_count"]) == int(r["tp"]) + int(r["fn"]) and int(r["pred_count"]) == int(r["tp"]) + int(r["fp"])
    first = datalist["test"][0]
    label = np.load(tmp_path / "data" / "synthetic" / first["label"])
    for r in rows:
        if r["name"] == first["name"]:  # the true count is the class's instances in the label file
            c = int(r["target_class"])
            assert int(r["true_count"]) == len(np.unique(label[0][(label[1] == c) & (label[0] > 0)]))
    assert summary["overall"]["pq"] == pytest.approx(np.mean([float(r["pq"]) for r in rows]), abs=1e-5)
    assert all("pq" in v and "aji" in v for v in summary["per_class"].values())
    assert all("pq" in v for v in summary["per_stratum"].values())

    # the per-image Dice is the saved network's single-tensor forward on the evaluation input
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "evaluate.yaml")])
    parser.update({"bundle_root": str(tmp_path), "model_size": "tiny", "image_size": IMAGE_SIZE, "lora_rank": 4,
                   "task": "t2", "synthetic": {"n_train": 2, "n_val": 1, "n_test": 3}})
    item = parser.get_parsed_content("evaluate#dataset")[0]
    with torch.no_grad():
        pred = net.eval()(item["image"][None].float()) > 0
    d, i = dice_iou(pred[0], item["label"])
    assert (rows[0]["name"], float(rows[0]["dice"]), float(rows[0]["iou"])) == (item["name"], pytest.approx(d, abs=1e-5),
                                                                               pytest.approx(i, abs=1e-5))
    assert float(rows[0]["pred_fraction"]) == pytest.approx(pred.float().mean().item(), abs=1e-5)

    grid = read_grid_csv(str(out_dir / "prompt_sensitivity.csv"))
    assert grid.shape == (10, 11)
    # the grid's (3+, 3-) cell is the protocol itself: the same prompts and the same prediction on the gridded items
    assert grid[2, 3] == pytest.approx(np.mean([float(r["dice"]) for r in rows[:2]]), abs=1e-3)
    assert summary["sensitivity"]["n_images"] == 2
    assert Image.open(out_dir / "prompt_sensitivity.png").size[0] > 11 * 40

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/eval/mlflow.db")
    exp = client.get_experiment_by_name("sampo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name.startswith("eval_t2_best_model_")
    assert run.data.metrics["test_dice"] == pytest.approx(summary["overall"]["dice"])
    assert run.data.metrics["test_pq"] == pytest.approx(summary["overall"]["pq"])
    assert run.data.metrics["sensitivity_max_dice"] == pytest.approx(grid.max(), abs=1e-4)
    assert run.data.params["checkpoint"] == str(tmp_path / "models" / "best_model.pt")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "summary.json", "prompt_sensitivity.csv", "prompt_sensitivity.png",
            "prompt_robustness_card.md", "executed_config.yaml"} <= artifacts


@pytest.mark.slow
def test_zero_shot_evaluation(tmp_path):
    """``--eval_checkpoint ''`` evaluates the initial network (t1, no grid)."""
    proc = _evaluate(tmp_path, "--eval_checkpoint", "", "--sensitivity", "False")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Evaluating the INITIAL network" in proc.stdout
    summary = json.load(open(tmp_path / "eval" / "evaluation" / "summary.json", encoding="utf-8"))
    assert summary["n_items"] == 3 and "per_class" not in summary and "sensitivity" not in summary
    assert not (tmp_path / "eval" / "evaluation" / "prompt_sensitivity.png").exists()



def test_run_experiments_help_and_dry_run(tmp_path):
    script = str(REPO / "scripts" / "run_experiments.py")
    help_ = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60)
    assert help_.returncode == 0 and "--set" in help_.stdout and "--bundle_root_base" in help_.stdout
    dry = subprocess.run([sys.executable, script, "--set", "main", "--task", "t1", "--bundle_root_base", str(tmp_path),
                          "--model_size", "tiny", "--max_epochs", "1", "--dry_run"], capture_output=True, text=True, encoding="utf-8", errors="replace",
                         timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = [ln for ln in dry.stdout.splitlines() if ln.startswith("$ ")]
    # zero-shot: evaluation only; supervised and SAMPO: training then evaluation of the final state
    assert [("run training" in ln, "run evaluating" in ln) for ln in lines] == [(False, True)] + [(True, False), (False, True)] * 2
    assert "zero_shot.yaml" in lines[0] and "--eval_checkpoint" not in lines[0]
    assert "supervised.yaml" in lines[1] and f"{tmp_path}/t1/f100/supervised" in lines[1]
    assert "checkpoint_epoch=1.pt" in lines[2]
    assert not os.listdir(tmp_path)
