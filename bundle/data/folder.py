"""A folder of images + instance labels (external nuclei sets: MoNuSeg, CPM, Lizard, DSB2018, ...) -> a prepared
dataset (docs/DATA_CONTRACT.md), by default all in the ``test`` split: a zero-shot evaluation set.

- Pairing: image ``<stem>.<ext>`` (``readers.IMAGE_EXTS``) in ``images`` <-> the file of ``labels``
  (``readers.LABEL_EXTS``) whose stem is ``<stem>`` + one of ``label_suffixes``; class maps in ``classes`` alike.
  No label, or two candidates, is an error naming the image. When ``labels`` is ``images``, only suffixed stems
  are labels (``a.png`` + ``a_mask.png``).
- Instances: renumbered 1..n in ascending raw id. A label with one non-zero value in several connected pieces is a
  binary mask: its 8-connected components become the nuclei (logged: touching nuclei merge).
- Class of a nucleus (raw): the class map's majority over the nucleus (class 0 pixels do not vote), else the label
  file's own classes (``.mat``), else 1. Then ``class_mapping`` raw -> written id (every raw class met must be
  mapped); ``class_names`` names the written ids. ``type_scheme`` presets both (``SCHEMES``); ``nuclei`` makes every
  nucleus class 1 whatever the files say.
- Tiles, never resized: a side shorter than ``tile_size`` is padded at the bottom / right (image: ``pad_mode``
  ``constant`` with ``pad_value``, or ``reflect``; label: 0); longer sides are cut at ``tiles.tile_offsets``
  (``stride`` None: the fewest tiles, evenly spread, the last flush with the border). Instances are renumbered per
  tile; nuclei cut by a tile border keep their visible part. Tiles without a nucleus are skipped and counted
  unless ``keep_empty``. Entries record ``tile: [y, x]`` (when cut) and ``pad: [bottom, right]`` (when padded).
- ``invert``: image values v -> 255 - v before padding (fluorescence: bright nuclei on black become dark nuclei on
  white, as haematoxylin on H&E).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from . import consep, pannuke
from .datalist import SPLITS
from .instances import instance_label, relabel_sequential
from .readers import IMAGE_EXTS, LABEL_EXTS, LabelFile, read_class_map, read_image, read_label
from .tiles import write_tiles
from .writer import DatasetWriter, check_output

LABEL_SUFFIXES = ("", "_mask", "_masks", "_label", "_labels", "_inst", "_instance")
LIZARD = {1: "neutrophil", 2: "epithelial", 3: "lymphocyte", 4: "plasma", 5: "eosinophil", 6: "connective"}
SCHEMES = {  # name -> (raw class -> written class, written class names)
    "nuclei": (None, {1: "nucleus"}),
    "consep": ({t: int(consep.MERGE_7_TO_4[t]) for t in range(1, 8)}, consep.CLASSES),
    "lizard": ({t: t for t in LIZARD}, LIZARD),
    "pannuke": ({t: t for t in pannuke.CLASSES}, pannuke.CLASSES),
}
logger = logging.getLogger(__name__)


def _by_stem(folder: Path, exts: tuple[str, ...]) -> dict[str, list[Path]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            files.setdefault(p.stem, []).append(p)
    return files


def _match(image: Path, files: dict[str, list[Path]], suffixes, what: str) -> Path | None:
    hits = [p for s in suffixes for p in files.get(image.stem + s, [])]
    if len(hits) > 1:
        raise ValueError(f"{image}: {len(hits)} {what} files match it ({', '.join(p.name for p in hits)}); "
                         "keep one, or set label_suffixes")
    return hits[0] if hits else None


def find_pairs(images, labels, classes=None, label_suffixes=LABEL_SUFFIXES) -> list[tuple[Path, Path, Path | None]]:
    """(image, label, class map or None) triples; errors name the image without a label or with two."""
    images, labels = Path(images), Path(labels)
    image_files, label_files = _by_stem(images, IMAGE_EXTS), _by_stem(labels, LABEL_EXTS)
    same = images.resolve() == labels.resolve()
    suffixes = [s for s in label_suffixes if s] if same else list(label_suffixes)
    if same:  # a suffixed stem whose unsuffixed stem is an image is that image's label
        image_files = {s: p for s, p in image_files.items()
                       if not any(s.endswith(x) and s[: -len(x)] in image_files for x in suffixes)}  # fmt: skip
    if not image_files:
        raise FileNotFoundError(f"{images}: no images ({', '.join(IMAGE_EXTS)})")
    class_files = _by_stem(Path(classes), LABEL_EXTS) if classes is not None else None
    pairs = []
    for stem, found in sorted(image_files.items()):
        if len(found) > 1:
            raise ValueError(f"{images}: two images named {stem!r} ({', '.join(p.name for p in found)}); keep one")
        image = found[0]
        label = _match(image, label_files, suffixes, "label")
        if label is None:
            raise FileNotFoundError(f"{image}: no label in {labels} (expected {stem}{{{','.join(suffixes)}}} with "
                                    f"one of {', '.join(LABEL_EXTS)})")
        class_map = _match(image, class_files, label_suffixes, "class map") if classes else None
        if classes is not None and class_map is None:
            raise FileNotFoundError(f"{image}: no class map in {classes}")
        pairs.append((image, label, class_map))
    return pairs


def instances_of(label: LabelFile, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(instance map 1..n, raw id of each) of a label; a binary mask becomes its connected components (logged)."""
    values = np.unique(label.inst[label.inst > 0])
    if len(values) == 1:
        pieces, n = ndimage.label(label.inst > 0, structure=np.ones((3, 3)))
        if n > 1:
            logger.info("%s: binary mask (one value, %d connected pieces): each piece is a nucleus", path, n)
            return pieces.astype(np.int32), np.arange(1, n + 1)
    return relabel_sequential(label.inst)


