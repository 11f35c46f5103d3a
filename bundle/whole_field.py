"""Evaluation on whole fields larger than the network's input (issue 22): CoNSeP's 1000 x 1000 test fields
recovered from the shared 256 px tiles, or fields of the embedded generator of any size (:func:`synthetic_fields`),
three ways to segment them, two click placements, Dice and nuclei metrics.

* **Recovering a field** (:func:`recover_field`): which tiles neighbour which is measured from the pixels across
  their edges, not assumed (the shared data's README says 4 x 4 tiles overlapping by 8 px; the pixels say the
  first 9 tiles abut as a 3 x 3 grid, no overlap).
* **Clicks**: 3 positives on nuclei (each at its interior-most pixel, the distance-transform peak) and 3 negatives
  on background at least 4 px from any nucleus, drawn with a seed per field, either ``spread`` over the field or
  all inside its top-left ``corner`` (``image_size`` square).
A serving-layer module: what it measures is the served preprocessing itself.

* **Methods**: ``resize`` (the field squeezed to ``image_size``, the old path), ``routed`` and ``propagate``
  (:mod:`bundle.tiling`), each through the served preprocessing (:class:`bundle.inference.PromptImaged`).
* **Metrics**: whole-field Dice of ``logit > 0`` against all nuclei, and on the instances
  (:func:`bundle.nuclei.split_instances` of ``sigmoid(logit)``) :func:`bundle.nuclei_metrics.nuclei_metrics`
  against the field's instance map: PQ / DQ / SQ, AJI, detection F1 at IoU 0.5, count error; seconds per field.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from scipy import ndimage

from bundle.data.readers import read_image, read_label
from bundle.data.synthetic import generate_field
from bundle.inference import PromptImaged
from bundle.metrics import dice
from bundle.nuclei import split_instances
from bundle.nuclei_metrics import nuclei_metrics
from bundle.tiling import Tiling, tiled_forward

logger = logging.getLogger(__name__)

METHODS = ("resize", "routed", "propagate")
PLACEMENTS = ("spread", "corner")


def _seam(a: np.ndarray, b: np.ndarray, axis: int) -> float:
    """Mean absolute difference across the edge where ``b`` would abut ``a`` (axis 1: right of it, 0: below)."""
    ea, eb = (a[:, -1], b[:, 0]) if axis == 1 else (a[-1], b[0])
    return float(np.abs(ea.astype(np.float32) - eb.astype(np.float32)).mean())


def _inner(a: np.ndarray, axis: int) -> float:
    """The same difference between the last two columns (rows) of one tile: what a true seam looks like."""
    ea, eb = (a[:, -1], a[:, -2]) if axis == 1 else (a[-1], a[-2])
    return float(np.abs(ea.astype(np.float32) - eb.astype(np.float32)).mean())


def recover_field(images_dir: Path, labels_dir: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) instance map of the largest abutting block of ``stem``'s tiles.

    Measured on the shared CoNSeP tiles (not assumed): tiles ``000..008`` abut as a 3 x 3 grid in row-major order
    (a 768 px field), the other 7 lie elsewhere. The grid width is the chain of right neighbours from tile 0 (each
    the tile whose first column continues the last one best); every seam of the block must then look like the
    inside of a tile (difference <= 2x the tile's own last-column difference + 3 grey levels, and < 0.6x the best
    other tile),
    else ``ValueError``. Nuclei cut by a seam are joined when their pixels touch across it."""
    paths = sorted(p for p in Path(images_dir).glob(f"{stem}_*.png") if re.fullmatch(rf"{stem}_\d{{3}}", p.stem))
    if len(paths) < 4:
        raise ValueError(f"{images_dir}: {len(paths)} tiles of {stem}; a field needs at least 2 x 2")
    tiles = [read_image(p) for p in paths]
    t = tiles[0].shape[0]

    def neighbour(k: int, axis: int) -> tuple[int, float, float]:
        costs = sorted((_seam(tiles[k], tiles[j], axis), j) for j in range(len(tiles)) if j != k)
        return costs[0][1], costs[0][0], costs[1][0]

    g = 1
    while g < len(tiles) and neighbour(g - 1, 1)[0] == g:
        g += 1
    if g < 2 or g * g > len(tiles):
        raise ValueError(f"{stem}: no square block of abutting tiles from tile 0 (row of {g})")
    for k in range(g * g):
        i, j = divmod(k, g)
        for axis, nxt in ((1, k + 1 if j + 1 < g else None), (0, k + g if i + 1 < g else None)):
            if nxt is None:
                continue
            cost, others = _seam(tiles[k], tiles[nxt], axis), min(
                _seam(tiles[k], tiles[m], axis) for m in range(len(tiles)) if m not in (k, nxt))
            if not (cost <= 2 * _inner(tiles[k], axis) + 3 and cost < 0.6 * others):
                raise ValueError(f"{stem}: tiles {k} and {nxt} do not abut (seam difference {cost:.1f}, inside "
                                 f"{_inner(tiles[k], axis):.1f}, best other tile {others:.1f})")
    image = np.zeros((g * t, g * t, 3), np.uint8)
    merged = np.zeros((g * t, g * t), np.int64)
    for k in range(g * g):
        i, j = divmod(k, g)
        image[i * t:(i + 1) * t, j * t:(j + 1) * t] = tiles[k]
        inst = read_label(Path(labels_dir) / f"{paths[k].stem}.mat").inst
        merged[i * t:(i + 1) * t, j * t:(j + 1) * t] = np.where(inst > 0, inst + (k + 1) * 100000, 0)
    parent: dict[int, int] = {}

    def root(v: int) -> int:
        while parent.setdefault(v, v) != v:
            v = parent[v]
        return v

    for s in range(1, g):  # pixels touching across a seam: one nucleus
        for a, b in ((merged[:, s * t - 1], merged[:, s * t]), (merged[s * t - 1], merged[s * t])):
            both = (a > 0) & (b > 0)
            for u, v in set(zip(a[both].tolist(), b[both].tolist())):
                parent[root(v)] = root(u)
    ids = np.unique(merged[merged > 0])
    _, compact = np.unique(np.array([root(int(v)) for v in ids]), return_inverse=True)
    lookup = np.zeros(int(ids.max()) + 1 if ids.size else 1, np.int64)
    lookup[ids] = compact + 1
    return image, lookup[merged]


