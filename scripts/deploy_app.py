#!/usr/bin/env python
"""MONAI Deploy App SDK (0.5.x) applications around the bundle's TorchScript model ``models/model.ts``.

The model is run by the SDK's own ``MonaiBundleInferenceOperator``: it reads ``extra/metadata.json`` and
``extra/inference.json`` from the TorchScript archive and applies the bundle's preprocessing / inferer /
postprocessing (its LoadImage / SaveImage transforms left out). The bundle's Python package (``bundle/``, installed
with ``pip install .``) must be importable where the app runs. Clicks reach the bundle through the image's
metadata (``foreground`` / ``background`` / ``slice_index``), read from ``clicks.json`` in the input folder.

Two applications:

* ``dicom``: a CT DICOM series (one series in the input folder) -> DICOM SEG of the clicked organ on one slice.
* ``file``: one NIfTI volume in the input folder -> ``<name>_seg.nii.gz`` with the input's geometry.

2D images (PNG H&E tiles) are served by MONAI Label or ``python -m monai.bundle run`` instead: the SDK 0.5
operator hands its outputs on as 3D volumes. Usage::

    python scripts/deploy_app.py -i INPUT_DIR -o OUTPUT_DIR -m models/model.ts [--app dicom|file]
    python scripts/deploy_app.py -i INPUT_DIR -o OUTPUT_DIR -m models:/<name>/<version> [--tracking_uri URI]

``-m models:/<name>/<version>`` (also ``latest`` or ``models:/<name>@<alias>``) serves a version of the MLflow model
registry: its bundle is downloaded with MLflow's client (bundle/registry.py) into a temporary folder, or into
``--registry_dir DIR`` to keep it, and its ``models/model.ts`` is run; the registry is ``--tracking_uri`` or
$MLFLOW_TRACKING_URI. A name or version the registry lacks stops the app with an error naming it.

INPUT_DIR holds the image (DICOM files or one .nii/.nii.gz) and clicks.json:
``{"foreground": [[x, y], ...], "background": [[x, y], ...], "slice_index": k}`` (see bundle/inference.py for the
coordinates; ``[i, j, k]`` voxel clicks need no slice_index).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import numpy as np


import monai.deploy.core as md  # noqa: E402
import monai.deploy.operators.monai_bundle_inference_operator as mbio  # noqa: E402
from monai.deploy.core import (  # noqa: E402
    Application,
    DataPath,
    ExecutionContext,
    Image,
    InputContext,
    IOType,
    Operator,
    OutputContext,
)
from monai.deploy.operators.monai_bundle_inference_operator import (  # noqa: E402
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

CLICKS_FILE = "clicks.json"


def read_clicks_file(folder: Path) -> dict:
    """``clicks.json`` of the app's input folder -> image metadata entries (clear error when missing), read by the
    bundle's click reader (:func:`bundle.clicks.read_prompt`)."""
    from bundle.clicks import read_prompt

    path = Path(folder) / CLICKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the app needs the clicks beside the image ({{'foreground': [[x, y]], ...}})")
    foreground, background, slice_index = read_prompt(str(path))
    out = {"foreground": foreground, "background": background}
    if slice_index is not None:
        out["slice_index"] = slice_index
    return out


class BundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, made to read metadata parsed by MONAI >= 1.4.

    MONAI's ConfigParser renames ``optional_packages_version`` to ``required_packages_version`` when it reads a
    bundle's metadata, while SDK 0.5.1 looks the old name up; the key is put back before the SDK reads it.
    """

    def _init_config(self, config_names):
        original = mbio.get_bundle_config

        def get_bundle_config(bundle_path, names):
            parser = original(bundle_path, names)
            meta = parser["_meta_"]
            meta.setdefault("optional_packages_version", {})
            return parser

        mbio.get_bundle_config = get_bundle_config
        try:
            super()._init_config(config_names)
        finally:
            mbio.get_bundle_config = original


def bundle_operator() -> BundleInferenceOperator:
    return BundleInferenceOperator(
        input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
        output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
        bundle_config_names=BundleConfigNames(config_names=["inference"]),
    )


@md.input("image", Image, IOType.IN_MEMORY)
@md.output("image", Image, IOType.IN_MEMORY)
class AttachClicksOperator(Operator):
    """Adds the clicks of ``clicks.json`` (app input folder) to the image's metadata."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        image = op_input.get("image")
        meta = dict(image.metadata())
        meta.update(read_clicks_file(context.input.get().path))
        op_output.set(Image(image.asnumpy(), metadata=meta), "image")


