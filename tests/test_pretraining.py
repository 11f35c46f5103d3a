"""The base's pretraining (bundle/pretraining.py, configs/pretrain.yaml): SAM's single-object objective on tiny data."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from bundle.networks import PromptableSAM
from bundle.pretraining import SingleObjectLoss, SingleObjectTrainer, corrective_clicks, dice_loss, focal_loss
from bundle.transforms.prompts import SingleObjectPromptsd
from conftest import REPO


@pytest.fixture
def one_thread():
    """Tiny networks run fastest on one thread; two threads on a busy 2-core machine wait on each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _instances(size=32):
    inst = np.zeros((size, size), np.int32)
    inst[2:10, 2:10] = 1
    inst[12:20, 14:26] = 2
    inst[24:30, 3:8] = 3
    return inst


# ---- the single-object prompt transform -----------------------------------------------------------------------
def test_prompts_click_inside_one_object_whose_mask_is_the_target():
    inst = _instances()
    label = torch.from_numpy(np.stack([inst, np.where(inst > 0, 2, 0)]))
    t = SingleObjectPromptsd(n_objects=3, min_clicks=1, max_clicks=3)
    t.set_random_state(0)
    for _ in range(5):
        d = t({"label": label, "image": torch.zeros(3, 32, 32)})
        assert d["label"].shape == (3, 32, 32) and d["points"].shape == (3, 3, 2)
        chosen = set()
        for k in range(3):
            target = d["label"][k].numpy() > 0
            (obj,) = np.unique(inst[target])  # exactly one object, all of it
            assert target.sum() == (inst == obj).sum()
            chosen.add(int(obj))
            real = d["point_labels"][k] != -1
            assert 1 <= int(real.sum()) <= 3 and (d["point_labels"][k][real] == 1).all()
            for x, y in d["points"][k][real].numpy().astype(int):
                assert target[y, x]
        assert chosen == {1, 2, 3}  # without replacement while there are enough objects


def test_prompts_seeded_for_evaluation_and_empty_maps():
    inst = _instances()
    label = np.stack([inst, inst])
    t = SingleObjectPromptsd(n_objects=1, min_clicks=1, max_clicks=1, seed=0)
    a, b = t({"label": label, "name": "x"}), t({"label": label, "name": "x"})
    assert torch.equal(a["points"], b["points"]) and torch.equal(a["label"], b["label"])
    empty = t({"label": np.zeros((2, 16, 16), np.int32), "name": "e"})
    assert empty["label"].sum() == 0 and empty["point_labels"].tolist() == [[0]]


def test_corrective_clicks_come_from_the_error_region():
    target = torch.zeros(2, 16, 16)
    target[0, 4:12, 4:12] = 1
    target[1, 4:12, 4:12] = 1
    pred = torch.full((2, 16, 16), -5.0)
    pred[0, 4:12, 4:8] = 5  # misses the right half of the object: a positive click there
    pred[1, 4:12, 4:12] = 5
    pred[1, 0:2, 0:16] = 5  # a false stripe: a negative click on it
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        points, labels = corrective_clicks(pred, target, g)
        (x0, y0), (x1, y1) = points.long().tolist()
        assert labels.tolist() == [1, 0]
        assert 4 <= y0 < 12 and 8 <= x0 < 12
        assert y1 < 2
    exact = corrective_clicks(torch.where(target > 0, 5.0, -5.0), target)[1]
    assert exact.tolist() == [-1, -1]


# ---- the loss, by hand ----------------------------------------------------------------------------------------
def test_loss_is_focal_and_dice_on_the_best_slot_plus_iou_mse():
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])[None, None]  # (B=1, K=1, 2, 2)
    logits = torch.stack([torch.full((2, 2), 2.0), torch.tensor([[2.0, 2.0], [-2.0, -2.0]]), torch.full((2, 2), -2.0)])
    logits = logits[None, None]  # (1, 1, 3, 2, 2)
    iou_pred = torch.tensor([[[0.4, 0.9, 0.1]]])
    out = SingleObjectLoss(focal_weight=20.0, dice_weight=1.0, lambda_iou=1.0)(logits, target, iou_pred)

    p = torch.sigmoid(torch.tensor(2.0))  # slot 2 (index 1) is right everywhere with confidence p
    focal_best = (0.25 * (1 - p) ** 2 * -torch.log(p) * 2 + 0.75 * (1 - p) ** 2 * -torch.log(p) * 2) / 4
    dice_best = 1 - (2 * 2 * p + 1) / ((2 * p + 2 * (1 - p)) + 2 + 1)  # sum p: 2p on G, 2(1 - p) off it
    true_iou = torch.tensor([0.5, 1.0, 0.0])
    mse = ((iou_pred[0, 0] - true_iou) ** 2).mean()
    assert out["focal"] == pytest.approx(float(focal_best), rel=1e-5)
    assert out["dice_loss"] == pytest.approx(float(dice_best), rel=1e-5)
    assert out["iou_head"] == pytest.approx(float(mse), rel=1e-5)
    assert out["loss"] == pytest.approx(float(20 * focal_best + dice_best + mse), rel=1e-5)
    # the per-mask terms are the functions' values
    assert focal_loss(logits[0, 0, 1], target[0, 0]) == pytest.approx(float(focal_best), rel=1e-5)
    assert dice_loss(logits[0, 0, 1], target[0, 0]) == pytest.approx(float(dice_best), rel=1e-5)


