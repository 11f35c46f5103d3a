"""CoNSeP (Train|Test/Images/*.png + Labels/*.mat) -> tiled prepared dataset (docs/DATA_CONTRACT.md).

- Types: the official release has 7 types, merged to the papers' 4: 1 other, 2 inflammatory,
  {3 healthy, 4 malignant epithelial} -> 3 epithelial, {5 fibroblast, 6 muscle, 7 endothelial} -> 4 spindle.
  ``type_scheme=4`` reads files already merged (the shared copy); a type id > 4 there is an error, since it means
  the file is in the 7-type scheme.
- Class of a nucleus: ``inst_type`` (one row per instance, in ascending instance-id order); it must agree with the
  majority of ``type_map`` inside the nucleus, else the file is rejected. Without ``inst_type``, the majority of
  ``type_map`` is used.
- Tiles (:mod:`bundle.data.tiles`): ``tile_size`` squares at ``stride`` steps plus a last tile flush with the
  border; ``stride=None`` spreads the fewest tiles evenly (1000 px, tile 256 -> offsets 0, 248, 496, 744). Instances
  are renumbered 1..n per tile; nuclei cut by the tile border keep their visible part. Tiles without a nucleus are
  skipped and counted.
- Split by source image: validation is a seeded ``val_fraction`` of the Train source images, test is Test.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .instances import instance_label, relabel_sequential
from .readers import as_ids, load_mat
from .splits import split_sources
from .tiles import tile_offsets, write_tiles  # noqa: F401  (tile_offsets: bundle.data.consep.tile_offsets)
from .writer import DatasetWriter, check_output

CLASSES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
CLASSES_7 = {
    1: "other", 2: "inflammatory", 3: "healthy epithelial", 4: "malignant epithelial",
    5: "fibroblast", 6: "muscle", 7: "endothelial",
}  # fmt: skip
MERGE_7_TO_4 = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.int32)
SOURCE_PATTERN = r"(?P<source>.+?)(?:_\d{3})?"  # 'train_10_003' (a pre-cut tile) -> 'train_10'; 'train_1' -> itself


def source_of(stem: str, pattern: str = SOURCE_PATTERN) -> str:
    """Source image of a file stem (the part the split must respect)."""
    m = re.fullmatch(pattern, stem)
    if not m:
        raise ValueError(f"file name {stem!r} does not match the source pattern {pattern!r}")
    return m.group("source")


def read_image(path: Path) -> np.ndarray:
    """RGB or RGBA PNG -> uint8 (H, W, 3) (alpha dropped)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"{path}: expected an RGB(A) image, got mode {im.mode}")
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def read_label(path: Path, type_scheme: int = 7) -> tuple[np.ndarray, np.ndarray, int]:
    """CoNSeP .mat -> (instance map renumbered 1..n (H, W), 4-class type of instance i+1 (n,), largest raw type id)."""
    if type_scheme not in (4, 7):
        raise ValueError(f"type_scheme must be 7 (official) or 4 (merged), got {type_scheme}")
    mat = load_mat(path)
    for key in ("inst_map", "type_map"):
        if key not in mat:
            raise ValueError(f"{path}: no '{key}' (expected inst_map and type_map (H, W), inst_type (N, 1))")
    inst = as_ids(mat["inst_map"], path, "inst_map")
    type_map = as_ids(mat["type_map"], path, "type_map")
    if inst.ndim != 2 or inst.shape != type_map.shape:
        raise ValueError(f"{path}: inst_map {inst.shape} and type_map {type_map.shape} must be the same (H, W)")
    inst_type = as_ids(mat["inst_type"], path, "inst_type").reshape(-1) if "inst_type" in mat else None
    all_types = np.union1d(np.unique(type_map), inst_type if inst_type is not None else [])
    top = 7 if type_scheme == 7 else 4
    bad = all_types[(all_types < 0) | (all_types > top)]
    if len(bad):
        hint = " (the file looks like the official 7-type scheme: use type_scheme 7)" if type_scheme == 4 else ""
        raise ValueError(f"{path}: type ids {bad.tolist()} outside the {type_scheme}-type scheme 0..{top}{hint}")
    ids = np.unique(inst)
    ids = ids[ids > 0]
    seq, _ = relabel_sequential(inst)
    votes = np.zeros((len(ids) + 1, top + 1), dtype=np.int64)
    np.add.at(votes, (seq.ravel(), type_map.ravel()), 1)
    majority = votes[1:].argmax(1)  # type of each instance by majority of its type_map pixels
    if inst_type is None:
        inst_type = majority
    elif len(inst_type) != len(ids):
        raise ValueError(
            f"{path}: inst_type has {len(inst_type)} rows for {len(ids)} instances in inst_map (expected (N, 1))"
        )
    disagree = np.flatnonzero(inst_type != majority)
    if len(disagree):
        i = disagree[0]
        raise ValueError(
            f"{path}: inst_type says type {inst_type[i]} for instance {ids[i]} but type_map says {majority[i]} "
            f"({len(disagree)} instances disagree)"
        )
    if len(inst_type) and inst_type.min() < 1:
        raise ValueError(f"{path}: instance {ids[np.argmin(inst_type)]} has type 0 (background)")
    types = MERGE_7_TO_4[inst_type] if type_scheme == 7 else inst_type
    return seq, types.astype(np.int32), int(all_types.max(initial=0))