@md.input("input", DataPath, IOType.DISK)
@md.output("image", Image, IOType.IN_MEMORY)
class VolumeLoaderOperator(Operator):
    """One NIfTI volume of the input folder -> Image (file index order, RAS affine) with the clicks attached."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        from monai.transforms import LoadImage

        folder = op_input.get().path
        folder = folder if folder.is_dir() else folder.parent
        files = sorted(p for p in folder.iterdir() if p.name.lower().endswith((".nii", ".nii.gz")))
        if len(files) != 1:
            raise ValueError(f"{folder}: expected one .nii / .nii.gz volume, found {[p.name for p in files]}")
        data, meta = LoadImage(image_only=False, dtype=None)(str(files[0]))
        meta = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in dict(meta).items()}
        meta.update(read_clicks_file(folder))
        op_output.set(Image(np.asarray(data), metadata=meta), "image")


@md.input("seg_image", Image, IOType.IN_MEMORY)
@md.output("mask", DataPath, IOType.DISK)
class NiftiMaskWriterOperator(Operator):
    """The mask Image (SDK order (K, J, I)) -> ``<input name>_seg.nii.gz`` with the input volume's header."""

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext):
        from bundle.io import save_nifti_mask
        from bundle.masks import mask_path

        image = op_input.get("seg_image")
        mask = np.swapaxes(image.asnumpy(), 0, 2).astype(np.uint8)  # back to file index order (I, J, K)
        source = str(image.metadata().get("filename_or_obj", "volume.nii.gz"))
        path = save_nifti_mask(mask, mask_path(source, str(op_output.get().path)), reference=source)
        logging.info("mask written to %s", path)


@md.resource(cpu=1, memory="4Gi")
@md.env(pip_packages=["monai>=1.4", "torch", "segment-anything", "nibabel", "itk"])
class SAMPOFileApp(Application):
    """NIfTI volume + clicks.json -> NIfTI mask of the prompted target on one slice."""

    name = "sampo_file_app"
    description = "Click-prompted SAMPO segmentation of one CT slice (NIfTI in, NIfTI out)"
    version = "0.1.0"

    def compose(self):
        loader = VolumeLoaderOperator()
        infer = bundle_operator()
        writer = NiftiMaskWriterOperator()
        self.add_flow(loader, infer, {"image": "image"})
        self.add_flow(infer, writer, {"pred": "seg_image"})


@md.resource(cpu=1, memory="4Gi")
@md.env(pip_packages=["monai>=1.4", "torch", "segment-anything", "nibabel", "itk", "highdicom", "pydicom"])
class SAMPODicomApp(Application):
    """CT DICOM series + clicks.json -> DICOM SEG of the prompted organ on one slice."""

    name = "sampo_dicom_app"
    description = "Click-prompted SAMPO segmentation of one CT slice (DICOM series in, DICOM SEG out)"
    version = "0.1.0"

    def compose(self):
        from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
        from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
        from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
        from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
        from pydicom.sr.codedict import codes

        loader = DICOMDataLoaderOperator()
        selector = DICOMSeriesSelectorOperator(json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]}))
        to_volume = DICOMSeriesToVolumeOperator()
        clicks = AttachClicksOperator()
        infer = bundle_operator()
        writer = DICOMSegmentationWriterOperator(
            segment_descriptions=[
                SegmentDescription(
                    segment_label="target",
                    segmented_property_category=codes.SCT.Organ,
                    segmented_property_type=codes.SCT.Organ,
                    algorithm_name="sampo_promptable_sam",
                    algorithm_family=codes.DCM.ArtificialIntelligence,
                    algorithm_version="0.1.0",
                )
            ]
        )
        self.add_flow(loader, selector, {"dicom_study_list": "dicom_study_list"})
        self.add_flow(selector, to_volume, {"study_selected_series_list": "study_selected_series_list"})
        self.add_flow(to_volume, clicks, {"image": "image"})
        self.add_flow(clicks, infer, {"image": "image"})
        self.add_flow(selector, writer, {"study_selected_series_list": "study_selected_series_list"})
        self.add_flow(infer, writer, {"pred": "seg_image"})


APPS = {"file": SAMPOFileApp, "dicom": SAMPODicomApp}


def _pop_option(argv: list, *names: str, default=None):
    """The value of the first of ``names`` in ``argv`` (removed from it with its value), else ``default``."""
    for name in names:
        if name in argv:
            i = argv.index(name)
            if i + 1 >= len(argv):
                raise SystemExit(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
    return default


def registry_model(uri: str, folder: str, tracking_uri: str | None) -> str:
    """``models:/...`` -> the ``models/model.ts`` of that registry version, downloaded into ``folder``."""
    from bundle.registry import RegistryError, fetch_bundle

    try:
        bundle = fetch_bundle(uri, folder, tracking_uri)
    except RegistryError as e:
        raise SystemExit(f"deploy_app -m: {e}") from None
    model = Path(bundle) / "models" / "model.ts"
    if not model.is_file():
        raise SystemExit(f"deploy_app: -m {uri}: the registered bundle {bundle} has no models/model.ts")
    return str(model)


def main(argv=None) -> None:
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    kind = _pop_option(argv, "--app", default="file")
    if kind not in APPS:
        raise SystemExit(f"--app must be one of {sorted(APPS)}")
    tracking_uri = _pop_option(argv, "--tracking_uri", "--tracking-uri")
    registry_dir = _pop_option(argv, "--registry_dir", "--registry-dir")
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    with tempfile.TemporaryDirectory(prefix="sampo-registry-") as tmp:
        for flag in ("-m", "--model"):
            if flag in argv and argv.index(flag) + 1 < len(argv) and argv[argv.index(flag) + 1].startswith("models:/"):
                i = argv.index(flag) + 1
                argv[i] = registry_model(argv[i], registry_dir or tmp,
                                         tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
                logging.info("serving %s", argv[i])
        sys.argv = [sys.argv[0], *argv]
        APPS[kind](do_run=True)


if __name__ == "__main__":
    main()
