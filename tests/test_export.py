"""Export: LoRA merge -> models/model.pt, TorchScript models/model.ts (MONAI bundle archive), scripts/export.py,
and the MONAI bundle checks of configs/metadata.json and configs/inference.yaml."""

import json
import subprocess
import sys

import pytest
import torch

from bundle.checkpoints import build_network, load_network, read_state_dict
from bundle.export import VERIFY_CASES, example_inputs, export_torchscript, merge_lora, write_bundle
from bundle.networks import CheckpointError, PromptableSAM
from conftest import REPO


def trained_like(model_size="tiny", image_size=64, lora_rank=4, seed=0) -> PromptableSAM:
    """A LoRA network whose adapters and trainable parts moved away from their initial values (as after training)."""
    torch.manual_seed(seed)
    net = build_network(model_size, image_size, lora_rank=lora_rank)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def save_training_checkpoint(net, path):
    """A checkpoint as the trainer's MONAI CheckpointSaver writes it ({'network': ..., 'optimizer': ...})."""
    from ignite.engine import Engine, Events
    from monai.handlers import CheckpointSaver

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    engine = Engine(lambda e, b: None)
    CheckpointSaver(str(path), {"network": net, "optimizer": opt}, save_final=True, final_filename="ckpt.pt").attach(
        engine
    )
    engine.add_event_handler(Events.STARTED, lambda e: None)
    engine.run([0], max_epochs=1)
    return path / "ckpt.pt"


def test_merge_lora_gives_the_same_function_and_loads_strictly(tmp_path):
    net = trained_like()
    merged = merge_lora(net)
    assert merged.lora_rank == 0 and net.lora_rank == 4  # the original keeps its adapters
    x = example_inputs(net, batch=2, clicks=(2, 1))
    with torch.no_grad():
        assert torch.allclose(net(x), merged(x), atol=1e-5)
        with net.reference():  # the adapters matter: the base model gives something else
            assert not torch.allclose(net(x), merged(x), atol=1e-3)
    torch.save(merged.state_dict(), tmp_path / "model.pt")
    fresh = PromptableSAM("tiny", image_size=64, lora_rank=0)
    fresh.load_state_dict(read_state_dict(tmp_path / "model.pt"), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), merged(x))


def test_torchscript_matches_eager_for_any_batch_and_click_count(tmp_path):
    from monai.data import load_net_with_metadata

    merged = merge_lora(trained_like())
    path = export_torchscript(merged, tmp_path / "model.ts", {"name": "t"}, {"image_size": 64}, verify=True)
    ts, meta, extra = load_net_with_metadata(path, more_extra_files=["inference.json"])
    assert meta["name"] == "t" and json.loads(extra["inference.json"]) == {"image_size": 64}
    cases = [*VERIFY_CASES, (1, (0, 0)), (2, (1, 5)), (5, (4, 0)), (1, (16, 0))]
    with torch.no_grad():
        for i, (batch, clicks) in enumerate(cases):
            x = example_inputs(merged, batch, clicks, seed=i)
            eager, script = merged(x), ts(x)
            assert script.shape == (batch, 1, 64, 64)
            assert torch.allclose(script, eager, rtol=1e-4, atol=1e-4), (batch, clicks)
        # the trace fixes the spatial size: other sizes are refused, not silently wrong
        with pytest.raises(Exception, match="expected input"):
            ts(torch.rand(1, 5, 96, 96))
        with pytest.raises(Exception, match="expected input"):
            ts(torch.rand(1, 4, 64, 64))


def test_export_bundle_writes_model_pt_and_ts(tmp_path):
    from monai.data import load_net_with_metadata

    net = trained_like()
    out = write_bundle(net, tmp_path / "b", REPO)
    assert set(out) == {"model.pt", "model.ts"}
    ts, meta, extra = load_net_with_metadata(out["model.ts"], more_extra_files=["inference.json"])
    inference = json.loads(extra["inference.json"])
    assert inference["model_size"] == "tiny" and inference["image_size"] == 64
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 5
    # the configs written beside the models describe the exported network
    written = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert written["network_data_format"] == meta["network_data_format"]
    # model.pt is what configs/inference.yaml's network_def loads strictly
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(tmp_path / "b" / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(tmp_path / "b")
    parser["device"] = "$torch.device('cpu')"
    loaded = parser.get_parsed_content("network")
    x = example_inputs(net, 1, (1, 1))
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)
        assert torch.allclose(ts(x), net(x), atol=1e-4)


