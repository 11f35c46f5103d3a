"""Training state and tracking across runs: resume, continuing a finished run, non-finite losses, crashed runs,
adapter-sized checkpoints and what the run says about them (real `python -m monai.bundle run training`, tiny SAM,
the sqlite MLflow store read back with MlflowClient)."""

import math
import os

import pytest
import torch
from test_training import _client, _run, _runs, _steps

from conftest import REPO

pytestmark = pytest.mark.slow

LR = 3e-4  # configs/train.yaml learning_rate


def _lr_key(client, run_id):
    keys = client.get_run(run_id).data.metrics
    (key,) = [k for k in keys if k.startswith("lr") or k.startswith("learning_rate")]
    return key


def _cosine(epoch, t_max):
    """The learning rate CosineAnnealingLR gives during 1-based ``epoch`` (eta_min 0)."""
    return LR * (1 + math.cos(math.pi * (epoch - 1) / t_max)) / 2


def _trained_key(key):
    return "lora_" in key or ".modules_to_save." in key


def test_rerun_with_more_epochs_continues_the_same_run(tmp_path):
    first = _run(tmp_path, "--max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "Engine run resuming" not in out and "Resuming from" not in out, "a fresh run must not say it resumes"
    assert "Engine run starting at epoch 1 of 1" in out
    assert "█" not in out and "\r" not in out, "the progress bar and the per-iteration log line share the terminal"
    assert "Trained epochs 1..1 of 1 (fresh start)" in out
    models = tmp_path / "models"
    state = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    # the schedule is saved after this epoch's step: resuming continues it exactly
    assert state["lr_scheduler"]["last_epoch"] == 1
    # adapter-sized: only what training changes, and the base it applies to
    assert state["network"] and all(_trained_key(k) for k in state["network"]), list(state["network"])[:5]
    assert state["base"]["initialisation"] == "random" and state["base"]["seed"] == 0
    assert len(state["base"]["fingerprint"]) == 64
    best = torch.load(models / "best_model.pt", map_location="cpu", weights_only=True)
    assert all(_trained_key(k) for k in best["network"]) and best["base"] == state["base"]
    best_bytes = (models / "best_model.pt").read_bytes()
    client = _client(tmp_path)
    (run,) = _runs(client)
    val1 = client.get_metric_history(run.info.run_id, "val_mean_dice")[0].value

    again = _run(tmp_path, "--max_epochs", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"Trained epochs 2..2 of 2 (resumed from {models / 'checkpoint_epoch=1.pt'})" in out
    (same,) = _runs(client)  # the finished run went on: one run, finished again
    assert same.info.run_id == run.info.run_id and same.info.status == "FINISHED"
    rid = run.info.run_id
    assert _steps(client, rid, "loss") == [1, 2, 3, 4]
    assert _steps(client, rid, "val_mean_dice") == [1, 2]
    val2 = client.get_metric_history(rid, "val_mean_dice")[1].value
    if val2 <= val1:  # the resumed run knows the best so far: no "new best", best_model.pt kept
        assert "Got new best metric of val_mean_dice" not in out
        assert (models / "best_model.pt").read_bytes() == best_bytes
    assert f"val_mean_dice best value: {max(val1, val2)}" in out
    # the schedule stretches to the new max_epochs (T_max 2): epoch 2 trains at the cosine's midpoint, not at 0
    lr = _lr_key(client, rid)
    assert [m.value for m in client.get_metric_history(rid, lr)][2:] == pytest.approx([_cosine(2, 2)] * 2)
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    assert _run(tmp_path, "--max_epochs", "1").returncode == 0
    models = tmp_path / "models"
    kept = {p.name: p.read_bytes() for p in models.glob("*.pt")}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    proc = _run(tmp_path, "--max_epochs", "2", "--loss#_target_", "faults.NaNLoss", env=env)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Non-finite training loss at iteration 3 (epoch 2, iteration 1 of 2): loss=nan, po1=" in out
    assert f"last good state: {models / 'checkpoint_epoch=1.pt'}" in out
    # nothing of the diverged epoch was saved; the good files are untouched
    assert {p.name: p.read_bytes() for p in models.glob("*.pt")} == kept
    client = _client(tmp_path)
    (run,) = _runs(client)
    assert run.info.status == "FAILED"
    assert "Non-finite training loss at iteration 3" in run.data.tags["error"]
    assert run.data.tags["failed_at"] == "epoch 2, iteration 3"
