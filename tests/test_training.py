"""Training through `python -m monai.bundle run training`: MLflow logging, resume, and bad inputs."""

import math
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

TINY = [
    "--model_size", "tiny", "--lora_rank", "4", "--image_size", "64", "--batch_size", "2",
    "--synthetic", "{'n_train': 4, 'n_val': 2, 'n_test': 1}",
]  # fmt: skip


def _command(bundle_root, *extra):
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(REPO / "configs" / "train.yaml"), "--bundle_root", str(bundle_root), *TINY, *extra,
    ]  # fmt: skip


def _run(bundle_root, *extra, timeout=600, env=None):
    return subprocess.run(
        _command(bundle_root, *extra), cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout, env=env
    )


def _client(bundle_root):
    return mlflow.MlflowClient(f"sqlite:///{bundle_root}/eval/mlflow.db")


def _runs(client):
    exp = client.get_experiment_by_name("sampo")
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_training_logs_to_mlflow(tmp_path):
    netlog = tmp_path / "outside_connections.log"
    # a guard refuses and records any connection leaving this machine; telemetry is left at the bundle's default
    ci_markers = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS")
    env = {k: v for k, v in os.environ.items() if k not in ci_markers}
    env.update(PYTHONPATH=str(REPO / "tests" / "netguard"), NETGUARD_LOG=str(netlog))
    proc = _run(tmp_path, "--max_epochs", "2", "--beta", "2.5", "--num_threads", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not netlog.exists(), f"the training tried to reach the network: {netlog.read_text(encoding='utf-8')}"
    out = proc.stdout + proc.stderr
    assert "torch uses 1 CPU thread (num_threads 1)" in out
    assert "RANDOM INITIALISATION" in out
    assert f"best checkpoint (validation Dice): {tmp_path}/models/best_model.pt" in out
    assert "MLflow run: sampo_" in out and f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/eval/mlflow.db" in out
    assert (tmp_path / "models" / "checkpoint_epoch=2.pt").is_file()

    client = _client(tmp_path)
    (run,) = _runs(client)
    assert run.info.run_name == (tmp_path / "eval" / "run_name.txt").read_text(encoding="utf-8").strip()
    assert run.info.status == "FINISHED"
    rid = run.info.run_id
    # per iteration (2 per epoch): the loss, its terms, the reward margin and the preference accuracy
    for key in ("loss", "po1", "po2", "sup", "margins", "accuracies"):
        assert _steps(client, rid, key) == [1, 2, 3, 4], key
    # per epoch: training and validation Dice and IoU
    for key in ("train_mean_dice", "train_mean_iou", "val_mean_dice", "val_mean_iou"):
        assert _steps(client, rid, key) == [1, 2], key
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(rid, key))
    # the first step compares the actor with itself: every preference pair costs log 2
    first_po1 = client.get_metric_history(rid, "po1")[0].value
    assert first_po1 == pytest.approx(0.693147, abs=1e-4)
    params = run.data.params
    assert params["beta"] == "2.5" and params["model_size"] == "tiny" and params["initialisation"] == "random"
    assert {"lambda", "lambda_dw", "lora_rank", "n_prompt_sets", "learning_rate", "task"} <= set(params)
    local = client.download_artifacts(rid, "executed_config.yaml", str(tmp_path / "dl"))
    executed = yaml.safe_load(open(local, encoding="utf-8"))
    assert executed["model_size"] == "tiny" and executed["beta"] == 2.5 and "train" in executed


