"""Config layout (issue 8): the papers' settings overlay, and MLflow params derived from the executed config
(bundle.tracking.config_params) rather than listed key by key."""

import pytest
from monai.bundle import ConfigParser

from conftest import REPO

CONFIGS = REPO / "configs"
TINY = {"model_size": "tiny", "image_size": 64, "sam_checkpoint": None, "batch_size": 2, "max_epochs": 1,
        "synthetic": {"n_train": 4, "n_val": 2, "n_test": 1}}
# the params configs/train.yaml listed one by one before they were derived: none may go missing
LISTED_BEFORE = {
    "task", "datalist", "train_fraction", "image_size", "model_size", "initialisation", "lora_rank", "lora_targets",
    "trainable_parts", "n_prompt_sets", "max_pos", "max_neg", "beta", "lambda", "lambda_dw", "lambda_iou", "use_po1",
    "use_po2", "use_sup", "use_iou_head", "loglik_reduction", "learning_rate", "weight_decay", "batch_size",
    "accumulate_grad_batches", "amp", "activation_checkpointing", "max_epochs", "seed", "num_threads", "eval_pos",
    "eval_neg", "eval_seed",
}


def _parser(tmp_path, *files, **overrides):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    parser.update({"bundle_root": str(tmp_path), **overrides})
    return parser


def test_paper_overlay_gives_the_papers_training_settings(tmp_path):
    parser = _parser(tmp_path, "train.yaml", "experiments/paper.yaml")
    got = {k: parser.get_parsed_content(k) for k in ("base", "model_size", "image_size", "lora_rank", "max_pos",
                                                      "max_neg", "lambda_dw", "learning_rate", "weight_decay",
                                                      "batch_size", "max_epochs")}
    assert got == {"base": "official", "model_size": "vit_b", "image_size": 224, "lora_rank": 64, "max_pos": 3,
                   "max_neg": 3, "lambda_dw": 1.0, "learning_rate": 3e-4, "weight_decay": 0.01, "batch_size": 14,
                   "max_epochs": 10}
    assert parser.get_parsed_content("sam_checkpoint") == str(tmp_path / "models" / "sam_vit_b_01ec64.pth")
    # the settings reach what they configure: AdamW's lr / weight decay, the cosine's length, the loader's batch
    assert parser["optimizer"]["_target_"] == "torch.optim.AdamW"
    assert (parser["optimizer"]["lr"], parser["optimizer"]["weight_decay"]) == ("@learning_rate", "@weight_decay")
    assert parser["lr_scheduler"]["T_max"] == "@max_epochs" and parser["train"]["dataloader"]["batch_size"] == "@batch_size"
    # without the official checkpoint it stops instead of training from random weights (tiny: quick to build)
    parser["model_size"] = "tiny"
    with pytest.raises(RuntimeError) as err:  # MONAI's "Failed to instantiate", caused by the network's own error
        parser.get_parsed_content("network_def")
    cause = err.value.__cause__
    assert isinstance(cause, FileNotFoundError)
    assert str(cause).startswith(f"SAM checkpoint not found: {tmp_path / 'models' / 'sam_tiny.pth'}")


def test_paper_overlay_keeps_a_task_config_and_the_command_line_on_top(tmp_path):
    parser = _parser(tmp_path, "train.yaml", "tasks/consep_t2.yaml", "experiments/paper.yaml", batch_size=2,
                     accumulate_grad_batches=7)
    assert parser.get_parsed_content("task") == "t2" and parser.get_parsed_content("stain_aug_prob") == 0.5
    assert (parser.get_parsed_content("batch_size"), parser.get_parsed_content("max_epochs")) == (2, 10)


@pytest.fixture
def train_params(tmp_path):
    """The MLflow params of configs/train.yaml (tiny network, small synthetic set) with one new top-level setting
    given on the command line, as `--my_new_setting 7` would."""
    parser = _parser(tmp_path, "train.yaml", **TINY, my_new_setting=7, my_new_list=["a", "b"])
    return parser.get_parsed_content("hyperparameters")


def test_a_new_top_level_setting_is_a_param_without_being_listed(train_params):
    assert train_params["my_new_setting"] == 7 and train_params["my_new_list"] == "a,b"


