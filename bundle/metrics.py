"""Per-image segmentation metrics of the evaluation protocol (METHOD.md) and the nucleus-density strata.

* Dice = 2|P & G| / (|P| + |G|), IoU = |P & G| / |P | G| on binary masks of one image;
  both masks empty: 1 (nothing to find, nothing found); exactly one empty: 0. :func:`overlap` computes them, batched
  in torch (preference mining, the sensitivity grid, the evaluation report through :func:`dice_iou`, which takes
  one pair of arrays of any shape).
* Density strata by the number of nuclei in the image (SAMPO-Path): sparse [0, 20), medium [20, 50),
  dense [50, 100], crowded (100, inf). 19 -> sparse, 20 -> medium, 50 -> dense, 100 -> dense, 101 -> crowded.
"""

from __future__ import annotations

import numpy as np
import torch

STRATA = ("sparse", "medium", "dense", "crowded")


def _as_bool(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask) > 0


def dice_iou(pred, target) -> tuple[float, float]:
    """Dice and IoU of one binary prediction against one binary target (any equal shapes, > 0 is foreground):
    :func:`overlap` on the flattened masks, in float64."""
    p, g = _as_bool(pred), _as_bool(target)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and target {g.shape} differ in shape")
    d, i = overlap(torch.from_numpy(p.reshape(1, -1)), torch.from_numpy(g.reshape(1, -1)), dtype=torch.float64)
    return float(d), float(i)


def overlap(
    pred: torch.Tensor, target: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched torch Dice ``2|P & G| / (|P| + |G|)`` and IoU ``|P & G| / |P | G|`` of binary masks (..., H, W)
    against targets broadcastable to them (> 0 is foreground); both are 1 when both masks are empty. No gradient
    flows (the masks are thresholded). The one Dice / IoU of the bundle: mining, the sensitivity grid, the report."""
    p, g = pred > 0, target > 0
    p, g = torch.broadcast_tensors(p, g)
    inter = (p & g).flatten(-2).sum(-1).to(dtype)
    total = (p.flatten(-2).sum(-1) + g.flatten(-2).sum(-1)).to(dtype)
    union = total - inter
    empty = total == 0
    one = torch.ones_like(total)
    return (torch.where(empty, one, 2 * inter / total.clamp(min=1)), torch.where(empty, one, inter / union.clamp(min=1)))


def dice(pred, target) -> float:
    return dice_iou(pred, target)[0]


def iou(pred, target) -> float:
    return dice_iou(pred, target)[1]


def density_stratum(n_nuclei: int) -> str:
    """Density stratum of an image with ``n_nuclei`` nuclei: sparse <20, medium 20-49, dense 50-100, crowded >100."""
    n = int(n_nuclei)
    if n < 0:
        raise ValueError(f"number of nuclei must be >= 0, got {n}")
    if n < 20:
        return "sparse"
    if n < 50:
        return "medium"
    if n <= 100:
        return "dense"
    return "crowded"


def count_instances(instance_map) -> int:
    """Number of distinct non-zero ids in an instance map."""
    ids = np.unique(np.asarray(instance_map.detach().cpu() if isinstance(instance_map, torch.Tensor) else instance_map))
    return int(np.count_nonzero(ids))
