"""Native-resolution inference on fields of any size: overlapping tiles, clicks routed to them, the intent propagated
to tiles without a click, and the logits blended back into one map.

The network sees what it was trained on: ``tile_size`` squares (the training ``image_size``) at the image's own
resolution, never resized. For a single-tensor input ``x = cat([image, fg, bg])`` of shape (C + 2, H, W):

* **Padding.** A side shorter than ``tile_size`` is padded at the bottom / right, as SAM pads its input: the image
  with SAM's pixel mean (0 after SAM's normalisation), the click channels with 0. The padding is cropped off the
  result. Nothing is stretched.
* **Tiles.** Offsets ``0, s, 2s, ...`` with stride ``s = tile_size - overlap`` and a last tile flush with the
  border (:func:`tile_offsets`).
* **Routing.** A tile's click channels are the slice of the field's click channels under it, so every click reaches
  every tile whose field contains it, in that tile's coordinates.
* **Blending.** ``L(p) = sum_t w_t(p) l_t(p) / sum_t w_t(p)`` over the tiles t that were run and contain pixel p,
  ``w_t`` the ``cosine`` window (``0.5 - 0.5 cos(pi (d + 0.5) / overlap)`` at distance d < overlap from the tile's
  edge, 1 inside; never 0) or ``mean`` (1 everywhere). A pixel no run tile covers gets ``BACKGROUND_LOGIT``.
* **Propagation** (``mode: propagate``). Tiles with a foreground click run first. Then, wave by wave, every tile
  next to a run tile (8-neighbourhood) is prompted from what its run neighbours predicted in the overlap they
  share, p = sigmoid(L) where covered: up to ``propagate_points`` positives, one at the interior-most pixel
  (distance-transform peak) of each of the largest confident objects (p > ``confident``), and as many negatives on
  confident background (p < 1 - ``confident``), each as far as possible from objects and from the negatives chosen
  before it; the user's own background clicks in the tile are kept. A tile whose overlap holds no confident object
  is not run in that wave (a later wave may reach it from another side). ``mode: routed`` runs only the clicked
  tiles: the intent stays where the clicks are.

So the user's intent ("these nuclei", "nuclei of this type") travels as examples, the way the clicks themselves
were given, and a tile the network is unsure about does not invent objects. ``mode: resize`` (the old behaviour,
the whole field squeezed to ``image_size``) is :class:`bundle.inference.PromptImaged`'s, not this module's.

Memory: the field's input, two float maps (H, W) and ``batch_size`` tiles at a time; the network never sees more.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import ndimage

from bundle.guidance import points_to_guidance

logger = logging.getLogger(__name__)

MODES = ("resize", "routed", "propagate")
BLENDS = ("cosine", "mean")
BACKGROUND_LOGIT = -20.0  # pixels no run tile covers
SAM_PIXEL_MEAN = (123.675 / 255.0, 116.28 / 255.0, 103.53 / 255.0)  # SAM's padding value, in [0, 1]


def tile_offsets(size: int, tile: int, stride: int | None = None) -> list[int]:
    """Tile start offsets along one axis covering ``size``, the last tile flush with the border.

    ``stride=None`` spreads the fewest tiles evenly (1000 px, tile 256 -> 0, 248, 496, 744: how CoNSeP's fields
    were cut); otherwise ``0, stride, 2 stride, ...`` plus the flush last tile."""
    if size < tile:
        raise ValueError(f"image side {size} is smaller than the tile size {tile}")
    if stride is None:
        n = int(np.ceil((size - tile) / tile)) + 1
        return [int(round(i * (size - tile) / (n - 1))) for i in range(n)] if n > 1 else [0]
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    offsets = list(range(0, size - tile + 1, stride))
    if offsets[-1] != size - tile:
        offsets.append(size - tile)
    return offsets


@dataclass(frozen=True)
class Tiling:
    """How a field larger (or smaller) than the network's input is processed (module docstring).

    Args:
        mode: ``propagate`` (tiles; clicked tiles first, then the intent spread outwards), ``routed`` (only tiles
            holding a foreground click), ``resize`` (the whole field squeezed to ``image_size``: the old path).
        tile_size: side of a tile; the training ``image_size``.
        overlap: pixels neighbouring tiles share (0 <= overlap < tile_size).
        blend: ``cosine`` or ``mean`` weights in the overlaps.
        batch_size: tiles run together.
        propagate_points: positives and negatives given to a propagated tile.
        confident: probability above which a neighbour's object is a positive (below 1 - confident: background).
    """

    mode: str = "propagate"
    tile_size: int = 256
    overlap: int = 64
    blend: str = "cosine"
    batch_size: int = 4
    propagate_points: int = 3
    confident: float = 0.55

    def __post_init__(self) -> None:
        checks = [
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("blend", self.blend in BLENDS, f"one of {BLENDS}"),
            ("tile_size", isinstance(self.tile_size, int) and self.tile_size >= 16, "an integer >= 16"),
            ("overlap", isinstance(self.overlap, int) and 0 <= self.overlap < int(self.tile_size),
             f"an integer in [0, tile_size {self.tile_size})"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("propagate_points", isinstance(self.propagate_points, int) and self.propagate_points >= 1,
             "an integer >= 1"),
            ("confident", 0.5 < float(self.confident) < 1.0, "a probability in (0.5, 1)"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise ValueError(f"tiling: '{key}' must be {expected}, got {getattr(self, key)!r}")

    @classmethod
    def of(cls, value: "Tiling | dict | None") -> "Tiling":
        """A :class:`Tiling` from itself, a config mapping (unknown keys refused, naming them) or ``None``."""
        if value is None or isinstance(value, Tiling):
            return value or cls()
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"tiling: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**dict(value))

    def as_dict(self) -> dict:
        return asdict(self)


def blend_window(tile: int, overlap: int, blend: str = "cosine") -> torch.Tensor:
    """(tile, tile) blending weights: 1 inside, a raised-cosine ramp over the ``overlap`` margin, never 0."""
    if blend == "mean" or overlap == 0:
        return torch.ones(tile, tile)
    d = torch.arange(tile, dtype=torch.float64)
    d = torch.minimum(d, tile - 1 - d)
    ramp = torch.where(d < overlap, 0.5 - 0.5 * torch.cos(math.pi * (d + 0.5) / overlap), torch.ones_like(d))
    return torch.outer(ramp, ramp).float()


def pad_to_tile(x: torch.Tensor, tile: int, channels: int) -> torch.Tensor:
    """(C + 2, H, W) -> (C + 2, max(H, tile), max(W, tile)): image channels padded with SAM's pixel mean, click
    channels with 0, at the bottom and right."""
    h, w = x.shape[-2:]
    ph, pw = max(h, tile), max(w, tile)
    if (ph, pw) == (h, w):
        return x
    out = torch.zeros((x.shape[0], ph, pw), dtype=x.dtype, device=x.device)
    mean = SAM_PIXEL_MEAN if channels == 3 else (sum(SAM_PIXEL_MEAN) / 3,) * channels
    out[:channels] = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    out[:, :h, :w] = x
    return out


def propagated_points(prob: np.ndarray, covered: np.ndarray, n: int, confident: float) -> tuple[list, list]:
    """Prompts for a tile without a click from its neighbours' prediction (module docstring): (positives,
    negatives) as (x, y) tile pixels. ``prob``: (t, t) probabilities, valid where ``covered``."""
    fg = covered & (prob > confident)
    labels, count = ndimage.label(fg)
    positives = []
    if count:
        areas = np.bincount(labels.ravel())[1:]
        depth = ndimage.distance_transform_edt(fg)
        for lab in np.argsort(-areas, kind="stable")[:n] + 1:
            inside = np.where(labels == lab, depth, -1.0)
            y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
            positives.append([int(x), int(y)])
    negatives = []
    bg = covered & (prob < 1.0 - confident)
    if positives and bg.any():
        far = ndimage.distance_transform_edt(~fg) if fg.any() else np.full(prob.shape, np.inf)
        for _ in range(n):
            score = np.where(bg, far, -1.0)
            y, x = np.unravel_index(int(np.argmax(score)), score.shape)
            if score[y, x] <= 0:
                break
            negatives.append([int(x), int(y)])
            seed = np.ones(prob.shape, dtype=bool)
            seed[y, x] = False
            far = np.minimum(far, ndimage.distance_transform_edt(seed))
    return positives, negatives


Forward = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def tiled_forward(forward: Forward, x: torch.Tensor, tiling: Tiling, channels: int) -> torch.Tensor:
    """(C + 2, H, W) field input -> (1, H, W) blended logits (module docstring).

    ``forward(batch, tile_ids)`` maps (B, C + 2, t, t) tiles to their (B, 1, t, t) logits; ``tile_ids`` name each
    tile (``"y0,x0"``) for an embedding cache. ``channels`` is C. An input of exactly one tile is one ``forward``.
    """
    if x.ndim != 3 or x.shape[0] != channels + 2:
        raise ValueError(f"tiled_forward: expected a (C + 2 = {channels + 2}, H, W) input, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    t, o = tiling.tile_size, tiling.overlap
    xp = pad_to_tile(x, t, channels)
    ys, xs = tile_offsets(xp.shape[-2], t, t - o), tile_offsets(xp.shape[-1], t, t - o)
    acc = torch.zeros(xp.shape[-2:], dtype=torch.float32)
    wsum = torch.zeros_like(acc)
    window = blend_window(t, o, tiling.blend)
    clicks = xp[channels:]
    grid = {(i, j): (y0, x0) for i, y0 in enumerate(ys) for j, x0 in enumerate(xs)}
    clicked = [k for k, (y0, x0) in grid.items() if bool((clicks[0, y0:y0 + t, x0:x0 + t] > 0.5).any())]
    if not clicked:
        raise ValueError("tiled_forward: the field has no foreground click")

    def run(keys: list, inputs: list) -> None:
        for start in range(0, len(keys), tiling.batch_size):
            batch_keys = keys[start:start + tiling.batch_size]
            batch = torch.stack(inputs[start:start + tiling.batch_size])
            ids = [f"{grid[k][0]},{grid[k][1]}" for k in batch_keys]
            logits = forward(batch, ids).detach().float().cpu()
            for k, lg in zip(batch_keys, logits):
                y0, x0 = grid[k]
                acc[y0:y0 + t, x0:x0 + t] += lg[0] * window
                wsum[y0:y0 + t, x0:x0 + t] += window

    if len(grid) == 1:  # one tile: the network's own output, no blending
        return forward(xp[None], ["0,0"]).detach().float().cpu()[0, :, :h, :w]
    run(clicked, [xp[:, y0:y0 + t, x0:x0 + t] for y0, x0 in (grid[k] for k in clicked)])
    done, ran, waves = set(clicked), set(clicked), 1
    while tiling.mode == "propagate":
        wave = sorted(k for k in grid if k not in done
                      and any((k[0] + di, k[1] + dj) in ran for di in (-1, 0, 1) for dj in (-1, 0, 1)))
        keys, inputs = [], []
        prob = torch.sigmoid(acc / wsum.clamp_min(1e-12)).numpy()
        covered_all = (wsum > 0).numpy()
        for k in wave:
            y0, x0 = grid[k]
            pos, neg = propagated_points(prob[y0:y0 + t, x0:x0 + t], covered_all[y0:y0 + t, x0:x0 + t],
                                         tiling.propagate_points, tiling.confident)
            if not pos:
                continue
            tile = xp[:, y0:y0 + t, x0:x0 + t].clone()
            pts = torch.tensor(pos + neg, dtype=torch.float32)[None]
            labs = torch.tensor([1] * len(pos) + [0] * len(neg))[None]
            prompt = points_to_guidance(pts, labs, (t, t))[0].to(tile)
            tile[channels] = prompt[0]
            tile[channels + 1] = torch.maximum(tile[channels + 1], prompt[1])  # the user's background clicks stay
            keys.append(k)
            inputs.append(tile)
        if not keys:
            break
        run(keys, inputs)
        done |= set(keys)
        ran |= set(keys)
        waves += 1
    logger.debug("tiled %dx%d field: %d tiles of %d, %d run (%d clicked) in %d waves", w, h, len(grid), t,
                 len(ran), len(clicked), waves)
    out = torch.where(wsum > 0, acc / wsum.clamp_min(1e-12), torch.full_like(acc, BACKGROUND_LOGIT))
    return out[None, :h, :w]
