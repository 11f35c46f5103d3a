"""Inference with clicks: image + clicks -> network input, network output -> mask in the input's format.

The transforms here are the ``preprocessing`` / ``postprocessing`` of ``configs/inference.yaml``, shared by the
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
  orientation (rows anterior -> posterior, columns patient right -> left; ``bundle.data.synapse.display_slice``,
  the orientation of the prepared training slices), and the slice is ``slice_index``. ``[i, j, k]`` are voxel
  indices of the file (MONAI Label's 3D clicks); all clicks must then lie on one slice ``k``, which also gives the
  slice. ``slice_index`` is a voxel index along the file's axis closest to inferior -> superior.

Clicks may also come as guidance channels: an ``.npy`` array (2, *spatial shape of the image*) whose local maxima
above 0.5 are the foreground (channel 0) and background (channel 1) clicks, in the file's index order.

CT intensities are windowed to -125..275 HU (configurable), mapped to [0, 1] and the grey channel repeated to RGB.
The network input is the image resized to ``image_size`` plus two one-hot click channels (:mod:`bundle.guidance`).
"""

from __future__ import annotations

import json
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
from monai.transforms import MapTransform, SaveImaged

from bundle.data.synapse import display_slice
from bundle.guidance import points_to_guidance
from bundle.transforms.ct import window_range

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".dcm")
META_KIND, META_SLICE = "prompt_kind", "prompt_slice"  # what PromptImaged records in the image's meta


class PromptInputError(ValueError):
    """An image or clicks that inference cannot use (the message says what and where)."""


# ------------------------------------------------------------------------------------------------------------------
# clicks
# ------------------------------------------------------------------------------------------------------------------
def _source_name(source: Any) -> str:
    return source if isinstance(source, str) else "clicks"


def guidance_to_clicks(guidance: np.ndarray, threshold: float = 0.5) -> tuple[list, list]:
    """(2, *spatial) click channels -> foreground and background clicks (local maxima above ``threshold``)."""
    from scipy.ndimage import maximum_filter

    guidance = np.asarray(guidance, dtype=np.float32)
    out = []
    for channel in guidance[:2]:
        peaks = (channel == maximum_filter(channel, size=3, mode="constant")) & (channel > threshold)
        out.append([[int(v) for v in p] for p in np.argwhere(peaks)])
    return out[0], out[1]


def read_clicks(source: Any) -> tuple[list, list]:
    """Foreground and background clicks from a dict, a JSON file, or guidance channels (``.npy`` file or array).

    Raises :class:`PromptInputError` for a malformed source; the clicks are not yet checked against an image.
    """
    fg, bg, _ = read_prompt(source)
    return fg, bg


def read_prompt(source: Any) -> tuple[list, list, int | None]:
    """:func:`read_clicks` plus the ``slice_index`` a JSON / dict source may give (``None`` if not)."""
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise PromptInputError(f"clicks file not found: {path}")
        if path.endswith(".npy"):
            source = np.load(path)
        else:
            try:
                with open(path) as f:
                    source = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise PromptInputError(f"{path}: not a JSON clicks file ({e})") from e
    if isinstance(source, (np.ndarray, torch.Tensor)):
        arr = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source)
        if arr.ndim < 3 or arr.shape[0] != 2:
            raise PromptInputError(f"{name}: guidance channels must have shape (2, *spatial), got {arr.shape}")
        return (*guidance_to_clicks(arr), None)
    if not isinstance(source, Mapping):
        raise PromptInputError(f"{name}: expected {{'foreground': [[x, y], ...], 'background': [...]}}")
    unknown = set(source) - {"foreground", "background", "slice_index"}
    if unknown:
        raise PromptInputError(f"{name}: unknown keys {sorted(unknown)} (expected 'foreground' and 'background')")
    k = source.get("slice_index")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
        raise PromptInputError(f"{name}: slice_index must be an integer, got {k!r}")
    fg = check_click_list(source.get("foreground"), "foreground", name)
    return fg, check_click_list(source.get("background"), "background", name), k


