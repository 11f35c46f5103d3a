"""Nuclei instances, table, counts and QuPath GeoJSON (bundle/nuclei.py): the watershed splits touching nuclei,
the table matches hand-computed values, and polygons rasterise back to exactly the instance pixels."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
from scipy import ndimage as ndi

from bundle import nuclei, qupath


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _round_trip(inst: np.ndarray) -> dict:
    collection = qupath.to_geojson(inst)
    back = qupath.rasterise_geojson(json.loads(json.dumps(collection)), inst.shape)
    np.testing.assert_array_equal(back, inst)
    for feature in collection["features"]:
        geometry = feature["geometry"]
        polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for poly in polys:
            for k, ring in enumerate(poly):
                assert ring[0] == ring[-1] and len(ring) >= 5
                area2 = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))
                assert (area2 > 0) if k == 0 else (area2 < 0)
                for (x0, y0), (x1, y1), (x2, y2) in zip(ring, ring[1:], ring[2:] + ring[1:2]):
                    assert (x0 == x1) != (y0 == y1) and (x1 - x0) * (y2 - y1) != (y1 - y0) * (x2 - x1)
    return collection


def test_two_touching_discs_are_split_and_one_disc_is_one():
    a, b = _disc((48, 64), 24, 20, 10), _disc((48, 64), 24, 38, 10)
    assert (a & b).any()
    inst = nuclei.split_instances((a | b).astype(np.float32) * 0.9)
    assert inst.dtype == np.int32 and set(np.unique(inst)) == {0, 1, 2}
    assert inst[24, 20] != inst[24, 38] and np.array_equal(inst > 0, a | b)
    one = nuclei.split_instances(a)  # a bool mask works too
    assert set(np.unique(one)) == {0, 1} and np.array_equal(one > 0, a)
    assert nuclei.counts(inst, "Tumor") == {"n_nuclei": 2, "class_name": "Tumor", "total_area": int((a | b).sum())}


def test_empty_map_gives_no_instances_no_rows_no_features(tmp_path):
    inst = nuclei.split_instances(np.zeros((16, 20), np.float32))
    assert inst.shape == (16, 20) and not inst.any()
    assert nuclei.nuclei_table(inst) == [] and nuclei.counts(inst)["n_nuclei"] == 0
    assert qupath.instance_polygons(inst) == {}
    assert qupath.to_geojson(inst) == {"type": "FeatureCollection", "features": []}
    path = nuclei.write_nuclei_csv([], tmp_path / "empty.csv")
    assert open(path, encoding="utf-8").read().strip() == ",".join(nuclei.CSV_FIELDS)


def test_min_size_removes_specks():
    prob = np.zeros((32, 32), np.float32)
    prob[16, 16] = prob[3, 3] = prob[3, 4] = 1.0
    prob[20:28, 4:12] = 0.8
    inst = nuclei.split_instances(prob, min_size=8)
    assert set(np.unique(inst)) == {0, 1} and inst[24, 8] == 1 and inst[16, 16] == 0 and inst[3, 3] == 0
    assert set(np.unique(nuclei.split_instances(prob, min_size=0))) == {0, 1, 2, 3}


def test_component_on_the_border_and_tiny_components_all_get_a_marker():
    rng = np.random.default_rng(1)
    prob = (rng.random((40, 40)) > 0.6).astype(np.float32)
    inst = nuclei.split_instances(prob, min_size=0, min_distance=5)
    np.testing.assert_array_equal(inst > 0, prob > 0.5)  # every foreground pixel is in an instance
    assert np.array_equal(np.unique(inst), np.arange(inst.max() + 1))


def test_table_against_hand_computed_values(tmp_path):
    inst = np.array([[1, 1, 0],
                     [0, 0, 2],
                     [0, 2, 2]], np.int32)
    prob = np.array([[0.9, 0.7, 0.1],
                     [0.0, 0.2, 0.6],
                     [0.3, 0.9, np.nan]])
    table = nuclei.nuclei_table(inst, prob, class_name="Tumor")
    assert [row["id"] for row in table] == [1, 2]
    one, two = table
    assert one["centroid_x"] == pytest.approx(0.5) and one["centroid_y"] == pytest.approx(0.0)
    assert one["area"] == 2 and one["mean_prob"] == pytest.approx(0.8) and one["class_name"] == "Tumor"
    assert two["centroid_x"] == pytest.approx(5 / 3) and two["centroid_y"] == pytest.approx(5 / 3)
    assert two["area"] == 3 and two["mean_prob"] == pytest.approx(0.5)  # NaN read as 0
    assert nuclei.nuclei_table(inst)[0]["mean_prob"] == "" and nuclei.nuclei_table(inst)[0]["class_name"] == "Nucleus"
    gap = np.where(inst == 2, 7, inst)  # ids need not be sequential
    assert [row["id"] for row in nuclei.nuclei_table(gap)] == [1, 7]

    path = nuclei.write_nuclei_csv(table, tmp_path / "out" / "nuclei.csv")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(nuclei.CSV_FIELDS)
    assert [(r["id"], r["area"], r["class_name"]) for r in rows] == [("1", "2", "Tumor"), ("2", "3", "Tumor")]
    assert float(rows[1]["centroid_x"]) == pytest.approx(5 / 3) and float(rows[0]["mean_prob"]) == pytest.approx(0.8)


def test_geojson_is_qupath_detections_and_json_serialisable(tmp_path):
    inst = np.zeros((10, 12), np.int32)
    inst[2:5, 3:6] = 1
    inst[7, 0] = inst[8, 1] = 2  # two corner-touching pixels: a MultiPolygon
    table = nuclei.nuclei_table(inst, inst > 0)
    collection = _round_trip(inst)
    collection = qupath.to_geojson(inst, table, class_name="Lymphocyte", color=(0, 128, 255))
    first, second = collection["features"]
    assert first["id"] == str(uuid.UUID(first["id"])) and first["id"] != second["id"]
    assert first["id"] == qupath.to_geojson(inst)["features"][0]["id"]  # deterministic
    assert first["geometry"] == {"type": "Polygon", "coordinates": [[[3, 2], [6, 2], [6, 5], [3, 5], [3, 2]]]}
    assert second["geometry"]["type"] == "MultiPolygon" and len(second["geometry"]["coordinates"]) == 2
    assert first["properties"] == {"objectType": "detection",
                                   "classification": {"name": "Lymphocyte", "color": [0, 128, 255]},
                                   "measurements": {"area": 9, "mean_prob": 1.0}, "nucleus_id": 1}
    assert qupath.to_geojson(inst)["features"][1]["properties"]["measurements"] == {"area": 2}
    assert qupath.to_geojson(inst)["features"][1]["properties"]["classification"]["name"] == "Nucleus"
    path = qupath.write_geojson(collection, tmp_path / "nuclei.geojson")
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(collection))


def test_round_trip_on_split_random_blobs():
    rng = np.random.default_rng(0)
    shape = (120, 150)
    prob = np.zeros(shape)
    for _ in range(40):
        prob += _disc(shape, rng.uniform(-5, shape[0] + 5), rng.uniform(-5, shape[1] + 5), rng.uniform(2, 9))
    prob = np.clip(ndi.gaussian_filter(prob, 1.5) + 0.3 * rng.random(shape), 0, 1)
    inst = nuclei.split_instances(prob, threshold=0.5, min_distance=4, min_size=4)
    assert inst.max() > 20 and (inst[0] > 0).any()  # many instances, some on the border
    _round_trip(inst)


def test_round_trip_on_holes_corners_single_pixels_and_borders():
    inst = np.zeros((12, 14), np.int32)
    inst[1:6, 1:6] = 1
    inst[3, 3] = 0  # a hole
    inst[7:10, 0:3] = 2
    inst[8, 1] = 0  # a hole touching nothing else
    inst[0, 8] = inst[1, 9] = inst[2, 10] = 3  # a diagonal chain: three corner-touching parts
    inst[5, 13] = 4  # single pixel on the right border
    inst[11, 13] = 5  # single pixel in the bottom-right corner
    inst[0, 0] = 6  # single pixel in the top-left corner, diagonal to instance 1
    ring = np.ones((5, 5), bool)  # a square ring without its top-right pixel: the hole meets the outside
    ring[1:4, 1:4] = ring[0, 4] = False  # diagonally, at one corner
    inst[7:12, 6:11][ring] = 7
    inst[6, 5] = 8  # corner-touching instance 7, edge-touching instance 1
    collection = _round_trip(inst)
    geoms = {f["properties"]["nucleus_id"]: f["geometry"] for f in collection["features"]}
    assert geoms[1]["type"] == "Polygon" and len(geoms[1]["coordinates"]) == 2  # exterior + hole
    assert geoms[3]["type"] == "MultiPolygon" and len(geoms[3]["coordinates"]) == 3
    assert geoms[5]["coordinates"] == [[[13, 11], [14, 11], [14, 12], [13, 12], [13, 11]]]
    exterior, hole = geoms[7]["coordinates"]  # one polygon: the hole touches the exterior at corner (10, 8)
    assert [10, 8] in exterior and [10, 8] in hole and len(exterior) == 7 and len(hole) == 5
    pixel = np.zeros((1, 1), np.int32)
    pixel[0, 0] = 1
    assert qupath.instance_polygons(pixel) == {1: [[[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]]}
    checker = (np.indices((6, 6)).sum(0) % 2).astype(np.int32) * 3  # one id, 18 corner-touching pixels
    assert len(qupath.instance_polygons(checker)[3]) == 18
    _round_trip(checker)


def test_round_trip_on_random_label_noise():
    rng = np.random.default_rng(3)
    for _ in range(5):
        inst = rng.integers(0, 4, size=(17, 23)).astype(np.int32)
        _round_trip(inst)


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"threshold": 1.0}, {"threshold": 1.5},
                                    {"min_distance": 0}, {"min_distance": 2.5}, {"min_size": -1},
                                    {"compactness": -1.0}])
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        nuclei.split_instances(np.zeros((8, 8)), **kwargs)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="2-D"):
        nuclei.split_instances(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="integer"):
        nuclei.nuclei_table(np.full((4, 4), 1.5, np.float32))  # integral floats are ids; 1.5 is not
    with pytest.raises(ValueError, match="shape"):
        nuclei.nuclei_table(np.zeros((4, 4), np.int32), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="color"):
        qupath.to_geojson(np.ones((2, 2), np.int32), color=(300, 0, 0))
    with pytest.raises(ValueError, match="negative instance id"):
        nuclei.counts(np.full((2, 2), -1))
