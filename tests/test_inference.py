"""configs/inference.yaml: image + clicks -> mask beside the input in the input's format; geometry and bad inputs."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from bundle.checkpoints import build_network
from bundle.clicks import PromptInputError, read_clicks
from bundle.export import write_bundle
from bundle.inference import PromptImaged
from bundle.masks import PromptMaskd
from bundle.transforms.geometry import display_slice, to_canonical
from conftest import REPO, SHARED_DATA

SIZE = 64  # network input size of the test bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A bundle copy with a tiny SAM (merged weights) in models/."""
    torch.manual_seed(0)
    net = build_network("tiny", SIZE, lora_rank=0)
    dest = tmp_path_factory.mktemp("bundle")
    write_bundle(net, dest, REPO, verify=False)
    return dest


def run_bundle(bundle_dir, **overrides):
    from monai.bundle import run

    run("run", config_file=str(bundle_dir / "configs" / "inference.yaml"), bundle_root=str(bundle_dir),
        device="$torch.device('cpu')", **overrides)


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def rgb(h=48, w=80, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def prompt(image, clicks, **kw):
    """PromptImaged on an image array as MONAI's LoadImaged + EnsureChannelFirstd give it."""
    extra = kw.pop("extra", {})
    return PromptImaged(image_size=SIZE, **kw)({"image": image, "clicks": clicks, **extra})


# ------------------------------------------------------------------------------------------------------------------
# end to end: files in, files out
# ------------------------------------------------------------------------------------------------------------------
def test_png_in_png_out_beside_the_input(bundle_dir, tmp_path):
    Image.fromarray(rgb()).save(tmp_path / "tile.png")
    clicks = write_json(tmp_path / "c.json", {"foreground": [[10, 20], [70, 40]], "background": [[40, 5]]})
    run_bundle(bundle_dir, input_image=str(tmp_path / "tile.png"), clicks=clicks)
    mask = np.array(Image.open(tmp_path / "tile_seg.png"))
    assert mask.shape == (48, 80) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


def test_tiff_in_png_out_in_output_dir(bundle_dir, tmp_path):
    Image.fromarray(rgb(40, 56)).save(tmp_path / "tile.tif")
    clicks = write_json(tmp_path / "c.json", {"foreground": [[5, 5]], "background": []})
    run_bundle(bundle_dir, input_image=str(tmp_path / "tile.tif"), clicks=clicks, output_dir=str(tmp_path / "out"))
    assert np.array(Image.open(tmp_path / "out" / "tile_seg.png")).shape == (40, 56)
    assert not (tmp_path / "tile_seg.png").exists()


def test_guidance_channels_give_the_same_mask_as_json_clicks(bundle_dir, tmp_path):
    Image.fromarray(rgb(50, 60)).save(tmp_path / "a.png")
    clicks = {"foreground": [[12, 30], [40, 10]], "background": [[55, 45]]}
    run_bundle(bundle_dir, input_image=str(tmp_path / "a.png"), clicks=write_json(tmp_path / "c.json", clicks),
               output_dir=str(tmp_path / "json"))
    guidance = np.zeros((2, 60, 50), np.float32)  # (2, X, Y): the image's index order as MONAI loads it
    for ch, key in enumerate(("foreground", "background")):
        for x, y in clicks[key]:
            guidance[ch, x, y] = 1.0
    np.save(tmp_path / "g.npy", guidance)
    run_bundle(bundle_dir, input_image=str(tmp_path / "a.png"), clicks=str(tmp_path / "g.npy"),
               output_dir=str(tmp_path / "npy"))
    a, b = (np.array(Image.open(tmp_path / d / "a_seg.png")) for d in ("json", "npy"))
    assert np.array_equal(a, b)


def _lps_volume(tmp_path, shape=(40, 32, 6)):
    """A synthetic CT volume stored in LPS voxel order (x and y flipped against RAS), 0.8 x 0.8 x 2.5 mm."""
    hu = np.random.default_rng(1).normal(0, 200, shape).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    affine[:3, 3] = [30, 20, -10]
    img = nib.Nifti1Image(hu, affine)
    img.header.set_xyzt_units("mm")
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    return path, hu, img


def test_nifti_volume_mask_has_the_input_geometry_and_one_slice(bundle_dir, tmp_path):
    path, hu, img = _lps_volume(tmp_path)
    clicks = write_json(tmp_path / "c.json", {"foreground": [[10, 12]], "background": [[2, 3]]})
    run_bundle(bundle_dir, input_image=str(path), clicks=clicks, slice_index=4)
    out = nib.load(tmp_path / "ct_seg.nii.gz")
    assert out.shape == hu.shape and np.allclose(out.affine, img.affine)
    assert out.get_data_dtype() == np.uint8
    mask = np.asarray(out.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert mask.any() and not np.delete(mask, 4, axis=2).any()  # only the segmented slice is filled


def test_real_ct_example_and_3d_clicks(bundle_dir, tmp_path):
    ct = SHARED_DATA / "ct_totalsegmentator_example" / "example_ct_sm.nii.gz"
    if not ct.exists():
        pytest.skip(f"needs {ct}")
    clicks = write_json(tmp_path / "c.json", {"foreground": [[60, 50, 15]], "background": [[5, 5, 15]]})
    run_bundle(bundle_dir, input_image=str(ct), clicks=clicks, output_dir=str(tmp_path))
    out = nib.load(tmp_path / "example_ct_sm_seg.nii.gz")
    ref = nib.load(ct)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert np.nonzero(np.asarray(out.dataobj).sum(axis=(0, 1)))[0].tolist() in ([15], [])


def _write_dicom_series(folder, hu):
    """A CT DICOM series through ITK (GDCM), one file per axial slice of ``hu`` (I, J, K)."""
    import itk

    folder.mkdir()
    study, series = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
    for k in range(hu.shape[2]):
        img = itk.image_from_array(np.ascontiguousarray(hu[:, :, k].T))
        img.SetSpacing([0.8, 0.8])  # GDCM writes PixelSpacing from the image
        md = img.GetMetaDataDictionary()
        for tag, value in {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": study, "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1), "0020|0032": f"-50\\-40\\{2.5 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.8\\0.8", "0018|0050": "2.5", "0010|0020": "P1",
            "0028|1052": "0", "0028|1053": "1", "0020|0011": "1", "0020|0052": "1.2.826.0.1.3680043.8.498.13",
            "0008|0020": "20240101", "0008|0030": "120000", "0010|0010": "Test^Patient", "0008|103e": "CT",
        }.items():
            md[tag] = value
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(img, str(folder / f"slice{k:03d}.dcm"), imageio=io)


def test_dicom_series_through_itk_gives_nifti_with_the_series_geometry(bundle_dir, tmp_path):
    from monai.transforms import LoadImage

    hu = np.random.default_rng(2).normal(0, 200, (36, 30, 5)).astype(np.int16)
    _write_dicom_series(tmp_path / "series", hu)
    clicks = write_json(tmp_path / "c.json", {"foreground": [[10, 10]], "background": []})
    run_bundle(bundle_dir, input_image=str(tmp_path / "series"), clicks=clicks, slice_index=2)
    out = nib.load(tmp_path / "series_seg.nii.gz")
    ref = LoadImage(image_only=True)(str(tmp_path / "series"))
    assert out.shape == hu.shape == tuple(ref.shape)
    assert np.allclose(out.affine, ref.affine.numpy())
    assert np.allclose(np.abs(np.diag(out.affine))[:3], [0.8, 0.8, 2.5])
    assert not np.delete(np.asarray(out.dataobj), 2, axis=2).any()


# ------------------------------------------------------------------------------------------------------------------
# geometry of the pre / post processing
# ------------------------------------------------------------------------------------------------------------------
def test_2d_image_rows_are_y_and_clicks_land_where_given():
    img = rgb(48, 80)  # (H, W, 3)
    loaded = MetaTensor(torch.from_numpy(np.transpose(img, (2, 1, 0)).copy()), meta={"spatial_shape": (80, 48)})
    d = prompt(loaded, {"foreground": [[70, 10]], "background": [[5, 40]]})
    x = d["image"]
    assert x.shape == (5, SIZE, SIZE)
    expected = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255,
                                               size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(x[:3], expected, atol=1e-5)
    fg = torch.nonzero(x[3]).tolist()  # (row, col)
    bg = torch.nonzero(x[4]).tolist()
    assert fg == [[round((10 + 0.5) * SIZE / 48 - 0.5), round((70 + 0.5) * SIZE / 80 - 0.5)]]
    assert bg == [[round((40 + 0.5) * SIZE / 48 - 0.5), round((5 + 0.5) * SIZE / 80 - 0.5)]]
    # a positive logit in the network's top-right corner is the top-right of the written PNG
    logits = -torch.ones(1, SIZE, SIZE)
    logits[:, : SIZE // 4, -SIZE // 4 :] = 1.0
    out = PromptMaskd()({"image": x, "pred": logits})["pred"]
    assert out.shape == (80, 48)  # (X, Y), as MONAI Label writes 2D labels
    png = np.asarray(out).T  # (H, W)
    assert png[:12, -20:].all() and not png[12:, :].any() and not png[:, :60].any()


def test_volume_display_slice_roundtrip_and_3d_clicks(tmp_path):
    path, hu, img = _lps_volume(tmp_path)
    vol = MetaTensor(torch.from_numpy(hu[None].astype(np.float32)), meta={"affine": torch.from_numpy(img.affine),
                                                                            "spatial_shape": hu.shape})
    k_file = 4
    d2 = prompt(vol, {"foreground": [[10, 12]], "background": []}, extra={"slice_index": k_file})
    # the network sees the slice as the training data: RAS+ canonical, radiological display, windowed
    canonical = to_canonical(hu.astype(np.float32), img.affine)
    k = canonical.shape[2] - 1 - k_file if img.affine[2, 2] < 0 else k_file
    shown = np.clip((display_slice(canonical, k) + 125) / 400, 0, 1)
    expected = torch.nn.functional.interpolate(torch.from_numpy(shown)[None, None].float(), size=(SIZE, SIZE),
                                               mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(d2["image"][0], expected, atol=1e-5)
    # the same point given as file voxel indices [i, j, k]: LPS storage flips x and y against RAS
    X, Y = canonical.shape[:2]
    a, b = 10, 12  # display column / row
    i, j = a, b  # canonical (X-1-a, Y-1-b) is file (a, b) for an LPS-stored volume
    assert np.allclose(np.diag(img.affine)[:2], [-0.8, -0.8])
    d3 = prompt(vol, {"foreground": [[i, j, k_file]], "background": []})
    assert torch.equal(d3["image"], d2["image"])
    assert canonical[X - 1 - a, Y - 1 - b, k] == hu[i, j, k_file]
    # a mask drawn in display space goes back to the file's voxels
    logits = -torch.ones(1, SIZE, SIZE)
    logits[:, :20, :10] = 1.0  # display rows 0.., columns 0..
    out = np.asarray(PromptMaskd()({"image": d2["image"], "pred": logits})["pred"])[0]
    assert out.shape == hu.shape
    back = display_slice(to_canonical(out, img.affine), k)
    ref = torch.nn.functional.interpolate(logits[None], size=back.shape, mode="bilinear", align_corners=False)[0, 0]
    assert np.array_equal(back, (ref > 0).numpy().astype(np.uint8))
    assert not np.delete(out, k_file, axis=2).any()


# ------------------------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------------------------
def _png_meta():
    return MetaTensor(torch.zeros(3, 80, 48, dtype=torch.uint8), meta={"filename_or_obj": "tile.png"})


@pytest.mark.parametrize(
    "clicks,message",
    [
        ({"foreground": [[80, 10]]}, r"click \[80.0, 10.0\] is outside the image \(80 columns x 48 rows"),
        ({"foreground": [[5, 5]], "background": [[-1, 3]]}, "outside the image"),
        ({"foreground": [], "background": [[5, 5]]}, "no foreground click"),
        ({"background": [[5, 5]]}, "no foreground click"),
        ({"foreground": [[5]]}, r"foreground click \[5\] is not \[x, y\]"),
        ({"foreground": [["a", 3]]}, "is not"),
        ({"foreground": "oops"}, "not a JSON list"),
        ({"foreground": [[5, 5]], "positive": [[1, 1]]}, "unknown keys"),
        ({"foreground": [[5, 5, 0]]}, r"clicks on a 2D image are \[x, y\]"),
    ],
)
def test_bad_clicks_are_clear_errors(clicks, message):
    with pytest.raises(PromptInputError, match=message):
        prompt(_png_meta(), clicks)


def test_missing_and_malformed_click_files(tmp_path):
    with pytest.raises(PromptInputError, match="clicks file not found"):
        read_clicks(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(PromptInputError, match="bad.json: not a JSON clicks file"):
        read_clicks(str(bad))
    with pytest.raises(PromptInputError, match="no clicks given"):
        PromptImaged(image_size=SIZE)({"image": _png_meta()})
    with pytest.raises(PromptInputError, match=r"guidance channels must have shape \(2, \*spatial\)"):
        read_clicks(np.zeros((3, 4, 4)))


def test_volume_without_slice_index_and_other_volume_errors(tmp_path):
    path, hu, img = _lps_volume(tmp_path)
    vol = MetaTensor(torch.from_numpy(hu[None].astype(np.float32)),
                     meta={"affine": torch.from_numpy(img.affine), "filename_or_obj": str(path)})
    with pytest.raises(PromptInputError, match=r"ct.nii.gz is a volume of shape \(40, 32, 6\): give a slice index"):
        prompt(vol, {"foreground": [[5, 5]]})
    with pytest.raises(PromptInputError, match="slice_index 6 is outside the volume"):
        prompt(vol, {"foreground": [[5, 5]]}, extra={"slice_index": 6})
    with pytest.raises(PromptInputError, match="different slices"):
        prompt(vol, {"foreground": [[5, 5, 1], [6, 6, 2]]})
    with pytest.raises(PromptInputError, match="outside the volume"):
        prompt(vol, {"foreground": [[40, 5, 1]]})
    with pytest.raises(PromptInputError, match="is not on slice 2"):
        prompt(vol, {"foreground": [[5, 5, 1]]}, extra={"slice_index": 2})
    with pytest.raises(PromptInputError, match=r"click \[40.0, 5.0\] is outside the image \(40 columns x 32 rows"):
        prompt(vol, {"foreground": [[40, 5]]}, extra={"slice_index": 1})


def test_bundle_run_reports_the_bad_input(bundle_dir, tmp_path):
    path, _, _ = _lps_volume(tmp_path)
    clicks = write_json(tmp_path / "c.json", {"foreground": [[5, 5]]})
    with pytest.raises(Exception) as e:
        run_bundle(bundle_dir, input_image=str(path), clicks=clicks)
    chain, err = [], e.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(c, PromptInputError) and "give a slice index" in str(c) for c in chain)
    assert not (tmp_path / "ct_seg.nii.gz").exists()


def test_exported_configs_still_name_the_mask_transforms_in_bundle_inference():
    """model.ts files exported before bundle/masks.py carry an inference config naming bundle.inference.PromptMaskd
    and SaveImageMaskd: MONAI Deploy instantiates those names."""
    from monai.bundle import ConfigComponent

    import bundle.masks

    for name in ("PromptMaskd", "SaveImageMaskd"):
        obj = ConfigComponent({"_target_": f"bundle.inference.{name}", "keys": "pred"}).instantiate()
        assert type(obj) is getattr(bundle.masks, name)
    import bundle.inference

    assert bundle.inference.mask_path is bundle.masks.mask_path
    with pytest.raises(AttributeError, match="no attribute 'PromptMask'"):
        bundle.inference.PromptMask  # noqa: B018


@pytest.mark.parametrize("kind", ["grey16", "grey16_low", "rgba", "grey8"])
def test_16_bit_rgba_and_grey_images_reach_the_network_as_the_importer_converts_them(tmp_path, kind):
    """The served input of a 16-bit, RGBA or grey PNG (loaded as configs/inference.yaml loads it) is the importer's
    RGB uint8 (bundle.data.readers.read_image, what training data goes through) / 255: a 16-bit field is stretched
    from 0..its maximum, not divided by 65535 (a 12-bit scan would be near black); alpha is dropped."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from bundle.data.readers import read_image

    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}.png"
    if kind == "grey16":
        Image.fromarray(rng.integers(200, 4096, (40, 60)).astype(np.uint16)).save(path)
    elif kind == "grey16_low":  # 16-bit file whose values fit 8 bits: as they are
        Image.fromarray(rng.integers(0, 200, (40, 60)).astype(np.uint16)).save(path)
    elif kind == "rgba":
        Image.fromarray(rng.integers(0, 256, (40, 60, 4)).astype(np.uint8), "RGBA").save(path)
    else:
        Image.fromarray(rng.integers(0, 256, (40, 60)).astype(np.uint8), "L").save(path)
    load = Compose([LoadImaged("image", image_only=True, dtype=None), EnsureChannelFirstd("image")])
    d = load({"image": str(path)})
    prep = PromptImaged(image_size=64, tiling={"mode": "propagate", "tile_size": 64, "overlap": 16})
    x = prep({**d, "clicks": {"foreground": [[5, 5]], "background": []}})["image"]
    expected = read_image(path).transpose(2, 0, 1).astype(np.float32) / 255.0
    assert x.shape == (5, 40, 60)
    np.testing.assert_allclose(np.asarray(x[:3]), expected, atol=1e-6)
    if kind == "grey16":  # stretched from 0 to the field's maximum, not / 65535
        raw = np.asarray(Image.open(path), dtype=np.float64)
        assert float(x[:3].max()) == pytest.approx(1.0)
        assert float(x[:3].min()) == pytest.approx(np.round(raw.min() * 255 / raw.max()) / 255, abs=1e-6)
