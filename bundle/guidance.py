"""Click guidance: point prompts <-> the two click channels of the single-tensor network contract.

The network's input is ``cat([image, fg_clicks, bg_clicks], dim=1)``. A click is a local maximum above 0.5 in
its channel, so both one-hot click maps (a 1 at each clicked pixel) and Gaussian-smoothed maps (as MONAI Label's
DeepEdit-style guidance) are read the same way. Points are (x, y) pixel coordinates, SAM's convention.
A served click on an image of size (H, W) maps to the network's S x S frame by x' = clip((x + 0.5) S / W - 0.5, 0,
S - 1) (and y likewise; :func:`click_channels`), for inference and for training on human pairs alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PAD_LABEL = -1  # SAM's "not a point" label


def points_to_guidance(points: torch.Tensor, labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, P, 2) (x, y) points with labels 1 fg / 0 bg / -1 pad -> (B, 2, H, W) one-hot click channels."""
    b = points.shape[0]
    h, w = size
    out = torch.zeros((b, 2, h, w), dtype=torch.float32, device=points.device)
    xy = points.round().long()
    inside = (xy[..., 0] >= 0) & (xy[..., 0] < w) & (xy[..., 1] >= 0) & (xy[..., 1] < h)
    for channel, label in ((0, 1), (1, 0)):
        sel = (labels == label) & inside
        bi, pi = torch.nonzero(sel, as_tuple=True)
        out[bi, channel, xy[bi, pi, 1], xy[bi, pi, 0]] = 1.0
    return out


def click_peaks(guidance: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, 2, *spatial) click channels with 2 or 3 spatial dims -> where the clicks are: the local maxima (3 x 3
    [x 3] neighbourhood) above ``threshold``. TorchScript-compatible."""
    if guidance.dim() == 5:
        pooled = F.max_pool3d(guidance, kernel_size=3, stride=1, padding=1)
    else:
        pooled = F.max_pool2d(guidance, kernel_size=3, stride=1, padding=1)
    return (guidance == pooled) & (guidance > threshold)


def guidance_to_points(guidance: torch.Tensor, max_points: int = 16, threshold: float = 0.5):
    """(B, 2, H, W) click channels -> points (B, 2*max_points, 2) and labels (B, 2*max_points).

    At most ``max_points`` clicks are read per channel (the strongest); unused slots get label -1, which SAM's
    prompt encoder embeds as "not a point". TorchScript-compatible.
    """
    b, _, h, w = guidance.shape
    k = min(max_points, h * w)
    score = torch.where(click_peaks(guidance, threshold), guidance, torch.zeros_like(guidance))
    values, index = score.flatten(2).topk(k, dim=2)  # (B, 2, k)
    xs = (index % w).to(guidance.dtype)
    ys = torch.div(index, w, rounding_mode="floor").to(guidance.dtype)
    points = torch.stack([xs, ys], dim=-1).reshape(b, 2 * k, 2)
    kind = torch.tensor([1, 0], device=guidance.device).view(1, 2, 1).expand(b, 2, k)
    labels = torch.where(values > 0, kind, torch.full_like(kind, -1)).reshape(b, 2 * k)  # -1: PAD_LABEL (no globals in TorchScript)
    return points, labels


def click_channels(points: Sequence[Sequence[float]], n_fg: int, size: tuple[int, int],
                   image_size: int | None = None) -> torch.Tensor:
    """(x, y) clicks on an image of ``size`` (H, W), the first ``n_fg`` foreground -> the network's click channels:
    (2, S, S) at ``image_size`` S, each click scaled with the image (pixel centres kept) onto its nearest pixel; or,
    with ``image_size=None``, (2, H, W) at the image's own resolution (native-resolution tiling,
    :mod:`bundle.tiling`). The one mapping of served clicks; training on MONAI Label's human preference pairs
    (:mod:`bundle.human_pairs`) uses it too, so that a pair is trained under the prompt the network answered."""
    h, w = size
    oh, ow = (h, w) if image_size is None else (int(image_size),) * 2
    xy = torch.tensor(points, dtype=torch.float32).view(1, -1, 2)
    xy = torch.minimum((xy + 0.5) * torch.tensor([ow / w, oh / h]) - 0.5, torch.tensor([ow - 1.0, oh - 1.0]))
    labels = torch.tensor([1] * n_fg + [0] * (len(points) - n_fg)).view(1, -1)
    return points_to_guidance(xy.clamp_min(0), labels, (oh, ow))[0]
