"""Read the image and label files of external nuclei sets (``bundle.data.folder``), checking what they hold.

- Images (``IMAGE_EXTS``): PNG / JPEG / BMP (PIL), TIFF (tifffile), ``.npy``; (H, W), (H, W, C) or (C, H, W) with
  C in 1..4. Result: uint8 (H, W, 3). Grey (1 channel, or grey + alpha) is repeated to RGB, RGBA loses alpha (both
  logged). Values: uint8 as they are; integers within 0..255 cast; floats within [0, 1] times 255; anything else
  (16-bit microscopy) scaled linearly from min(0, the image's minimum)..its maximum to 0..255, logged (the black
  level stays: a field of values 200..4095 maps to 12..255). NaN / inf: an error.
- Labels (``LABEL_EXTS``) -> :class:`LabelFile`: the raw instance map (H, W) int64 (0 background, any positive
  ids), plus what the file says about classes:
  * PNG / TIFF / ``.npy``: one channel (an RGB label with three equal channels is read as one); palette PNGs give
    their indices.
  * ``.mat`` (scipy.io.loadmat): ``inst_map`` (required); per-instance classes from CoNSeP's ``inst_type`` (row i:
    the i-th smallest id) or Lizard's ``class`` with ``id`` (row i: the nucleus ``id[i]``); else ``type_map``
    (a class per pixel).
  * ``.xml`` (MoNuSeg / Aperio ImageScope): every ``Region``'s ``Vertex`` polygon rasterised at the image's size,
    ids in file order (a later polygon overwrites an earlier one where they overlap).
  Values must be integers >= 0; an error names the file.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

from bundle.transforms.checks import check_finite

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
LABEL_EXTS = (".png", ".tif", ".tiff", ".npy", ".mat", ".xml")
logger = logging.getLogger(__name__)


@dataclass
class LabelFile:
    """A label file's instance map (raw ids) and its class information (at most one of the two is set)."""

    inst: np.ndarray  # (H, W) int64, 0 background
    instance_class: dict[int, int] | None = None  # raw instance id -> raw class id
    class_map: np.ndarray | None = None  # (H, W) int64 class per pixel


