"""Nuclei instance metrics (bundle/nuclei_metrics.py): hand-computed fixtures and a brute-force cross-check."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage

from bundle.nuclei_metrics import (
    aggregated_jaccard_index,
    count_error,
    detection_f1,
    match_instances,
    nuclei_metrics,
    panoptic_quality,
)


def _map(shape: tuple[int, int], *boxes: tuple[int, int, int, int, int]) -> np.ndarray:
    """Instance map with ``(id, y0, y1, x0, x1)`` boxes painted in order (later boxes overwrite)."""
    m = np.zeros(shape, np.int64)
    for i, y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = i
    return m


def _fixture_a() -> tuple[np.ndarray, np.ndarray]:
    """Two true nuclei: one predicted exactly, one with IoU 4/6, plus one false positive."""
    true = _map((8, 8), (1, 0, 2, 0, 2), (2, 4, 6, 0, 3))  # areas 4, 6
    pred = _map((8, 8), (1, 0, 2, 0, 2), (2, 4, 6, 0, 2), (3, 6, 8, 6, 8))  # 4 (= true 1), 4 (inside true 2), 4 (FP)
    return true, pred


def test_fixture_a_pq_aji_f1_counts():
    true, pred = _fixture_a()
    m = match_instances(true, pred)
    assert [(t, p) for t, p, _ in m.pairs] == [(1, 1), (2, 2)]
    assert m.pairs[0][2] == 1.0 and m.pairs[1][2] == pytest.approx(4 / 6)
    assert m.unmatched_true == [] and m.unmatched_pred == [3]
    # TP 2, FP 1, FN 0: DQ = 2 / (2 + 1/2) = 4/5; SQ = (1 + 4/6) / 2 = 5/6; PQ = 4/5 * 5/6 = 2/3
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (2, 1, 0)
    assert pq["dq"] == pytest.approx(4 / 5) and pq["sq"] == pytest.approx(5 / 6) and pq["pq"] == pytest.approx(2 / 3)
    # AJI: C = 4 + 4 = 8; U = 4 + 6 (pair unions) + 4 (pred 3 unused) = 14 -> 4/7
    assert aggregated_jaccard_index(true, pred) == pytest.approx(4 / 7)
    # precision 2/3, recall 2/2, F1 = 4 / (4 + 1 + 0) = 4/5
    f1 = detection_f1(true, pred)
    assert f1["f1"] == pytest.approx(4 / 5) and f1["precision"] == pytest.approx(2 / 3) and f1["recall"] == 1.0
    # 2 true, 3 predicted: abs 1, rel 1/2
    assert count_error(true, pred) == {"true_count": 2, "pred_count": 3, "abs_error": 1, "rel_error": 0.5}
    allm = nuclei_metrics(true, pred)
    assert set(allm) == {"pq", "dq", "sq", "aji", "f1", "precision", "recall", "tp", "fp", "fn", "true_count",
                         "pred_count", "count_abs_error", "count_rel_error"}  # fmt: skip
    assert allm["pq"] == pytest.approx(2 / 3) and allm["aji"] == pytest.approx(4 / 7)
    assert allm["f1"] == pytest.approx(4 / 5) and (allm["count_abs_error"], allm["count_rel_error"]) == (1, 0.5)


def test_aji_prediction_used_by_two_true_nuclei_counts_once():
    # true 1, true 2: 4 px each side by side; pred 1 (8 px) covers both -> IoU 4/8 with each
    true = _map((6, 6), (1, 0, 2, 0, 2), (2, 0, 2, 2, 4))
    pred = _map((6, 6), (1, 0, 2, 0, 4))
    # C = 4 + 4 = 8; U = 8 + 8 (the two pair unions); pred 1 is used, so no extra term -> AJI = 1/2
    # (adding pred 1's area again as "unused" would give 8/24 = 1/3)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(1 / 2)
    # IoU 1/2 is not > 1/2: no TP, FP 1, FN 2 -> DQ = SQ = PQ = 0
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (0, 1, 2) and pq["pq"] == pq["dq"] == pq["sq"] == 0.0
    # below 0.5 the matching is one-to-one (Hungarian): one of the two true nuclei gets pred 1
    m = match_instances(true, pred, iou_threshold=0.3)
    assert len(m.pairs) == 1 and m.pairs[0][1] == 1 and m.pairs[0][2] == 0.5 and len(m.unmatched_true) == 1
    assert detection_f1(true, pred, 0.3)["f1"] == pytest.approx(2 / (2 + 0 + 1))


def test_aji_unused_overlapping_prediction_and_unpaired_true_nucleus():
    # true 1: 4x4 = 16 px; true 2: 4 px far away, never overlapped
    true = _map((8, 8), (1, 0, 4, 0, 4), (2, 6, 8, 6, 8))
    # pred 1: cols 0-2 (12 px, inside true 1) -> IoU 12/16; pred 2: cols 3-4 (8 px), 4 px in true 1 -> IoU 4/20
    pred = _map((8, 8), (1, 0, 4, 0, 3), (2, 0, 4, 3, 5))
    # true 1 takes pred 1 (3/4 > 1/5): C = 12, U = 16; true 2 unpaired: U += 4; pred 2 unused: U += 8 -> 12/28 = 3/7
    assert aggregated_jaccard_index(true, pred) == pytest.approx(3 / 7)
    # TP 1 (IoU 3/4), FP 1, FN 1: DQ = 1 / (1 + 1/2 + 1/2) = 1/2, SQ = 3/4, PQ = 3/8
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 1)
    assert pq["dq"] == pytest.approx(1 / 2) and pq["sq"] == pytest.approx(3 / 4) and pq["pq"] == pytest.approx(3 / 8)
    m = match_instances(true, pred)
    assert m == ([(1, 1, 0.75)], [2], [2])


def test_empty_conventions():
    empty = np.zeros((6, 6), np.int32)
    one = _map((6, 6), (5, 1, 3, 1, 3))
    both = nuclei_metrics(empty, empty)
    for k in ("pq", "dq", "sq", "aji", "f1", "precision", "recall"):
        assert both[k] == 1.0, k
    assert (both["tp"], both["fp"], both["fn"], both["count_abs_error"], both["count_rel_error"]) == (0, 0, 0, 0, 0.0)
    for true, pred in ((one, empty), (empty, one)):
        r = nuclei_metrics(true, pred)
        for k in ("pq", "dq", "sq", "aji", "f1", "precision", "recall"):
            assert r[k] == 0.0, k
    assert count_error(one, empty) == {"true_count": 1, "pred_count": 0, "abs_error": 1, "rel_error": 1.0}
    # no true nucleus: relative error divides by max(0, 1) = 1
    assert count_error(empty, one)["rel_error"] == 1.0
    assert match_instances(empty, one) == ([], [], [5])
    # identical maps are perfect
    assert nuclei_metrics(one, one)["pq"] == 1.0 and aggregated_jaccard_index(one, one) == 1.0


def test_non_sequential_ids_match_relabelled_ones():
    true, pred = _fixture_a()
    t2 = np.select([true == 1, true == 2], [7, 300], 0)
    p2 = np.select([pred == 1, pred == 2, pred == 3], [12, 40000, 9], 0).astype(np.uint32)
    assert nuclei_metrics(t2, p2) == pytest.approx(nuclei_metrics(true, pred))
    m = match_instances(t2, p2)
    assert [(t, p) for t, p, _ in m.pairs] == [(7, 12), (300, 40000)] and m.unmatched_pred == [9]
    # bool / integral float maps are accepted
    assert panoptic_quality(true > 0, true > 0)["pq"] == 1.0
    assert nuclei_metrics(true.astype(float), pred) == nuclei_metrics(true, pred)


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(6, 7\)"):
        nuclei_metrics(np.zeros((6, 6), int), np.zeros((6, 7), int))
    with pytest.raises(ValueError, match="2D"):
        panoptic_quality(np.zeros((2, 6, 6), int), np.zeros((2, 6, 6), int))
    with pytest.raises(ValueError, match="negative"):
        aggregated_jaccard_index(np.full((4, 4), -1), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="integer"):
        detection_f1(np.full((4, 4), 0.5), np.zeros((4, 4), int))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 4), int), iou_threshold=1.0)


# ---- independent brute-force reference: one boolean mask per id, loops over every (true, pred) pair ----


def _ref(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Slow reference PQ / DQ / SQ / AJI / F1 from explicit per-pair masks (IoU > 0.5 matching)."""
    tids = [i for i in np.unique(true) if i]
    pids = [i for i in np.unique(pred) if i]
    if not tids and not pids:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "aji": 1.0, "f1": 1.0}
    inter = np.zeros((len(tids), len(pids)))
    union = np.zeros((len(tids), len(pids)))
    for a, t in enumerate(tids):
        for b, p in enumerate(pids):
            tm, pm = true == t, pred == p
            inter[a, b] = np.logical_and(tm, pm).sum()
            union[a, b] = np.logical_or(tm, pm).sum()
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    matched = [(a, b) for a in range(len(tids)) for b in range(len(pids)) if iou[a, b] > 0.5]
    assert len({a for a, _ in matched}) == len(matched) == len({b for _, b in matched})  # unique for IoU > 0.5
    tp, fp, fn = len(matched), len(pids) - len(matched), len(tids) - len(matched)
    dq = tp / (tp + fp / 2 + fn / 2)
    sq = sum(iou[a, b] for a, b in matched) / tp if tp else 0.0
    # AJI, Kumar et al.: best-IoU prediction per true nucleus (first max = smallest pred id); unused preds once
    c = u = 0.0
    used: set[int] = set()
    for a, t in enumerate(tids):
        if len(pids) and iou[a].max() > 0:
            b = int(np.argmax(iou[a]))
            c, u = c + inter[a, b], u + union[a, b]
            used.add(b)
        else:
            u += (true == t).sum()
    for b, p in enumerate(pids):
        if b not in used:
            u += (pred == p).sum()
    return {"pq": dq * sq, "dq": dq, "sq": sq, "aji": c / u, "f1": 2 * tp / (2 * tp + fp + fn)}


