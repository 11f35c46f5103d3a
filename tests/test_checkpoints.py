"""Adapter-sized training checkpoints (bundle.checkpoints): what they hold, the base they name, and loading them
for evaluation and export; which weights evaluation / inference say they loaded."""

import logging

import pytest
import torch
from test_evaluation import _perturb
from test_network import _official_tiny_checkpoint

from bundle.checkpoints import BaseModel, TrainedWeights, load_network, load_weights
from bundle.evaluation import load_checkpoint
from bundle.export import merge_lora
from bundle.networks import CheckpointError, PromptableSAM

SIZE = 64


def _net(seed=0, checkpoint=None, rank=4):
    return PromptableSAM("tiny", image_size=SIZE, lora_rank=rank, sam_checkpoint=checkpoint, seed=seed)


def _save(net, path, sam_checkpoint=None, seed=0):
    state = {"base": BaseModel(net, sam_checkpoint, seed).state_dict(), "network": TrainedWeights(net).state_dict()}
    torch.save(state, path)
    return state


def _x():
    x = torch.rand(1, 5, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    x[:, 3:] = 0
    x[0, 3, 30, 30] = 1
    return x


def test_checkpoint_holds_what_training_changes_and_loads_for_evaluation_and_export(tmp_path, caplog):
    torch.manual_seed(7)  # the base does not depend on the global RNG: its seed builds it
    trained = _perturb(_net())
    path = tmp_path / "best_model.pt"
    state = _save(trained, path)
    full = trained.state_dict()
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable <= set(state["network"]) < set(full)
    assert all("lora_" in k or ".modules_to_save." in k for k in state["network"])
    assert state["base"]["initialisation"] == "random" and state["base"]["seed"] == 0
    with torch.no_grad():
        want = trained(_x())
        with caplog.at_level(logging.INFO):
            net = load_checkpoint(_net(), str(path))  # evaluation: the configured network, same base
        torch.testing.assert_close(net(_x()), want)
        assert f"loaded trained weights from {path}" in caplog.text
        # export: the network is rebuilt on the base the checkpoint names, then merged
        rebuilt = load_network(path, model_size="tiny", image_size=SIZE, lora_rank=4)
        torch.testing.assert_close(rebuilt(_x()), want)
        torch.testing.assert_close(merge_lora(rebuilt)(_x()), want, atol=1e-4, rtol=1e-4)
    # the training state (optimiser etc. beside the weights) loads the same way
    torch.save({**state, "optimizer": {}}, tmp_path / "checkpoint_epoch=1.pt")
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(_net(), str(tmp_path / "checkpoint_epoch=1.pt"))(_x()), want)


def test_checkpoint_refuses_a_network_on_another_base(tmp_path):
    sam = tmp_path / "sam_tiny.pth"
    _official_tiny_checkpoint(sam)
    path = tmp_path / "best_model.pt"
    state = _save(_perturb(_net(checkpoint=str(sam))), path, sam_checkpoint=str(sam))
    assert state["base"]["sam_checkpoint"] == str(sam) and len(state["base"]["sha256"]) == 64
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_net(), str(path))  # random base instead of sam_tiny.pth
    msg = str(err.value)
    assert str(path) in msg and f"SAM checkpoint {sam} (sha256 {state['base']['sha256'][:12]}" in msg
    assert "random initialisation (seed 0)" in msg and "--sam_checkpoint" in msg
    other = tmp_path / "seed1.pt"
    _save(_perturb(_net(seed=1)), other, seed=1)
    with pytest.raises(CheckpointError, match=r"random initialisation \(seed 1\)"):
        load_checkpoint(_net(), str(other))
    # export rebuilds the base the checkpoint names
    with torch.no_grad():
        assert load_network(path, model_size="tiny", image_size=SIZE, lora_rank=4).initialisation == "sam_tiny.pth"
    sam.unlink()  # the base is gone: say so
    with pytest.raises(CheckpointError, match=f"base SAM checkpoint {sam} .* not found"):
        load_network(path, model_size="tiny", image_size=SIZE, lora_rank=4)


def test_inference_network_does_not_announce_random_weights_it_replaces(tmp_path, caplog):
    merged = merge_lora(_perturb(_net()))
    torch.save(merged.state_dict(), tmp_path / "model.pt")
    with caplog.at_level(logging.INFO):
        net = PromptableSAM("tiny", image_size=SIZE, lora_rank=0)  # configs/inference.yaml: no SAM checkpoint
        load_weights(net, tmp_path / "model.pt")
    assert "RANDOM INITIALISATION" not in caplog.text
    assert f"loaded trained weights from {tmp_path / 'model.pt'}" in caplog.text
