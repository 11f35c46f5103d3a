"""Load-time checks of the training / evaluation data (configs/train.yaml ``load``, configs/tasks/synapse.yaml):
an unreadable file, an image of an unusable channel count, non-finite values or a label of another size than its
image stop with an error naming the file(s), instead of a bare reader error, a collation error, a NaN loss or a
label silently resized on its own.

* :class:`LoadImaged`: MONAI's ``LoadImaged`` whose errors name the file and give the reader's reason
  ("image file is truncated", "cannot identify image file"), not MONAI's "cannot find a suitable reader".
* :class:`EnsureRGBd`: a grey (1-channel), grey + alpha (2) or RGBA (4) image becomes RGB (3 channels), with a log
  line naming the file; other channel counts are an error.
* :class:`CheckImageLabeld`: image and label have the same spatial size and only finite values.
* :func:`check_finite`: the value check, shared with the preparation scripts (``bundle.data``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImaged as _MonaiLoadImaged
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def file_of(data: Mapping, key: Hashable) -> str:
    """The file an item's ``key`` was loaded from (MetaTensor ``filename_or_obj``, a meta dict, or the path)."""
    value = data.get(key)
    meta = getattr(value, "meta", None) or data.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if not name and isinstance(value, str):
        name = value
    return str(name) if name else f"<{key}>"


def check_finite(array, where: str, what: str = "values") -> None:
    """Raise ``ValueError`` naming ``where`` when ``array`` holds NaN or +-inf (how many, of how many)."""
    arr = _array(array)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
        return
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ValueError(
            f"{where}: {n_nan} NaN and {n_inf} infinite {what} out of {arr.size}; the data must hold finite numbers "
            "(re-export or repair the file, or leave it out of the datalist)"
        )


class LoadImaged(_MonaiLoadImaged):
    """``monai.transforms.LoadImaged`` that names the file and the reader's reason when a file cannot be read."""

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            value = data[key]
            if isinstance(value, (str, os.PathLike)) and not os.path.exists(value):
                raise FileNotFoundError(f"{key} file not found: {os.fspath(value)} (check the datalist entry)")
        try:
            return super().__call__(data, reader)
        except Exception as e:
            keys = [k for k in self.keys if k in data]
            files = ", ".join(file_of(data, k) for k in keys) or "?"
            reason = str(e).strip()
            if "cannot find a suitable reader" in reason:
                # MONAI folds every tried reader's traceback into its message, the configured reader's first
                found = re.search(r"^(?!Traceback)[A-Za-z_][\w.]*(?:Error|Exception)\b.*$", reason, flags=re.M)
                reason = found.group(0) if found else reason.splitlines()[0]
            else:
                reason = f"{type(e).__name__}: {reason}"
            raise ValueError(f"cannot read {files}: {reason}") from None  # the reason is in the message


class EnsureRGBd(MapTransform):
    """Channel-first image -> 3 channels: grey (1) repeated, grey + alpha (2) and RGBA (4) lose alpha; logged."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 3:
                raise ValueError(f"{file_of(d, key)}: expected a 2D image (C, H, W), got shape {tuple(img.shape)}")
            c = img.shape[0]
            if c == 3:
                continue
            if c in (1, 2):
                logger.info("%s: grey image (%d channel%s) converted to RGB", file_of(d, key), c, "s" * (c > 1))
                d[key] = img[:1].repeat(3, 1, 1) if isinstance(img, torch.Tensor) else np.repeat(img[:1], 3, 0)
            elif c == 4:
                logger.info("%s: RGBA image converted to RGB (alpha dropped)", file_of(d, key))
                d[key] = img[:3]
            else:
                raise ValueError(
                    f"{file_of(d, key)}: an image needs 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {c} "
                    f"(shape {tuple(img.shape)})"
                )
        return d


class CheckImageLabeld(MapTransform):
    """Refuse an item whose label has another spatial size than its image, whose image / label hold NaN / inf, or
    whose label does not have ``label_channels`` channels (None: any).

    Both are channel-first; the spatial size is everything after the channel axis. Errors name both files.
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", label_channels: int | None = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key, self.label_key, self.label_channels = image_key, label_key, label_channels

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite(d[key], f"{key} file {file_of(d, key)}")
        label = d.get(self.label_key)
        if self.label_channels and label is not None and (label.ndim != 3 or label.shape[0] != self.label_channels):
            raise ValueError(
                f"label {file_of(d, self.label_key)} has shape {tuple(label.shape)}; expected ({self.label_channels}, "
                "H, W): the [instance map, class map] of docs/DATA_CONTRACT.md (re-run the preparation script)"
            )
        if self.image_key in d and self.label_key in d:
            image, label = d[self.image_key], d[self.label_key]
            if tuple(image.shape[1:]) != tuple(label.shape[1:]):
                raise ValueError(
                    f"label {file_of(d, self.label_key)} has size {tuple(label.shape[1:])} but its image "
                    f"{file_of(d, self.image_key)} has size {tuple(image.shape[1:])}; a label must have its image's "
                    "height and width (re-run the preparation script, or fix the datalist entry)"
                )
        return d
