"""Per-image Dice / IoU and the nucleus-density strata (bundle/metrics.py)."""

import numpy as np
import pytest
import torch

from bundle.metrics import STRATA, count_instances, density_stratum, dice, dice_iou, iou


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_dice_and_iou_on_hand_made_masks():
    pred = _mask((6, 6), (0, 2, 0, 4))  # 8 pixels
    target = _mask((6, 6), (0, 2, 2, 6))  # 8 pixels, 4 shared
    d, i = dice_iou(pred, target)
    assert d == pytest.approx(2 * 4 / 16)
    assert i == pytest.approx(4 / 12)
    assert dice(pred, target) == d and iou(pred, target) == i
    # identical masks, and a prediction inside the target
    assert dice_iou(target, target) == (1.0, 1.0)
    inner = _mask((6, 6), (0, 1, 2, 6))  # 4 pixels inside the 8 of the target
    assert dice_iou(inner, target) == pytest.approx((8 / 12, 4 / 8))
    # symmetric, and the same on tensors with a channel dimension / float values
    assert dice_iou(target, pred) == pytest.approx((d, i))
    t = torch.from_numpy(pred[None].astype(np.float32)), torch.from_numpy(target[None].astype(np.float32))
    assert dice_iou(*t) == pytest.approx((d, i))


def test_empty_masks():
    empty = np.zeros((5, 5), bool)
    some = _mask((5, 5), (1, 3, 1, 3))
    assert dice_iou(empty, empty) == (1.0, 1.0)  # both empty: 1
    assert dice_iou(empty, some) == (0.0, 0.0)  # one empty: 0
    assert dice_iou(some, empty) == (0.0, 0.0)
    disjoint = _mask((5, 5), (4, 5, 4, 5))
    assert dice_iou(disjoint, some) == (0.0, 0.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_iou(np.zeros((4, 4)), np.zeros((4, 5)))


@pytest.mark.parametrize(
    "n, stratum",
    [(0, "sparse"), (19, "sparse"), (20, "medium"), (49, "medium"), (50, "dense"), (99, "dense"), (100, "dense"),
     (101, "crowded"), (500, "crowded")],
)
def test_density_strata_boundaries(n, stratum):
    assert density_stratum(n) == stratum
    assert stratum in STRATA


def test_density_stratum_rejects_negative_counts():
    with pytest.raises(ValueError):
        density_stratum(-1)


def test_count_instances():
    inst = np.zeros((8, 8), np.int32)
    inst[0, 0], inst[2:4, 2:4], inst[7, 7] = 3, 7, 12  # ids need not be consecutive
    assert count_instances(inst) == 3
    assert count_instances(torch.from_numpy(inst)) == 3
    assert count_instances(np.zeros((3, 3))) == 0
