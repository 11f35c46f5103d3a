"""Folder importer (bundle/data/folder.py, readers.py, scripts/prepare_folder.py): fixtures written here in every
label format, tiling without resizing, padding, binary masks, class maps and schemes, and each bad input."""

import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import tifffile
from PIL import Image

from bundle.data.datalist import load_datalist
from bundle.data.folder import prepare_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import fetch_stardist_dsb2018  # noqa: E402
import prepare_folder as prepare_folder_script  # noqa: E402


def _inst(h=20, w=24):
    """Three nuclei with ids 5, 9, 12 (not sequential), one touching the border."""
    inst = np.zeros((h, w), np.int32)
    inst[2:6, 3:8], inst[10:14, 10:16], inst[15:20, 0:3] = 5, 9, 12
    return inst


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_label(path: Path, inst: np.ndarray, **mat):
    ext = path.suffix
    if ext == ".png":
        Image.fromarray(inst.astype(np.uint16)).save(path)
    elif ext in (".tif", ".tiff"):
        tifffile.imwrite(path, inst.astype(np.uint16))
    elif ext == ".npy":
        np.save(path, inst)
    elif ext == ".mat":
        sio.savemat(path, {"inst_map": inst.astype(float), **mat})


def _folder(tmp_path, image=None, inst=None, label_name="a_mask.png", image_name="a.png", **mat):
    image = _rgb(20, 24) if image is None else image
    inst = _inst() if inst is None else inst
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    Image.fromarray(image).save(tmp_path / "images" / image_name)
    _save_label(tmp_path / "labels" / label_name, inst, **mat)
    return tmp_path / "images", tmp_path / "labels"


def _prepare(tmp_path, images, labels, **kwargs):
    kwargs.setdefault("tile_size", 32)
    path = prepare_folder(images, labels, tmp_path / "out", progress=False, **kwargs)
    data = json.loads(path.read_text(encoding="utf-8"))
    items = load_datalist(path, "test")
    return data, items, [np.load(i["label"]) for i in items], [np.asarray(Image.open(i["image"])) for i in items]


@pytest.mark.parametrize("label_name", ["a_mask.png", "a.tif", "a_label.npy", "a.mat", "a_inst.tiff"])
def test_every_label_format_gives_the_same_padded_instance_map(tmp_path, label_name):
    image = _rgb(20, 24)
    data, items, labels, tiles = _prepare(tmp_path, *_folder(tmp_path, image, label_name=label_name))
    assert data["classes"] == {"1": "nucleus"} and data["training"] == [] and data["validation"] == []
    assert [i["name"] for i in items] == ["a"] and items[0]["pad"] == [12, 8] and "tile" not in items[0]
    label, tile = labels[0], tiles[0]
    assert label.shape == (2, 32, 32) and tile.shape == (32, 32, 3)
    expected = np.zeros((32, 32), np.int32)
    expected[:20, :24] = np.searchsorted([0, 5, 9, 12], _inst())  # 5, 9, 12 -> 1, 2, 3
    assert np.array_equal(label[0], expected) and np.array_equal(label[1], (expected > 0).astype(np.int32))
    assert np.array_equal(tile[:20, :24], image) and not tile[20:].any() and not tile[:, 24:].any()
    assert items[0]["n_nuclei"] == 3 and data["preparation"]["image_sizes"] == [[20, 24]]


def test_reflect_and_white_padding(tmp_path):
    image = _rgb(20, 24)
    images, labels = _folder(tmp_path, image)
    *_, tiles = _prepare(tmp_path, images, labels, pad_mode="reflect")
    assert np.array_equal(tiles[0], np.pad(image, [(0, 12), (0, 8), (0, 0)], mode="reflect"))
    *_, tiles = _prepare(tmp_path, images, labels, pad_value=255)
    assert (tiles[0][20:] == 255).all()
    *_, tiles = _prepare(tmp_path, images, labels, invert=True)
    assert np.array_equal(tiles[0][:20, :24], 255 - image) and not tiles[0][20:].any()  # the pad is not inverted


