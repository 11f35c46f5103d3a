"""Training logs the deployable bundle to MLflow: a real `mlflow server` on 127.0.0.1 (sqlite store, artifacts in
tmp_path), `python -m monai.bundle run training` with small overrides, then the bundle is downloaded back with
MlflowClient and its model.ts / model.pt are loaded and compared."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from servers import serve_mlflow

pytestmark = pytest.mark.slow


@pytest.fixture
def mlflow_server(tmp_path):
    with serve_mlflow(tmp_path) as url:
        yield url


def test_training_logs_the_bundle_to_mlflow(tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    from monai.bundle import ConfigParser
    from monai.data import load_net_with_metadata

    from bundle.export import example_inputs

    if not (REPO / "configs" / "train.yaml").exists():
        pytest.skip("configs/train.yaml not written yet")
    root = tmp_path / "sampo"  # a copy of the bundle: the training writes models/ and eval/ there, not in the repo
    shutil.copytree(REPO / "configs", root / "configs")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(root / "configs" / "train.yaml"),
        "--bundle_root", str(root), "--model_size", "tiny", "--image_size", "64", "--max_epochs", "1",
        "--batch_size", "2", "--n_prompt_sets", "2", "--synthetic", "{'n_train': 4, 'n_val': 2, 'n_test': 1}",
        "--tracking_uri", mlflow_server, "--experiment_name", "sampo_export_test",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=1200, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    assert (root / "models" / "model.pt").is_file() and (root / "models" / "model.ts").is_file()

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("sampo_export_test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    names = {a.path for a in client.list_artifacts(run_id, "bundle")}
    assert names == {"bundle/models", "bundle/configs"}
    dst = tmp_path / "download"
    dst.mkdir()
    local = client.download_artifacts(run_id, "bundle", str(dst))
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    assert files == ["configs/inference.yaml", "configs/metadata.json", "models/model.pt", "models/model.ts"]
    assert (tmp_path / "artifacts").is_dir()  # stored by the server, not beside the client

    # the downloaded bundle works: model.ts (with its metadata and inference config) and model.pt agree
    ts, meta, extra = load_net_with_metadata(os.path.join(local, "models", "model.ts"),
                                             more_extra_files=["inference.json"])
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 5
    inference = extra["inference.json"]
    inference = json.loads(inference.decode() if isinstance(inference, bytes) else inference)
    assert inference["model_size"] == "tiny" and inference["image_size"] == 64
    parser = ConfigParser()
    parser.read_config(os.path.join(local, "configs", "inference.yaml"))
    parser["bundle_root"] = local
    parser["device"] = "$torch.device('cpu')"
    net = parser.get_parsed_content("network")  # loads models/model.pt strictly
    x = example_inputs(net, batch=2, clicks=(2, 1))
    with torch.no_grad():
        assert torch.allclose(ts(x), net(x), atol=1e-4)
    # what was exported is the trained network (the best validation checkpoint, adapters merged)
    from bundle.checkpoints import load_network
    from bundle.export import merge_lora

    best = load_network(root / "models" / "best_model.pt", model_size="tiny", image_size=64, lora_rank=64)
    with torch.no_grad():
        assert torch.allclose(merge_lora(best)(x), net(x), atol=1e-4)
