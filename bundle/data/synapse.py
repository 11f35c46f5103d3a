"""Synapse / BTCV abdominal CT -> 2D axial slices with at least one of 8 organs (docs/DATA_CONTRACT.md).

Inputs:

- NIfTI volumes: ``imagesTr/`` + ``labelsTr/`` (pairs by the same file name, BTCV's ``img0001`` <-> ``label0001``,
  or nnU-Net's ``_0000`` suffix), or explicit (image, label) pairs. Both are reoriented to the closest canonical
  (RAS+) orientation; slice k is stored in radiological display orientation (rows anterior -> posterior, columns
  patient right -> left): ``volume[::-1, ::-1, k].T``. Image: float32 HU (scl_slope/inter applied).
- TransUNet's preprocessed ``.npz`` slices (``caseXXXX_sliceYYY.npz``, keys ``image`` (H, W) in [0, 1] after
  clipping to -125..275 HU, ``label`` (H, W) in the 8-organ Synapse ids): stored as-is in orientation, the image
  mapped back to HU as ``-125 + 400 * image`` (values outside the window stay clipped at -125 / 275, so windows
  wider than 'synapse' see a clipped image; 'synapse' windowing gives back the original values exactly).

Output classes: 1 aorta, 2 gallbladder, 3 left_kidney, 4 right_kidney, 5 liver, 6 pancreas, 7 spleen, 8 stomach.
Source label maps convert through a named mapping (``LABEL_MAPPINGS``); other structures become background, and
a label id outside the named scheme is an error (the wrong mapping was chosen). Slices without any of the
selected organs are skipped and counted. Splits are by patient.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from bundle.transforms.checks import check_finite
from bundle.transforms.geometry import display_slice

from .splits import partition_sources
from .writer import DatasetWriter, check_output

ORGANS = ("aorta", "gallbladder", "left_kidney", "right_kidney", "liver", "pancreas", "spleen", "stomach")
CLASSES = {i + 1: name for i, name in enumerate(ORGANS)}
# name -> (source id of each organ in ORGANS, largest id of the source scheme)
LABEL_MAPPINGS = {
    # TransUNet's preprocessed Synapse slices / volumes: already 1..8 in ORGANS order
    "synapse": (dict(zip(ORGANS, range(1, 9), strict=True)), 8),
    # BTCV / Synapse multi-atlas 13 organs: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus,
    # 6 liver, 7 stomach, 8 aorta, 9 IVC, 10 portal & splenic vein, 11 pancreas, 12/13 right/left adrenal gland
    "btcv": ({"aorta": 8, "gallbladder": 4, "left_kidney": 3, "right_kidney": 2, "liver": 6, "pancreas": 11,
              "spleen": 1, "stomach": 7}, 13),
    # TotalSegmentator v2 (117 classes)
    "totalsegmentator": ({"aorta": 52, "gallbladder": 4, "left_kidney": 3, "right_kidney": 2, "liver": 5,
                          "pancreas": 7, "spleen": 1, "stomach": 6}, 117),
}  # fmt: skip
NPZ_WINDOW = (-125.0, 275.0)
NII = (".nii.gz", ".nii")


def organ_ids(organs=None) -> dict[str, int]:
    """Selected organ names (None: all 8; spaces or case allowed) -> output class id; error lists known names."""
    if organs is None:
        return {name: i for i, name in CLASSES.items()}
    chosen = {}
    for organ in organs:
        key = str(organ).strip().lower().replace(" ", "_").replace("-", "_")
        if key not in ORGANS:
            raise ValueError(f"unknown organ {organ!r}; known organs: {list(ORGANS)}")
        chosen[key] = ORGANS.index(key) + 1
    return chosen


def map_labels(label: np.ndarray, mapping: str, where: str, organs=None) -> np.ndarray:
    """Source label map -> int32 organ map (class ids 1..8, 0 elsewhere) through the named ``mapping``."""
    if mapping not in LABEL_MAPPINGS:
        raise ValueError(f"unknown label mapping {mapping!r}; known: {list(LABEL_MAPPINGS)}")
    source_ids, top = LABEL_MAPPINGS[mapping]
    label = np.asarray(label)
    if not np.all(label == np.round(label)):
        raise ValueError(f"{where}: label map holds non-integer values")
    label = label.astype(np.int64)
    values = np.unique(label)
    bad = values[(values < 0) | (values > top)]
    if len(bad):
        raise ValueError(
            f"{where}: label ids {bad[:10].tolist()} are outside the '{mapping}' scheme 0..{top}; "
            f"choose the mapping that matches the file (known: {list(LABEL_MAPPINGS)})"
        )
    lut = np.zeros(top + 1, dtype=np.int32)
    for name, class_id in organ_ids(organs).items():
        lut[source_ids[name]] = class_id
    return lut[label]


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Load a NIfTI file (reoriented to RAS+) or raise naming the file."""
    try:
        img = nib.as_closest_canonical(nib.load(os.fspath(path)))
        img.get_fdata(dtype=np.float32)  # read now so that a truncated file fails here, with its name
    except FileNotFoundError:
        raise FileNotFoundError(f"NIfTI file not found: {path}") from None
    except Exception as e:
        raise ValueError(f"cannot read NIfTI file {path}: {e}") from e
    return img