def nucleus_classes(seq, old, label: LabelFile, class_map, label_path: Path, class_path, mapping) -> np.ndarray:
    """Written class of each instance (module docstring, 'Class of a nucleus'); errors name the file and nucleus."""
    source = class_path or label_path
    if class_map is not None:
        votes = np.zeros((len(old) + 1, int(class_map.max(initial=0)) + 1), np.int64)
        np.add.at(votes, (seq.ravel(), class_map.ravel()), 1)
        votes[:, 0] = 0
        empty = np.flatnonzero(votes[1:].sum(1) == 0)
        if len(empty):
            raise ValueError(f"{source}: nucleus {old[empty[0]]} of {label_path} has no class (class 0 under all "
                             f"its pixels; nuclei without a class: {len(empty)})")
        classes = votes[1:].argmax(1)
    elif label.instance_class is not None:
        missing = [int(i) for i in old if int(i) not in label.instance_class]
        if missing:
            raise ValueError(f"{label_path}: nuclei {missing[:5]} of inst_map have no class row ({len(missing)} "
                             "missing)")
        classes = np.array([label.instance_class[int(i)] for i in old], np.int64)
        if len(classes) and classes.min() < 1:
            raise ValueError(f"{label_path}: nucleus {old[np.argmin(classes)]} has class 0 (background); a "
                             "nucleus needs a class >= 1")
    else:
        classes = np.ones(len(old), np.int64)
    if mapping is None:
        return classes
    unknown = sorted(set(classes.tolist()) - set(mapping))
    if unknown:
        raise ValueError(f"{source}: class ids {unknown} are not in the class mapping {sorted(mapping)}")
    return np.array([mapping[c] for c in classes.tolist()], np.int64)


def read_pair(image_path: Path, label_path: Path, class_path, invert: bool, type_scheme, class_mapping):
    """One image (``invert``-ed if asked), its instance map 1..n and the written class of each nucleus; sizes that
    differ are an error naming the files."""
    image = 255 - read_image(image_path) if invert else read_image(image_path)
    label = read_label(label_path, image.shape[:2])
    seq, old = instances_of(label, label_path)
    class_map = read_class_map(class_path) if class_path else label.class_map
    for what, path, array in (("label", label_path, seq), ("class map", class_path, class_map)):
        if array is not None and array.shape != image.shape[:2]:
            raise ValueError(f"{image_path}: image size {image.shape[:2]} != {what} size {array.shape} of {path}")
    types = (np.ones(len(old), np.int64) if type_scheme == "nuclei"
             else nucleus_classes(seq, old, label, class_map, label_path, class_path, class_mapping))
    return image, seq, types


