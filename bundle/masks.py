"""The network's logits as a mask in the input image's space, and its file: the ``postprocessing`` of
``configs/inference.yaml`` (:mod:`bundle.inference` is its ``preprocessing``).

:class:`PromptMaskd` maps the logits back through what :class:`~bundle.inference.PromptImaged` recorded in the
image's metadata (``prompt_kind``, ``prompt_slice``): a 2D mask in the file's index order, or a volume with only
the segmented slice filled (:mod:`bundle.transforms.geometry`). :class:`SaveImageMaskd` writes it beside the input
(:func:`mask_path`) with :func:`bundle.io.save_png` / :func:`bundle.io.save_nifti_mask`; MONAI Label and MONAI
Deploy, which write results themselves, leave it out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, SaveImaged

from bundle.image_meta import IMAGE_SUFFIXES, META_KIND, META_SLICE, VOLUME_SUFFIXES, image_meta, source_name
from bundle.io import save_nifti_mask, save_png
from bundle.transforms.geometry import display_shape, from_canonical, set_display_slice, to_canonical

logger = logging.getLogger(__name__)


class PromptMaskd(MapTransform):
    """Network logits ``(1, S, S)`` -> binary mask in the input image's space (file index order), uint8.

    2D images give ``(X, Y)`` (MONAI Label's writer takes a 2D label without channel), volumes ``(1, I, J, K)``
    with only the segmented slice filled (MONAI Deploy's operator expects a channel).
    """

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", threshold: float = 0.0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.threshold = image_key, threshold

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = image_meta(d.get(self.image_key))
        kind, k = meta.get(META_KIND), int(meta.get(META_SLICE, -1))
        spatial = [int(v) for v in np.asarray(meta.get("spatial_shape", ())).reshape(-1)]
        if kind not in ("2d", "volume"):
            raise ValueError(f"PromptMaskd: '{self.image_key}' carries no PromptImaged metadata")
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key]).detach().float().cpu()
            if logits.ndim == 2:
                logits = logits[None]
            if kind == "2d":
                x, y = spatial[:2]
                mask = F.interpolate(logits[None], size=(y, x), mode="bilinear", align_corners=False)[0, 0]
                out = (mask > self.threshold).numpy().T.astype(np.uint8)  # (H, W) -> (X, Y)
            else:
                canonical_shape = to_canonical(np.zeros(spatial, dtype=np.uint8), meta.get("affine")).shape
                mask = F.interpolate(logits[None], size=display_shape(canonical_shape), mode="bilinear",
                                     align_corners=False)[0, 0]
                vol = np.zeros(canonical_shape, dtype=np.uint8)
                set_display_slice(vol, k, (mask > self.threshold).numpy())
                out = np.ascontiguousarray(from_canonical(vol, meta.get("affine")))[None]
            out_meta = {kk: v for kk, v in meta.items() if kk not in (META_KIND, META_SLICE)}
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(out)), meta=out_meta)
        return d


class SaveImageMaskd(SaveImaged):
    """Write the mask beside the input (or in ``output_dir``) in the input's format; the path goes to ``mask_path``.

    PNG for PNG / TIFF inputs (0 / ``png_value``), NIfTI for volumes with the input's geometry: the input NIfTI
    header, or the DICOM series' affine. A ``SaveImaged`` so that MONAI Label and MONAI Deploy, which write
    results themselves, leave it out.
    """

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", output_dir: str | None = None,
                 output_postfix: str = "seg", png_value: int = 255, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, output_dir=output_dir or "./", output_postfix=output_postfix,
                         allow_missing_keys=allow_missing_keys)
        self.image_key, self.out_dir, self.postfix, self.png_value = image_key, output_dir, output_postfix, png_value

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        meta = image_meta(d.get(self.image_key))
        source = source_name(meta)
        if not source:
            raise ValueError("SaveImageMaskd: the image has no file name in its metadata")
        for key in self.key_iterator(d):
            mask = np.asarray(torch.as_tensor(d[key]).cpu()).astype(np.uint8)
            if mask.ndim == 2:
                path = save_png(np.ascontiguousarray(mask.T) * np.uint8(self.png_value),
                                mask_path(source, self.out_dir, self.postfix, ".png"))
            else:
                nifti = source.lower().endswith((".nii", ".nii.gz"))
                path = save_nifti_mask(mask[0] if mask.ndim == 4 else mask,
                                       mask_path(source, self.out_dir, self.postfix, ".nii.gz"),
                                       reference=source if nifti else None,
                                       affine=None if nifti else meta.get("original_affine", meta.get("affine")))
            d[f"{key}_path"] = path
            d["mask_path"] = path
            logger.info("mask written to %s", path)
        return d


def mask_path(source: str, folder: str | None = None, postfix: str = "seg", suffix: str = ".nii.gz") -> str:
    """``<folder>/<source name without its image suffix>_<postfix><suffix>``; ``folder`` defaults to the source's
    own (created if needed)."""
    base = os.path.basename(os.path.normpath(source))
    for ext in sorted(VOLUME_SUFFIXES + IMAGE_SUFFIXES, key=len, reverse=True):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    folder = folder or os.path.dirname(os.path.abspath(os.path.normpath(source)))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{base}_{postfix}{suffix}")
