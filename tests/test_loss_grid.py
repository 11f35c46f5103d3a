"""Issue 20 section 3: SAMPO's, the human pairs' and the ranked loss on the decoder's grid (``loss_size``).

On a grid of side s the loss is the loss of the downsampled problem: the logits resized to s x s, G area-averaged
to it (soft), the candidates binarised there; with ``loss_size`` None (or G's own size) nothing changes.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundle.engines import SAMPOTrainer, decode_actor_and_reference
from bundle.networks import PromptableSAM
from bundle.networks.decoding import loss_grid, to_grid, upsample
from bundle.preference import SAMPOLoss


def _batch(seed=0, n=2, size=64):
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, 1, size, size)
    target[0, :, 9:37, 11:45] = 1  # edges off the 4-px grid: soft cells on a 16 x 16 grid
    target[1, :, 30:61, 3:22] = 1
    return (torch.rand(n, 3, size, size, generator=g), target,
            torch.randint(0, size, (n, 4, 6, 2), generator=g).float(), torch.randint(0, 2, (n, 4, 6), generator=g))


def _trainer(loss_size, **loss):
    torch.manual_seed(0)
    net = PromptableSAM("tiny", 64, lora_rank=4)
    with torch.no_grad():  # adapters away from zero, so that actor and reference differ and margins are not 0
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    fn = SAMPOLoss(beta=0.1, reward_region="disagreement", **loss)
    return SAMPOTrainer("cpu", 1, [{}], net, opt, fn, decollate=False, loss_size=loss_size), net, fn


def test_the_loss_on_a_grid_is_the_loss_of_the_downsampled_problem():
    images, target, points, labels = _batch()
    trainer, net, fn = _trainer(16)
    preds, goal, out = trainer.compute_loss(images, target, points, labels)
    assert preds.shape == (2, 4, 64, 64) and goal.shape == preds.shape  # metrics at G's size
    low, iou_pred, ref_low = decode_actor_and_reference(net, images, points, labels, (64, 64))
    soft = F.interpolate(target, size=(16, 16), mode="area")[:, 0]
    assert 0 < float(((soft > 0) & (soft < 1)).float().mean())  # the grid really averages
    expected = fn(F.interpolate(low.flatten(0, 1), size=(16, 16), mode="bilinear").view(2, 4, 3, 16, 16),
                  F.interpolate(ref_low.flatten(0, 1), size=(16, 16), mode="bilinear").view(2, 4, 3, 16, 16),
                  soft, iou_pred)
    for key in ("loss", "po1", "po2", "sup", "iou_head", "margins", "disagreement_fraction", "pairs"):
        assert torch.allclose(out[key], expected[key], atol=1e-6), key
    assert float(out["pairs"]) > 0 and float(out["margins"].abs()) > 0
    # the mining's IoU thresholds the soft G at 0.5 (not at > 0, which would grow every object by its border cells)
    from bundle.metrics import overlap

    masks = upsample(low, (16, 16)).detach() > 0
    assert torch.equal(expected["iou"], overlap(masks, (soft > 0.5)[:, None, None])[1])
    assert not torch.equal(expected["iou"], overlap(masks, soft[:, None, None])[1])


def test_no_grid_and_the_targets_own_size_leave_the_loss_unchanged():
    images, target, points, labels = _batch(1)
    outs = []
    for loss_size in (None, 64):
        trainer, _, _ = _trainer(loss_size)
        outs.append(trainer.compute_loss(images, target, points, labels))
    (p0, _, a), (p1, _, b) = outs
    assert torch.equal(p0, p1)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_grid_step_is_cheaper_and_trains():
    """The decoder's grid has 16x fewer pixels: the loss and its backward see (64 / 16)^2 fewer values."""
    images, target, points, labels = _batch(2)
    trainer, net, _ = _trainer(16)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    out = trainer._iteration(trainer, {"image": images, "label": target, "points": points, "point_labels": labels})
    assert torch.isfinite(out["loss"])
    moved = [n for n, p in net.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and any("lora" in n for n in moved)


@pytest.mark.parametrize("bad", [0, -4, 2.5, "16", True])
def test_a_bad_loss_size_is_refused_before_any_step(bad):
    with pytest.raises(ValueError, match=r"loss_size must be a positive number of pixels or None.*got"):
        _trainer(bad)


def test_to_grid_is_the_area_mean_and_keeps_a_mask_of_the_grids_size():
    m = torch.zeros(1, 8, 8)
    m[0, :4, :2] = 1
    g = to_grid(m, (2, 2))
    assert torch.allclose(g, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    assert to_grid(m, (8, 8)) is m
    assert loss_grid(None, (8, 9)) == (8, 9) and loss_grid(4, (8, 9)) == (4, 4)


def test_the_human_pairs_and_the_ranked_loss_run_on_the_grid(tmp_path):
    """The trainers of train.yaml (with a human pair) and semi_supervised.yaml, one tiny epoch with loss_size 16."""
    from monai.bundle import ConfigParser

    from bundle.data.datalist import load_datalist
    from bundle.data.synthetic import ensure_dataset
    from conftest import REPO

    data = ensure_dataset(str(tmp_path / "data"), n_train=2, n_val=1, n_test=1)
    items = []
    for i, item in enumerate(load_datalist(data, "training")):
        proposal = np.zeros((256, 256), np.uint8)
        proposal[:40, :40] = 1
        np.save(tmp_path / f"p{i}.npy", proposal)
        items.append({**item, "proposal": str(tmp_path / f"p{i}.npy"),
                      "clicks": {"foreground": [[100, 120]], "background": [[3, 3]]}})
    tiny = {"model_size": "tiny", "lora_rank": 4, "image_size": 64, "batch_size": 2, "max_epochs": 1,
            "n_prompt_sets": 2, "loss_size": 16}
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(tmp_path / "human"), "train#handlers": [], "train#dataset#data": items, **tiny})
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.loss_size == 16
    trainer.run()
    out = trainer.state.output[0]
    assert float(out["human_pairs"]) > 0 and np.isfinite(float(out["human_margins"]))
    assert out["pred"].shape[-2:] == (64, 64)

    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.yaml"), str(REPO / "configs" / "semi_supervised.yaml")])
    parser.update({"bundle_root": str(tmp_path / "semi"), "dataset_dir": str(tmp_path / "data"), **tiny})
    parser["semi#handlers"] = []
    parser.get_parsed_content("initialize")
    semi = parser.get_parsed_content("semi#trainer")
    assert semi.loss_size == 16
    images, target, points, labels = _batch(3)
    semi.stage = 2
    preds, out = semi.align(images, target, points[:, :2], labels[:, :2])
    assert preds.shape == (2, 2, 64, 64) and torch.isfinite(out["loss"])
    assert 0 <= float(out["disagreement_fraction"]) <= 1
