"""configs/tasks/*.yaml overlay configs/train.yaml: they set only existing keys (plus their own), and their
preprocessing runs on prepared data (a CoNSeP-format and a NIfTI fixture converted in tmp_path)."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io as sio
from monai.bundle import ConfigParser
from monai.transforms import Compose
from PIL import Image
from scipy import ndimage

from bundle.data.consep import prepare_consep
from bundle.data.datalist import load_datalist
from bundle.data.synapse import prepare_synapse

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"pannuke_t1": "t1", "pannuke_t2": "t2", "consep_t1": "t1", "consep_t2": "t2", "synapse": "organ",
         "external_t1": "t1", "external_t2": "t2"}  # fmt: skip
OWN_KEYS = {"stain_aug_prob", "ct_window"}  # keys the overlays add for their own transforms


def _parser(name: str, dataset_dir=None) -> ConfigParser:
    files = [str(ROOT / "configs" / "train.yaml"), str(ROOT / "configs" / "tasks" / f"{name}.yaml")]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    if dataset_dir is not None:
        parser["dataset_dir"] = str(dataset_dir)
    return parser


@pytest.mark.parametrize("name", sorted(TASKS))
def test_overlay_sets_existing_keys(name):
    base = ConfigParser(ConfigParser.load_config_file(ROOT / "configs" / "train.yaml"))
    overlay = ConfigParser.load_config_file(ROOT / "configs" / "tasks" / f"{name}.yaml")
    for key in overlay:
        if key not in OWN_KEYS:
            assert key in base, f"{name}.yaml sets '{key}', which configs/train.yaml does not have"
    parser = _parser(name, "/data/x")
    assert parser.get_parsed_content("task") == TASKS[name]
    assert parser.get_parsed_content("datalist") == "/data/x/datalist.json"


def _consep_fixture(root: Path):
    inst = np.zeros((32, 32), np.int32)
    inst[2:8, 2:8], inst[10:16, 4:10], inst[20:26, 20:28] = 1, 2, 3
    types = np.array([[2.0], [3.0], [6.0]])  # inflammatory, healthy epithelial, muscle (7-type scheme)
    type_map = np.zeros_like(inst)
    for i, t in enumerate(types[:, 0]):
        type_map[inst == i + 1] = t
    for split in ("Train", "Test"):
        for sub in ("Images", "Labels"):
            (root / split / sub).mkdir(parents=True)
        image = np.random.default_rng(0).integers(120, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / split / "Images" / f"{split.lower()}_1.png")
        sio.savemat(root / split / "Labels" / f"{split.lower()}_1.mat", {"inst_map": inst, "type_map": type_map,
                                                                         "inst_type": types})  # fmt: skip


@pytest.mark.parametrize("name", ["consep_t1", "consep_t2", "pannuke_t2"])
def test_nuclei_preprocessing_runs_on_prepared_data(tmp_path, name):
    _consep_fixture(tmp_path / "raw")
    prepare_consep(tmp_path / "raw", tmp_path / "prepared", tile_size=32, val_fraction=0.0, progress=False)
    parser = _parser(name, tmp_path / "prepared")
    parser["stain_aug_prob"] = 1.0
    transform = Compose(parser.get_parsed_content("load") + parser.get_parsed_content("train#augment")
                        + parser.get_parsed_content("resize"))  # fmt: skip
    transform.set_random_state(0)
    for split in ("training", "test"):
        item = load_datalist(parser.get_parsed_content("datalist"), split)[0]
        out = transform(item)
        size = parser.get_parsed_content("image_size")
        assert out["image"].shape == (3, size, size) and 0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1
        target = np.asarray(out["label"])[0] > 0
        assert target.any()
        if name == "consep_t1":
            assert out["target_class"] == 0
        else:  # one of the merged classes present: inflammatory 2, epithelial 3, spindle 4 (6 -> 4)
            assert out["target_class"] in (2, 3, 4)


def test_synapse_preprocessing_windows_ct(tmp_path):
    hu = np.full((12, 10, 2), -1000, np.int16)
    hu[3:9, 2:8, :] = 75  # mid-window of 'synapse' (-125..275) -> 0.5
    label = np.zeros((12, 10, 2), np.uint8)
    label[3:9, 2:8, :] = 6  # BTCV liver
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / "raw" / sub).mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "raw" / "imagesTr" / "img0001.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "raw" / "labelsTr" / "label0001.nii.gz")
    prepare_synapse(tmp_path / "prepared", tmp_path / "raw", val_fraction=0.0, test_fraction=0.0, progress=False)
    parser = _parser("synapse", tmp_path / "prepared")
    transform = Compose(parser.get_parsed_content("load") + parser.get_parsed_content("resize"))
    item = load_datalist(parser.get_parsed_content("datalist"), "training")[0]
    out = transform(item)
    image, target = np.asarray(out["image"]), np.asarray(out["label"])[0] > 0
    assert image.shape[0] == 3 and np.array_equal(image[0], image[2])
    assert out["target_class"] == 5  # liver, the only organ present
    inside = ndimage.binary_erosion(target, iterations=25)  # away from the bilinear blur of the organ's edge
    assert inside.sum() > 1000
    assert np.allclose(image[0][inside], 0.5, atol=1e-6) and float(image[0].min()) == 0.0