def find_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of an official split folder (Images/*.png, Labels/*.mat)."""
    images_dir, labels_dir = split_dir / "Images", split_dir / "Labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"CoNSeP folder not found: {d} (expected Train|Test/Images and /Labels)")
    pairs = []
    for image in sorted(images_dir.glob("*.png")):
        label = labels_dir / f"{image.stem}.mat"
        if not label.is_file():
            raise FileNotFoundError(f"{image}: no label file {label}")
        pairs.append((image, label))
    if not pairs:
        raise FileNotFoundError(f"{images_dir}: no .png images")
    return pairs


def _check_args(type_scheme, tile_size, stride, val_fraction, source_pattern) -> None:
    if type_scheme not in (4, 7):
        raise ValueError(f"type_scheme must be 7 (official release) or 4 (labels already merged), got {type_scheme!r}")
    for name, value in (("tile_size", tile_size), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if "(?P<source>" not in source_pattern:
        raise ValueError(f"source_pattern {source_pattern!r} needs a named group (?P<source>...)")


def prepare_consep(
    input_dir: str | os.PathLike,
    output: str | os.PathLike,
    type_scheme: int = 7,
    tile_size: int = 256,
    stride: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    source_pattern: str = SOURCE_PATTERN,
    progress: bool = True,
) -> Path:
    """Convert a CoNSeP release folder (Train/, Test/) to ``output``; return the datalist path.

    Arguments are checked before anything is read; ``output`` is written through :class:`DatasetWriter`, so a run
    that fails leaves an existing output unchanged.
    """
    _check_args(type_scheme, tile_size, stride, val_fraction, source_pattern)
    check_output(output)
    input_dir = Path(input_dir)
    train_pairs, test_pairs = find_pairs(input_dir / "Train"), find_pairs(input_dir / "Test")
    train_sources, val_sources = split_sources([source_of(i.stem, source_pattern) for i, _ in train_pairs],
                                               val_fraction, seed)  # fmt: skip
    val_sources = set(val_sources)
    with DatasetWriter(output, "consep", "nuclei", CLASSES) as writer:
        max_type = 0
        jobs = [(p, "test") for p in test_pairs] + [(p, None) for p in train_pairs]
        for (image_path, label_path), split in tqdm(jobs, desc="CoNSeP", disable=not progress):
            source = source_of(image_path.stem, source_pattern)
            split = split or ("validation" if source in val_sources else "training")
            image = read_image(image_path)
            inst, types, top_type = read_label(label_path, type_scheme)
            max_type = max(max_type, top_type)
            if image.shape[:2] != inst.shape:
                raise ValueError(
                    f"{image_path}: image size {image.shape[:2]} != label size {inst.shape} in {label_path}"
                )
            write_tiles(writer, split, image_path.stem, image, instance_label(inst, types), tile_size, stride,
                        source=source, where=image_path, tissue="colon")
        if type_scheme == 7 and max_type <= 4:
            raise ValueError(
                f"{input_dir}: no file has a type id above 4, so the labels look already merged to the 4-type scheme; "
                "reading them as the official 7 types would turn spindle (4) into epithelial: use type_scheme 4"
            )
        info = {"type_scheme": type_scheme, "tile_size": tile_size, "stride": stride, "val_fraction": val_fraction,
                "validation_sources": sorted(val_sources)}  # fmt: skip
        return writer.finish(seed, info)
