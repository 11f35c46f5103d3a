"""The README's commands in order on a default training, with no architecture flag: the trained model carries its
architecture (bundle/networks/trained_weights.py ``architecture``), and every consumer builds from that record.

A bundle folder as a fresh clone has it (a copy of configs/) is trained with the README's command (the testbed's
``small`` SAM at 256 px: the default base without the official checkpoint), shortened to one epoch on a few tiles;
then, without --model_size / --image_size, the README's inference command, the evaluation, a real MONAI Label server
answering the documented infer request, and the MONAI Deploy app on one volume each give a mask of the input's size.
"""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO

pytestmark = pytest.mark.slow

SHORT = ["--max_epochs", "1", "--batch_size", "2", "--n_prompt_sets", "2", "--num_threads", "1",
         "--synthetic", "{'n_train': 4, 'n_val': 2, 'n_test': 2}"]


def bundle_cmd(root, *args, timeout=900):
    """``python -m monai.bundle ARGS`` run in the bundle folder ``root`` as the README runs it from the checkout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=str(root), capture_output=True, text=True,
                       encoding="utf-8", errors="replace", timeout=timeout, env=env)
    assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-5000:])
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_flow")
    shutil.copytree(REPO / "configs", root / "configs")
    bundle_cmd(root, "run", "training", "--config_file", "configs/train.yaml", *SHORT)
    return root


def test_training_records_the_architecture(trained):
    from bundle.checkpoints import recorded_architecture

    for name in ("model.pt", "best_model.pt", "checkpoint_epoch=1.pt"):
        record = recorded_architecture(trained / "models" / name)
        assert record["model_size"] == "small" and record["image_size"] == 256 and record["task"] == "t1", name
    assert recorded_architecture(trained / "models" / "model.pt")["lora_rank"] == 0  # merged
    assert recorded_architecture(trained / "models" / "best_model.pt")["lora_rank"] == 64
    extra = {"metadata.json": ""}
    torch.jit.load(str(trained / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["architecture"]["model_size"] == "small"  # the bundle's metadata


def test_readme_inference_needs_no_architecture_flag(trained, tmp_path):
    img = (np.random.default_rng(0).random((300, 200, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "tile.png")
    (tmp_path / "clicks.json").write_text(json.dumps({"foreground": [[50, 60]], "background": [[10, 10]]}), encoding="utf-8")
    bundle_cmd(trained, "run", "--config_file", "configs/inference.yaml", "--input_image", str(tmp_path / "tile.png"),
               "--clicks", str(tmp_path / "clicks.json"))
    mask = np.array(Image.open(tmp_path / "tile_seg.png"))
    assert mask.shape == (300, 200)


def test_an_override_that_contradicts_the_record_is_refused(trained, tmp_path):
    img = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "tile.png")
    (tmp_path / "clicks.json").write_text(json.dumps({"foreground": [[5, 6]]}), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
                        "--input_image", str(tmp_path / "tile.png"), "--clicks", str(tmp_path / "clicks.json"),
                        "--model_size", "tiny"], cwd=str(trained), capture_output=True, text=True, timeout=600,
                       encoding="utf-8", errors="replace", env=env)
    assert r.returncode != 0
    assert "model.pt: does not fit PromptableSAM(model_size tiny" in r.stderr
    assert "records model_size small, image_size 256" in r.stderr and "--model_size" in r.stderr
    assert not (tmp_path / "tile_seg.png").exists()


def test_evaluation_needs_no_architecture_flag(trained):
    bundle_cmd(trained, "run", "evaluating", "--config_file", "['configs/train.yaml','configs/evaluate.yaml']",
               "--sensitivity", "False", "--eval_max_images", "2", *SHORT[6:])
    summary = json.loads((trained / "eval" / "evaluation" / "summary.json").read_text(encoding="utf-8"))
    assert summary  # the evaluation ran on the trained small model


def test_export_script_needs_no_architecture_flag(trained, tmp_path):
    from bundle.checkpoints import read_state_dict

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint",
                        str(trained / "models" / "best_model.pt"), "--output_dir", str(tmp_path), "--no_verify"],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                       cwd=str(trained), env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_state_dict(tmp_path / "model.pt").keys() == read_state_dict(trained / "models" / "model.pt").keys()


def test_monailabel_serves_the_trained_bundle(trained, tmp_path):
    import requests
    from test_monailabel import monailabel_server, write_studies

    studies = write_studies(tmp_path / "studies", n=1)
    with monailabel_server(tmp_path, studies, trained, conf=[("skip_trainers", "true")]) as server:
        data = {"params": (None, json.dumps({"foreground": [[10, 20]], "background": [[5, 5]]}))}
        r = requests.post(f"{server['url']}/infer/sampo", params={"image": "img0", "output": "image"}, files=data,
                          timeout=300)
        assert r.status_code == 200, (r.text, (tmp_path / "server.log").read_text(encoding="utf-8")[-3000:])
        (tmp_path / "label.png").write_bytes(r.content)
        assert np.array(Image.open(tmp_path / "label.png")).shape == (48, 64)


def test_monailabel_refuses_at_start_a_model_that_does_not_load(trained, tmp_path):
    from test_monailabel import monailabel_server, write_studies

    broken = tmp_path / "bundle"
    shutil.copytree(trained / "configs", broken / "configs")
    (broken / "models").mkdir()
    (broken / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="MONAI Label server exited"):
        with monailabel_server(tmp_path, write_studies(tmp_path / "studies", n=1), broken,
                               conf=[("skip_trainers", "true")], timeout=120):
            pass
    log = (tmp_path / "server.log").read_text(encoding="utf-8")
    assert f"SAMPO: cannot serve the bundle {broken}" in log and "model.pt: not a readable PyTorch checkpoint" in log


def test_deploy_app_runs_the_trained_bundle(trained, tmp_path):
    from test_deploy import deploy_python, run_app

    py = deploy_python()
    in_dir = tmp_path / "input"
    in_dir.mkdir()
    hu = np.random.default_rng(3).normal(0, 300, (40, 32, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([-0.8, -0.8, 2.5, 1.0])), in_dir / "ct.nii.gz")
    (in_dir / "clicks.json").write_text(json.dumps({"foreground": [[12, 10]], "slice_index": 2}), encoding="utf-8")
    run_app(py, "file", in_dir, tmp_path / "output", trained / "models" / "model.ts")
    assert nib.load(tmp_path / "output" / "ct_seg.nii.gz").shape == hu.shape


def test_default_training_logs_the_disagreement_reward(trained):
    """Issue 20: a default run computes the reward over the disagreement region and logs its diagnostics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained / 'eval' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    training = [r for r in runs if "po1" in r.data.metrics]  # the evaluations log to the same store
    assert len(training) == 1, [r.info.run_name for r in runs]
    run = training[0]
    assert run.data.params["reward_region"] == "disagreement"
    history = client.get_metric_history(run.info.run_id, "disagreement_fraction")
    assert history and all(0.0 < m.value <= 1.0 for m in history)
    for name in ("margins", "accuracies", "chosen_rewards", "rejected_rewards"):
        assert client.get_metric_history(run.info.run_id, name), name