def load_array(path: Path, label: bool = False) -> np.ndarray:
    """The array stored in ``path`` (no conversion but palette -> RGB for images); unreadable: ``ValueError``."""
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            return np.load(path, allow_pickle=False)
        if ext in (".tif", ".tiff"):
            import tifffile  # a dependency of scikit-image

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if im.mode == "P" and not label:
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            return np.asarray(im)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _channels_last(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3 and array.shape[-1] <= 4:
        return array
    if array.ndim == 3 and array.shape[0] <= 4:
        return np.moveaxis(array, 0, -1)
    raise ValueError(f"{path}: {what} must be (H, W), (H, W, C) or (C, H, W) with C <= 4, got shape {array.shape}")


def to_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    """Image values -> uint8 by the rule of the module docstring."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{path}: image values must be numbers, got dtype {array.dtype}")
    check_finite(array, f"image {path}")
    low, high = float(array.min(initial=0)), float(array.max(initial=0))
    if np.issubdtype(array.dtype, np.integer) and low >= 0 and high <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and low >= 0 and high <= 1:
        return np.round(array * 255).astype(np.uint8)
    logger.info("%s: %s values %g..%g scaled to 0..255", path, array.dtype, low, high)
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.round((array.astype(np.float64) - low) * scale).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
    """Image file -> uint8 (H, W, 3) (module docstring)."""
    array = _channels_last(load_array(path), path, "an image")
    c = array.shape[-1]
    if c in (1, 2):
        logger.info("%s: grey image converted to RGB", path)
        array = np.repeat(array[..., :1], 3, axis=-1)
    elif c == 4:
        logger.info("%s: RGBA image converted to RGB (alpha dropped)", path)
        array = array[..., :3]
    return np.ascontiguousarray(to_uint8(array, path))


def as_ids(array, path: Path, key: str) -> np.ndarray:
    """Label values -> int64, refusing non-integers and negative ids (the error names the file and the key)."""
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{path}: {key} must hold integer ids, got dtype {array.dtype}")
    check_finite(array, f"{path}: {key}")
    if not np.all(array == np.round(array)):
        raise ValueError(f"{path}: {key} holds non-integer values (e.g. {array[array != np.round(array)].flat[0]:g}); "
                         "expected integer ids (0 background)")
    if array.size and array.min() < 0:
        raise ValueError(f"{path}: {key} holds negative ids (min {array.min():g}); expected 0 background, ids >= 1")
    return array.astype(np.int64)


def _single_channel(array: np.ndarray, path: Path) -> np.ndarray:
    array = _channels_last(array, path, "a label")
    if array.shape[-1] > 1 and not all(np.array_equal(array[..., 0], array[..., k]) for k in range(array.shape[-1])):
        raise ValueError(f"{path}: the label has {array.shape[-1]} different channels (a colour rendering?); "
                         "expected a single-channel instance map (0 background, one id per nucleus)")
    return array[..., 0]


def load_mat(path: Path) -> dict:
    """The variables of a MATLAB ``.mat`` file (``scipy.io.loadmat``): the one ``.mat`` reader of the bundle (CoNSeP's
    importer and the folder importer both read through it); unreadable: ``ValueError`` naming the file."""
    try:
        return sio.loadmat(path)
    except Exception as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _read_mat(path: Path) -> LabelFile:
    mat = load_mat(path)
    if "inst_map" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no 'inst_map' (has {keys}); expected a CoNSeP / Lizard / CPM style .mat with "
                         "inst_map (H, W) and optionally type_map, inst_type or class + id")
    inst = as_ids(mat["inst_map"], path, "inst_map")
    if inst.ndim != 2:
        raise ValueError(f"{path}: inst_map must be (H, W), got shape {inst.shape}")
    ids = np.unique(inst[inst > 0])
    if "class" in mat and "id" in mat:  # Lizard
        rows, classes = as_ids(mat["id"], path, "id").ravel(), as_ids(mat["class"], path, "class").ravel()
        if len(rows) != len(classes):
            raise ValueError(f"{path}: 'id' has {len(rows)} rows but 'class' {len(classes)}")
        return LabelFile(inst, instance_class=dict(zip(rows.tolist(), classes.tolist())))
    if "inst_type" in mat:  # CoNSeP
        classes = as_ids(mat["inst_type"], path, "inst_type").ravel()
        if len(classes) != len(ids):
            raise ValueError(f"{path}: inst_type has {len(classes)} rows for {len(ids)} instances in inst_map "
                             "(expected one row per instance, in ascending id order)")
        return LabelFile(inst, instance_class=dict(zip(ids.tolist(), classes.tolist())))
    if "type_map" in mat:
        return LabelFile(inst, class_map=as_ids(mat["type_map"], path, "type_map"))
    return LabelFile(inst)


def _read_xml(path: Path, shape: tuple[int, int]) -> LabelFile:
    from skimage.draw import polygon

    try:
        regions = ET.parse(path).getroot().iter("Region")
        polygons = [[(float(v.get("Y")), float(v.get("X"))) for v in r.iter("Vertex")] for r in regions]
    except (ET.ParseError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read {path} as MoNuSeg / ImageScope XML (Region / Vertex X, Y): {e}") from e
    inst = np.zeros(shape, np.int64)
    for k, points in enumerate(p for p in polygons if len(p) >= 3):
        rr, cc = polygon(*np.array(points).T, shape=shape)
        inst[rr, cc] = k + 1
    return LabelFile(inst)


def read_label(path: Path, shape: tuple[int, int] | None = None) -> LabelFile:
    """Label file -> :class:`LabelFile` (module docstring); ``shape`` (H, W) is needed to rasterise an XML file."""
    ext = path.suffix.lower()
    if ext == ".mat":
        return _read_mat(path)
    if ext == ".xml":
        if shape is None:
            raise ValueError(f"{path}: an XML label is rasterised at its image's size, which was not given")
        return _read_xml(path, shape)
    return LabelFile(as_ids(_single_channel(load_array(path, label=True), path), path, "the label"))


def read_class_map(path: Path) -> np.ndarray:
    """A class map file (PNG / TIFF / ``.npy``, or a ``.mat`` with ``type_map`` or ``class_map``) -> (H, W) int64."""
    if path.suffix.lower() != ".mat":
        return as_ids(_single_channel(load_array(path, label=True), path), path, "the class map")
    mat = load_mat(path)
    key = next((k for k in ("type_map", "class_map") if k in mat), None)
    if key is None:
        raise ValueError(f"{path}: a class map .mat needs 'type_map' or 'class_map'")
    return as_ids(mat[key], path, key)