def check_click_list(clicks: Any, kind: str, name: str = "clicks") -> list[list[float]]:
    """A list of [x, y] or [x, y, z] number lists (``None`` -> empty); raise :class:`PromptInputError` otherwise."""
    if clicks is None:
        return []
    if isinstance(clicks, (np.ndarray, torch.Tensor)):
        clicks = np.asarray(clicks).tolist()
    if isinstance(clicks, str):
        try:
            clicks = json.loads(clicks)
        except json.JSONDecodeError as e:
            raise PromptInputError(f"{name}: {kind} clicks are not a JSON list ({clicks!r})") from e
    if not isinstance(clicks, (list, tuple)):
        raise PromptInputError(f"{name}: {kind} clicks must be a list of [x, y] points, got {type(clicks).__name__}")
    out = []
    for c in clicks:
        if (
            not isinstance(c, (list, tuple))
            or len(c) not in (2, 3)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in c)
        ):
            raise PromptInputError(f"{name}: {kind} click {c!r} is not [x, y] or [x, y, z] with finite numbers")
        out.append([float(v) for v in c])
    return out


# ------------------------------------------------------------------------------------------------------------------
# geometry of volumes: file voxel index <-> canonical (RAS+) index <-> display slice
# ------------------------------------------------------------------------------------------------------------------
def _orientation(affine: Any) -> np.ndarray:
    """nibabel orientation (file axis -> [RAS axis, flip]) of a 4x4 RAS affine."""
    import nibabel as nib

    aff = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if aff.shape != (4, 4):
        aff = np.eye(4)
    return nib.orientations.io_orientation(aff)


def to_canonical(volume: np.ndarray, affine: Any) -> np.ndarray:
    """(I, J, K) volume in file order -> closest-canonical RAS+ order (as ``nib.as_closest_canonical``)."""
    import nibabel as nib

    return nib.orientations.apply_orientation(volume, _orientation(affine))


def from_canonical(volume: np.ndarray, affine: Any) -> np.ndarray:
    """Inverse of :func:`to_canonical`."""
    import nibabel as nib

    ornt = _orientation(affine)
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
    return nib.orientations.apply_orientation(volume, back)


def voxel_to_canonical(ijk: Sequence[float], shape: Sequence[int], affine: Any) -> list[float]:
    """File voxel index -> closest-canonical RAS+ voxel index."""
    out = [0.0, 0.0, 0.0]
    for axis, (ras_axis, flip) in enumerate(_orientation(affine)):
        v = float(ijk[axis])
        out[int(ras_axis)] = shape[axis] - 1 - v if flip < 0 else v
    return out


def slice_to_canonical(k: int, shape: Sequence[int], affine: Any) -> int:
    """A slice index along the file axis closest to S -> the canonical axial slice index."""
    for axis, (ras_axis, flip) in enumerate(_orientation(affine)):
        if int(ras_axis) == 2:
            if not 0 <= k < shape[axis]:
                raise PromptInputError(f"slice_index {k} is outside the volume ({shape[axis]} axial slices)")
            return shape[axis] - 1 - k if flip < 0 else k
    raise PromptInputError("the volume has no axial axis")


# ------------------------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------------------------
def _meta(img: Any) -> dict:
    return dict(img.meta) if isinstance(img, MetaTensor) else {}


def _filename(meta: Mapping) -> str:
    name = meta.get("filename_or_obj", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name)


def _is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES) or os.path.isdir(name)


