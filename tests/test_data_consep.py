"""CoNSeP preparation: tiny official-format fixtures (7 types, .mat, RGBA PNG) and the shared 4-type tiles."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from bundle.data.consep import prepare_consep, read_label, source_of, tile_offsets
from bundle.data.datalist import load_datalist

ROOT = Path(__file__).resolve().parents[1]
SHARED_CONSEP = ROOT.parent / "shared" / "data" / "consep"
MERGE = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}  # official 7 types -> the papers' 4
SIZE, TILE = 40, 16  # offsets 0, 12, 24: three tiles per side like 1000 px / 256 px (0, 248, 496, 744)


def _source_label(seed: int):
    """Instance map with six 4x4 nuclei in the top-left 22 px (so some tiles are empty), 7-type types."""
    inst = np.zeros((SIZE, SIZE), np.int32)
    corners = [(0, 0), (0, 6), (6, 0), (10, 10), (6, 16), (17, 3)]  # (10, 10) straddles the tile border at 12
    types = [(seed + k) % 7 + 1 for k in range(6)]
    for k, (y, x) in enumerate(corners):
        inst[y : y + 4, x : x + 4] = k + 1
    type_map = np.zeros_like(inst)
    for k, t in enumerate(types):
        type_map[inst == k + 1] = t
    return inst, type_map, np.array(types, float)[:, None]


def _write_item(folder: Path, stem: str, seed: int, scheme: int = 7, image_size=SIZE, **override):
    inst, type_map, inst_type = _source_label(seed)
    if scheme == 4:
        type_map = np.vectorize(lambda t: MERGE.get(t, 0))(type_map)
        inst_type = np.vectorize(MERGE.get)(inst_type)
    mat = {"inst_map": inst.astype(float), "type_map": type_map, "inst_type": inst_type,
           "inst_centroid": np.zeros((len(inst_type), 2))}  # fmt: skip
    mat.update(override)
    mat = {k: v for k, v in mat.items() if v is not None}
    (folder / "Images").mkdir(parents=True, exist_ok=True)
    (folder / "Labels").mkdir(parents=True, exist_ok=True)
    rgba = np.random.default_rng(seed).integers(0, 256, (image_size, image_size, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "Images" / f"{stem}.png")
    sio.savemat(folder / "Labels" / f"{stem}.mat", mat)
    return rgba[..., :3], inst, type_map


@pytest.fixture
def consep_root(tmp_path):
    root = tmp_path / "CoNSeP"
    for i in range(1, 6):
        _write_item(root / "Train", f"train_{i}", seed=i)
    for i in range(1, 3):
        _write_item(root / "Test", f"test_{i}", seed=10 + i)
    return root


def test_tile_offsets():
    assert tile_offsets(1000, 256) == [0, 248, 496, 744]
    assert tile_offsets(256, 256) == [0]
    assert tile_offsets(SIZE, TILE) == [0, 12, 24]
    assert tile_offsets(SIZE, TILE, stride=16) == [0, 16, 24]
    with pytest.raises(ValueError, match="smaller than the tile size"):
        tile_offsets(100, 256)


def test_source_of_keeps_the_source_image():
    assert source_of("train_1") == "train_1"
    assert source_of("train_10_003") == "train_10"  # a tile already cut (the shared copy)
    assert source_of("test_14") == "test_14"


def test_read_label_merges_seven_types(consep_root):
    inst, types, top = read_label(consep_root / "Train" / "Labels" / "train_3.mat", type_scheme=7)
    assert top == 7
    raw = _source_label(3)[2].ravel().astype(int)
    assert types.tolist() == [MERGE[t] for t in raw]
    assert sorted(np.unique(inst)) == list(range(7))


def test_prepare_consep_tiles_relabels_and_splits(consep_root, tmp_path):
    path = prepare_consep(consep_root, tmp_path / "out", tile_size=TILE, seed=0, progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["classes"] == {"1": "other", "2": "inflammatory", "3": "epithelial", "4": "spindle"}
    entries = data["training"] + data["validation"] + data["test"]
    # split by source image: one of the five Train images is validation, Test is test
    by_split = {s: {e["source"] for e in data[s]} for s in ("training", "validation", "test")}
    assert len(by_split["validation"]) == 1 and len(by_split["training"]) == 4
    assert by_split["test"] == {"test_1", "test_2"}
    assert by_split["training"] | by_split["validation"] == {f"train_{i}" for i in range(1, 6)}
    # every tile, checked against the source arrays: instances renumbered 1..n in ascending original id,
    # classes merged, empty tiles skipped
    expected_skipped = 0
    seen = set()
    for split, folder, names in (("train", "Train", range(1, 6)), ("test", "Test", range(1, 3))):
        for i in names:
            seed = i if split == "train" else 10 + i
            inst, type_map, _ = _source_label(seed)
            rgb = np.asarray(Image.open(consep_root / folder / "Images" / f"{split}_{i}.png"))[..., :3]
            for k, (y, x) in enumerate((y, x) for y in (0, 12, 24) for x in (0, 12, 24)):
                crop = inst[y : y + TILE, x : x + TILE]
                ids = [v for v in np.unique(crop) if v > 0]
                stem = f"{split}_{i}_{k:03d}"
                if not ids:
                    expected_skipped += 1
                    assert not (tmp_path / "out" / "images" / f"{stem}.png").exists()
                    continue
                entry = next(e for e in entries if e["image"] == f"images/{stem}.png")
                seen.add(stem)
                assert entry["n_nuclei"] == len(ids) and entry["tile"] == [y, x] and entry["tissue"] == "colon"
                label = np.load(tmp_path / "out" / entry["label"])
                expected_inst = np.zeros_like(crop)
                for new, old in enumerate(ids, start=1):
                    expected_inst[crop == old] = new
                assert np.array_equal(label[0], expected_inst)
                merged = np.vectorize(lambda t: MERGE.get(t, 0))(type_map[y : y + TILE, x : x + TILE])
                assert np.array_equal(label[1], merged)
                tile = np.asarray(Image.open(tmp_path / "out" / entry["image"]))
                assert np.array_equal(tile, rgb[y : y + TILE, x : x + TILE])
    assert len(seen) == len(entries)
    assert data["preparation"]["skipped"] == {"no nucleus": expected_skipped} and expected_skipped > 0


def test_prepare_consep_split_is_seeded(consep_root, tmp_path):
    runs = [prepare_consep(consep_root, tmp_path / f"o{s}", tile_size=TILE, seed=s, progress=False) for s in (0, 0, 1)]
    sub = [json.loads(p.read_text(encoding="utf-8")) for p in runs]
    val = [sub[k]["preparation"]["validation_sources"] for k in range(3)]
    assert val[0] == val[1]
    tens = [[e["image"] for e in d["training"] if 10 in e["subsets"]] for d in sub]
    assert tens[0] == tens[1]
    assert (val[0], tens[0]) != (val[2], tens[2])


def test_script_help_and_run(consep_root, tmp_path):
    script = str(ROOT / "scripts" / "prepare_consep.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path, check=True)
    assert "--type_scheme" in out.stdout and "--tile_size" in out.stdout
    cmd = [sys.executable, script, "--input", str(consep_root), "--output", str(tmp_path / "o"), "--tile_size", "40"]
    run = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path, check=True)
    assert "training 10% subset: 1 items" in run.stdout
    items = load_datalist(tmp_path / "o" / "datalist.json", "training")
    assert [i["name"] for i in items] == [i["source"] for i in items]  # one tile per image keeps the image's name


def test_seven_types_read_as_four_is_an_error(consep_root, tmp_path):
    with pytest.raises(ValueError, match=r"test_1.mat: type ids \[5, 6, 7\] outside the 4-type scheme .*type_scheme 7"):
        prepare_consep(consep_root, tmp_path / "o", type_scheme=4, tile_size=TILE, progress=False)
    assert not (tmp_path / "o" / "datalist.json").exists()


def test_four_types_read_as_seven_is_an_error(tmp_path):
    root = tmp_path / "CoNSeP4"
    for split in ("Train", "Test"):
        _write_item(root / split, f"{split.lower()}_1", seed=1, scheme=4)
    with pytest.raises(ValueError, match="look already merged to the 4-type scheme"):
        prepare_consep(root, tmp_path / "o", type_scheme=7, tile_size=TILE, val_fraction=0.0, progress=False)
    path = prepare_consep(root, tmp_path / "o", type_scheme=4, tile_size=TILE, val_fraction=0.0, progress=False)
    assert {c for e in load_datalist(path, "training") for c in np.unique(np.load(e["label"])[1])} <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize(
    "override, match",
    [
        ({"inst_map": None}, r"train_1.mat: no 'inst_map'"),
        ({"type_map": np.zeros((SIZE, SIZE - 1))}, r"train_1.mat: inst_map \(40, 40\) and type_map \(40, 39\)"),
        ({"inst_type": np.ones((5, 1))}, r"train_1.mat: inst_type has 5 rows for 6 instances"),
        ({"inst_type": np.full((6, 1), 2.0)}, r"train_1.mat: inst_type says type 2 for instance 2 but type_map says 3 \(5 instances disagree\)"),
        ({"type_map": np.full((SIZE, SIZE), 9)}, r"train_1.mat: type ids \[9\] outside the 7-type scheme"),
    ],
)
def test_bad_label_files(tmp_path, override, match):
    _write_item(tmp_path / "C" / "Train", "train_1", seed=1, **override)
    _write_item(tmp_path / "C" / "Test", "test_1", seed=2)
    with pytest.raises(ValueError, match=match):
        prepare_consep(tmp_path / "C", tmp_path / "o", tile_size=TILE, progress=False)


def test_size_mismatch_and_missing_label(tmp_path):
    _write_item(tmp_path / "C" / "Train", "train_1", seed=1, image_size=SIZE + 8)
    _write_item(tmp_path / "C" / "Test", "test_1", seed=2)
    with pytest.raises(ValueError, match=r"train_1.png: image size \(48, 48\) != label size \(40, 40\)"):
        prepare_consep(tmp_path / "C", tmp_path / "o", tile_size=TILE, progress=False)
    (tmp_path / "C" / "Test" / "Labels" / "test_1.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_1.png: no label file .*test_1.mat"):
        prepare_consep(tmp_path / "C", tmp_path / "o", tile_size=TILE, progress=False)


def test_image_smaller_than_tile_names_the_file(consep_root, tmp_path):
    with pytest.raises(ValueError, match=r"test_1.png: image side 40 is smaller than the tile size 64"):
        prepare_consep(consep_root, tmp_path / "o", tile_size=64, progress=False)


# ---- the shared real CoNSeP tiles (4-type scheme) -------------------------------------------------------------
needs_shared = pytest.mark.skipif(
    not SHARED_CONSEP.is_dir(), reason=f"shared CoNSeP data not found at {SHARED_CONSEP} (../shared/data beside the repo)"
)


@needs_shared
@pytest.mark.data
def test_shared_consep_converts(tmp_path):
    path = prepare_consep(SHARED_CONSEP, tmp_path / "consep", type_scheme=4, progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data["training"] + data["validation"] + data["test"]
    assert len(entries) + data["preparation"]["skipped"].get("no nucleus", 0) == 576
    assert len({e["source"] for e in data["training"] + data["validation"]}) == 27
    assert {e["source"] for e in data["test"]} == {f"test_{i}" for i in range(1, 10)}
    assert len({e["source"] for e in data["validation"]}) == 5  # round(20 % of 27)
    for entry in entries[::25]:  # labels match the source .mat exactly (tile = image: no cutting)
        split = "Test" if entry["source"].startswith("test") else "Train"
        mat = sio.loadmat(SHARED_CONSEP / split / "Labels" / f"{Path(entry['image']).stem}.mat")
        label = np.load(path.parent / entry["label"])
        assert np.array_equal(label[1], mat["type_map"])
        assert np.array_equal(label[0] > 0, mat["inst_map"] > 0)
        assert entry["n_nuclei"] == len(mat["inst_type"]) == label[0].max()
        assert set(np.unique(label[1])) <= {0, 1, 2, 3, 4}


@needs_shared
@pytest.mark.data
def test_shared_consep_read_as_seven_types_is_an_error(tmp_path):
    for split, stem in (("Train", "train_1_000"), ("Test", "test_1_000")):
        for sub, ext in (("Images", "png"), ("Labels", "mat")):
            (tmp_path / "c" / split / sub).mkdir(parents=True, exist_ok=True)
            (tmp_path / "c" / split / sub / f"{stem}.{ext}").symlink_to(SHARED_CONSEP / split / sub / f"{stem}.{ext}")
    with pytest.raises(ValueError, match="use type_scheme 4"):
        prepare_consep(tmp_path / "c", tmp_path / "o", type_scheme=7, val_fraction=0.0, progress=False)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_preparation_leaves_the_existing_output_unchanged(tmp_path):
    """The issue's case: a wrong --type_scheme 7 run into an existing output fails without touching it."""
    root = tmp_path / "CoNSeP4"
    for split in ("Train", "Test"):
        _write_item(root / split, f"{split.lower()}_1", seed=1, scheme=4)
    script = str(ROOT / "scripts" / "prepare_consep.py")
    out = tmp_path / "o"
    base = [sys.executable, script, "--input", str(root), "--output", str(out), "--tile_size", str(TILE),
            "--val_fraction", "0"]
    subprocess.run(base + ["--type_scheme", "4"], capture_output=True, cwd=tmp_path, check=True)
    before = _snapshot(out)
    assert "datalist.json" in before and len(before) > 3
    run = subprocess.run(base + ["--type_scheme", "7"], capture_output=True, text=True, encoding="utf-8",
                         errors="replace", cwd=tmp_path)
    assert run.returncode != 0 and "use type_scheme 4" in run.stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CoNSeP4", "o"], "a temporary folder was left behind"


