"""The real shared CoNSeP tiles train one short epoch for T1 and for T2 through `monai.bundle run training`."""

import subprocess
import sys

import mlflow
import pytest

from bundle.data.consep import prepare_consep
from conftest import REPO, needs_shared_data

pytestmark = [pytest.mark.slow, pytest.mark.data]


@pytest.fixture(scope="module")
def consep_datalist(tmp_path_factory):
    source = needs_shared_data("consep")
    return prepare_consep(source, tmp_path_factory.mktemp("consep"), type_scheme=4, progress=False)


@pytest.mark.parametrize("task", ["consep_t1", "consep_t2"])
def test_shared_consep_trains_one_short_epoch(consep_datalist, tmp_path, task):
    configs = f"['{REPO}/configs/train.yaml','{REPO}/configs/tasks/{task}.yaml']"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--bundle_root", str(tmp_path), "--datalist", str(consep_datalist), "--train_fraction", "10",
        "--model_size", "tiny", "--lora_rank", "4", "--image_size", "64", "--max_epochs", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/eval/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("sampo").experiment_id])
    assert run.data.params["task"] == ("t1" if task.endswith("t1") else "t2")
    assert run.data.params["datalist"] == str(consep_datalist)
    # 10 % of the 334 training tiles, batch 4: one epoch of 9 iterations, then one validation pass
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 9
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [1]
    assert (tmp_path / "models" / "checkpoint_epoch=1.pt").is_file()