def _volume(img: nib.Nifti1Image, path) -> np.ndarray:
    data = img.get_fdata(dtype=np.float32)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume (X, Y, Z), got shape {data.shape}")
    return data


def patient_of(path: Path) -> str:
    """Patient id of a NIfTI image file: its name without extension and nnU-Net's ``_0000`` channel suffix."""
    name = path.name
    for ext in NII:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return re.sub(r"_0000$", "", name)


def find_nifti_pairs(input_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) pairs from ``imagesTr/`` + ``labelsTr/`` below ``input_dir``."""
    input_dir = Path(input_dir)
    images_dir, labels_dir = input_dir / "imagesTr", input_dir / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"folder not found: {d} (expected imagesTr/ and labelsTr/ with .nii.gz files)")
    images = sorted(p for p in images_dir.iterdir() if p.name.endswith(NII))
    if not images:
        raise FileNotFoundError(f"{images_dir}: no .nii.gz / .nii files")
    pairs = []
    for image in images:
        names = [image.name, image.name.replace("img", "label", 1), re.sub(r"_0000(\.nii(\.gz)?)$", r"\1", image.name)]
        found = [labels_dir / n for n in dict.fromkeys(names) if (labels_dir / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{image}: no label file in {labels_dir} (tried {list(dict.fromkeys(names))})")
        pairs.append((image, found[0]))
    return pairs


def nifti_slices(image_path: Path, label_path: Path, mapping: str, organs=None):
    """Yield (k, HU slice (H, W) float32, organ map (H, W) int32) for every axial slice of one volume pair."""
    image_img, label_img = load_nifti(image_path), load_nifti(label_path)
    image, label = _volume(image_img, image_path), _volume(label_img, label_path)
    check_finite(image, f"image {image_path}", "HU values")
    check_finite(label, f"label {label_path}", "label values")
    if image.shape != label.shape:
        raise ValueError(f"image {image_path} has shape {image.shape} but label {label_path} has {label.shape}")
    if not np.allclose(image_img.affine, label_img.affine, atol=1e-2):
        raise ValueError(f"image {image_path} and label {label_path} have different affines (voxel grids)")
    organs_map = map_labels(label, mapping, str(label_path), organs)
    for k in range(image.shape[2]):
        yield k, display_slice(image, k), display_slice(organs_map, k)


def read_npz_slice(path: Path, mapping: str = "synapse", organs=None) -> tuple[np.ndarray, np.ndarray]:
    """TransUNet .npz slice -> (HU image (H, W) float32, organ map (H, W) int32)."""
    try:
        with np.load(path) as npz:
            arrays = {k: np.asarray(npz[k]) for k in ("image", "label") if k in npz.files}
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    for key in ("image", "label"):
        if key not in arrays:
            raise ValueError(f"{path}: no '{key}' array (expected keys 'image' and 'label', each (H, W))")
    image, label = arrays["image"], arrays["label"]
    check_finite(image, f"{path} 'image'")
    check_finite(label, f"{path} 'label'")
    if image.ndim != 2 or label.ndim != 2:
        raise ValueError(f"{path}: expected image and label of shape (H, W), got {image.shape} and {label.shape}")
    if image.shape != label.shape:
        raise ValueError(f"{path}: image size {image.shape} != label size {label.shape}")
    lo, hi = float(image.min()), float(image.max())
    if lo < -1.0 or hi > 2.0:
        raise ValueError(f"{path}: image values in [{lo:g}, {hi:g}]; expected the [0, 1] scaling of -125..275 HU")
    hu = (NPZ_WINDOW[0] + (NPZ_WINDOW[1] - NPZ_WINDOW[0]) * image.astype(np.float64)).astype(np.float32)
    return hu, map_labels(label, mapping, str(path), organs)


def npz_patient(path: Path) -> str:
    m = re.fullmatch(r"(?P<patient>.+?)_slice\d+", path.stem)
    if not m:
        raise ValueError(f"{path}: name must be <patient>_slice<k>.npz (e.g. case0005_slice012.npz)")
    return m.group("patient")


def _patient_splits(patients, val_fraction, test_fraction, val_patients, test_patients, seed) -> dict[str, str]:
    known = sorted(set(patients))
    if val_patients is None and test_patients is None:
        parts = partition_sources(known, {"validation": val_fraction, "test": test_fraction}, seed)
    else:
        parts = {"validation": list(val_patients or []), "test": list(test_patients or [])}
        for split, names in parts.items():
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ValueError(f"unknown {split} patients {unknown}; known patients: {known}")
        if set(parts["validation"]) & set(parts["test"]):
            both = sorted(set(parts["validation"]) & set(parts["test"]))
            raise ValueError(f"patients in both validation and test: {both}")
        parts["training"] = [p for p in known if p not in set(parts["validation"]) | set(parts["test"])]
    return {p: split for split, names in parts.items() for p in names}


def nifti_items(input_dir, pairs) -> list[tuple[str, tuple[Path, Path]]]:
    """(patient, (image, label)) of the NIfTI volumes: ``pairs``, else imagesTr/ + labelsTr/ of ``input_dir``; two
    images of one patient id are an error."""
    volume_pairs = [(Path(i), Path(lbl)) for i, lbl in pairs] if pairs is not None else find_nifti_pairs(input_dir)
    items = [(patient_of(i), (i, lbl)) for i, lbl in volume_pairs]
    names = [p for p, _ in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two image files give the same patient id: {twice}")
    return items


def item_slices(patient: str, item, use_npz: bool, mapping: str, organs=None):
    """Yield (name, HU slice, organ map) of one item: the .npz slice itself, or every axial slice of a volume pair
    (``<patient>_<k:03d>``)."""
    if use_npz:
        hu, organ_map = read_npz_slice(item, mapping, organs)
        yield item.stem, hu, organ_map
    else:
        for k, hu, organ_map in nifti_slices(*item, mapping, organs):
            yield f"{patient}_{k:03d}", hu, organ_map


def prepare_synapse(
    output: str | os.PathLike,
    input_dir: str | os.PathLike | None = None,
    pairs: list[tuple[str, str]] | None = None,
    label_mapping: str | None = None,
    organs=None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    val_patients=None,
    test_patients=None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Convert NIfTI volumes (``input_dir`` with imagesTr/labelsTr, or ``pairs``) or a folder of TransUNet .npz
    slices (``input_dir`` holding *.npz at any depth) to ``output``; return the datalist path.

    ``label_mapping`` defaults to 'btcv' for NIfTI and 'synapse' for .npz.
    """
    if (input_dir is None) == (pairs is None):
        raise ValueError("give either input_dir (imagesTr/labelsTr or .npz slices) or pairs of (image, label) files")
    chosen = organ_ids(organs)
    classes = {i: name for name, i in sorted(chosen.items(), key=lambda kv: kv[1])}
    npz_files = sorted(Path(input_dir).rglob("*.npz")) if input_dir is not None else []
    use_npz = bool(npz_files) and not (Path(input_dir) / "imagesTr").is_dir()
    mapping = label_mapping or ("synapse" if use_npz else "btcv")
    if mapping not in LABEL_MAPPINGS:
        raise ValueError(f"unknown label mapping {mapping!r}; known: {list(LABEL_MAPPINGS)}")
    items = [(npz_patient(p), p) for p in npz_files] if use_npz else nifti_items(input_dir, pairs)
    split_of = _patient_splits([p for p, _ in items], val_fraction, test_fraction, val_patients, test_patients, seed)
    check_output(output)
    with DatasetWriter(output, "synapse", "organ", classes) as writer:
        for patient, item in tqdm(items, desc="Synapse", disable=not progress):
            for stem, hu, organ_map in item_slices(patient, item, use_npz, mapping, organs):
                present = np.unique(organ_map)
                present = present[present > 0]
                if len(present) == 0:
                    writer.skip("no organ")
                    continue
                label = np.stack([organ_map, organ_map])
                writer.add(split_of[patient], stem, hu, label, source=patient, n_organs=len(present))
        info = {
            "input_format": "npz" if use_npz else "nifti",
            "label_mapping": mapping,
            "intensity": "HU from [0,1] npz: -125 + 400 * x" if use_npz else "HU",
            "orientation": "as stored" if use_npz
            else "RAS+ reoriented, radiological display (volume[::-1, ::-1, k].T)",
            "patients": {s: sorted(p for p, v in split_of.items() if v == s)
                         for s in ("training", "validation", "test")},
        }
        return writer.finish(seed, info)
