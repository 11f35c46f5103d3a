"""Nuclei from the served logits (bundle/nuclei_outputs.py, issue 22): instances, table, counts, MONAI Label's result
JSON, and the files `monai.bundle run` writes for an image larger than the network's field."""

import csv
import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from bundle.checkpoints import build_network
from bundle.export import write_bundle
from bundle.qupath import rasterise_geojson
from bundle.nuclei_outputs import NucleiInstancesd
from conftest import REPO

SIZE = 64


def discs(h, w, centres, r):
    yy, xx = np.mgrid[:h, :w]
    out = np.zeros((h, w), bool)
    for cx, cy in centres:
        out |= (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    return out


def image_2d(x, y, name="field.png"):
    return MetaTensor(torch.zeros((5, y, x)), meta={"filename_or_obj": name, "spatial_shape": (x, y),
                                                    "prompt_kind": "2d", "prompt_slice": -1})


def test_two_touching_nuclei_and_one_alone_are_three_rows_and_a_monai_label_result():
    h, w = 60, 90
    mask = discs(h, w, [(20, 30), (36, 30), (70, 15)], r=8)  # the first two touch
    logits = torch.from_numpy(np.where(mask, 6.0, -6.0)[None].astype(np.float32))
    d = NucleiInstancesd(class_name="Nucleus")({"image": image_2d(w, h), "pred": logits, "class_name": "epithelial"})
    assert d["n_nuclei"] == 3 and d["instances"].shape == (h, w)
    assert np.array_equal(d["instances"] > 0, mask)
    assert {r["class_name"] for r in d["nuclei"]} == {"epithelial"}  # the request's class wins
    alone = min(d["nuclei"], key=lambda r: abs(r["centroid_x"] - 70))
    assert alone["centroid_x"] == pytest.approx(70) and alone["centroid_y"] == pytest.approx(15)
    assert alone["area"] == int(discs(h, w, [(70, 15)], 8).sum())
    assert alone["mean_prob"] == pytest.approx(float(torch.sigmoid(torch.tensor(6.0))))
    result = d["result"]
    assert result["n_nuclei"] == 3 and result["annotation"]["size"] == [w, h]
    assert len(result["annotation"]["elements"][0]["contours"]) == 3
    json.dumps(result)  # MONAI Label sends it as the response's JSON
    assert torch.equal(d["pred"], logits)  # the mask path is untouched


def test_an_empty_mask_is_zero_nuclei_and_volumes_get_none():
    d = NucleiInstancesd()({"image": image_2d(40, 30), "pred": torch.full((1, 30, 40), -5.0)})
    assert d["n_nuclei"] == 0 and d["nuclei"] == [] and d["result"]["annotation"]["elements"] == []
    vol = MetaTensor(torch.zeros((5, 8, 8)), meta={"prompt_kind": "volume", "spatial_shape": (8, 8, 4)})
    assert "instances" not in NucleiInstancesd()({"image": vol, "pred": torch.ones((1, 8, 8))})


def test_watershed_parameters_are_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="threshold"):
        NucleiInstancesd(threshold=1.5)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("bundle")
    write_bundle(build_network("tiny", SIZE, lora_rank=0), dest, REPO, verify=False)
    return dest


def test_bundle_run_on_a_field_larger_than_the_network_writes_mask_instances_csv_and_geojson(bundle_dir, tmp_path):
    from monai.bundle import run

    h, w = 150, 200  # 64 px network: 4 x 3 tiles at native resolution
    img = (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "field.png")
    (tmp_path / "c.json").write_text(json.dumps({"foreground": [[20, 30], [150, 120]], "background": [[100, 5]]}),
                                     encoding="utf-8")
    run("run", config_file=str(bundle_dir / "configs" / "inference.yaml"), bundle_root=str(bundle_dir),
        device="$torch.device('cpu')", input_image=str(tmp_path / "field.png"), clicks=str(tmp_path / "c.json"),
        class_name="inflammatory", **{"nuclei#min_size": 0, "nuclei#min_distance": 1})
    mask = np.array(Image.open(tmp_path / "field_seg.png")) > 0
    inst = np.array(Image.open(tmp_path / "field_instances.png"))
    assert mask.shape == inst.shape == (h, w) and inst.dtype == np.uint16
    with open(tmp_path / "field_nuclei.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(np.unique(inst[inst > 0])) > 0, "the tiny network segments something here"
    assert all(r["class_name"] == "inflammatory" for r in rows)
    with open(tmp_path / "field_nuclei.geojson", encoding="utf-8") as f:
        collection = json.load(f)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(rows)
    assert all(f["properties"]["objectType"] == "detection" for f in collection["features"])
    assert np.array_equal(rasterise_geojson(collection, (h, w)), inst)  # the polygons are the instances
    assert np.array_equal(inst > 0, mask & (inst > 0))  # instances lie inside the mask