def _scale_to_unit(image: np.ndarray) -> np.ndarray:
    """Photo intensities -> [0, 1]: integer types by their range, floats above 1 as 8-bit."""
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
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
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_size, self.window = int(image_size), window_range(window)
        self.clicks_key, self.foreground_key, self.background_key = clicks_key, foreground_key, background_key
        self.slice_key, self.max_points = slice_key, max_points

    # -- clicks -----------------------------------------------------------------------------------------------------
    def _clicks(self, d: Mapping, meta: Mapping, name: str) -> tuple[list, list, int | None]:
        fg, bg = d.get(self.foreground_key), d.get(self.background_key)
        if fg is not None or bg is not None:
            return check_click_list(fg, "foreground", name), check_click_list(bg, "background", name), None
        source = d.get(self.clicks_key)
        if source is not None and not (isinstance(source, str) and not source):
            return read_prompt(source)
        if meta.get("foreground") is not None or meta.get("background") is not None:
            fg = check_click_list(meta.get("foreground"), "foreground", name)
            return fg, check_click_list(meta.get("background"), "background", name), None
        raise PromptInputError(
            f"{name}: no clicks given (request keys '{self.foreground_key}' / '{self.background_key}', or "
            f"'{self.clicks_key}': a JSON file {{\"foreground\": [[x, y], ...], \"background\": [...]}})"
        )

    def _slice_index(self, d: Mapping, meta: Mapping, clicks: list, given: int | None) -> int | None:
        k = d.get(self.slice_key)
        if isinstance(k, torch.Tensor):
            k = k.item()
        if k is None or (isinstance(k, str) and not k.strip()) or (isinstance(k, (int, float)) and k < 0):
            k = given
        if k is None:
            k = meta.get(self.slice_key)
        if isinstance(k, torch.Tensor):
            k = k.item()
        if k is None or (isinstance(k, str) and not k.strip()) or (isinstance(k, (int, float)) and k < 0):
            zs = {c[2] for c in clicks if len(c) == 3}
            if len(zs) > 1:
                raise PromptInputError(f"3D clicks lie on different slices {sorted(zs)}; the network segments one slice")
            return int(zs.pop()) if zs else None
        try:
            return int(k)
        except (TypeError, ValueError):
            raise PromptInputError(f"slice_index must be an integer, got {k!r}") from None

    # -- images -----------------------------------------------------------------------------------------------------
    def _image_2d(self, img: np.ndarray, name: str) -> np.ndarray:
        """(C, X, Y) -> (3, H, W) in [0, 1]."""
        c = img.shape[0]
        if c == 4:  # RGBA
            img = img[:3]
        elif c not in (1, 3):
            raise PromptInputError(f"{name}: a 2D image needs 1, 3 or 4 channels, got {c}")
        if _is_volume_file(name):  # a 2D CT slice file
            low, high = self.window
            unit = np.clip((img.astype(np.float32) - low) / (high - low), 0.0, 1.0)
        else:
            unit = _scale_to_unit(img)
        unit = np.transpose(unit, (0, 2, 1))  # (C, X, Y) -> (C, H, W): rows are y
        return np.repeat(unit, 3, axis=0) if unit.shape[0] == 1 else unit

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = _meta(img)
            name = _filename(meta) or key
            arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise PromptInputError(
                    f"{name}: {int(np.isnan(arr).sum())} NaN and {int(np.isinf(arr).sum())} infinite values in the "
                    "image; it must hold finite numbers"
                )
            fg, bg, given_slice = self._clicks(d, meta, name)
            if not fg:
                raise PromptInputError(f"{name}: no foreground click; give at least one 'foreground' [x, y] click")
            if len(fg) > self.max_points or len(bg) > self.max_points:
                raise PromptInputError(
                    f"{name}: at most {self.max_points} foreground and {self.max_points} background clicks are read, "
                    f"got {len(fg)} and {len(bg)}"
                )
            spatial = arr.shape[1:]
            if len(spatial) == 3 and spatial[2] == 1 and not _is_volume_file(name):
                arr, spatial = arr[..., 0], spatial[:2]
            if len(spatial) == 2:
                if any(len(c) != 2 for c in fg + bg):
                    raise PromptInputError(f"{name}: clicks on a 2D image are [x, y]")
                image = self._image_2d(arr, name)
                h, w = image.shape[1:]
                points = fg + bg
                kind, k = "2d", -1
            elif len(spatial) == 3:
                if arr.shape[0] != 1:
                    raise PromptInputError(f"{name}: a volume must have one channel, got {arr.shape[0]}")
                affine = meta.get("affine", np.eye(4))
                k_file = self._slice_index(d, meta, fg + bg, given_slice)
                if k_file is None:
                    raise PromptInputError(
                        f"{name} is a volume of shape {tuple(spatial)}: give a slice index ('slice_index', "
                        f"--slice_index) or 3D clicks [i, j, k]"
                    )
                k = slice_to_canonical(k_file, spatial, affine)
                canonical = to_canonical(arr[0], affine)
                points = []
                for c in fg + bg:
                    if len(c) == 3:
                        for axis, (v, n) in enumerate(zip(c, spatial)):
                            if not 0 <= v < n:
                                raise PromptInputError(
                                    f"{name}: click {c} is outside the volume of shape {tuple(spatial)} (axis {axis})"
                                )
                        if int(c[2]) != k_file:
                            raise PromptInputError(f"{name}: click {c} is not on slice {k_file}")
                        a, b, _ = voxel_to_canonical(c, spatial, affine)
                        points.append([canonical.shape[0] - 1 - a, canonical.shape[1] - 1 - b])
                    else:
                        points.append(list(c))
                low, high = self.window
                hu = display_slice(canonical, k).astype(np.float32)
                image = np.repeat(np.clip((hu - low) / (high - low), 0.0, 1.0)[None], 3, axis=0)
                h, w = image.shape[1:]
                kind = "volume"
            else:
                raise PromptInputError(f"{name}: expected a 2D image or a 3D volume, got array shape {arr.shape}")
            for c, p in zip(fg + bg, points):
                if not (0 <= p[0] < w and 0 <= p[1] < h):
                    raise PromptInputError(
                        f"{name}: click {c} is outside the image ({w} columns x {h} rows; x is the column, y the row)"
                    )
            s = self.image_size
            resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None], size=(s, s), mode="bilinear",
                                    align_corners=False)[0]
            xy = torch.tensor(points, dtype=torch.float32).view(1, -1, 2)
            xy = torch.minimum((xy + 0.5) * torch.tensor([s / w, s / h]) - 0.5, torch.tensor(s - 1.0)).clamp_min(0)
            labels = torch.tensor([1] * len(fg) + [0] * len(bg)).view(1, -1)
            clicks = points_to_guidance(xy, labels, (s, s))[0]
            meta.update({META_KIND: kind, META_SLICE: int(k)})
            d[key] = MetaTensor(torch.cat([resized, clicks], dim=0).float(), meta=meta)
        return d


