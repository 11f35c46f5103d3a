"""PanNuke official folds (images.npy, masks.npy, types.npy) -> prepared dataset (docs/DATA_CONTRACT.md).

A fold folder holds, anywhere below it (the release nests them as ``Fold 1/images/fold1/images.npy``):

- ``images.npy``: (N, H, W, 3) float (0..255) or uint8 RGB;
- ``masks.npy``: (N, H, W, 6): instance maps of neoplastic, inflammatory, connective, dead, epithelial nuclei,
  then background;
- ``types.npy``: (N,) tissue names.

Per image the five instance channels are merged into one instance map (ids renumbered 1..n across channels, in
channel order then ascending id) and a class map (1 neoplastic, 2 inflammatory, 3 connective, 4 dead,
5 epithelial). A pixel claimed by two channels keeps the first channel's nucleus and is counted in the summary.
Images without any nucleus are skipped and counted.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bundle.transforms.checks import check_finite

from .instances import relabel_sequential
from .writer import DatasetWriter, check_output

logger = logging.getLogger(__name__)

CLASSES = {1: "neoplastic", 2: "inflammatory", 3: "connective", 4: "dead", 5: "epithelial"}
TISSUES = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck", "Kidney",
    "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis", "Thyroid", "Uterus",
)  # fmt: skip
FOLD_FILES = {"images": "(N, H, W, 3)", "masks": "(N, H, W, 6)", "types": "(N,)"}


def find_fold_files(fold_dir: str | os.PathLike) -> dict[str, Path]:
    """Locate images.npy, masks.npy and types.npy below ``fold_dir``; raise naming what is missing or ambiguous."""
    fold_dir = Path(fold_dir)
    if not fold_dir.is_dir():
        raise FileNotFoundError(f"PanNuke fold folder not found: {fold_dir}")
    found = {}
    for key, shape in FOLD_FILES.items():
        hits = sorted(fold_dir.rglob(f"{key}.npy"))
        if not hits:
            raise FileNotFoundError(f"{fold_dir}: no {key}.npy below it (expected a {shape} array)")
        if len(hits) > 1:
            raise ValueError(f"{fold_dir}: several {key}.npy below it: {[str(h) for h in hits]}")
        found[key] = hits[0]
    return found


def find_fold_dirs(root: str | os.PathLike) -> dict[int, Path]:
    """Fold number -> folder for the sub-folders of ``root`` named like 'Fold 1', 'fold1', 'fold_2'."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"PanNuke root folder not found: {root}")
    folds = {}
    for d in sorted(root.iterdir()):
        m = re.fullmatch(r"fold[\s_-]*(\d+)", d.name, flags=re.IGNORECASE)
        if d.is_dir() and m:
            folds[int(m.group(1))] = d
    if not folds:
        raise FileNotFoundError(f"{root}: no fold folders ('Fold 1', 'fold1', ...) inside it")
    return folds


def _load(path: Path, expected: str, mmap: bool = True) -> np.ndarray:
    try:
        try:
            return np.load(path, mmap_mode="r" if mmap else None)
        except ValueError:  # object arrays (e.g. tissue names saved as Python strings) need pickle
            return np.load(path, allow_pickle=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} (expected a {expected} .npy array): {e}") from e


