"""The SAMPO trainer as an Ignite engine, built from configs/train.yaml."""

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from conftest import REPO


def _trainer(tmp_path, **overrides):
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    parser.update(
        {
            "bundle_root": str(tmp_path),
            "model_size": "tiny",
            "lora_rank": 4,
            "image_size": 64,
            "batch_size": 2,
            "max_epochs": 1,
            "synthetic": {"n_train": 2, "n_val": 1, "n_test": 1},
            "train#handlers": [],
            **overrides,
        }
    )
    parser.get_parsed_content("initialize")
    return parser.get_parsed_content("train#trainer"), parser.get_parsed_content("network")


def test_gradients_reach_only_trainable_parameters(tmp_path):
    trainer, net = _trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _grads(engine):
        seen.update({n: p.grad for n, p in net.named_parameters()})

    trainer.run()
    assert seen, "no iteration ran"
    for name, param in net.named_parameters():
        if not param.requires_grad:
            assert seen[name] is None, f"frozen {name} received a gradient"
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    trained = [n for n, g in seen.items() if g is not None and g.abs().sum() > 0]
    assert any("lora_B" in n for n in trained) and any("mask_decoder" in n for n in trained)
    out = trainer.state.output[0]
    assert {"loss", "po1", "po2", "sup", "reward_margin", "preference_accuracy", "pred", "label"} <= set(out)
    # the first step compares the actor with itself: every preference pair costs exactly log 2
    assert abs(float(out["po1"]) - 0.6931472) < 1e-5


def test_ablation_switches_reach_the_loss(tmp_path):
    trainer, _ = _trainer(tmp_path, use_po1=False, use_po2=False)
    trainer.run()
    out = trainer.state.output[0]
    assert abs(float(out["loss"]) - float(out["sup"])) < 1e-6  # SUP only: the supervised-only baseline


def test_latest_checkpoint_skips_a_file_truncated_by_a_kill(tmp_path):
    from bundle.engines import latest_checkpoint

    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_epoch=2.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes((tmp_path / "checkpoint_epoch=10.pt").read_bytes()[:40])
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(str(tmp_path / "none")) is None
