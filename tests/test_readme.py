"""The README says what the bundle does: its evaluation example evaluates the task its training example trains
(the size read from the checkpoint), the learning-rate metric it names is the one the training config logs, and an error
raised inside a bundle config ends the traceback with the bundle's own message."""

import re
import subprocess
import sys

from monai.bundle import ConfigParser

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def _commands(run_id: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [b.replace("\\\n", " ") for b in blocks if f"monai.bundle run {run_id}" in b]


def test_evaluation_example_evaluates_the_trained_task_without_a_size_flag():
    train = next(c for c in _commands("training") if "configs/tasks/" in c)
    evaluate = _commands("evaluating")[0]
    task = re.search(r"configs/tasks/(\w+)\.yaml", train).group(1)
    assert f"configs/tasks/{task}.yaml" in evaluate, f"README trains {task} but evaluates another task"
    # the checkpoint records its architecture: the example needs no size flag (tests/test_default_flow.py runs it)
    assert "--model_size" not in evaluate and "--image_size" not in evaluate


def test_readme_names_the_learning_rate_metric_the_training_logs():
    config = ConfigParser.load_config_file(str(REPO / "configs" / "train.yaml"))
    name = config["train"]["mlflow_handler"]["optimizer_param_names"]
    assert f"`{name}_group_0`" in README  # MONAI's MLFlowHandler logs optimizer params as <name>_group_<i>


def test_uncaught_error_ends_with_the_bundles_message():
    code = ("import bundle\n"
            "try:\n    raise FileNotFoundError('checkpoint not found: models/x.pt')\n"
            "except Exception as e:\n    raise RuntimeError('Failed to evaluate ConfigExpression: $...') from e\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, encoding="utf-8")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == "FileNotFoundError: checkpoint not found: models/x.pt"