# ---- one step lowers the loss on a fixed batch ----------------------------------------------------------------
@pytest.mark.parametrize("rounds", [0, 1])
def test_a_step_lowers_the_loss_on_a_fixed_batch(rounds, one_thread):
    torch.manual_seed(0)
    net = PromptableSAM("tiny", 64, lora_rank=0, trainable_parts=("image_encoder", "prompt_encoder", "mask_decoder"))
    inst = np.kron(_instances(), np.ones((2, 2), np.int32))  # 64 px
    t = SingleObjectPromptsd(n_objects=2, max_clicks=2)
    t.set_random_state(0)
    items = [t({"label": np.stack([inst, inst])}) for _ in range(2)]
    image = torch.from_numpy(np.where(inst > 0, 0.2, 0.8).astype(np.float32))[None].expand(3, -1, -1)
    batch = {"image": image[None].repeat(2, 1, 1, 1), **{k: torch.stack([d[k] for d in items])
                                                            for k in ("label", "points", "point_labels")}}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = SingleObjectTrainer("cpu", 1, [batch], net, opt, SingleObjectLoss(), decollate=False,
                                  correction_rounds=rounds, loss_size=16)

    def loss():
        torch.manual_seed(1)  # the same corrective clicks
        with torch.no_grad():
            return float(trainer.compute_loss(batch["image"], batch["label"], batch["points"].float(),
                                              batch["point_labels"])[2]["loss"])

    before = loss()
    for _ in range(5):
        out = trainer._iteration(trainer, batch)
    assert out["pred"].shape == (2, 2, 64, 64) and {"focal", "dice_loss", "iou_head"} <= set(out)
    assert loss() < before


# ---- the bundle run: one epoch, the base checkpoint, resume ---------------------------------------------------
TINY_OVERLAY = {
    "model_size": "tiny", "image_size": 64, "batch_size": 2, "n_objects": 2,
    "synthetic": {"n_train": 4, "n_val": 2, "n_test": 1},
    "pretrain#datasets": [{"_target_": "Dataset", "data": "$bundle.data.datalist.load_datalist(@datalist, 'training')",
                           "transform": "@pretrain#he_transform"}],
    "pretrain#val_datasets": [{"_target_": "Dataset",
                               "data": "$bundle.data.datalist.load_datalist(@datalist, 'validation')",
                               "transform": {"_target_": "Compose",
                                             "transforms": "$@load + @pretrain#resize + @pretrain#val_prompts"}}],
}  # fmt: skip


def _pretrain(root, *extra):
    overlay = root / "tiny.yaml"
    overlay.write_text(yaml.safe_dump(TINY_OVERLAY), encoding="utf-8")
    configs = f"['{REPO}/configs/train.yaml','{REPO}/configs/pretrain.yaml','{overlay}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "pretraining", "--config_file", configs,
           "--bundle_root", str(root), *extra]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_thread
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                          env=env)


@pytest.mark.slow
def test_pretraining_run_writes_a_loadable_base_and_resumes(tmp_path):
    proc = _pretrain(tmp_path, "--max_epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = tmp_path / "models" / "sam_small_base.pth"
    assert base.is_file() and (tmp_path / "models" / "pretraining" / "checkpoint_epoch=1.pt").is_file()
    assert "md5" in proc.stdout and not (tmp_path / "models" / "checkpoint_epoch=1.pt").exists()
    state = torch.load(base, weights_only=True)
    assert state["image_encoder.patch_embed.proj.weight"].dtype == torch.float16  # official keys, fp16
    net = PromptableSAM("tiny", 64, lora_rank=0, sam_checkpoint=str(base), require_checkpoint=True)
    assert net.initialisation == "sam_small_base.pth"
    assert torch.allclose(net.sam.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"].float())

    proc = _pretrain(tmp_path, "--max_epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resuming from" in proc.stdout and "checkpoint_epoch=1.pt" in proc.stdout
    assert (tmp_path / "models" / "pretraining" / "checkpoint_epoch=2.pt").is_file()
    assert "Epoch[2]" in proc.stdout + proc.stderr and "Epoch[1]" not in proc.stdout + proc.stderr