def load_fold(fold_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks, tissue names) of one fold, memory-mapped, with their shapes checked."""
    files = find_fold_files(fold_dir)
    images = _load(files["images"], FOLD_FILES["images"])
    masks = _load(files["masks"], FOLD_FILES["masks"])
    types = np.asarray(_load(files["types"], FOLD_FILES["types"], mmap=False)).reshape(-1)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{files['images']}: expected shape (N, H, W, 3), got {images.shape}")
    if masks.ndim != 4 or masks.shape[3] != 6:
        raise ValueError(f"{files['masks']}: expected shape (N, H, W, 6), got {masks.shape}")
    if masks.shape[:3] != images.shape[:3]:
        raise ValueError(
            f"{files['masks']}: shape {masks.shape} does not match {files['images']} {images.shape} "
            "(expected the same N, H, W)"
        )
    if len(types) != images.shape[0]:
        raise ValueError(f"{files['types']}: {len(types)} tissue names for {images.shape[0]} images (expected (N,))")
    unknown = sorted({str(t) for t in types} - set(TISSUES))
    if unknown:
        raise ValueError(f"{files['types']}: unknown tissue names {unknown}; known: {list(TISSUES)}")
    return images, masks, types


def to_uint8_rgb(image: np.ndarray, where: str) -> np.ndarray:
    """PanNuke image (float 0..255, float 0..1 when its maximum is <= 1, or uint8) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    check_finite(image, where)
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{where}: image values in [{lo}, {hi}], expected 0..255 (or 0..1)")
    if hi <= 1.0:
        image = image * 255.0
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def merge_masks(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W, 6) PanNuke mask -> ((2, H, W) instance + class label, number of pixels claimed by two channels)."""
    inst = np.zeros(mask.shape[:2], dtype=np.int32)
    cls = np.zeros(mask.shape[:2], dtype=np.int32)
    overlap, next_id = 0, 1
    for c in range(5):
        channel = np.asarray(mask[..., c])
        if channel.min() < 0 or not np.all(channel == np.round(channel)):
            raise ValueError(f"mask channel {c} ({CLASSES[c + 1]}) holds non-integer or negative instance ids")
        local, old = relabel_sequential(channel.astype(np.int64))
        claimed = local > 0
        overlap += int(np.count_nonzero(claimed & (inst > 0)))
        free = claimed & (inst == 0)
        inst[free] = local[free] + next_id - 1
        cls[free] = c + 1
        next_id += len(old)
    inst, _ = relabel_sequential(inst)  # nuclei fully covered by an earlier channel leave gaps
    return np.stack([inst, cls]), overlap


def prepare_pannuke(
    fold_dirs: dict[int, str | os.PathLike],
    output: str | os.PathLike,
    train: tuple[int, ...] = (1,),
    val: tuple[int, ...] = (2,),
    test: tuple[int, ...] = (3,),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Convert PanNuke folds (fold number -> folder) to ``output``; return the datalist path."""
    roles = {"training": train, "validation": val, "test": test}
    used = [f for folds in roles.values() for f in folds]
    if len(used) != len(set(used)):
        raise ValueError(f"a fold is used in two splits: train {train}, val {val}, test {test}")
    missing = sorted(set(used) - set(fold_dirs))
    if missing:
        raise ValueError(f"folds {missing} requested but only folds {sorted(fold_dirs)} were given")
    check_output(output)
    loaded = {fold: load_fold(fold_dirs[fold]) for fold in used}  # memory-mapped: every fold checked before writing
    with DatasetWriter(output, "pannuke", "nuclei", CLASSES) as writer:
        overlap_pixels = 0
        for split, folds in roles.items():
            for fold in folds:
                images, masks, types = loaded[fold]
                for i in tqdm(range(images.shape[0]), desc=f"PanNuke fold {fold} ({split})", disable=not progress):
                    label, overlap = merge_masks(masks[i])
                    overlap_pixels += overlap
                    n = int(label[0].max())
                    if n == 0:
                        writer.skip("no nucleus")
                        continue
                    stem = f"fold{fold}_{i:05d}"
                    image = to_uint8_rgb(images[i], f"{fold_dirs[fold]} images.npy[{i}]")
                    writer.add(split, stem, image, label, source=stem, tissue=str(types[i]), n_nuclei=n, fold=fold)
        if overlap_pixels:
            logger.warning("PanNuke: %d pixels were claimed by two class channels; the first channel kept them",
                           overlap_pixels)
        info = {"folds": {k: list(v) for k, v in roles.items()}, "overlap_pixels": overlap_pixels}
        return writer.finish(seed, info)
