"""MONAI Label glue: its datastore labels (binary / label-index masks) as the trainer's label maps.

MONAI Label saves a label per image as a mask (0 background, label index inside). The training config reads the
data contract's (2, H, W) [instance map, class map] labels (docs/DATA_CONTRACT.md). :class:`MaskToLabelMapsd`
turns a mask into that: instances are the connected components of the mask, the class is the mask's value
(255, as PNG viewers write it, counts as class 1). :func:`datastore_label_loader` rewrites a training config's
``load`` list to read datastore masks that way, and :func:`check_mask_upload` refuses a mask that is not an image
of its image's size before it is saved (both used by ``scripts/monailabel_app``).
"""

from __future__ import annotations

import copy
import io
import os

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage


class MaskToLabelMapsd(MapTransform):
    """(1, H, W) or (H, W) mask -> (2, H, W) int32 [instance map (connected components), class map]."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            mask = np.asarray(d[key].detach().cpu() if isinstance(d[key], torch.Tensor) else d[key])
            if mask.ndim == 3 and mask.shape[0] == 1:
                mask = mask[0]
            if mask.ndim != 2:
                raise ValueError(f"{key}: expected a 2D mask, got shape {mask.shape}")
            classes = np.where(mask == 255, 1, mask).astype(np.int32)
            instances = np.zeros_like(classes)
            offset = 0
            for c in np.unique(classes[classes > 0]):
                comp, n = ndimage.label(classes == c)
                instances[comp > 0] = comp[comp > 0] + offset
                offset += n
            maps = torch.from_numpy(np.stack([instances, classes]))
            # a MetaTensor keeps the file name for the load-time checks' messages
            d[key] = MetaTensor(maps, meta=d[key].meta) if isinstance(d[key], MetaTensor) else maps
        return d


LOADERS = ("LoadImaged", "monai.transforms.LoadImaged", "bundle.transforms.checks.LoadImaged")


def datastore_label_loader(load: list) -> list:
    """A copy of a training config's ``load`` transforms list reading ``label`` as a PNG mask, not a ``.npy``."""
    out = []
    for t in copy.deepcopy(load):
        target = t.get("_target_") if isinstance(t, dict) else None
        if target in LOADERS and t.get("keys") in ("label", ["label"]):
            out.append({"_target_": target, "keys": "label", "reader": "PILReader", "reverse_indexing": False,
                        "image_only": True, "ensure_channel_first": True})
            out.append({"_target_": "bundle.labeling.MaskToLabelMapsd", "keys": "label"})
        else:
            out.append(t)
    return out


MASK_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # 2D images whose masks are checked here


def check_mask_upload(data: bytes, image_path: str, name: str = "label", image_id: str = "") -> tuple[int, int]:
    """Check an uploaded mask (the file's bytes) against its 2D image before it is saved: it must be an image of the
    image's width and height. Returns (height, width); ``ValueError`` naming both files and sizes otherwise."""
    from PIL import Image, UnidentifiedImageError

    what = f"image '{image_id}' ({image_path})" if image_id else f"image {image_path}"
    with Image.open(image_path) as im:
        w, h = im.size
    try:
        with Image.open(io.BytesIO(data)) as mask:
            mw, mh = mask.size
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"label {name} for {what} is not a readable image ({type(e).__name__}: {e}); save the mask "
                         f"as a PNG of the image's size ({w} x {h}, 0 background)") from None
    if (mw, mh) != (w, h):
        raise ValueError(f"label {name} has size {mw} x {mh} (width x height) but {what} has size {w} x {h}: a label "
                         "must have its image's size; nothing was saved (the image's previous label, if any, is kept)")
    return h, w


def is_2d_image(path: str) -> bool:
    """Whether ``path`` is a 2D image file whose labels :func:`check_mask_upload` checks."""
    return os.path.isfile(path) and path.lower().endswith(MASK_IMAGE_SUFFIXES)
