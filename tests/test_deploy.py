"""MONAI Deploy App SDK 0.5.1 runs models/model.ts with its own MonaiBundleInferenceOperator (scripts/deploy_app.py):
NIfTI in / NIfTI out and DICOM series in / DICOM SEG out, with the same masks as the bundle's own inference.

The SDK (monai-deploy-app-sdk==0.5.1 with highdicom, setuptools<81) must be importable by this interpreter or by
$SAMPO_DEPLOY_PYTHON (a Python that also has this project installed); otherwise the test skips.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

SIZE = 64
CHECK = "import monai.deploy.operators.monai_bundle_inference_operator, highdicom, bundle.inference"


def deploy_python() -> str:
    for py in (sys.executable, os.environ.get("SAMPO_DEPLOY_PYTHON")):
        if py and os.path.isfile(py):
            if subprocess.run([py, "-c", CHECK], capture_output=True, cwd=str(REPO)).returncode == 0:
                return py
    pytest.skip(
        "MONAI Deploy App SDK absent: pip install 'monai-deploy-app-sdk==0.5.1' highdicom 'setuptools<81' "
        "(or set SAMPO_DEPLOY_PYTHON to a Python that has it and this project)"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from bundle.checkpoints import build_network
    from bundle.export import write_bundle

    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("deploy_model")
    write_bundle(build_network("tiny", SIZE, lora_rank=0), dest, REPO, verify=False)
    return dest


def bundle_run(model_dir, image, clicks, out_dir, slice_index=-1):
    from monai.bundle import run

    run("run", config_file=str(model_dir / "configs" / "inference.yaml"), bundle_root=str(model_dir),
        device="$torch.device('cpu')", input_image=str(image), clicks=str(clicks), output_dir=str(out_dir),
        slice_index=slice_index)


def run_app(py, app, in_dir, out_dir, model_ts):
    r = subprocess.run(
        [py, str(REPO / "scripts" / "deploy_app.py"), "--app", app, "-i", str(in_dir), "-o", str(out_dir),
         "-m", str(model_ts)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900, cwd=str(in_dir.parent),
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return r


def test_sdk_reads_the_torchscript_bundle(model_dir):
    py = deploy_python()
    code = f"""
import json, torch
from monai.deploy.core.models.torch_model import TorchScriptModel
from monai.deploy.operators.monai_bundle_inference_operator import get_bundle_config
path = {str(model_dir / "models" / "model.ts")!r}
assert TorchScriptModel.accept(path)[0]
parser = get_bundle_config(path, ["inference"])
meta = parser["_meta_"]
assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 5
pre = parser.get_parsed_content("preprocessing")
names = [type(t).__name__ for t in pre.transforms]
assert names == ["LoadImaged", "EnsureChannelFirstd", "PromptImaged"], names
post = [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]
assert post == ["NucleiInstancesd", "PromptMaskd", "SaveImageMaskd", "SaveImageNucleid"], post  # the SDK leaves out LoadImage* / SaveImage*
net = torch.jit.load(path)
print(json.dumps(list(net(torch.zeros(2, 5, {SIZE}, {SIZE})).shape)))
"""
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=str(REPO), timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [2, 1, SIZE, SIZE]


@pytest.mark.parametrize("shape, clicks", [
    ((40, 32, 6), {"foreground": [[12, 10], [20, 15]], "background": [[3, 3]]}),  # a slice smaller than the tile
    # a slice of 150 x 100 px: 3 x 2 tiles of the model's 64 px at native resolution, a click in the last tile
    ((150, 100, 6), {"foreground": [[12, 10], [140, 90]], "background": [[70, 50]]}),
], ids=["small", "larger_than_a_tile"])
def test_nifti_app_gives_the_bundle_mask(model_dir, tmp_path, shape, clicks):
    py = deploy_python()
    in_dir = tmp_path / "input"
    in_dir.mkdir()
    hu = np.random.default_rng(3).normal(0, 300, shape).astype(np.int16)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), in_dir / "ct.nii.gz")
    clicks = {**clicks, "slice_index": 3}
    (in_dir / "clicks.json").write_text(json.dumps(clicks), encoding="utf-8")
    run_app(py, "file", in_dir, tmp_path / "output", model_dir / "models" / "model.ts")
    deployed = nib.load(tmp_path / "output" / "ct_seg.nii.gz")
    assert deployed.shape == hu.shape and np.allclose(deployed.affine, affine)
    bundle_run(model_dir, in_dir / "ct.nii.gz", in_dir / "clicks.json", tmp_path / "bundle")
    mine = np.asarray(nib.load(tmp_path / "bundle" / "ct_seg.nii.gz").dataobj)
    assert np.array_equal(np.asarray(deployed.dataobj), mine)  # TorchScript in the SDK == eager bundle run
    assert not np.delete(mine, 3, axis=2).any()


def test_dicom_app_writes_a_dicom_seg_of_the_bundle_mask(model_dir, tmp_path):
    py = deploy_python()
    from test_inference import _write_dicom_series

    in_dir = tmp_path / "input"
    hu = np.random.default_rng(4).normal(0, 300, (36, 30, 5)).astype(np.int16)
    _write_dicom_series(in_dir, hu)
    clicks = {"foreground": [[10, 12]], "background": [[30, 25]], "slice_index": 2}
    (in_dir / "clicks.json").write_text(json.dumps(clicks), encoding="utf-8")
    run_app(py, "dicom", in_dir, tmp_path / "output", model_dir / "models" / "model.ts")
    segs = list((tmp_path / "output").rglob("*.dcm"))
    assert len(segs) == 1
    code = f"""
import json, pydicom
d = pydicom.dcmread({str(segs[0])!r})
frames = d.pixel_array.reshape(-1, d.Rows, d.Columns)
z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in d.PerFrameFunctionalGroupsSequence]
print(json.dumps({{"modality": d.Modality, "label": d.SegmentSequence[0].SegmentLabel, "z": z,
                  "frames": frames.tolist()}}))
"""
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seg = json.loads(r.stdout.strip().splitlines()[-1])
    assert seg["modality"] == "SEG" and seg["label"] == "target"
    bundle_run(model_dir, in_dir, in_dir / "clicks.json", tmp_path / "bundle")
    mine = np.asarray(nib.load(tmp_path / "bundle" / "input_seg.nii.gz").dataobj)  # (I, J, K) of the series
    if mine.any():
        assert seg["z"] == [2.5 * 2]  # only the segmented slice is a frame
        assert np.array_equal(np.array(seg["frames"][0], dtype=np.uint8), mine[:, :, 2].T)  # frame rows are j
    else:
        assert seg["frames"] == []
