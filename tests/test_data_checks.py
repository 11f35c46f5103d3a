"""Load-time checks in the configs' ``load`` chain (bundle/transforms/checks.py), run through the real configs on
real files written to tmp_path: a label of another size than its image, NaN / inf values, a truncated PNG and an
unknown channel count stop naming the file(s); grey and RGBA PNGs become RGB with a log line."""

import logging
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load(task: str | None = None) -> Compose:
    files = [str(ROOT / "configs" / "train.yaml")] + ([str(ROOT / "configs" / "tasks" / f"{task}.yaml")] if task else [])
    parser = ConfigParser(ConfigParser.load_config_files(files))
    return Compose(parser.get_parsed_content("load"))


def _label(path: Path, size=(32, 32)) -> str:
    label = np.zeros((2, *size), np.int32)
    label[:, 4:10, 4:10] = 1
    np.save(path, label)
    return str(path)


def _png(path: Path, mode="RGB", size=(32, 32)) -> str:
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = np.random.default_rng(0).integers(0, 256, (*size, channels), dtype=np.uint8)
    Image.fromarray(arr[..., 0] if channels == 1 else arr, mode).save(path)
    return str(path)


def test_label_of_another_size_is_refused_naming_both_files(tmp_path):
    item = {"image": _png(tmp_path / "a.png", size=(32, 40)), "label": _label(tmp_path / "a_label.npy", (32, 32))}
    with pytest.raises(RuntimeError) as e:
        _load()(item)
    msg = str(e.value.__cause__ or e.value)
    assert "a_label.npy has size (32, 32) but its image" in msg and "a.png has size (32, 40)" in msg


def test_evaluation_and_ct_load_chains_check_sizes_too(tmp_path):
    parser = ConfigParser(ConfigParser.load_config_files(
        [str(ROOT / "configs" / f) for f in ("train.yaml", "tasks/synapse.yaml", "evaluate.yaml")]))
    load = Compose(parser.get_parsed_content("evaluate#preprocessing").transforms[:4])
    np.save(tmp_path / "ct.npy", np.zeros((24, 24), np.float32))
    with pytest.raises(RuntimeError) as e:
        load({"image": str(tmp_path / "ct.npy"), "label": _label(tmp_path / "ct_label.npy", (24, 30))})
    assert "ct_label.npy has size (24, 30) but its image" in str(e.value.__cause__ or e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_ct_slice_with_nan_or_inf_is_refused_naming_the_file(tmp_path, bad):
    hu = np.zeros((24, 24), np.float32)
    hu[3, 4] = bad
    np.save(tmp_path / "slice.npy", hu)
    with pytest.raises(RuntimeError) as e:
        _load("synapse")({"image": str(tmp_path / "slice.npy"), "label": _label(tmp_path / "l.npy", (24, 24))})
    msg = str(e.value.__cause__ or e.value)
    assert "image file" in msg and "slice.npy" in msg and "out of 576" in msg


def test_truncated_png_names_the_file(tmp_path):
    path = _png(tmp_path / "cut.png", size=(64, 64))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as e:
        _load()({"image": path, "label": _label(tmp_path / "l.npy", (64, 64))})
    msg = str(e.value.__cause__ or e.value)
    assert f"cannot read {path}" in msg and "truncated" in msg


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_grey_and_rgba_pngs_become_rgb_with_a_log_line(tmp_path, caplog, mode):
    load = _load()
    with caplog.at_level(logging.INFO, logger="bundle.transforms.checks"):
        out = load({"image": _png(tmp_path / f"{mode}.png", mode), "label": _label(tmp_path / "l.npy")})
    assert tuple(out["image"].shape) == (3, 32, 32)
    assert f"{mode}.png" in caplog.text and "converted to RGB" in caplog.text
    rgb = load({"image": _png(tmp_path / "rgb.png"), "label": _label(tmp_path / "l.npy")})
    from monai.data import list_data_collate

    assert list_data_collate([out, rgb])["image"].shape == (2, 3, 32, 32)  # batches with RGB tiles


def test_image_with_five_channels_names_the_file(tmp_path):
    from bundle.transforms.checks import EnsureRGBd

    with pytest.raises(ValueError, match=r"x.tif: an image needs 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got 5"):
        EnsureRGBd("image")({"image": np.zeros((5, 4, 4)), "image_meta_dict": {"filename_or_obj": "x.tif"}})


def test_missing_empty_and_misshapen_files_name_the_file(tmp_path):
    load = _load()
    with pytest.raises(RuntimeError) as e:
        load({"image": str(tmp_path / "nothere.png"), "label": _label(tmp_path / "l.npy")})
    assert isinstance(e.value.__cause__, FileNotFoundError) and "nothere.png (check the datalist entry)" in str(e.value.__cause__)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(RuntimeError) as e:
        load({"image": str(tmp_path / "empty.png"), "label": _label(tmp_path / "l.npy")})
    assert "cannot read" in str(e.value.__cause__) and "cannot identify image file" in str(e.value.__cause__)
    np.save(tmp_path / "hw.npy", np.zeros((32, 32), np.int32))
    with pytest.raises(RuntimeError) as e:
        load({"image": _png(tmp_path / "a.png"), "label": str(tmp_path / "hw.npy")})
    assert "hw.npy has shape (32, 32); expected (2, H, W)" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"training": []}, "no training items"),
        ({"training": {"image": "a"}}, "'training' must be a list"),
        ({"training": ["images/a.png"]}, r"training\[0\] must be an object"),
        ({"training": [{"image": None, "label": "l.npy"}]}, r"training\[0\]\['image'\] must be a file path"),
    ],
)
def test_malformed_datalists_say_what_is_wrong(tmp_path, data, match):
    import json

    from bundle.data.datalist import load_datalist

    body = json.dumps({"task_family": "nuclei", "classes": {"1": "a"}, **data})
    (tmp_path / "d.json").write_text(body, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_datalist(tmp_path / "d.json", "training")
    (tmp_path / "d.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="must be a JSON object"):
        load_datalist(tmp_path / "d.json", "training")


def test_inference_refuses_an_image_with_nan(tmp_path):
    import torch
    from monai.data import MetaTensor

    from bundle.clicks import PromptInputError
    from bundle.inference import PromptImaged

    img = torch.zeros(1, 16, 16)
    img[0, 3, 3] = float("nan")
    with pytest.raises(PromptInputError, match=r"ct.nii.gz: 1 NaN and 0 infinite values in the image"):
        PromptImaged("image", image_size=16)({"image": MetaTensor(img, meta={"filename_or_obj": "ct.nii.gz"}),
                                              "clicks": {"foreground": [[2, 2]]}})
