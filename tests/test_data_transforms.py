"""CT windowing (bundle/transforms/ct.py) and H&E stain transforms (bundle/transforms/stain.py)."""

import logging

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import set_determinism

from bundle.transforms.ct import WINDOWS, CTWindowd, GreyToRGBd
from bundle.transforms.stain import NormalizeStainsd, RandHEDStaind, hed_to_rgb, rgb_to_hed


@pytest.mark.parametrize(
    "window, low, high", [("synapse", -125, 275), ("abdomen", -160, 240), ("liver", -45, 105), ("bone", -500, 1300),
                          ("lung", -1350, 150), ((-100, 100), -100, 100)]
)  # fmt: skip
def test_ct_window_maps_hu_to_unit_range_with_clipping(window, low, high):
    hu = torch.tensor([[[low - 500.0, low, (low + high) / 2, low + (high - low) / 4, high, high + 500.0]]])
    out = CTWindowd("image", window=window)({"image": hu})["image"]
    assert torch.allclose(out, torch.tensor([[[0.0, 0.0, 0.5, 0.25, 1.0, 1.0]]]), atol=1e-6)


def test_ct_window_errors_and_grey_to_rgb():
    assert set(WINDOWS) == {"synapse", "abdomen", "liver", "bone", "lung"}
    with pytest.raises(ValueError, match=r"unknown CT window 'brain'; known windows: \['synapse', 'abdomen'"):
        CTWindowd("image", window="brain")
    with pytest.raises(ValueError, match="low < high"):
        CTWindowd("image", window=(100, -100))
    grey = MetaTensor(torch.rand(1, 5, 7))
    rgb = GreyToRGBd("image")({"image": grey})["image"]
    assert rgb.shape == (3, 5, 7) and all(torch.equal(rgb[c], grey[0]) for c in range(3))


# ---- stains ----------------------------------------------------------------------------------------------------
def _render(stains, seed=0, size=64):
    """Beer-Lambert H&E image (H, W, 3) in 0..255 from nucleus-like H blobs and an E background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = sum(1.2 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20) for cy, cx in rng.integers(0, size, (12, 2)))
    e = 0.4 + 0.3 * rng.random((size, size))
    stains = np.asarray(stains, float) / np.linalg.norm(stains, axis=0)
    return np.clip(240 * np.exp(-(np.stack([h, e], -1) @ stains.T)), 0, 255)


STAINS_A = [[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]]
STAINS_B = [[0.45, 0.20], [0.85, 0.80], [0.35, 0.50]]


def test_macenko_brings_differently_stained_images_together():
    a, b = _render(STAINS_A), _render(STAINS_B)
    t = NormalizeStainsd("image")
    na = t({"image": np.moveaxis(a, -1, 0)})["image"]
    nb = t({"image": np.moveaxis(b, -1, 0)})["image"]
    before = np.abs(a - b).mean()
    after = np.abs(np.moveaxis(na, 0, -1) - np.moveaxis(nb, 0, -1)).mean()
    assert after < 0.6 * before


def test_macenko_keeps_layout_type_and_range_and_uses_a_reference():
    reference = np.rint(_render(STAINS_A, seed=1)).astype(np.uint8)
    image = MetaTensor(torch.from_numpy(np.moveaxis(_render(STAINS_B), -1, 0) / 255.0).float())
    out = NormalizeStainsd("image", reference=reference, max_value=1.0)({"image": image})["image"]
    assert isinstance(out, MetaTensor) and out.shape == image.shape and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    default = NormalizeStainsd("image", max_value=1.0)({"image": image})["image"]
    assert not torch.allclose(out, default)  # the reference's stains, not MONAI's default target
    with pytest.raises(ValueError, match=r"expected a channel-first RGB image \(3, H, W\), got shape \(64, 64, 3\)"):
        NormalizeStainsd("image")({"image": _render(STAINS_A)})


def test_macenko_leaves_tiles_with_little_tissue_unchanged(caplog):
    blank = torch.full((3, 32, 32), 250.0)
    blank[:, :2, :2] = 60.0  # a few dark pixels: < 5 % tissue
    with caplog.at_level(logging.INFO, logger="bundle.transforms.stain"):
        out = NormalizeStainsd("image")({"image": blank})["image"]
    assert torch.equal(out, blank) and "tissue share" in caplog.text
    white = np.full((3, 16, 16), 255.0)
    assert np.array_equal(NormalizeStainsd("image", min_tissue=0.0)({"image": white})["image"], white)  # estimate fails


def test_hed_round_trip_is_exact():
    rgb = np.random.default_rng(0).random((8, 8, 3)) * 0.98 + 0.01
    assert np.allclose(hed_to_rgb(rgb_to_hed(rgb)), rgb, atol=1e-9)


def test_hed_augmentation_is_seeded_and_bounded():
    image = torch.from_numpy(np.moveaxis(_render(STAINS_A), -1, 0)).float()
    t = RandHEDStaind("image", prob=1.0, scale=0.1, shift=0.01)
    outs = [t.set_random_state(seed)({"image": image})["image"] for seed in (0, 0, 1)]
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    assert not torch.allclose(outs[0], image, atol=1.0)
    assert 0.0 <= float(outs[0].min()) and float(outs[0].max()) <= 255.0
    assert torch.equal(RandHEDStaind("image", prob=0.0)({"image": image})["image"], image)
    identity = RandHEDStaind("image", prob=1.0, scale=0.0, shift=0.0)({"image": image / 255})["image"]
    assert torch.allclose(identity, image / 255, atol=1e-5)
    blank = RandHEDStaind("image", prob=1.0, max_value=1.0)({"image": torch.ones(3, 8, 8)})["image"]
    assert blank.shape == (3, 8, 8) and torch.isfinite(blank).all()


def test_hed_augmentation_follows_set_determinism():
    image = torch.from_numpy(np.moveaxis(_render(STAINS_B), -1, 0)).float()
    runs = []
    for _ in range(2):
        set_determinism(seed=7)
        runs.append(Compose([RandHEDStaind("image", prob=1.0)])({"image": image})["image"])
    set_determinism(seed=None)
    assert torch.equal(runs[0], runs[1])
