"""Inference with clicks: image + clicks -> the network input (:class:`PromptImaged`), and the network run on it
(:class:`PromptInferer`); the way back, logits -> mask in the input's format, is :mod:`bundle.masks`.

The transforms here are the ``preprocessing`` of ``configs/inference.yaml`` (:mod:`bundle.masks`: its
``postprocessing``), shared by the
bundle's own ``run`` (MONAI ``SupervisedEvaluator``), MONAI Label (``BundleInferTask``) and MONAI Deploy
(``MonaiBundleInferenceOperator``). They read images that MONAI's ``LoadImaged`` loaded: arrays channel-first in
the file's index order (``(C, X, Y)`` for PNG / TIFF, ``(1, I, J, K)`` for NIfTI or a DICOM series, with a RAS
affine), which is also what MONAI Label and MONAI Deploy hand over.

Coordinates
-----------
Clicks are ``{"foreground": [[x, y], ...], "background": [[x, y], ...]}`` in pixel coordinates:

* 2D images (PNG / TIFF): ``x`` is the column, ``y`` the row, 0-based (what an image viewer shows; MONAI Label's
  convention for 2D images too).
* volumes (CT): ``[x, y]`` are column / row of the axial slice as the network sees it, in radiological display
  orientation (rows anterior -> posterior, columns patient right -> left; :mod:`bundle.transforms.geometry`,
  the orientation of the prepared training slices), and the slice is ``slice_index``. ``[i, j, k]`` are voxel
  indices of the file (MONAI Label's 3D clicks); all clicks must then lie on one slice ``k``, which also gives the
  slice. ``slice_index`` is a voxel index along the file's axis closest to inferior -> superior.

Clicks may also come as guidance channels: an ``.npy`` array (2, *spatial shape of the image*) whose local maxima
above 0.5 are the foreground (channel 0) and background (channel 1) clicks, in the file's index order
(:mod:`bundle.clicks` reads every click source).

CT intensities are windowed to -125..275 HU (configurable, :mod:`bundle.transforms.ct`), mapped to [0, 1] and the
grey channel repeated to RGB. The network input is the image plus two one-hot click channels (:mod:`bundle.guidance`):

* 2D images at their own resolution, any size (``tiling`` mode ``propagate`` or ``routed``): the inferer cuts the
  field into ``image_size`` tiles, pads what is smaller, and blends the tiles' logits back (:mod:`bundle.tiling`);
* with ``tiling`` mode ``resize`` or none given (configs of older exported bundles), and always for a slice of a
  volume (the CT training slices were resized to ``image_size`` too), the image resized to ``image_size``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from bundle.clicks import PromptInputError, clicks_of_request, slice_of_request
from bundle.data.readers import to_uint8
from bundle.guidance import click_channels
from bundle.tiling import Tiling
from bundle.image_meta import IMAGE_SUFFIXES, META_KIND, META_SLICE, VOLUME_SUFFIXES, image_meta, source_name  # noqa: F401
from bundle.masks import PromptMaskd, SaveImageMaskd, mask_path  # noqa: F401  (names of the config in older model.ts)
from bundle.transforms.ct import apply_window, window_range
from bundle.transforms.geometry import (
    canonical_to_display,
    display_slice,
    slice_to_canonical,
    to_canonical,
    voxel_to_canonical,
)

logger = logging.getLogger(__name__)

def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES) or os.path.isdir(name)


def _scale_to_unit(image: np.ndarray, name: str) -> np.ndarray:
    """Photo intensities -> [0, 1] as training saw them: integers (8- or 16-bit) and floats above 255 through the
    importer's rule (:func:`bundle.data.readers.to_uint8`: within 0..255 as they are, else linearly from
    min(0, minimum)..maximum to 0..255, logged), then / 255; floats within [0, 1] as they are, floats up to 255 as 8-bit."""
    if np.issubdtype(image.dtype, np.integer) or image.max(initial=0) > 255:
        return to_uint8(image, name).astype(np.float32) / 255.0
    image = image.astype(np.float32)
    return image / 255.0 if image.max(initial=0.0) > 1.0 else image


class PromptImaged(MapTransform):
    """Image + clicks -> the network input ``(C + 2, image_size, image_size)``: RGB in [0, 1] and click channels.

    Reads the image under ``keys`` (a MONAI-loaded array, channel-first, file index order) and the clicks from, in
    this order: ``foreground_key`` / ``background_key`` (MONAI Label requests), ``clicks_key`` (a dict, a JSON
    or ``.npy`` path, or guidance channels), or the image's metadata (``foreground`` / ``background``, MONAI
    Deploy). The slice of a volume comes from ``slice_key`` (or the image's metadata, or 3D clicks).

    Records in the image's metadata what :class:`PromptMaskd` needs to map the mask back:
    ``prompt_kind`` (``"2d"`` or ``"volume"``) and ``prompt_slice`` (canonical axial slice, -1 for 2D).

    Raises :class:`PromptInputError` for: no foreground click, a click outside the image (or off the slice), a
    malformed click, a volume without a slice index, an image that is neither 2D nor a volume.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        image_size: int = 224,
        window: str | Sequence[float] = "synapse",
        clicks_key: str = "clicks",
        foreground_key: str = "foreground",
        background_key: str = "background",
        slice_key: str = "slice_index",
        max_points: int = 16,
        tiling: Tiling | Mapping | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_size, self.window = int(image_size), window_range(window)
        self.native = tiling is not None and Tiling.of(tiling).mode != "resize"
        self.clicks_key, self.foreground_key, self.background_key = clicks_key, foreground_key, background_key
        self.slice_key, self.max_points = slice_key, max_points

    # -- images -----------------------------------------------------------------------------------------------------
    def _image_2d(self, img: np.ndarray, name: str) -> np.ndarray:
        """(C, X, Y) -> (3, H, W) in [0, 1]."""
        c = img.shape[0]
        if c == 4:  # RGBA
            img = img[:3]
        elif c not in (1, 3):
            raise PromptInputError(f"{name}: a 2D image needs 1, 3 or 4 channels, got {c}")
        unit = apply_window(img, self.window) if _is_volume_file(name) else _scale_to_unit(img, name)  # a 2D CT slice file
        unit = np.transpose(unit, (0, 2, 1))  # (C, X, Y) -> (C, H, W): rows are y
        return np.repeat(unit, 3, axis=0) if unit.shape[0] == 1 else unit

    def _prompt_2d(self, arr: np.ndarray, clicks: list, name: str) -> tuple[np.ndarray, list, int]:
        """A 2D image: (3, H, W) in [0, 1], the clicks as (x, y) on it, slice -1."""
        if any(len(c) != 2 for c in clicks):
            raise PromptInputError(f"{name}: clicks on a 2D image are [x, y]")
        return self._image_2d(arr, name), clicks, -1

    def _prompt_volume(self, arr: np.ndarray, d: Mapping, meta: Mapping, clicks: list, given_slice: int | None,
                       name: str) -> tuple[np.ndarray, list, int]:
        """A volume (1, I, J, K): its display slice (3, H, W) in [0, 1], the clicks as (x, y) on it, the canonical
        slice index (:mod:`bundle.transforms.geometry`)."""
        spatial = arr.shape[1:]
        if arr.shape[0] != 1:
            raise PromptInputError(f"{name}: a volume must have one channel, got {arr.shape[0]}")
        affine = meta.get("affine", np.eye(4))
        k_file = slice_of_request(d, meta, clicks, given_slice, self.slice_key)
        if k_file is None:
            raise PromptInputError(
                f"{name} is a volume of shape {tuple(spatial)}: give a slice index ('slice_index', "
                f"--slice_index) or 3D clicks [i, j, k]"
            )
        try:
            k = slice_to_canonical(k_file, spatial, affine)
        except (IndexError, ValueError) as e:
            raise PromptInputError(str(e)) from None
        canonical = to_canonical(arr[0], affine)
        points = []
        for c in clicks:
            if len(c) == 3:
                for axis, (v, n) in enumerate(zip(c, spatial)):
                    if not 0 <= v < n:
                        raise PromptInputError(
                            f"{name}: click {c} is outside the volume of shape {tuple(spatial)} (axis {axis})"
                        )
                if int(c[2]) != k_file:
                    raise PromptInputError(f"{name}: click {c} is not on slice {k_file}")
                points.append(canonical_to_display(voxel_to_canonical(c, spatial, affine), canonical.shape))
            else:
                points.append(list(c))
        image = np.repeat(apply_window(display_slice(canonical, k), self.window)[None], 3, axis=0)
        return image, points, k

    def _network_input(self, image: np.ndarray, clicks: list, points: list, n_fg: int, name: str,
                       native: bool = False) -> torch.Tensor:
        """(3, H, W) image and its clicks -> ``(3 + 2, S, S)``: the image resized, the clicks scaled with it; or,
        ``native``, ``(3 + 2, H, W)`` as it is (:mod:`bundle.tiling` cuts it)."""
        h, w = image.shape[1:]
        for c, p in zip(clicks, points):
            if not (0 <= p[0] < w and 0 <= p[1] < h):
                raise PromptInputError(
                    f"{name}: click {c} is outside the image ({w} columns x {h} rows; x is the column, y the row)"
                )
        if min(h, w) < 2:
            raise PromptInputError(f"{name}: an image of {w} x {h} pixels is too small to segment (at least 2 x 2)")
        if native:
            return torch.cat([torch.from_numpy(np.ascontiguousarray(image)), click_channels(points, n_fg, (h, w))],
                             dim=0).float()
        s = self.image_size
        resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None], size=(s, s), mode="bilinear",
                                align_corners=False)[0]
        return torch.cat([resized, click_channels(points, n_fg, (h, w), s)], dim=0).float()

    def _checked_array(self, img: Any, name: str) -> np.ndarray:
        arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise PromptInputError(
                f"{name}: {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} infinite values in the "
                "image; it must hold finite numbers"
            )
        return arr

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = image_meta(d[key])
            name = source_name(meta) or key
            arr = self._checked_array(d[key], name)
            fg, bg, given_slice = clicks_of_request(d, meta, name, self.foreground_key, self.background_key,
                                                    self.clicks_key)
            if not fg:
                raise PromptInputError(f"{name}: no foreground click; give at least one 'foreground' [x, y] click")
            if len(fg) > self.max_points or len(bg) > self.max_points:
                raise PromptInputError(
                    f"{name}: at most {self.max_points} foreground and {self.max_points} background clicks are read, "
                    f"got {len(fg)} and {len(bg)}"
                )
            if arr.ndim == 4 and arr.shape[3] == 1 and not _is_volume_file(name):
                arr = arr[..., 0]
            if arr.ndim == 3:
                image, points, k = self._prompt_2d(arr, fg + bg, name)
            elif arr.ndim == 4:
                image, points, k = self._prompt_volume(arr, d, meta, fg + bg, given_slice, name)
            else:
                raise PromptInputError(f"{name}: expected a 2D image or a 3D volume, got array shape {arr.shape}")
            meta.update({META_KIND: "2d" if k < 0 else "volume", META_SLICE: int(k)})
            x = self._network_input(image, fg + bg, points, len(fg), name, native=self.native and k < 0)
            d[key] = MetaTensor(x, meta=meta)
        return d


class PromptInferer(Inferer):
    """Run the network on the single-tensor input (a plain tensor: TorchScript and SAM get no MetaTensor)."""

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        return network(x, *args, **kwargs)