class PromptInferer(Inferer):
    """Run the network on the single-tensor input (a plain tensor: TorchScript and SAM get no MetaTensor)."""

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        return network(x, *args, **kwargs)


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
        meta = _meta(d.get(self.image_key))
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
                h, w = canonical_shape[1], canonical_shape[0]  # display slice: rows = A->P, columns = R->L
                mask = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                vol = np.zeros(canonical_shape, dtype=np.uint8)
                vol[:, :, k] = (mask > self.threshold).numpy().T[::-1, ::-1]
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

    def _path(self, source: str, suffix: str) -> str:
        base = os.path.basename(os.path.normpath(source))
        for ext in sorted(VOLUME_SUFFIXES + (".png", ".tif", ".tiff", ".jpg", ".jpeg"), key=len, reverse=True):
            if base.lower().endswith(ext):
                base = base[: -len(ext)]
                break
        folder = self.out_dir or os.path.dirname(os.path.abspath(os.path.normpath(source)))
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{base}_{self.postfix}{suffix}")

    def __call__(self, data: Mapping) -> dict:
        import nibabel as nib
        from PIL import Image

        d = dict(data)
        meta = _meta(d.get(self.image_key))
        source = _filename(meta)
        if not source:
            raise ValueError("SaveImageMaskd: the image has no file name in its metadata")
        for key in self.key_iterator(d):
            mask = np.asarray(torch.as_tensor(d[key]).cpu()).astype(np.uint8)
            if mask.ndim == 2:
                path = self._path(source, ".png")
                Image.fromarray(np.ascontiguousarray(mask.T) * np.uint8(self.png_value)).save(path)
            else:
                mask = mask[0] if mask.ndim == 4 else mask
                path = self._path(source, ".nii.gz")
                if source.lower().endswith((".nii", ".nii.gz")):
                    ref = nib.load(source)
                    header = ref.header.copy()
                    header.set_data_dtype(np.uint8)
                    header.set_slope_inter(1.0, 0.0)
                    out = nib.Nifti1Image(mask, ref.affine, header=header)
                else:
                    affine = meta.get("original_affine", meta.get("affine"))
                    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
                    out = nib.Nifti1Image(mask, affine)
                    out.set_qform(affine, code=1)
                    out.set_sform(affine, code=1)
                nib.save(out, path)
            d[f"{key}_path"] = path
            d["mask_path"] = path
            logger.info("mask written to %s", path)
            print(f"mask: {path}", flush=True)
        return d
