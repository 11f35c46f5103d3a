"""PanNuke preparation on tiny folds written in the official layout (Fold k/images/foldk/images.npy, ...)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.data.datalist import load_datalist
from bundle.data.pannuke import TISSUES, find_fold_dirs, merge_masks, prepare_pannuke

ROOT = Path(__file__).resolve().parents[1]
H = W = 16


def _fold_arrays(fold: int):
    """3 images: #0 four nuclei over three classes, #1 none, #2 three nuclei (connective, epithelial x2)."""
    rng = np.random.default_rng(fold)
    images = rng.uniform(0, 255, (3, H, W, 3))  # float 0..255 as in the release
    masks = np.zeros((3, H, W, 6))
    masks[0, 1:4, 1:4, 0] = 3  # neoplastic, ids 3 and 7 (ids need not be contiguous)
    masks[0, 6:9, 1:4, 0] = 7
    masks[0, 1:4, 8:12, 1] = 3  # inflammatory: id 3 again, a different nucleus
    masks[0, 10:14, 10:14, 3] = 1  # dead
    masks[2, 0:5, 0:5, 2] = 12  # connective
    masks[2, 8:10, 8:10, 4] = 1  # epithelial x2
    masks[2, 12:15, 12:15, 4] = 2
    masks[..., 5] = (masks[..., :5].sum(-1) == 0).astype(float)
    types = np.array(["Breast", "Colon", TISSUES[fold]])
    return images, masks, types


def _write_fold(root: Path, fold: int, images=None, masks=None, types=None):
    a = _fold_arrays(fold)
    base = root / f"Fold {fold}"
    (base / "images" / f"fold{fold}").mkdir(parents=True)
    (base / "masks" / f"fold{fold}").mkdir(parents=True)
    np.save(base / "images" / f"fold{fold}" / "images.npy", a[0] if images is None else images)
    np.save(base / "images" / f"fold{fold}" / "types.npy", a[2] if types is None else types)
    np.save(base / "masks" / f"fold{fold}" / "masks.npy", a[1] if masks is None else masks)
    return base


@pytest.fixture
def pannuke_root(tmp_path):
    for fold in (1, 2, 3):
        _write_fold(tmp_path / "PanNuke", fold)
    return tmp_path / "PanNuke"


def test_merge_masks_gives_unique_ids_and_channel_classes():
    _, masks, _ = _fold_arrays(1)
    label, overlap = merge_masks(masks[0])
    assert overlap == 0
    inst, cls = label
    assert sorted(np.unique(inst)) == [0, 1, 2, 3, 4]
    # channel order, then ascending id: neoplastic 3 -> 1, neoplastic 7 -> 2, inflammatory 3 -> 3, dead 1 -> 4
    assert inst[2, 2] == 1 and inst[7, 2] == 2 and inst[2, 9] == 3 and inst[11, 11] == 4
    assert [cls[2, 2], cls[7, 2], cls[2, 9], cls[11, 11]] == [1, 1, 2, 4]
    assert np.array_equal(cls > 0, inst > 0)


def test_merge_masks_counts_pixels_claimed_twice():
    _, masks, _ = _fold_arrays(1)
    m = masks[0].copy()
    m[1:3, 1:3, 4] = 5  # epithelial nucleus on top of the first neoplastic one (4 pixels)
    label, overlap = merge_masks(m)
    assert overlap == 4
    assert label[1, 1, 1] == 1  # the first channel keeps the pixel


def test_prepare_pannuke_default_protocol(pannuke_root, tmp_path, capsys):
    from bundle.data.pannuke import find_fold_dirs

    path = prepare_pannuke(find_fold_dirs(pannuke_root), tmp_path / "out", progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["task_family"] == "nuclei"
    assert data["classes"] == {"1": "neoplastic", "2": "inflammatory", "3": "connective", "4": "dead", "5": "epithelial"}
    for split, fold in (("training", 1), ("validation", 2), ("test", 3)):
        entries = data[split]
        assert [e["image"] for e in entries] == [f"images/fold{fold}_00000.png", f"images/fold{fold}_00002.png"]
        assert [e["n_nuclei"] for e in entries] == [4, 3]
        assert [e["tissue"] for e in entries] == ["Breast", TISSUES[fold]]
        assert all(e["fold"] == fold for e in entries)
    assert data["preparation"]["skipped"] == {"no nucleus": 3}
    assert "skipped (no nucleus): 3" in capsys.readouterr().out
    item = load_datalist(path, "test")[1]
    label = np.load(item["label"])
    assert label.shape == (2, H, W) and label.dtype == np.int32
    assert {int(c): int((label[1] == c).any()) for c in range(1, 6)} == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1}
    from PIL import Image

    image = np.asarray(Image.open(item["image"]))
    assert np.array_equal(image, np.rint(_fold_arrays(3)[0][2]).astype(np.uint8))