def test_resume_after_kill(tmp_path):
    """Killed in epoch 3 of 4 and run again: the same MLflow run goes on from the saved state with the best metric,
    the LR schedule and the logged steps exactly as an uninterrupted run has them, and no stale state is left."""
    epochs = 4
    cmd = _command(tmp_path, "--max_epochs", str(epochs))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", start_new_session=True)
    models = tmp_path / "models"
    killed_in = None
    try:
        # kill as soon as the first iteration of epoch 3 is logged: its metrics are not committed, its state not
        # saved (a timer here raced the tiny model's second iteration and the epoch-3 save on a quiet machine)
        for line in proc.stdout:
            if f"Epoch: 3/{epochs}, Iter: 1/2" in line:
                killed_in = 3
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_in, "the run ended before it could be killed"
    from bundle.checkpoints import latest_checkpoint

    latest = latest_checkpoint(str(models))
    assert latest == str(models / "checkpoint_epoch=2.pt"), sorted(os.listdir(models))
    client = _client(tmp_path)
    (run,) = _runs(client)
    rid = run.info.run_id
    val = [m.value for m in client.get_metric_history(rid, "val_mean_dice")]

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert f"Resuming from {latest}" in out
    assert f"Epoch: 3/{epochs}" in out and f"Epoch: 2/{epochs}," not in out and "Epoch: 1/" not in out
    assert sorted(p.name for p in models.glob("checkpoint_epoch=*.pt")) == [f"checkpoint_epoch={epochs}.pt"]
    (same,) = _runs(client)  # the same run went on
    assert same.info.run_id == rid and same.info.status == "FINISHED"
    # every step once, in order: nothing of the killed epoch is logged twice
    assert _steps(client, rid, "val_mean_dice") == list(range(1, epochs + 1))
    assert _steps(client, rid, "loss") == list(range(1, 2 * epochs + 1))
    for key in ("margins", "accuracies", "chosen_rewards", "rejected_rewards", "pairs", "disagreement_fraction"):
        assert _steps(client, rid, key) == list(range(1, 2 * epochs + 1)), key  # the DPO core's terms, every step
    fractions = [m.value for m in client.get_metric_history(rid, "disagreement_fraction")]
    assert all(0 <= f < 1 for f in fractions) and max(fractions) > 0, fractions
    # the schedule of an uninterrupted run (cosine over max_epochs), not shifted by the resume
    lr = [m.value for m in client.get_metric_history(rid, [k for k in client.get_run(rid).data.metrics if k.startswith("lr")][0])]
    assert lr == pytest.approx([3e-4 * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, epochs + 1) for _ in "it"])
    # the best metric so far came back with the state: "new best" only when better than epochs 1-2
    val += [m.value for m in client.get_metric_history(rid, "val_mean_dice")][2:]
    for epoch in (3, 4):
        better = val[epoch - 1] > max(val[: epoch - 1])
        assert (f"Got new best metric of val_mean_dice: {val[epoch - 1]}" in out) == better, (epoch, val)
    assert f"val_mean_dice best value: {max(val)}" in out
    # once finished, the same command says so instead of training again, in the same run
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0 and f"is at epoch {epochs} of max_epochs {epochs}" in done.stdout
    assert f"Nothing to train: already at epoch {epochs} of {epochs}" in done.stdout
    (same,) = _runs(client)
    assert same.info.run_id == rid and same.info.status == "FINISHED"
    assert _steps(client, rid, "loss") == list(range(1, 2 * epochs + 1))


def test_bad_inputs_stop_clearly_and_keep_what_was_written(tmp_path):
    assert _run(tmp_path, "--max_epochs", "1").returncode == 0
    before = sorted(os.listdir(tmp_path / "models"))
    runs_before = len(_runs(_client(tmp_path)))

    corrupt = tmp_path / "models" / "sam_tiny.pth"  # the file a tiny run starts from (bundle/networks/bases.py)
    corrupt.write_bytes(b"truncated download")
    proc = _run(tmp_path, "--max_epochs", "2")
    assert proc.returncode != 0
    assert f"{corrupt}: not a readable PyTorch checkpoint" in proc.stderr
    corrupt.unlink()

    missing = tmp_path / "nowhere" / "datalist.json"
    proc = _run(tmp_path, "--max_epochs", "2", "--datalist", str(missing))
    assert proc.returncode != 0 and f"datalist not found: {missing}" in proc.stderr

    proc = _run(tmp_path, "--max_epochs", "2", "--task", "t9")
    assert proc.returncode != 0 and "task must be one of ('t1', 't2', 'organ'), got 't9'" in proc.stderr

    assert sorted(os.listdir(tmp_path / "models")) == before
    assert len(_runs(_client(tmp_path))) == runs_before