def test_large_image_is_tiled_never_resized_and_a_three_pixel_nucleus_survives(tmp_path):
    image, inst = _rgb(70, 100, seed=1), np.zeros((70, 100), np.int32)
    inst[40, 50:53] = 7  # a 3-pixel nucleus
    inst[5:15, 5:15] = 3
    data, items, labels, tiles = _prepare(tmp_path, *_folder(tmp_path, image, inst), stride=None)
    assert all(t.shape == (32, 32, 3) for t in tiles) and all(label.shape == (2, 32, 32) for label in labels)
    for item, label, tile in zip(items, labels, tiles):
        y, x = item["tile"]
        assert np.array_equal(tile, image[y : y + 32, x : x + 32])  # pixels copied, not resampled
        assert np.array_equal(label[0] > 0, inst[y : y + 32, x : x + 32] > 0)
    small = [(item, label) for item, label in zip(items, labels) if 40 in range(item["tile"][0], item["tile"][0] + 32)
             and all(c in range(item["tile"][1], item["tile"][1] + 32) for c in (50, 51, 52))]  # fmt: skip
    assert small and all(np.bincount(label[0].ravel())[1:].tolist() in ([3], [100, 3], [3, 100]) for _, label in small)
    assert data["preparation"]["skipped"]["no nucleus"] > 0  # tiles without a nucleus are left out ...
    kept = _prepare(tmp_path, *_folder(tmp_path, image, inst), keep_empty=True)[1]
    assert len(kept) == 3 * 4  # ... unless keep_empty: 70 -> 3 rows, 100 -> 4 columns of 32 px tiles


def test_binary_mask_becomes_connected_components_with_a_log_line(tmp_path, caplog):
    binary = (_inst() > 0).astype(np.uint8) * 255
    with caplog.at_level(logging.INFO, logger="bundle.data.folder"):
        *_, labels, _ = _prepare(tmp_path, *_folder(tmp_path, inst=binary))
    assert labels[0][0].max() == 3 and np.array_equal(labels[0][0][:20, :24] > 0, binary > 0)
    assert "binary mask (one value, 3 connected pieces)" in caplog.text


def test_class_maps_vote_and_map(tmp_path):
    images, labels = _folder(tmp_path)
    (tmp_path / "classes").mkdir()
    classes = np.zeros((20, 24), np.uint8)
    classes[_inst() == 5], classes[_inst() == 9], classes[_inst() == 12] = 4, 6, 2
    classes[2, 3] = 7  # one stray pixel: the majority decides
    Image.fromarray(classes).save(tmp_path / "classes" / "a.png")
    data, _, labels_out, _ = _prepare(tmp_path, images, labels, classes=tmp_path / "classes", type_scheme="consep")
    assert data["classes"] == {"1": "other", "2": "inflammatory", "3": "epithelial", "4": "spindle"}
    assert [int(labels_out[0][1][labels_out[0][0] == k][0]) for k in (1, 2, 3)] == [3, 4, 2]  # 4->3, 6->4, 2
    with pytest.raises(ValueError, match=r"a.png: class ids \[2, 6\] are not in the class mapping \[4\]"):
        _prepare(tmp_path, images, labels, classes=tmp_path / "classes", class_mapping={4: 1})
    data, _, labels_out, _ = _prepare(tmp_path, images, labels, classes=tmp_path / "classes")
    assert data["classes"] == {"2": "class 2", "4": "class 4", "6": "class 6"}
    data, _, labels_out, _ = _prepare(tmp_path, images, labels, classes=tmp_path / "classes", type_scheme="nuclei")
    assert data["classes"] == {"1": "nucleus"} and set(np.unique(labels_out[0][1])) == {0, 1}
    classes[_inst() == 9] = 0
    Image.fromarray(classes).save(tmp_path / "classes" / "a.png")
    with pytest.raises(ValueError, match=r"classes/a.png: nucleus 9 of .*a_mask.png has no class \(class 0 under"):
        _prepare(tmp_path, images, labels, classes=tmp_path / "classes")


@pytest.mark.parametrize("mat, expected", [
    ({"id": np.array([[12], [5], [9]]), "class": np.array([[6], [2], [3]])}, [2, 3, 6]),  # Lizard: class of id[i]
    ({"inst_type": np.array([[1], [5], [7]])}, [1, 5, 7]),  # CoNSeP: rows in ascending id order
])  # fmt: skip
def test_mat_classes_lizard_and_consep(tmp_path, mat, expected):
    data, _, labels, _ = _prepare(tmp_path, *_folder(tmp_path, label_name="a.mat", **mat))
    assert [int(labels[0][1][labels[0][0] == k][0]) for k in (1, 2, 3)] == expected


def test_grey_rgba_and_16_bit_images_become_rgb(tmp_path):
    grey16 = (np.arange(20 * 24).reshape(20, 24) * 100).astype(np.uint16)
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "g.tif", grey16)
    Image.fromarray(np.dstack([_rgb(20, 24), np.full((20, 24), 9, np.uint8)])).save(tmp_path / "images" / "r.png")
    (tmp_path / "labels").mkdir()
    for stem in ("g", "r"):
        np.save(tmp_path / "labels" / f"{stem}.npy", _inst())
    _, items, _, tiles = _prepare(tmp_path, tmp_path / "images", tmp_path / "labels")
    g, r = tiles[[i["name"] for i in items].index("g")], tiles[[i["name"] for i in items].index("r")]
    assert np.array_equal(g[..., 0], g[..., 2]) and g[0, 0, 0] == 0 and g[19, 23, 0] == 255
    assert np.array_equal(r[:20, :24], _rgb(20, 24))


