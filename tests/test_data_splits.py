"""Seeded source splits and nested training fractions (bundle/data/splits.py), read back through the datalist API."""

import json

import numpy as np
import pytest

from bundle.data.datalist import load_datalist
from bundle.data.splits import assign_subsets, partition_sources, split_sources, subset_sizes
from bundle.data.writer import DatasetWriter


def _entries(n):
    return [{"image": f"images/{i:03d}.png"} for i in range(n)]


def _members(entries, p):
    return {e["image"] for e in entries if p in e["subsets"]}


@pytest.mark.parametrize("n", [1, 7, 25, 103])
def test_fractions_are_nested_and_sized(n):
    entries = assign_subsets(_entries(n), seed=3)
    s10, s20, s30, s100 = (_members(entries, p) for p in (10, 20, 30, 100))
    assert s10 <= s20 <= s30 <= s100
    assert len(s100) == n
    assert [len(s) for s in (s10, s20, s30)] == [max(1, int(np.ceil(n * p / 100))) for p in (10, 20, 30)]
    for e in entries:  # 'subsets' lists exactly the percentages holding the entry, in increasing order
        assert e["subsets"] == sorted(e["subsets"]) and e["subsets"][-1] == 100


def test_fractions_are_seeded_and_independent_of_input_order():
    a = assign_subsets(_entries(50), seed=0)
    b = assign_subsets(list(reversed(_entries(50))), seed=0)
    c = assign_subsets(_entries(50), seed=1)
    by_image = lambda entries: {e["image"]: e["subsets"] for e in entries}  # noqa: E731
    assert by_image(a) == by_image(b)
    assert _members(a, 10) != _members(c, 10)  # 5 of 50: the two seeds pick different entries


def test_subset_sizes_of_empty_split():
    assert subset_sizes(0) == {10: 0, 20: 0, 30: 0, 100: 0}
    assert assign_subsets([], seed=0) == []


def test_partition_is_seeded_disjoint_and_complete():
    sources = [f"p{i}" for i in range(20)] * 3  # repeated sources count once
    parts = partition_sources(sources, {"validation": 0.2, "test": 0.25}, seed=5)
    assert [len(parts[k]) for k in ("validation", "test", "training")] == [4, 5, 11]
    assert set().union(*parts.values()) == set(sources)
    assert not (set(parts["validation"]) & set(parts["test"]))
    assert parts == partition_sources(reversed(sources), {"validation": 0.2, "test": 0.25}, seed=5)
    kept, held = split_sources(sources, 0.2, seed=5)
    assert len(held) == 4 and set(kept) | set(held) == set(sources)


def test_partition_rejects_bad_fractions():
    with pytest.raises(ValueError, match="validation fraction must be in"):
        partition_sources(["a"], {"validation": 1.5})
    with pytest.raises(ValueError, match="leave nothing for training"):
        partition_sources(["a", "b"], {"validation": 0.5, "test": 0.5})


def test_writer_datalist_round_trips_through_load_datalist(tmp_path):
    writer = DatasetWriter(tmp_path, "toy", "nuclei", {1: "a", 2: "b"})
    for i in range(20):
        label = np.zeros((2, 8, 8), np.int32)
        label[:, 2:4, 2:4] = [[[1]], [[1 + i % 2]]]
        writer.add("training" if i < 15 else "test", f"img{i:02d}", np.full((8, 8, 3), i, np.uint8), label, f"s{i}")
    writer.skip("no nucleus")
    path = writer.finish(seed=0)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["classes"] == {"1": "a", "2": "b"} and data["preparation"]["skipped"] == {"no nucleus": 1}
    ten = load_datalist(path, "training", fraction=10)
    assert len(ten) == 2 and len(load_datalist(path, "training", fraction=30)) == 5
    assert {t["name"] for t in ten} <= {t["name"] for t in load_datalist(path, "training", fraction=20)}
    test = load_datalist(path, "test", task="t2")  # one item per class present
    assert sorted((t["name"], t["target_class"]) for t in test)[:2] == [("img15", 2), ("img16", 1)]
    assert np.load(ten[0]["label"]).dtype == np.int32


def test_writer_rejects_unknown_class_and_duplicate_names(tmp_path):
    writer = DatasetWriter(tmp_path, "toy", "nuclei", {1: "a"})
    label = np.zeros((2, 4, 4), np.int32)
    label[1, 0, 0] = 3
    with pytest.raises(ValueError, match=r"class ids \[3\] are not in the classes"):
        writer.add("training", "x", np.zeros((4, 4, 3), np.uint8), label, "s")
    writer.add("training", "y", np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4, 4)), "s")
    with pytest.raises(ValueError, match="two items are named 'y'"):
        writer.add("test", "y", np.zeros((4, 4, 3), np.uint8), np.zeros((2, 4, 4)), "s")