def _blobs(rng: np.random.Generator, shape: tuple[int, int], sigma: float, q: float) -> np.ndarray:
    """Instance map: connected components of a thresholded smoothed noise field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return ndimage.label(field > np.quantile(field, q))[0]


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    shape = (40, 48)
    true = _blobs(rng, shape, 2.0, 0.7)
    # prediction: true perturbed (shifted, eroded / dilated nuclei, dropped ones) plus random extra blobs
    pred = np.roll(true, (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    for i in np.unique(pred)[1:]:
        r = rng.random()
        if r < 0.15:
            pred[pred == i] = 0
        elif r < 0.35:
            pred[(pred == i) & ~ndimage.binary_erosion(pred == i)] = 0
        elif r < 0.5:
            pred[ndimage.binary_dilation(pred == i) & (pred == 0)] = i
    extra = _blobs(rng, shape, 1.5, 0.9)
    pred = np.where((pred == 0) & (extra > 0), extra + pred.max(), pred)
    # scatter the ids: not sequential, not in the same order
    pred = np.where(pred > 0, rng.permutation(10_000)[pred] + 1, 0)
    ref, got = _ref(true, pred), nuclei_metrics(true, pred)
    assert got["tp"] > 0 and got["fp"] + got["fn"] > 0  # a non-trivial case
    for k in ("pq", "dq", "sq", "aji", "f1"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    # the PQ-side metrics are independent of the ids themselves
    perm = rng.permutation(true.max() + 1)
    perm[perm == 0], perm[0] = perm[0], 0
    relab = nuclei_metrics(np.where(true > 0, perm[true] * 3 + 5, 0), pred)
    for k in ("pq", "dq", "sq", "f1", "tp", "fp", "fn"):
        assert relab[k] == pytest.approx(got[k]), k