def test_labels_beside_their_images(tmp_path):
    image = _rgb(20, 24)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(_inst().astype(np.uint16)).save(tmp_path / "a_mask.png")
    _, items, labels, _ = _prepare(tmp_path, tmp_path, tmp_path)
    assert [i["name"] for i in items] == ["a"] and labels[0][0].max() == 3


def _bad(tmp_path, case):
    images, labels = tmp_path / "images", tmp_path / "labels"
    if case == "unreadable image":
        _folder(tmp_path)
        (images / "a.png").write_bytes(b"not a png")
    elif case == "label missing":
        _folder(tmp_path, label_name="b.png")
    elif case == "size mismatch":
        _folder(tmp_path, inst=_inst(20, 20))
    elif case == "non-integer label":
        _folder(tmp_path, inst=_inst() + 0.5, label_name="a.npy")
    elif case == "negative ids":
        _folder(tmp_path, inst=-_inst(), label_name="a.npy")
    elif case == "mat without inst_map":
        _folder(tmp_path, label_name="a.mat")
        sio.savemat(labels / "a.mat", {"type_map": _inst()})
    elif case == "empty folder":
        images.mkdir(), labels.mkdir()
    elif case == "two labels":
        _folder(tmp_path)
        np.save(labels / "a.npy", _inst())
    elif case == "colour label":
        _folder(tmp_path)
        Image.fromarray(_rgb(20, 24)).save(labels / "a_mask.png")
    elif case == "five channels":
        _folder(tmp_path, label_name="a.npy")
        (images / "a.png").unlink()
        np.save(images / "a.npy", np.zeros((20, 24, 5), np.uint8))
    elif case == "lizard id without class row":
        _folder(tmp_path, label_name="a.mat", id=np.array([[5], [9]]), **{"class": np.array([[1], [2]])})
    elif case == "lizard class 0":
        _folder(tmp_path, label_name="a.mat", id=np.array([[5], [9], [12]]), **{"class": np.array([[1], [0], [2]])})
    elif case == "no nucleus anywhere":
        _folder(tmp_path, inst=np.zeros((20, 24), np.int32))
    return images, labels