def test_export_script_from_training_checkpoint(tmp_path):
    net = trained_like()
    ckpt = save_training_checkpoint(net, tmp_path)
    assert "network" in torch.load(ckpt, weights_only=True)
    out_dir = tmp_path / "models"
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint", str(ckpt), "--model_size", "tiny",
         "--image_size", "64", "--lora_rank", "4", "--output_dir", str(out_dir)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out_dir / "model.pt").is_file() and (out_dir / "model.ts").is_file()
    merged = PromptableSAM("tiny", image_size=64, lora_rank=0)
    merged.load_state_dict(read_state_dict(out_dir / "model.pt"), strict=True)
    ts = torch.jit.load(str(out_dir / "model.ts"))
    x = example_inputs(net, 2, (3, 2))
    with torch.no_grad():
        assert torch.allclose(merged.eval()(x), net(x), atol=1e-5)
        assert torch.allclose(ts(x), net(x), atol=1e-4)


def test_export_script_help():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "export.py"), "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--lora_rank" in r.stdout


def test_checkpoint_of_another_size_names_file_and_mismatch(tmp_path):
    ckpt = save_training_checkpoint(trained_like("tiny", 64, 4), tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_network(ckpt, model_size="vit_b", image_size=64, lora_rank=4)
    msg = str(e.value)
    assert str(ckpt) in msg and "model_size tiny" in msg and "shape mismatches" in msg and "vit_b" in msg
    with pytest.raises(CheckpointError, match="lora_rank 4"):
        load_network(ckpt, model_size="tiny", image_size=64, lora_rank=8)
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), "--checkpoint", str(ckpt), "--model_size", "vit_b",
         "--image_size", "64", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
    )
    assert r.returncode == 2 and str(ckpt) in r.stderr and "does not fit" in r.stderr
    assert not (tmp_path / "out").exists()


def test_inference_config_refuses_a_model_pt_of_another_size(tmp_path):
    from monai.bundle import ConfigParser

    write_bundle(trained_like("tiny", 64, 4), tmp_path / "b", REPO, verify=False)
    parser = ConfigParser()
    parser.read_config(str(tmp_path / "b" / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(tmp_path / "b")
    parser["image_size"] = 96  # a network of another shape than models/model.pt
    with pytest.raises(Exception) as e:
        parser.get_parsed_content("network")
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    assert any("model.pt: does not fit PromptableSAM" in m for m in chain), chain


def test_verify_net_in_out_and_metadata_schema(tmp_path):
    """`monai.bundle verify_net_in_out` on the repo's configs, and verify_metadata against a local schema copy."""
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.yaml", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data shape of network is verified with no error" in (r.stdout + r.stderr)

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(BUNDLE_METADATA_SCHEMA), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", "configs/metadata.json",
         "--filepath", str(schema)],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metadata is verified with no error" in (r.stdout + r.stderr)
    # the schema copy does reject a metadata file that misses required fields
    bad = tmp_path / "bad.json"
    meta = json.loads((REPO / "configs" / "metadata.json").read_text(encoding="utf-8"))
    del meta["network_data_format"]["inputs"]["image"]["value_range"]
    bad.write_text(json.dumps(meta), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(bad), "--filepath", str(schema)],
        cwd=REPO, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert r.returncode != 0 and "against schema" in r.stderr  # MONAI's validation error (names the schema)


# The MONAI bundle metadata requirements (MONAI bundle specification, metadata schema of 2024-07-25), written here
# as a JSON schema so that verify_metadata runs offline: `verify_metadata --filepath` uses an existing file instead
# of downloading the URL in the metadata's "schema" field.
_TENSOR = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"],
    "properties": {
        "type": {"type": "string"},
        "format": {"type": "string"},
        "num_channels": {"type": "integer"},
        "spatial_shape": {"type": "array", "items": {"type": ["string", "integer"]}},
        "dtype": {"type": "string"},
        "value_range": {"type": "array", "items": {"type": "number"}},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {"type": "object"},
    },
}
_ARG = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}, _TENSOR]}
_IO = {
    "type": "object",
    "required": ["inputs", "outputs"],
    "properties": {
        "inputs": {"type": "object", "patternProperties": {"^.+$": _ARG}},
        "outputs": {"type": "object", "patternProperties": {"^.+$": _ARG}},
        "post_processed_outputs": {"type": "object", "patternProperties": {"^.+$": _ARG}},
    },
}
_STRINGS = ("schema", "version", "monai_version", "pytorch_version", "numpy_version", "task", "description",
            "authors", "copyright", "data_source", "data_type", "image_classes", "label_classes", "pred_classes",
            "intended_use")
BUNDLE_METADATA_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2019-09/schema",
    "type": "object",
    "required": ["schema", "version", "monai_version", "pytorch_version", "numpy_version",
                 "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"],
    "properties": {
        **{k: {"type": "string"} for k in _STRINGS},
        "changelog": {"type": "object"},
        "required_packages_version": {"type": "object"},
        "eval_metrics": {"type": "object"},
        "references": {"type": "array", "items": {"type": "string"}},
        "supported_apps": {"type": "object"},
        "network_data_format": _IO,
    },
    "patternProperties": {"^[_a-zA-Z0-9]+_data_format$": _IO},
}
