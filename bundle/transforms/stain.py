"""H&E stain transforms for channel-first RGB images (C=3, H, W), as the bundle's loaders produce them.

- :class:`NormalizeStainsd`: Macenko normalisation to a reference through MONAI's
  ``monai.apps.pathology.transforms.NormalizeHEStains`` / ``ExtractHEStains``. Those expect a channel-last uint8
  (H, W, 3) array in 0..255, so the image is moved to that layout and back, keeping its type and value range.
  A tile with too little tissue (share of pixels whose optical density exceeds ``beta`` in every channel below
  ``min_tissue``), or one where the stain estimate fails, is left unchanged and logged.
- :class:`RandHEDStaind`: random stain augmentation in HED space: each of the H, E, D concentrations becomes
  ``c * a + b`` with ``a ~ U(1 - scale, 1 + scale)``, ``b ~ U(-shift, shift)`` drawn per sample and channel
  (Tellez et al. 2018). The colour deconvolution is skimage's (``rgb2hed`` / ``hed2rgb`` matrices and log scaling),
  without the clamp of negative concentrations in ``rgb2hed``, so that a = 1, b = 0 returns the image unchanged.
  A MONAI RandomizableTransform: seeded by ``set_determinism`` / ``set_random_state`` like every MONAI random
  transform.

``max_value`` is the intensity of white in the input: 255 before ``ScaleIntensityRanged``, 1.0 after.
"""

from __future__ import annotations

import logging

import numpy as np
from monai.apps.pathology.transforms import ExtractHEStains, NormalizeHEStains
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type
from skimage.color import hed_from_rgb, rgb_from_hed

logger = logging.getLogger(__name__)


def _to_hwc_unit(image, key: str, max_value: float) -> np.ndarray:
    """Channel-first RGB (3, H, W) in 0..max_value -> float64 (H, W, 3) in [0, 1]."""
    array = np.asarray(image.detach().cpu().numpy() if hasattr(image, "detach") else image, dtype=np.float64)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"{key}: expected a channel-first RGB image (3, H, W), got shape {array.shape}")
    return np.clip(np.moveaxis(array, 0, -1) / max_value, 0.0, 1.0)


def _from_hwc_unit(hwc: np.ndarray, like, max_value: float):
    chw = np.ascontiguousarray(np.moveaxis(hwc, -1, 0) * max_value, dtype=np.float32)
    return convert_to_dst_type(chw, like, dtype=np.float32)[0]


_LOG_ADJUST = np.log(1e-6)  # skimage's scaling of optical density in rgb2hed / hed2rgb


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in [0, 1] -> HED concentrations (skimage's rgb2hed without clamping negatives)."""
    return (np.log(np.maximum(rgb, 1e-6)) / _LOG_ADJUST) @ hed_from_rgb


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hed` (skimage's hed2rgb), clipped to [0, 1]."""
    return np.clip(np.exp(-(hed * -_LOG_ADJUST) @ rgb_from_hed), 0.0, 1.0)


def tissue_fraction(rgb_uint8: np.ndarray, tli: float = 240, beta: float = 0.15) -> float:
    """Share of pixels that Macenko's estimate uses (optical density > beta in every channel)."""
    od = -np.log(np.clip(rgb_uint8.reshape(-1, 3).astype(np.float32) + 1.0, None, tli) / tli)
    return float(np.mean(np.all(od > beta, axis=1)))


def reference_stains(reference: np.ndarray, tli: float = 240, alpha: float = 1, beta: float = 0.15):
    """Macenko stain matrix (3, 2) and 99th-percentile concentrations (2,) of a reference uint8 (H, W, 3) image."""
    he = ExtractHEStains(tli=tli, alpha=alpha, beta=beta)(reference)
    od = -np.log(np.clip(reference.reshape(-1, 3).astype(np.float32) + 1.0, None, tli) / tli)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return he, np.percentile(conc, 99, axis=1)


class NormalizeStainsd(MapTransform):
    """Macenko H&E normalisation to a reference for channel-first RGB images (see the module docstring).

    Args:
        keys: image keys.
        reference: path of a reference RGB image, or an (H, W, 3) uint8 array; its stain matrix and maximal
            concentrations become the target. None: MONAI's defaults (``target_he``, ``max_cref``).
        target_he, max_cref: explicit target (used when ``reference`` is None).
        tli, alpha, beta: Macenko parameters (MONAI's defaults).
        max_value: intensity of white in the input (255 or 1.0).
        min_tissue: smallest share of tissue pixels to attempt normalisation.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference=None,
        target_he=((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581)),
        max_cref=(1.9705, 1.0308),
        tli: float = 240,
        alpha: float = 1,
        beta: float = 0.15,
        max_value: float = 255.0,
        min_tissue: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if reference is not None:
            if isinstance(reference, str):
                from PIL import Image

                with Image.open(reference) as im:
                    reference = np.asarray(im.convert("RGB"))
            reference = np.asarray(reference)
            if reference.ndim != 3 or reference.shape[2] != 3 or reference.dtype != np.uint8:
                got = f"{reference.dtype} {reference.shape}"
                raise ValueError(f"reference must be a uint8 (H, W, 3) RGB image, got {got}")
            target_he, max_cref = reference_stains(reference, tli, alpha, beta)
        self.normalizer = NormalizeHEStains(tli=tli, alpha=alpha, beta=beta, target_he=target_he, max_cref=max_cref)
        self.tli, self.beta, self.max_value, self.min_tissue = tli, beta, float(max_value), min_tissue

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            rgb = np.rint(_to_hwc_unit(d[key], key, self.max_value) * 255).astype(np.uint8)
            share = tissue_fraction(rgb, self.tli, self.beta)
            if share < self.min_tissue:
                logger.info("stain normalisation skipped for %s: tissue share %.3f < %.3f", key, share, self.min_tissue)
                continue
            try:
                out = self.normalizer(rgb)
            except (ValueError, np.linalg.LinAlgError) as e:
                logger.warning("stain normalisation failed for %s (%s); image left unchanged", key, e)
                continue
            d[key] = _from_hwc_unit(out.astype(np.float64) / 255.0, d[key], self.max_value)
        return d


class RandHEDStaind(RandomizableTransform, MapTransform):
    """Random H&E stain augmentation in HED space (see the module docstring); the same draw for all ``keys``."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        scale: float = 0.05,
        shift: float = 0.01,
        max_value: float = 255.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 <= scale < 1 or shift < 0:
            raise ValueError(f"need 0 <= scale < 1 and shift >= 0, got scale={scale}, shift={shift}")
        self.scale, self.shift, self.max_value = scale, shift, float(max_value)
        self._a, self._b = np.ones(3), np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._a = self.R.uniform(1.0 - self.scale, 1.0 + self.scale, size=3)
            self._b = self.R.uniform(-self.shift, self.shift, size=3)

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            rgb = _to_hwc_unit(d[key], key, self.max_value)
            out = hed_to_rgb(rgb_to_hed(rgb) * self._a + self._b)
            if not np.all(np.isfinite(out)):
                logger.warning("HED augmentation gave non-finite values for %s; image left unchanged", key)
                continue
            d[key] = _from_hwc_unit(out, d[key], self.max_value)
        return d
