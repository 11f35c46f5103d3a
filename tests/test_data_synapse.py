"""Synapse / BTCV preparation: NIfTI volumes and TransUNet .npz slices written in tmp_path, and the shared CT."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle.data.datalist import load_datalist
from bundle.data.synapse import ORGANS, prepare_synapse
from bundle.transforms.ct import CTWindowd

ROOT = Path(__file__).resolve().parents[1]
SHARED_CT = ROOT.parent / "shared" / "data" / "ct_totalsegmentator_example"
X, Y, Z = 10, 8, 5
# BTCV ids per slice: 0 empty, 1 aorta + liver, 2 esophagus only (not one of the 8), 3 four organs, 4 three ids
SLICE_IDS = {1: [8, 6], 2: [5], 3: [11, 1, 3, 2], 4: [4, 7, 9]}
BTCV_TO_CLASS = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}  # written out independently of the module
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # axis 0 runs toward the patient's left, axis 1 toward posterior
RAS = np.diag([0.8, 0.8, 3.0, 1.0])


def _volumes(seed: int):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1000, (X, Y, Z)).astype(np.int16)
    label = np.zeros((X, Y, Z), np.uint8)
    for k, ids in SLICE_IDS.items():
        for n, organ in enumerate(ids):
            label[2 * n : 2 * n + 2, 1:5, k] = organ
    return image, label


def _write_volumes(root: Path, patient: int, affine=RAS, label_shape=None):
    image, label = _volumes(patient)
    if label_shape is not None:
        label = np.zeros(label_shape, np.uint8)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"img{patient:04d}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"label{patient:04d}.nii.gz")
    return image, label


@pytest.fixture
def btcv_root(tmp_path):
    for p in range(1, 6):
        _write_volumes(tmp_path / "btcv", p, affine=LPS if p == 1 else RAS)
    return tmp_path / "btcv"


def test_nifti_slices_organs_orientation_and_split(btcv_root, tmp_path):
    path = prepare_synapse(tmp_path / "out", btcv_root, progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["task_family"] == "organ"
    assert data["classes"] == {str(i + 1): name for i, name in enumerate(ORGANS)}
    assert data["preparation"]["label_mapping"] == "btcv"
    assert data["preparation"]["skipped"] == {"no organ": 2 * 5}  # slices 0 and 2 of every patient
    patients = {s: {e["source"] for e in data[s]} for s in ("training", "validation", "test")}
    assert [len(patients[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    entries = data["training"] + data["validation"] + data["test"]
    assert len(entries) == 3 * 5
    for entry in entries:
        patient = int(entry["source"][3:])
        k = int(entry["image"][-7:-4])
        assert entry["image"] == f"images/img{patient:04d}_{k:03d}.npy" and k in (1, 3, 4)
        raw_image, raw_label = _volumes(patient)
        # radiological display: rows anterior -> posterior, columns patient right -> left
        flip = (lambda a: a[:, :, k].T) if patient == 1 else (lambda a: a[::-1, ::-1, k].T)
        image = np.load(tmp_path / "out" / entry["image"])
        label = np.load(tmp_path / "out" / entry["label"])
        assert image.dtype == np.float32 and np.array_equal(image, flip(raw_image).astype(np.float32))
        expected = np.vectorize(lambda v: BTCV_TO_CLASS.get(v, 0))(flip(raw_label))
        assert label.shape == (2, Y, X) and np.array_equal(label[0], expected) and np.array_equal(label[1], expected)
        assert entry["n_organs"] == len({BTCV_TO_CLASS[i] for i in SLICE_IDS[k] if i in BTCV_TO_CLASS})


def test_organ_subset_and_slice_counts(btcv_root, tmp_path):
    path = prepare_synapse(tmp_path / "o", btcv_root, organs=["Liver", "left kidney"], progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["classes"] == {"3": "left_kidney", "5": "liver"}
    items = data["training"] + data["validation"] + data["test"]
    assert sorted({e["image"][-7:-4] for e in items}) == ["001", "003"]
    assert data["preparation"]["skipped"] == {"no organ": 3 * 5}
    for e in items:
        assert set(np.unique(np.load(tmp_path / "o" / e["label"])[1])) <= {0, 3, 5}


def test_explicit_patients_and_seeded_fractions(btcv_root, tmp_path):
    a = prepare_synapse(tmp_path / "a", btcv_root, test_patients=["img0002", "img0005"], val_patients=[], progress=False)
    data = json.loads(a.read_text(encoding="utf-8"))
    assert data["preparation"]["patients"] == {"training": ["img0001", "img0003", "img0004"], "validation": [],
                                               "test": ["img0002", "img0005"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown test patients \['case9'\]; known patients: \['img0001'"):
        prepare_synapse(tmp_path / "b", btcv_root, test_patients=["case9"], progress=False)
    b1 = json.loads(prepare_synapse(tmp_path / "b1", btcv_root, seed=4, progress=False).read_text(encoding="utf-8"))
    b2 = json.loads(prepare_synapse(tmp_path / "b2", btcv_root, seed=4, progress=False).read_text(encoding="utf-8"))
    assert b1["training"] == b2["training"] and b1["preparation"]["patients"] == b2["preparation"]["patients"]


def _write_npz(folder: Path, name: str, image: np.ndarray, label: np.ndarray, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", image=image, label=label, **extra)


@pytest.fixture
def npz_root(tmp_path):
    rng = np.random.default_rng(0)
    for case in range(1, 6):
        for s in range(3):
            label = np.zeros((12, 12), np.float32)
            if not (case == 2 and s == 0):  # one slice without organs
                label[2:6, 3:9] = (case + s) % 8 + 1
                label[8:10, 8:10] = 5
            _write_npz(tmp_path / "train_npz", f"case{case:04d}_slice{s:03d}", rng.random((12, 12), np.float32), label)
    return tmp_path / "train_npz"


def test_npz_slices_are_stored_as_hu(npz_root, tmp_path):
    path = prepare_synapse(tmp_path / "o", npz_root, val_fraction=0.2, test_fraction=0.2, progress=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["preparation"]["input_format"] == "npz" and data["preparation"]["label_mapping"] == "synapse"
    assert data["preparation"]["skipped"] == {"no organ": 1}
    entries = data["training"] + data["validation"] + data["test"]
    assert len(entries) == 14
    assert {e["source"] for e in data["test"]}.isdisjoint({e["source"] for e in data["training"]})
    for entry in entries:
        npz = np.load(npz_root / f"{Path(entry['image']).stem}.npz")
        hu = np.load(tmp_path / "o" / entry["image"])
        assert np.allclose(hu, -125 + 400 * npz["image"], atol=1e-3)
        assert np.array_equal(np.load(tmp_path / "o" / entry["label"])[1], npz["label"].astype(int))
        assert entry["source"] == Path(entry["image"]).stem[:8]
    window = CTWindowd("image", window="synapse")({"image": hu[None]})["image"][0]
    assert np.allclose(window, npz["image"], atol=1e-5)  # 'synapse' windowing gives the npz intensities back


@pytest.mark.parametrize(
    "arrays, name, match",
    [
        ({"image": np.zeros((4, 4))}, "case0001_slice000", r"case0001_slice000.npz: no 'label' array"),
        ({"image": np.full((4, 4), 40.0), "label": np.ones((4, 4))}, "case0001_slice000", r"case0001_slice000.npz: image values in \[40, 40\]; expected the \[0, 1\] scaling"),
        ({"image": np.zeros((4, 4)), "label": np.ones((4, 5))}, "case0001_slice000", r"image size \(4, 4\) != label"),
        ({"image": np.zeros((4, 4)), "label": np.full((4, 4), 12)}, "case0001_slice000", r"ids \[12\] are outside"),
        ({"image": np.zeros((4, 4)), "label": np.ones((4, 4))}, "case0001", r"case0001.npz: name must be"),
    ],
)
def test_bad_npz(tmp_path, arrays, name, match):
    (tmp_path / "n").mkdir()
    np.savez(tmp_path / "n" / f"{name}.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        prepare_synapse(tmp_path / "o", tmp_path / "n", progress=False)


def test_unreadable_nifti_names_the_file(btcv_root, tmp_path):
    (btcv_root / "imagesTr" / "img0003.nii.gz").write_bytes(b"this is not a NIfTI file")
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*img0003.nii.gz"):
        prepare_synapse(tmp_path / "o", btcv_root, progress=False)
    good = gzip.decompress((btcv_root / "labelsTr" / "label0004.nii.gz").read_bytes())
    (btcv_root / "labelsTr" / "label0004.nii.gz").write_bytes(gzip.compress(good[: len(good) // 2]))  # truncated
    with pytest.raises(ValueError, match=r"cannot read NIfTI file .*label0004.nii.gz"):
        prepare_synapse(tmp_path / "o", pairs=[(btcv_root / "imagesTr" / "img0004.nii.gz",
                                                 btcv_root / "labelsTr" / "label0004.nii.gz")], progress=False)  # fmt: skip
    assert not (tmp_path / "o" / "datalist.json").exists()


def test_bad_volumes_and_names(tmp_path):
    _write_volumes(tmp_path / "v", 1, label_shape=(X, Y, Z + 1))
    with pytest.raises(ValueError, match=r"img0001.nii.gz has shape \(10, 8, 5\) but label .*label0001.nii.gz has \(10, 8, 6\)"):
        prepare_synapse(tmp_path / "o", tmp_path / "v", progress=False)
    _write_volumes(tmp_path / "w", 1)
    with pytest.raises(ValueError, match=r"unknown organ 'heart'; known organs: \['aorta', 'gallbladder'"):
        prepare_synapse(tmp_path / "o", tmp_path / "w", organs=["liver", "heart"], progress=False)
    with pytest.raises(ValueError, match=r"label0001.nii.gz: label ids \[9, 11\] are outside the 'synapse' scheme 0..8"):
        prepare_synapse(tmp_path / "o", tmp_path / "w", label_mapping="synapse", progress=False)
    with pytest.raises(ValueError, match=r"unknown label mapping 'amos'; known: \['synapse', 'btcv', 'totalsegmentator'\]"):
        prepare_synapse(tmp_path / "o", tmp_path / "w", label_mapping="amos", progress=False)
    (tmp_path / "w" / "labelsTr" / "label0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"img0001.nii.gz: no label file in .*labelsTr"):
        prepare_synapse(tmp_path / "o", tmp_path / "w", progress=False)


# ---- the shared TotalSegmentator example CT -------------------------------------------------------------------
needs_shared = pytest.mark.skipif(
    not SHARED_CT.is_dir(), reason=f"shared CT example not found at {SHARED_CT} (../shared/data beside the repo)"
)
TS_IDS = {"aorta": 52, "gallbladder": 4, "left_kidney": 3, "right_kidney": 2, "liver": 5, "pancreas": 7,
          "spleen": 1, "stomach": 6}  # fmt: skip


@needs_shared
@pytest.mark.data
def test_shared_ct_converts_and_windows(tmp_path):
    ct, seg = SHARED_CT / "example_ct_sm.nii.gz", SHARED_CT / "example_seg.nii.gz"
    script = [sys.executable, str(ROOT / "scripts" / "prepare_synapse.py"), "--pair", str(ct), str(seg),
              "--label_mapping", "totalsegmentator", "--output", str(tmp_path / "ct")]  # fmt: skip
    run = subprocess.run(script, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=tmp_path, check=True)
    assert "skipped" in run.stdout
    data = json.loads((tmp_path / "ct" / "datalist.json").read_text(encoding="utf-8"))
    raw = np.asarray(nib.load(seg).dataobj)
    assert nib.aff2axcodes(nib.load(ct).affine) == ("R", "A", "S")  # so display = raw[::-1, ::-1, k].T
    organ_slices = [k for k in range(raw.shape[2]) if np.isin(raw[:, :, k], list(TS_IDS.values())).any()]
    entries = data["training"]  # one patient: all training
    assert [int(e["image"][-7:-4]) for e in entries] == organ_slices
    for c, name in enumerate(ORGANS, start=1):  # per organ: the slices holding it
        with_organ = [e for e in entries if (np.load(tmp_path / "ct" / e["label"])[1] == c).any()]
        assert len(with_organ) == sum((raw[:, :, k] == TS_IDS[name]).any() for k in range(raw.shape[2])) > 0
    # a liver voxel of known HU, found in the raw volume, lands where expected and windows to (hu + 125) / 400
    hu_raw = np.asarray(nib.load(ct).dataobj)
    i, j, k = np.argwhere((raw == TS_IDS["liver"]) & (hu_raw > -125) & (hu_raw < 275))[0]
    entry = next(e for e in entries if int(e["image"][-7:-4]) == k)
    item = load_datalist(tmp_path / "ct" / "datalist.json", "training")[entries.index(entry)]
    hu = np.load(item["image"])
    row, col = raw.shape[1] - 1 - j, raw.shape[0] - 1 - i
    assert hu[row, col] == hu_raw[i, j, k]
    assert np.load(item["label"])[1, row, col] == 5  # liver
    windowed = CTWindowd("image", window="synapse")({"image": hu[None]})["image"][0]
    assert float(windowed[row, col]) == pytest.approx((float(hu_raw[i, j, k]) + 125) / 400, abs=1e-6)
    assert float(windowed.min()) == 0.0 and float(windowed.max()) == 1.0  # clipped: the slice spans beyond the window


def test_nan_in_npz_or_nifti_is_refused_naming_the_file(tmp_path):
    image = np.zeros((4, 4), np.float32)
    image[1, 1] = np.nan
    (tmp_path / "n").mkdir()
    np.savez(tmp_path / "n" / "case0001_slice000.npz", image=image, label=np.ones((4, 4)))
    with pytest.raises(ValueError, match=r"case0001_slice000.npz 'image': 1 NaN and 0 infinite values"):
        prepare_synapse(tmp_path / "o", tmp_path / "n", progress=False)
    vol, label = _volumes(1)
    vol = vol.astype(np.float32)
    vol[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(vol, RAS), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, RAS), tmp_path / "lab.nii.gz")
    with pytest.raises(ValueError, match=r"image .*ct.nii.gz: 0 NaN and 1 infinite HU values"):
        prepare_synapse(tmp_path / "o", pairs=[(tmp_path / "ct.nii.gz", tmp_path / "lab.nii.gz")], progress=False)
    assert not (tmp_path / "o").exists()
