"""The embedded default dataset: procedurally generated H&E-like tiles with typed nuclei.

Nothing is downloaded: a seeded generator paints an eosin-pink stroma with fibres and nuclei of four types that
look different enough for T2 (category) prompting to make sense, with instance and type labels:

| id | type          | shape                          | stain                       |
|----|---------------|--------------------------------|-----------------------------|
| 1  | other         | round, medium                  | medium haematoxylin         |
| 2  | inflammatory  | small, round                   | dark, dense                 |
| 3  | epithelial    | large, oval, often clustered   | pale, vesicular (textured)  |
| 4  | spindle       | long and thin, oriented        | medium-dark                 |

The files follow docs/DATA_CONTRACT.md, so the default run reads them exactly as it reads prepared real data.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

CLASSES = {"1": "other", "2": "inflammatory", "3": "epithelial", "4": "spindle"}
# per type: (semi-axis range along, semi-axis range across, RGB stain, darkness range, texture)
NUCLEUS_TYPES = {
    1: ((5.0, 7.0), (4.5, 6.5), (120, 70, 160), (0.55, 0.7), 0.05),
    2: ((3.0, 4.5), (3.0, 4.2), (60, 30, 120), (0.8, 0.95), 0.03),
    3: ((8.0, 11.0), (6.0, 8.0), (150, 95, 185), (0.45, 0.6), 0.25),
    4: ((9.0, 13.0), (1.8, 2.8), (100, 55, 150), (0.65, 0.8), 0.05),
}
BACKGROUND = np.array([236.0, 184.0, 212.0])
VERSION = 1


def _ellipse(shape, cy, cx, a, b, angle):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / a
    v = (-(xx - cx) * s + (yy - cy) * c) / b
    return u * u + v * v <= 1.0


def generate_tile(rng: np.random.Generator, size: int = 256, n_nuclei: tuple[int, int] = (12, 60)):
    """One tile: RGB uint8 (size, size, 3), instance map and type map (int32, 0 background); between
    ``n_nuclei[0]`` and ``n_nuclei[1]`` nuclei are drawn (fewer are placed where they would overlap)."""
    smooth = lambda sigma: ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)  # noqa: E731
    stroma = 1.0 + 0.6 * smooth(6) / 0.05 * 0.05 + 0.4 * smooth(1.5)
    image = BACKGROUND[None, None] * (1 - 0.08 * np.clip(stroma, -2, 2)[..., None])
    for _ in range(rng.integers(3, 8)):  # eosinophilic fibres
        y0, x0, angle = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0, np.pi)
        fibre = _ellipse((size, size), y0, x0, rng.uniform(30, 90), rng.uniform(1.0, 2.5), angle)
        image[fibre] = image[fibre] * 0.85 + np.array([220.0, 120.0, 170.0]) * 0.15
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    mix = rng.dirichlet(np.full(4, 0.7))
    n_nuclei = int(rng.integers(*n_nuclei))
    next_id = 1
    for t in rng.choice([1, 2, 3, 4], size=n_nuclei, p=mix):
        (a_lo, a_hi), (b_lo, b_hi), stain, (d_lo, d_hi), texture = NUCLEUS_TYPES[int(t)]
        for _ in range(20):  # rejection sampling: nuclei do not overlap
            cy, cx = rng.uniform(0, size, 2)
            region = _ellipse((size, size), cy, cx, rng.uniform(a_lo, a_hi), rng.uniform(b_lo, b_hi), rng.uniform(0, np.pi))
            if region.sum() >= 6 and not inst[ndimage.binary_dilation(region)].any():
                break
        else:
            continue
        inst[region] = next_id
        types[region] = t
        next_id += 1
        darkness = rng.uniform(d_lo, d_hi) * (1 - texture * np.abs(smooth(1.0)[region]) / 0.3)
        image[region] = image[region] * (1 - darkness[:, None]) + np.asarray(stain, float) * darkness[:, None]
    image = ndimage.gaussian_filter(image, sigma=(0.7, 0.7, 0)) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), inst, types


def generate_field(rng: np.random.Generator, size: int = 1024):
    """A field larger than a tile (issue 22's whole-field evaluation) with a tile's density of nuclei: the tile's
    12-60 nuclei per 256 x 256 px scaled by the area, ``n ~ U[12, 60) * (size / 256)^2``. Same outputs as
    :func:`generate_tile`."""
    scale = (size / 256) ** 2
    return generate_tile(rng, size, (max(1, round(12 * scale)), max(2, round(60 * scale))))


def make_dataset(out_dir: str, n_train: int = 48, n_val: int = 12, n_test: int = 12, size: int = 256, seed: int = 0):
    """Write the synthetic set (images/*.png, labels/*.npy, datalist.json) to ``out_dir``; return the datalist path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labels"), exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {"training": n_train, "validation": n_val, "test": n_test}
    datalist = {
        "name": "synthetic_he",
        "task_family": "nuclei",
        "classes": CLASSES,
        "generator": {"version": VERSION, "seed": seed, "size": size, **splits},
    }
    order = rng.permutation(n_train)  # nested training fractions: prefixes of one seeded permutation
    rank = np.empty(n_train, int)
    rank[order] = np.arange(n_train)
    for split, count in splits.items():
        items = []
        for i in range(count):
            name = f"{split}_{i:03d}"
            image, inst, types = generate_tile(rng, size)
            Image.fromarray(image).save(os.path.join(out_dir, "images", f"{name}.png"))
            np.save(os.path.join(out_dir, "labels", f"{name}.npy"), np.stack([inst, types]))
            item = {
                "image": f"images/{name}.png",
                "label": f"labels/{name}.npy",
                "name": name,
                "source": name,
                "tissue": "synthetic",
                "n_nuclei": int(inst.max()),
            }
            if split == "training":
                item["subsets"] = [f for f in (10, 20, 30, 100) if rank[i] < max(1, round(n_train * f / 100))]
            items.append(item)
        datalist[split] = items
    path = os.path.join(out_dir, "datalist.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=1)
    return path


def ensure_dataset(out_dir: str, n_train: int = 48, n_val: int = 12, n_test: int = 12, size: int = 256, seed: int = 0):
    """Path of the synthetic datalist in ``out_dir``, generating it first unless an identical one is there (in a
    distributed run rank 0 generates it while the other ranks wait, then they read it)."""
    from bundle.distributed import rank_zero_first

    return rank_zero_first(_ensure_dataset, out_dir, n_train, n_val, n_test, size, seed)


def _ensure_dataset(out_dir: str, n_train: int, n_val: int, n_test: int, size: int, seed: int):
    path = os.path.join(out_dir, "datalist.json")
    wanted = {"version": VERSION, "seed": seed, "size": size, "training": n_train, "validation": n_val, "test": n_test}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f).get("generator") == wanted:
                return path
    logger.info("generating the embedded synthetic H&E dataset (%d/%d/%d tiles) in %s", n_train, n_val, n_test, out_dir)
    return make_dataset(out_dir, n_train, n_val, n_test, size, seed)
