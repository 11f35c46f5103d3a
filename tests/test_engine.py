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
    trainer, net = _trainer(tmp_path, synthetic={"n_train": 4, "n_val": 1, "n_test": 1})  # 2 iterations
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    seen = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _grads(engine):
        seen.append({n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()})

    trainer.run()
    assert len(seen) == 2, "expected two iterations"
    for name, param in net.named_parameters():
        if not param.requires_grad:
            assert all(s[name] is None for s in seen), f"frozen {name} received a gradient"
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    # every trainable group gets a gradient (LoRA A only once B has left zero, i.e. in the second step)
    moved = {n for n, g in seen[1].items() if g is not None and g.abs().sum() > 0}
    groups = {
        "LoRA A": lambda n: "lora_A" in n,
        "LoRA B": lambda n: "lora_B" in n,
        "prompt encoder": lambda n: "prompt_encoder.modules_to_save" in n,
        "mask decoder": lambda n: "mask_decoder.modules_to_save" in n and "iou_prediction_head" not in n,
        "IoU head": lambda n: "iou_prediction_head" in n and "modules_to_save" in n,
    }
    for group, member in groups.items():
        assert any(member(n) for n in moved), f"no gradient reached the {group}"
    # the optimiser holds exactly the trainable parameters (AdamW would silently skip frozen ones)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in net.parameters() if p.requires_grad}
    out = trainer.state.output[0]
    assert {"loss", "po1", "po2", "sup", "iou_head", "margins", "accuracies", "pred", "label"} <= set(out)
    # training Dice covers every prompt set: one prediction channel per set, G repeated
    assert out["pred"].shape[0] == 4 and out["label"].shape == out["pred"].shape


def test_first_step_compares_the_actor_with_itself(tmp_path):
    trainer, _ = _trainer(tmp_path)
    trainer.run()
    # every preference pair costs exactly log 2 while actor and reference are the same model
    assert abs(float(trainer.state.output[0]["po1"]) - 0.6931472) < 1e-5


def test_iou_head_mse_falls_on_a_fixed_batch(tmp_path):
    """The head that picks the output mask is trained towards the candidates' true IoUs (SAM's objective)."""
    from bundle.engines import SAMPOTrainer
    from bundle.networks import PromptableSAM
    from bundle.preference import SAMPOLoss

    torch.manual_seed(0)
    net = PromptableSAM("tiny", 64, lora_rank=4)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 16:40, 10:44] = 1
    batch = {"image": torch.rand(2, 3, 64, 64, generator=g), "label": target,
             "points": torch.randint(0, 64, (2, 4, 6, 2), generator=g).float(),
             "point_labels": torch.randint(0, 2, (2, 4, 6), generator=g)}
    trainer = SAMPOTrainer("cpu", 1, [batch], net, opt, SAMPOLoss(), decollate=False)
    head = [p for n, p in net.named_parameters() if "iou_prediction_head" in n and p.requires_grad]
    mse = []
    for _ in range(15):
        out = trainer._iteration(trainer, batch)
        mse.append(float(out["iou_head"]))
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    assert mse[-1] < 0.5 * mse[0], mse
    # switched off, the head gets no gradient from the loss
    net.zero_grad(set_to_none=True)
    trainer.loss_function = SAMPOLoss(use_iou_head=False)
    out = trainer._iteration(trainer, batch)
    assert float(out["iou_head"]) == 0.0


def test_ablation_switches_reach_the_loss(tmp_path):
    trainer, _ = _trainer(tmp_path, use_po1=False, use_po2=False)
    trainer.run()
    out = trainer.state.output[0]
    # SUP (+ the IoU head, trained in every variant) only: the supervised-only baseline
    assert abs(float(out["loss"]) - float(out["sup"]) - float(out["iou_head"])) < 1e-6
    trainer, _ = _trainer(tmp_path, use_po1=False, use_po2=False, use_iou_head=False)
    trainer.run()
    out = trainer.state.output[0]
    assert abs(float(out["loss"]) - float(out["sup"])) < 1e-6


def test_latest_checkpoint_skips_a_file_truncated_by_a_kill(tmp_path):
    from bundle.checkpoints import latest_checkpoint

    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_epoch=2.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes((tmp_path / "checkpoint_epoch=10.pt").read_bytes()[:40])
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_epoch=10.pt")
    assert latest_checkpoint(str(tmp_path / "none")) is None


