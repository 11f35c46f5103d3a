"""What the inference transforms record about an image and read back: file suffixes by kind, the metadata keys
:class:`bundle.inference.PromptImaged` writes (``prompt_kind``: ``"2d"`` / ``"volume"``; ``prompt_slice``: the
canonical axial slice, -1 for 2D) and :class:`bundle.masks.PromptMaskd` reads, and the two accessors of a MONAI-loaded
image's metadata. A leaf: the preprocessing (``inference``) and the postprocessing (``masks``) both import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.data import MetaTensor

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dcm")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
META_KIND, META_SLICE = "prompt_kind", "prompt_slice"  # what PromptImaged records in the image's meta


def image_meta(img: Any) -> dict:
    """The metadata of a MONAI-loaded image (a copy; ``{}`` for a plain array)."""
    return dict(img.meta) if isinstance(img, MetaTensor) else {}


def source_name(meta: Mapping) -> str:
    """The file an image was loaded from, by its metadata (``""`` when unknown)."""
    name = meta.get("filename_or_obj", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name)