def test_successful_rerun_replaces_the_output_as_a_whole(consep_root, tmp_path):
    prepare_consep(consep_root, tmp_path / "o", tile_size=TILE, progress=False)
    prepare_consep(consep_root, tmp_path / "o", tile_size=SIZE, progress=False)  # one tile per image now
    names = {p.stem for p in (tmp_path / "o" / "images").iterdir()}
    assert names == {f"train_{i}" for i in range(1, 6)} | {"test_1", "test_2"}  # no tile of the first run is left


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"type_scheme": 5}, "type_scheme must be 7 .* or 4"),
        ({"tile_size": 0}, "tile_size must be an integer >= 1, got 0"),
        ({"stride": -3}, "stride must be an integer >= 1, got -3"),
        ({"val_fraction": 1.5}, r"val_fraction must be in \[0, 1\), got 1.5"),
        ({"source_pattern": "(.+)"}, r"needs a named group \(\?P<source>"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(consep_root, tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_consep(consep_root, tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


def test_output_that_is_not_a_prepared_dataset_is_refused(consep_root, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds \['notes.txt'\], so it is not a prepared dataset"):
        prepare_consep(consep_root, tmp_path / "o", tile_size=TILE, progress=False)
    assert (tmp_path / "o" / "notes.txt").read_text(encoding="utf-8") == "mine"