BAD = {
    "unreadable image": (ValueError, r"cannot read .*images/a.png: UnidentifiedImageError"),
    "label missing": (FileNotFoundError, r"images/a.png: no label in .*labels \(expected a\{,_mask,"),
    "size mismatch": (ValueError, r"images/a.png: image size \(20, 24\) != label size \(20, 20\) of .*a_mask.png"),
    "non-integer label": (ValueError, r"a.npy: the label holds non-integer values \(e.g. 0.5\)"),
    "negative ids": (ValueError, r"a.npy: the label holds negative ids \(min -12\)"),
    "mat without inst_map": (ValueError, r"a.mat: no 'inst_map' \(has \['type_map'\]\)"),
    "empty folder": (FileNotFoundError, r"images: no images \(.png"),
    "two labels": (ValueError, r"images/a.png: 2 label files match it \(a.npy, a_mask.png\)"),
    "colour label": (ValueError, r"a_mask.png: the label has 3 different channels"),
    "five channels": (ValueError, r"a.npy: an image must be .* C <= 4, got shape \(20, 24, 5\)"),
    "lizard id without class row": (ValueError, r"a.mat: nuclei \[12\] of inst_map have no class row"),
    "lizard class 0": (ValueError, r"a.mat: nucleus 9 has class 0 \(background\)"),
    "no nucleus anywhere": (ValueError, r"images: no tile of the 1 images holds a nucleus"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_the_file_and_keeps_the_output(tmp_path, case):
    images, labels = _bad(tmp_path, case)
    out = tmp_path / "out"
    out.mkdir()
    (out / "datalist.json").write_text("{}", encoding="utf-8")
    error, message = BAD[case]
    with pytest.raises(error, match=message):
        prepare_folder(images, labels, out, tile_size=32, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["datalist.json"]  # the old output is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left


@pytest.mark.parametrize("kwargs, message", [
    ({"tile_size": 0}, "tile_size must be an integer >= 1, got 0"),
    ({"pad_mode": "wrap"}, "pad_mode must be 'constant' or 'reflect'"),
    ({"split": "train"}, "split must be one of"),
    ({"type_scheme": "monusac"}, "type_scheme must be one of"),
    ({"label_suffixes": "_mask"}, "label_suffixes must be a non-empty list"),
    ({"class_mapping": {1: 0}}, "class_mapping must map to class ids >= 1"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_reading(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_folder(tmp_path / "nothing", tmp_path / "nothing", tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_script_parses_mappings_and_split(tmp_path):
    images, labels = _folder(tmp_path, label_name="a.mat", inst_type=np.array([[1], [5], [7]]))
    prepare_folder_script.main(["--images", str(images), "--labels", str(labels), "--output", str(tmp_path / "o"),
                                "--class_mapping", "1:1,5:2,7:2", "--class_names", "1:a,2:b", "--split",
                                "validation", "--tile_size", "32", "--tissue", "colon"])  # fmt: skip
    data = json.loads((tmp_path / "o" / "datalist.json").read_text(encoding="utf-8"))
    assert data["classes"] == {"1": "a", "2": "b"} and data["test"] == []
    assert data["validation"][0]["tissue"] == "colon"
    assert sorted(np.unique(np.load(tmp_path / "o" / data["validation"][0]["label"])[1])) == [0, 1, 2]


def test_fetch_script_reads_the_dsb2018_files_from_a_wheel(tmp_path):
    wheel = tmp_path / "stardist-0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("stardist/data/images/img2d.tif", b"image")
        z.writestr("stardist/data/images/mask2d.tif", b"mask")
    fetch_stardist_dsb2018.main(["--output", str(tmp_path / "raw"), "--package", str(wheel)])
    assert (tmp_path / "raw" / "images" / "dsb2018.tif").read_bytes() == b"image"
    assert (tmp_path / "raw" / "labels" / "dsb2018.tif").read_bytes() == b"mask"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("stardist/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="no stardist/data/images/img2d.tif inside"):
        fetch_stardist_dsb2018.read_members(wheel)


@pytest.mark.parametrize("task", ["external_t1", "external_t2"])
def test_evaluation_preprocessing_runs_on_an_imported_set(tmp_path, task):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    classes = (_inst() == 9).astype(np.uint8) + 1  # nucleus 9 is class 2, the others class 1
    images, labels = _folder(tmp_path, label_name="a.mat", type_map=classes * (_inst() > 0))
    prepare_folder(images, labels, tmp_path / "out", tile_size=32, progress=False)
    files = [str(ROOT / "configs" / name) for name in ("train.yaml", f"tasks/{task}.yaml")]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser["dataset_dir"], parser["image_size"] = str(tmp_path / "out"), 32
    task_name = parser.get_parsed_content("task")
    items = load_datalist(parser.get_parsed_content("datalist"), "test", task=task_name)
    assert [i.get("target_class") for i in items] == ([None] if task == "external_t1" else [1, 2])
    transform = Compose(parser.get_parsed_content("load") + parser.get_parsed_content("resize"))
    targets = [np.asarray(transform(item)["label"])[0] > 0 for item in items]
    assert [int(t.sum()) for t in targets] == ([20 + 24 + 15] if task == "external_t1" else [20 + 15, 24])


def test_monuseg_xml_polygons_are_rasterised_at_the_image_size(tmp_path):
    def region(k, xs, ys):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in zip(xs, ys))
        return f'<Region Id="{k}" Type="0"><Attributes/><Vertices>{vertices}</Vertices></Region>'

    squares = region(1, [2, 7, 7, 2], [1, 1, 5, 5]) + region(2, [10, 14, 14, 10], [10, 10, 16, 16])
    images, labels = _folder(tmp_path, label_name="a.png")
    (labels / "a_mask.png").unlink(missing_ok=True)
    (labels / "a.png").unlink()
    (labels / "a.xml").write_text(f"<Annotations><Annotation Id='1'><Regions>{squares}</Regions></Annotation>"
                                  "</Annotations>", encoding="utf-8")  # fmt: skip
    *_, labels_out, _ = _prepare(tmp_path, images, labels)
    expected = np.zeros((20, 24), np.int32)
    expected[1:6, 2:8], expected[10:17, 10:15] = 1, 2  # skimage.draw.polygon includes the vertices' pixels
    assert np.array_equal(labels_out[0][0][:20, :24], expected)
    (labels / "a.xml").write_text("<Annotations><Region><Vertex X='a' Y='1'/></Region>", encoding="utf-8")
    with pytest.raises(ValueError, match="a.xml as MoNuSeg / ImageScope XML"):
        _prepare(tmp_path, images, labels)