def test_prepare_pannuke_script_with_other_folds(pannuke_root, tmp_path):
    dirs = [str(pannuke_root / f"Fold {k}") for k in (1, 2, 3)]
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_pannuke.py"), "--fold_dirs", *dirs,
           "--output", str(tmp_path / "o"), "--train", "2", "3", "--val", "--test", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    data = json.loads((tmp_path / "o" / "datalist.json").read_text(encoding="utf-8"))
    assert sorted({e["fold"] for e in data["training"]}) == [2, 3]
    assert data["validation"] == [] and {e["fold"] for e in data["test"]} == {1}
    assert sum(10 in e["subsets"] for e in data["training"]) == 1  # ceil(10 % of 4)


def test_float_images_in_unit_range_are_scaled(tmp_path):
    images = _fold_arrays(1)[0] / 255.0
    base = _write_fold(tmp_path, 1, images=images)
    path = prepare_pannuke({1: base}, tmp_path / "o", val=(), test=(), progress=False)
    from PIL import Image

    png = np.asarray(Image.open(load_datalist(path, "training")[0]["image"]))
    assert np.array_equal(png, np.rint(images[0] * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masks": np.zeros((3, H, W, 5))}, r"masks.npy: expected shape \(N, H, W, 6\), got \(3, 16, 16, 5\)"),
        ({"images": np.zeros((3, H, W))}, r"images.npy: expected shape \(N, H, W, 3\)"),
        ({"masks": np.zeros((3, H + 1, W, 6))}, r"does not match .*images.npy"),
        ({"types": np.array(["Breast", "Colon"])}, r"types.npy: 2 tissue names for 3 images"),
        ({"types": np.array(["Breast", "Colon", "Brain"])}, r"unknown tissue names \['Brain'\]; known: \['Adrenal_gland'"),
        ({"images": np.full((3, H, W, 3), 300.0)}, r"images.npy\[0\]: image values in \[300.0, 300.0\], expected 0..255"),
    ],
)
def test_bad_fold_files_raise_naming_the_file(tmp_path, kwargs, match):
    base = _write_fold(tmp_path, 1, **kwargs)
    with pytest.raises(ValueError, match=match):
        prepare_pannuke({1: base}, tmp_path / "o", val=(), test=(), progress=False)
    assert not (tmp_path / "o" / "datalist.json").exists()


def test_missing_fold_file_and_folds(tmp_path):
    base = _write_fold(tmp_path, 1)
    (base / "masks" / "fold1" / "masks.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"Fold 1: no masks.npy below it \(expected a \(N, H, W, 6\) array\)"):
        prepare_pannuke({1: base}, tmp_path / "o", val=(), test=(), progress=False)
    with pytest.raises(ValueError, match=r"folds \[2, 3\] requested but only folds \[1\] were given"):
        prepare_pannuke({1: base}, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="a fold is used in two splits"):
        prepare_pannuke({1: base}, tmp_path / "o", train=(1,), val=(1,), test=(), progress=False)


def test_nan_image_is_refused_naming_the_fold_file_and_the_output_is_kept(pannuke_root, tmp_path):
    folds = find_fold_dirs(pannuke_root)
    first = prepare_pannuke(folds, tmp_path / "o", progress=False).read_bytes()
    images = _fold_arrays(3)[0]
    images[2, 5, 5, 1] = np.nan
    _write_fold(tmp_path / "bad", 3, images=images)
    folds[3] = tmp_path / "bad" / "Fold 3"
    with pytest.raises(ValueError, match=r"Fold 3 images.npy\[2\]: 1 NaN and 0 infinite values"):
        prepare_pannuke(folds, tmp_path / "o", progress=False)
    assert (tmp_path / "o" / "datalist.json").read_bytes() == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