def _pad(array: np.ndarray, bottom: int, right: int, mode: str, value: int) -> np.ndarray:
    width = [(0, bottom), (0, right)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, width, mode="reflect") if mode == "reflect" else np.pad(array, width, constant_values=value)


def _check_args(tile_size, stride, pad_mode, pad_value, split, type_scheme, label_suffixes, class_mapping) -> None:
    for name, value in (("tile_size", tile_size), ("stride", stride)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
    if not (isinstance(pad_value, int) and 0 <= pad_value <= 255):
        raise ValueError(f"pad_value must be an integer in 0..255, got {pad_value!r}")
    if class_mapping is not None and any(int(v) < 1 for v in class_mapping.values()):
        raise ValueError(f"class_mapping must map to class ids >= 1 (0 is background), got {class_mapping}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if type_scheme is not None and type_scheme not in SCHEMES:
        raise ValueError(f"type_scheme must be one of {sorted(SCHEMES)} or None, got {type_scheme!r}")
    if isinstance(label_suffixes, str) or not label_suffixes:
        raise ValueError(f"label_suffixes must be a non-empty list of suffixes ('' for none), got {label_suffixes!r}")


def prepare_folder(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    output: str | os.PathLike,
    classes: str | os.PathLike | None = None,
    label_suffixes=LABEL_SUFFIXES,
    type_scheme: str | None = None,
    class_mapping: dict[int, int] | None = None,
    class_names: dict[int, str] | None = None,
    tile_size: int = 256,
    stride: int | None = None,
    pad_mode: str = "constant",
    pad_value: int = 0,
    keep_empty: bool = False,
    invert: bool = False,
    split: str = "test",
    name: str = "external",
    tissue: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Import a folder of images + instance labels into ``output`` (module docstring); return the datalist path.

    Arguments are checked before anything is read; ``output`` is written through :class:`DatasetWriter`, so a failed
    run leaves an existing output unchanged.
    """
    _check_args(tile_size, stride, pad_mode, pad_value, split, type_scheme, label_suffixes, class_mapping)
    if type_scheme is not None:
        scheme_mapping, scheme_names = SCHEMES[type_scheme]
        class_mapping = scheme_mapping if class_mapping is None else class_mapping
        class_names = scheme_names if class_names is None else class_names
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    check_output(output)
    pairs = find_pairs(images, labels, classes, label_suffixes)
    n_nuclei, sizes = 0, set()
    with DatasetWriter(output, name, "nuclei", names) as writer:
        for image_path, label_path, class_path in tqdm(pairs, desc=name, disable=not progress):
            image, seq, types = read_pair(image_path, label_path, class_path, invert, type_scheme, class_mapping)
            if not class_names:
                for c in np.unique(types).tolist():
                    writer.classes.setdefault(int(c), "nucleus" if c == 1 else f"class {c}")
            n_nuclei += len(types)
            sizes.add(image.shape[:2])
            _write_tiles(writer, image_path.stem, image, instance_label(seq, types), split, tile_size, stride,
                         pad_mode, pad_value, keep_empty, tissue)
        if not writer.splits[split]:
            raise ValueError(f"{images}: no tile of the {len(pairs)} images holds a nucleus, so there is nothing to "
                             "evaluate (keep_empty keeps tiles without one)")
        info = {"images": len(pairs), "nuclei": n_nuclei, "image_sizes": sorted(list(s) for s in sizes),
                "tile_size": tile_size, "stride": stride, "pad_mode": pad_mode, "type_scheme": type_scheme,
                "invert": invert}
        return writer.finish(seed, info)


def _write_tiles(writer, stem, image, label, split, tile_size, stride, pad_mode, pad_value, keep_empty, tissue):
    """Pad ``image`` / ``label`` (2, H, W) up to ``tile_size`` and write its tiles (module docstring, 'Tiles')."""
    h, w = image.shape[:2]
    bottom, right = max(0, tile_size - h), max(0, tile_size - w)
    fields = {}
    if bottom or right:
        image = _pad(image, bottom, right, pad_mode, pad_value)
        label = np.moveaxis(_pad(np.moveaxis(label, 0, -1), bottom, right, "constant", 0), -1, 0)
        fields["pad"] = [bottom, right]
    if tissue:
        fields["tissue"] = tissue
    write_tiles(writer, split, stem, image, label, tile_size, stride, keep_empty=keep_empty, **fields)
