"""The MLflow model registry (bundle/registry.py, bundle.handlers.RegisterBundle): a training run against a real
`mlflow server` on 127.0.0.1 registers its exported bundle, the version tagged with the validation Dice and the run;
MONAI Label (its own environment, .venv-label) and the MONAI Deploy app serve `models:/<name>/<version>` from that
server; a name or version the registry lacks is an error naming it."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO
from servers import serve_mlflow

pytestmark = pytest.mark.slow

NAME = "sampo_registry_test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow server and one tiny training registered in it as version 1 of NAME."""
    tmp = tmp_path_factory.mktemp("registry")
    with serve_mlflow(tmp) as url:
        root = tmp / "sampo"
        shutil.copytree(REPO / "configs", root / "configs")
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
               "--config_file", str(root / "configs" / "train.yaml"), "--bundle_root", str(root),
               "--model_size", "tiny", "--lora_rank", "4", "--image_size", "64", "--max_epochs", "1",
               "--batch_size", "2", "--n_prompt_sets", "2", "--synthetic", "{'n_train': 2, 'n_val': 2, 'n_test': 1}",
               "--tracking_uri", url, "--experiment_name", "registry_test", "--registered_model_name", NAME,
               "--num_threads", "1"]
        env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, encoding="utf-8", errors="replace",
                           timeout=1200, env=env)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
        yield {"url": url, "root": root, "tmp": tmp, "log": r.stdout + r.stderr}


def test_the_exported_bundle_is_a_version_tagged_with_its_validation_dice_and_run(registry):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=registry["url"], registry_uri=registry["url"])
    (run,) = client.search_runs([client.get_experiment_by_name("registry_test").experiment_id])
    run_id = run.info.run_id
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run_id and version.source == f"runs:/{run_id}/bundle"
    best = max(m.value for m in client.get_metric_history(run_id, "val_mean_dice"))
    assert version.tags["training_run_id"] == run_id and version.tags["training_run_name"] == run.info.run_name
    assert float(version.tags["val_mean_dice"]) == pytest.approx(best, abs=1e-6)
    assert version.tags["val_mean_dice_epoch"] == "1"
    assert version.tags["model_size"] == "tiny" and version.tags["image_size"] == "64"
    assert run.data.params["registered_model_name"] == NAME
    assert f"Registered the bundle as models:/{NAME}/1" in registry["log"]


def test_fetch_gives_the_trained_bundle_and_names_what_is_missing(registry, tmp_path):
    from bundle.registry import RegistryError, fetch_bundle

    folder = fetch_bundle(f"models:/{NAME}/1", tmp_path, registry["url"])
    assert folder == str(tmp_path / NAME / "1")
    for name in ("model.pt", "model.ts"):  # the files the training exported
        assert (tmp_path / NAME / "1" / "models" / name).read_bytes() == (registry["root"] / "models" / name).read_bytes()
    assert json.loads((tmp_path / NAME / "1" / "registry.json").read_text(encoding="utf-8"))["version"] == "1"
    assert fetch_bundle(f"models:/{NAME}/latest", tmp_path, registry["url"]) == folder
    with pytest.raises(RegistryError, match=rf"no registered model 'nope' in the MLflow registry at .*"
                                            rf"\(registered models: \['{NAME}'\]\)"):
        fetch_bundle("models:/nope/1", tmp_path, registry["url"])
    with pytest.raises(RegistryError, match=rf"registered model '{NAME}' .* has no version 5 \(versions: \[1\]\)"):
        fetch_bundle(f"models:/{NAME}/5", tmp_path, registry["url"])
    with pytest.raises(RegistryError, match="expected models:/<name>/<version>"):
        fetch_bundle(f"models:/{NAME}", tmp_path, registry["url"])
    assert not (tmp_path / "nope").exists()


def test_monailabel_serves_a_registry_version(registry, tmp_path):
    from test_monailabel import bundle_run_mask, monailabel_server, served_mask, write_studies

    studies = write_studies(tmp_path / "studies", n=1)
    conf = [("mlflow_tracking_uri", registry["url"]), ("registry_dir", tmp_path / "registry")]
    with monailabel_server(tmp_path, studies, f"models:/{NAME}/1", conf) as server:
        import requests

        info = requests.get(f"{server['url']}/info/", timeout=30).json()
        assert info["models"]["sampo"]["type"] == "deepgrow"
        clicks = {"foreground": [[10, 20], [50, 30]], "background": [[5, 5]]}
        mask = served_mask(server, clicks)
    local = tmp_path / "registry" / NAME / "1"  # downloaded with the client of MONAI Label's own environment
    assert (local / "models" / "model.pt").read_bytes() == (registry["root"] / "models" / "model.pt").read_bytes()
    assert np.array_equal(mask, bundle_run_mask({"model_dir": local, "studies": studies}, clicks, tmp_path))


def test_monailabel_refuses_an_unknown_registry_name_naming_it(registry, tmp_path):
    from test_monailabel import monailabel_server, write_studies

    studies = write_studies(tmp_path / "studies", n=1)
    with pytest.raises(RuntimeError, match="MONAI Label server exited") as e:
        with monailabel_server(tmp_path, studies, "models:/nope/3", [("mlflow_tracking_uri", registry["url"])]):
            pass
    assert "models:/nope/3: no registered model 'nope'" in str(e.value)
    assert f"registered models: ['{NAME}']" in str(e.value)


def test_deploy_app_runs_a_registry_version(registry, tmp_path, monkeypatch):
    from test_deploy import bundle_run, deploy_python, run_app

    from bundle.registry import fetch_bundle

    py = deploy_python()
    in_dir = tmp_path / "input"
    in_dir.mkdir()
    hu = np.random.default_rng(3).normal(0, 300, (40, 32, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([-0.8, -0.8, 2.5, 1.0])), in_dir / "ct.nii.gz")
    (in_dir / "clicks.json").write_text(json.dumps({"foreground": [[12, 10], [20, 15]], "background": [[3, 3]],
                                                    "slice_index": 3}), encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["url"])
    run_app(py, "file", in_dir, tmp_path / "output", f"models:/{NAME}/1")
    deployed = np.asarray(nib.load(tmp_path / "output" / "ct_seg.nii.gz").dataobj)
    local = fetch_bundle(f"models:/{NAME}/1", tmp_path / "registry", registry["url"])
    bundle_run(__import__("pathlib").Path(local), in_dir / "ct.nii.gz", in_dir / "clicks.json", tmp_path / "bundle")
    assert np.array_equal(deployed, np.asarray(nib.load(tmp_path / "bundle" / "ct_seg.nii.gz").dataobj))
    r = subprocess.run([py, str(REPO / "scripts" / "deploy_app.py"), "--app", "file", "-i", str(in_dir), "-o",
                        str(tmp_path / "out2"), "-m", "models:/nope/1", "--tracking_uri", registry["url"]],
                       capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode != 0
    assert "deploy_app -m: models:/nope/1: no registered model 'nope'" in r.stderr, r.stderr[-2000:]