# -- gradient accumulation and mixed precision (issue 12) ---------------------------------------------------------
def _fixed_batches(n_images: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n_images, 1, 64, 64)
    for i in range(n_images):
        target[i, :, 8 + 4 * i:36 + 2 * i, 10:44 - 3 * i] = 1
    return {"image": torch.rand(n_images, 3, 64, 64, generator=g), "label": target,
            "points": torch.randint(0, 64, (n_images, 4, 6, 2), generator=g).float(),
            "point_labels": torch.randint(0, 2, (n_images, 4, 6), generator=g)}


def _split(batch: dict, size: int) -> list[dict]:
    n = batch["image"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def _sup_trainer(batches, lr=0.5, **kwargs):
    """A tiny SAMPO trainer with the SUP + IoU-head objective (pooled per candidate, so batches add up exactly)."""
    from bundle.engines import SAMPOTrainer
    from bundle.networks import PromptableSAM
    from bundle.preference import SAMPOLoss

    torch.manual_seed(0)
    net = PromptableSAM("tiny", 64, lora_rank=4)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    loss = SAMPOLoss(use_po1=False, use_po2=False)
    return SAMPOTrainer("cpu", 1, batches, net, opt, loss, decollate=False, **kwargs), net


def _trained(net):
    return {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}


def test_accumulated_small_batches_give_the_step_of_one_large_batch():
    batch = _fixed_batches(4)
    large, large_net = _sup_trainer([batch])
    large.run()
    small, small_net = _sup_trainer(_split(batch, 2), accumulate_grad_batches=2)
    start = _trained(small_net)
    after_first = []
    small.add_event_handler(Events.ITERATION_COMPLETED, lambda e: after_first.append(_trained(small_net))
                            if e.state.iteration == 1 else None)
    small.run()
    # no optimiser step after the first half of the group; after the second, the step of the batch of 4
    assert all(torch.equal(after_first[0][n], start[n]) for n in start)
    expected, got = _trained(large_net), _trained(small_net)
    assert any(not torch.equal(expected[n], start[n]) for n in start), "the large batch did not move the network"
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-6, msg=n)
    # without accumulation the same two batches take two steps and end elsewhere
    two_steps, two_net = _sup_trainer(_split(batch, 2))
    two_steps.run()
    assert any(not torch.allclose(_trained(two_net)[n], expected[n], atol=1e-5) for n in expected)


def test_the_last_short_group_of_an_epoch_still_steps():
    trainer, _ = _sup_trainer(_split(_fixed_batches(6), 2), accumulate_grad_batches=2)  # 3 batches: groups 2 + 1
    trainer.max_epochs = trainer.state.max_epochs = 2
    steps, groups = [], []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(trainer.state.iteration), step(*a, **k))[1]
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: groups.append(e.accumulation_group()))
    trainer.run()
    assert steps == [2, 3, 5, 6]  # groups never cross the epoch boundary
    assert [g[2] for g in groups] == [2, 2, 1, 2, 2, 1]


def test_bfloat16_amp_loss_is_finite_and_close_to_float32():
    batch = _fixed_batches(2)
    losses, grads = {}, {}
    for amp in (False, True):
        trainer, net = _sup_trainer([batch], amp=amp)
        trainer.loss_function.use_po1 = trainer.loss_function.use_po2 = True  # the full SAMPO loss
        _, _, out = trainer.compute_loss(batch["image"], batch["label"], batch["points"], batch["point_labels"])
        out["loss"].backward()
        assert out["loss"].dtype == torch.float32
        losses[amp] = float(out["loss"])
        grads[amp] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    assert torch.isfinite(torch.tensor(losses[True])) and torch.isfinite(grads[True]).all()
    assert abs(losses[True] - losses[False]) <= 0.02 * abs(losses[False]), losses
    cosine = torch.nn.functional.cosine_similarity(grads[True], grads[False], dim=0)
    assert cosine > 0.95, float(cosine)


def test_bad_accumulation_and_amp_settings_say_what_is_allowed(tmp_path):
    import re

    import pytest

    for overrides, match in [
        ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches must be an integer >= 1.*got 0"),
        ({"accumulate_grad_batches": 2.5}, r"accumulate_grad_batches must be an integer >= 1.*got 2.5"),
        ({"amp": True, "amp_dtype": "float16"}, r"amp_dtype float16 needs a CUDA device.*use amp_dtype bfloat16"),
        ({"amp_dtype": "fp8"}, r"amp_dtype must be one of \['bfloat16', 'float16'\], got 'fp8'"),
    ]:
        with pytest.raises(Exception) as info:  # MONAI's "Failed to instantiate" wraps the trainer's error
            _trainer(tmp_path, **overrides)
        chain, e = [], info.value
        while e is not None:
            chain, e = chain + [str(e)], e.__cause__ or e.__context__
        assert re.search(match, "\n".join(chain)), chain