def test_derived_params_hold_every_param_listed_before_with_its_value(train_params, tmp_path):
    assert LISTED_BEFORE <= set(train_params)
    assert train_params["lora_targets"] == "qkv,proj,lin1,lin2"
    assert train_params["trainable_parts"] == "prompt_encoder,mask_decoder"
    assert train_params["initialisation"] == "random" and train_params["amp"] is False
    assert train_params["datalist"] == str(tmp_path / "data" / "synthetic" / "datalist.json")
    assert train_params["synthetic.n_train"] == 4  # a dict of values: one param per entry
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in train_params.values())


def test_workflows_objects_and_bookkeeping_are_not_params(train_params):
    for key in ("imports", "initialize", "training", "run", "network", "network_def", "loss", "optimizer",
                "lr_scheduler", "load", "resize", "train", "validate", "device", "hyperparameters"):
        assert not any(p == key or p.startswith(key + ".") for p in train_params), key
    assert "resume_from" not in train_params  # None fresh, a path on resume: it would change the run's params


def test_config_params_never_builds_an_object_it_does_not_log(tmp_path):
    parser = ConfigParser({
        "imports": ["$import bundle", "$import bundle.tracking"],
        "rate": 0.5,
        "label": "$'x' * 2",
        "items": "$[1, 2]",
        "thing": "$object()",  # an expression giving an object: resolved (cheaply) but not a param
        "section": {"_target_": "builtins.ZeroDivisionError"},  # never instantiated
        "steps": [{"_target_": "builtins.ZeroDivisionError"}],
        "not_rank_zero": False,
        "hyperparameters": "$bundle.tracking.config_params(exclude=['rate'], extra=@rate * 2)",
    })
    assert parser.get_parsed_content("hyperparameters") == {"label": "xx", "items": "1,2", "extra": 1.0}


def test_more_than_100_params_are_all_logged(tmp_path):
    import mlflow
    from ignite.engine import Engine

    from bundle.tracking import MLFlowHandler, sqlite_uri

    uri = sqlite_uri(str(tmp_path / "mlflow.db"))
    params = {f"p{i:03d}": i for i in range(250)}
    handler = MLFlowHandler(tracking_uri=uri, experiment_name="many", run_name="r", experiment_param=params,
                            iteration_log=False, epoch_log=False, close_on_complete=True)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)  # MONAI logs them in one log_batch; a store takes at most 100 per batch
    run = mlflow.tracking.MlflowClient(uri).search_runs([handler.experiment.experiment_id])[0]
    assert {k: int(v) for k, v in run.data.params.items() if k.startswith("p")} == params


@pytest.mark.parametrize("device, pinned", [("$torch.device('cpu')", False), ("$torch.device('cuda:0')", True),
                                            ("cpu", False), ("cuda", True)])
def test_gpu_runs_pin_batches_and_copy_them_without_blocking(tmp_path, device, pinned):
    """Every loader of a training / evaluation config pins its batches, and every engine copies them with
    non_blocking, exactly when the device is a GPU (parsed, not run: no GPU here). ``device`` may be a torch.device
    or a string (MONAI Label's bundle train task overrides it with "cpu" / "cuda")."""
    import torch

    for files, loaders, engines in (
        (("train.yaml",), ("train#dataloader", "validate#dataloader"), ("train#trainer", "validate#evaluator")),
        (("train.yaml", "pretrain.yaml"), ("base_eval#dataloader",), ("pretrain#trainer", "base_eval#evaluator")),
        (("train.yaml", "semi_supervised.yaml"), ("semi#unlabelled_dataloader",), ("semi#trainer",)),
        (("train.yaml", "evaluate.yaml"), ("evaluate#dataloader",), ("evaluate#evaluator",)),
    ):
        parser = _parser(tmp_path, *files, device=device)
        assert parser.get_parsed_content("pin_memory") is pinned, files
        for key in loaders:
            assert parser[key]["pin_memory"] == "@pin_memory", (files, key)
        for key in engines:
            assert parser[key]["non_blocking"] == "@pin_memory", (files, key)
    loader = _parser(tmp_path, "train.yaml", **TINY).get_parsed_content("train#dataloader")
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.pin_memory is False  # this CPU