def synthetic_fields(n: int, size: int = 1024, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``n`` fields of ``size`` px from the embedded generator (:func:`bundle.data.synthetic.generate_field`: a
    tile's density of nuclei over the whole field), as ``{"synthetic_<k>": (RGB image, instance map)}``; field k is
    drawn from ``seed + k``, so a field does not depend on how many are asked for."""
    if size < 2:
        raise ValueError(f"synthetic fields: size {size} px; expected at least 2")
    fields = {}
    for k in range(n):
        image, instances, _ = generate_field(np.random.default_rng(seed + k), size)
        fields[f"synthetic_{k}"] = (image, instances)
        logger.info("synthetic field %d / %d: %d px, %d nuclei", k + 1, n, size, int(instances.max()))
    return fields


def field_clicks(instances: np.ndarray, placement: str, seed: int, size: int, n: int = 3) -> dict:
    """3+/3- clicks (module docstring) as the served ``{"foreground", "background"}`` (x, y) dict."""
    rng = np.random.default_rng(seed)
    h, w = instances.shape
    region = np.ones((h, w), bool) if placement == "spread" else np.zeros((h, w), bool)
    region[:size, :size] = True
    ids = np.unique(instances[region & (instances > 0)])
    chosen = rng.choice(ids, size=min(n, ids.size), replace=False)
    fg = []
    for i in chosen:
        depth = ndimage.distance_transform_edt(instances == i)
        y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
        fg.append([int(x), int(y)])
    far = ndimage.distance_transform_edt(instances == 0) >= 4
    ys, xs = np.nonzero(far & region)
    pick = rng.choice(len(ys), size=n, replace=False)
    return {"foreground": fg, "background": [[int(xs[p]), int(ys[p])] for p in pick]}


def segment_field(network, image: np.ndarray, clicks: dict, method: str, image_size: int,
                  confident: float = 0.55) -> np.ndarray:
    """(H, W) logits of ``network`` for the field by ``method``, through the served preprocessing."""
    h, w = image.shape[:2]
    tiling = None if method == "resize" else Tiling(mode=method, tile_size=image_size, overlap=image_size // 4,
                                                          confident=confident)
    arr = MetaTensor(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 1, 0))),  # (C, X, Y) as LoadImaged
                     meta={"filename_or_obj": "field.png", "spatial_shape": (w, h)})
    x = PromptImaged(image_size=image_size, tiling=tiling)({"image": arr, "clicks": clicks})["image"].as_tensor()
    with torch.no_grad():
        if tiling is None:
            low = network(x[None])
            return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        return tiled_forward(lambda t, ids: network(t), x, tiling, 3)[0].numpy()


def evaluate_fields(network, fields: dict, image_size: int, seeds=(0,), methods=METHODS,
                    confident: float = 0.55) -> list[dict]:
    """One row per field, placement, seed and method: Dice, nuclei metrics, seconds."""
    rows = []
    for stem, (image, instances) in fields.items():
        for placement in PLACEMENTS:
            for seed in seeds:
                clicks = field_clicks(instances, placement, seed, image_size)
                for method in methods:
                    t0 = time.perf_counter()
                    logits = segment_field(network, image, clicks, method, image_size, confident)
                    seconds = time.perf_counter() - t0
                    pred = split_instances(1 / (1 + np.exp(-logits)))
                    m = nuclei_metrics(instances, pred)
                    rows.append({"field": stem, "placement": placement, "seed": seed, "method": method,
                                 "dice": dice(logits > 0, instances > 0), "seconds": seconds,
                                 "pred_fraction": float((logits > 0).mean()),
                                 **{k: m[k] for k in ("pq", "dq", "sq", "aji", "f1", "true_count", "pred_count",
                                                      "count_abs_error")}})
                    logger.info("%s %s seed %d %s: Dice %.3f PQ %.3f (%.1f s)", stem, placement, seed, method,
                                rows[-1]["dice"], m["pq"], seconds)
    return rows


def field_table(rows: list[dict]) -> str:
    """Markdown: per placement and method the mean over fields and seeds of Dice (± sd), PQ, AJI, F1 at IoU 0.5, the
    count error (mean |predicted - true| of mean true nuclei), the predicted fraction and the seconds per field."""
    head = ["| placement | method | Dice | PQ | AJI | F1@0.5 | count error | predicted fraction | s / field |",
            "|---|---|---|---|---|---|---|---|---|"]
    for placement in PLACEMENTS:
        for method in METHODS:
            sel = [r for r in rows if r["placement"] == placement and r["method"] == method]
            if not sel:
                continue
            mean = {k: float(np.mean([r[k] for r in sel])) for k in ("dice", "pq", "aji", "f1", "count_abs_error",
                                                                     "true_count", "pred_fraction", "seconds")}
            sd = float(np.std([r["dice"] for r in sel], ddof=1)) if len(sel) > 1 else 0.0
            head.append(f"| {placement} | {method} | {mean['dice']:.3f} ± {sd:.3f} | {mean['pq']:.3f} | "
                        f"{mean['aji']:.3f} | {mean['f1']:.3f} | {mean['count_abs_error']:.0f} of "
                        f"{mean['true_count']:.0f} | {mean['pred_fraction']:.3f} | {mean['seconds']:.2f} |")
    return "\n".join(head) + "\n"
