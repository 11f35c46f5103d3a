"""Nuclei instance-segmentation metrics: PQ / DQ / SQ, AJI, detection F1 and count error (numpy + scipy only).

Inputs are 2D integer instance maps of the same shape: 0 is background, every other value is one nucleus; ids need
not be sequential (7 and 300 are as good as 1 and 2). For true instance ``g`` and predicted instance ``s``::

    I(g, s) = |g & s|,   U(g, s) = |g | s|,   IoU(g, s) = I / U

All pairwise intersections come from one ``np.unique`` over the (true, pred) id pairs of the foreground pixels, so the
cost is O(H*W log(H*W)) whatever the number of nuclei, and only overlapping pairs are ever stored.

Matching (``match_instances``): a pair matches when IoU > t. For t >= 0.5 a nucleus can have at most one partner with
IoU > t (two would need more than its whole area), so the matching is unique by construction; for t < 0.5 the pairs
come from a maximum-total-IoU assignment (Hungarian, ``scipy.optimize.linear_sum_assignment``), then IoU > t. This
is HoVer-Net's ``get_fast_pq`` (match_iou 0.5 by default).

Panoptic quality (Kirillov et al. 2019), with TP the matched pairs, FP the unmatched predictions, FN the unmatched
true nuclei::

    DQ = TP / (TP + FP/2 + FN/2),   SQ = sum_{(g,s) in TP} IoU(g, s) / TP,   PQ = DQ * SQ

SQ is 0 when there is no TP.

Aggregated Jaccard index (Kumar et al. 2017, as HoVer-Net's ``get_fast_aji``): every true nucleus ``g`` takes the
prediction ``s*(g)`` with the highest IoU among those overlapping it (ties: the smallest predicted id); a nucleus
that no prediction overlaps adds only its area to U::

    C = sum_g I(g, s*(g)),   U = sum_g U(g, s*(g)) + sum_{g unpaired} |g| + sum_{s not used} |s|,   AJI = C / U

"Used" follows Kumar's definition: a prediction chosen by several true nuclei is used (its area is inside each of
their pair unions), and it never enters the last term; only predictions chosen by no true nucleus do, once each.

Detection (same matching as PQ)::

    precision = TP / (TP + FP),   recall = TP / (TP + FN),   F1 = 2 TP / (2 TP + FP + FN)   (= DQ at the same threshold)

Count error: ``abs_error = |#pred - #true|``, ``rel_error = abs_error / max(#true, 1)``.

Empty conventions: both maps empty (no nucleus in either) is a perfect result, PQ = DQ = SQ = AJI = F1 = precision
= recall = 1; exactly one empty scores 0 on all of them. Any other 0/0 (precision with no prediction, recall with no
true nucleus) is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "Matching",
    "aggregated_jaccard_index",
    "count_error",
    "detection_f1",
    "match_instances",
    "nuclei_metrics",
    "panoptic_quality",
]


class Matching(NamedTuple):
    """Result of ``match_instances``: matched ``(true_id, pred_id, iou)`` pairs (by true id) and the unmatched ids."""

    pairs: list[tuple[int, int, float]]
    unmatched_true: list[int]
    unmatched_pred: list[int]


@dataclass(frozen=True)
class _Overlaps:
    """Instance ids / areas of both maps and the intersections of every overlapping (true, pred) pair."""

    true_ids: np.ndarray  # sorted non-zero ids
    pred_ids: np.ndarray
    true_areas: np.ndarray  # int64, aligned with the ids
    pred_areas: np.ndarray
    pair_t: np.ndarray  # index into true_ids of each overlapping pair
    pair_p: np.ndarray  # index into pred_ids
    inter: np.ndarray  # int64 pixel count of each pair's intersection

    @property
    def union(self) -> np.ndarray:
        """Pixel count of each pair's union."""
        return self.true_areas[self.pair_t] + self.pred_areas[self.pair_p] - self.inter

    @property
    def iou(self) -> np.ndarray:
        """IoU of each overlapping pair (all > 0)."""
        return self.inter / self.union


def as_instance_map(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` as a 2D integer array with no negative id, or ValueError."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2D instance map, got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.number) or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{name} must hold integer instance ids, got dtype {a.dtype}")
        a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has a negative instance id ({a.min()}); 0 is background, ids are >= 1")
    return a


def _ids_and_index(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted non-zero ids, per-pixel index into them (-1 on background) and the area of each id."""
    ids, inv, counts = np.unique(a.ravel(), return_inverse=True, return_counts=True)
    inv = inv.ravel().astype(np.int64)
    if ids.size and ids[0] == 0:
        ids, counts, inv = ids[1:], counts[1:], inv - 1
    return ids, inv, counts.astype(np.int64)


def _overlaps(true: np.ndarray, pred: np.ndarray) -> _Overlaps:
    """Validate both maps and histogram the (true, pred) id pairs of the pixels where both are foreground."""
    true, pred = as_instance_map(true, "true"), as_instance_map(pred, "pred")
    if true.shape != pred.shape:
        raise ValueError(f"true and pred shapes differ: true {true.shape} vs pred {pred.shape}")
    t_ids, t_idx, t_area = _ids_and_index(true)
    p_ids, p_idx, p_area = _ids_and_index(pred)
    fg = (t_idx >= 0) & (p_idx >= 0)
    m = max(len(p_ids), 1)
    codes, inter = np.unique(t_idx[fg] * m + p_idx[fg], return_counts=True)
    return _Overlaps(t_ids, p_ids, t_area, p_area, codes // m, codes % m, inter.astype(np.int64))


def _match(ov: _Overlaps, iou_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched pairs as (true index, pred index, IoU) arrays, sorted by true index."""
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    iou = ov.iou
    if iou_threshold >= 0.5:  # unique by construction
        keep = iou > iou_threshold
        t, p, v = ov.pair_t[keep], ov.pair_p[keep], iou[keep]
    elif iou.size:  # maximum-total-IoU assignment over the instances that overlap anything
        tu, t_loc = np.unique(ov.pair_t, return_inverse=True)
        pu, p_loc = np.unique(ov.pair_p, return_inverse=True)
        mat = np.zeros((len(tu), len(pu)))
        mat[t_loc, p_loc] = iou
        r, c = linear_sum_assignment(mat, maximize=True)
        v = mat[r, c]
        keep = v > iou_threshold
        t, p, v = tu[r[keep]], pu[c[keep]], v[keep]
    else:
        t = p = np.zeros(0, np.int64)
        v = np.zeros(0)
    order = np.argsort(t, kind="stable")
    return t[order], p[order], v[order]


def _counts(ov: _Overlaps, iou_threshold: float) -> tuple[int, int, int, np.ndarray]:
    """TP, FP, FN and the IoUs of the matched pairs."""
    t, _, v = _match(ov, iou_threshold)
    tp = len(t)
    return tp, len(ov.pred_ids) - tp, len(ov.true_ids) - tp, v


def _pq(ov: _Overlaps, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """``panoptic_quality`` on precomputed overlaps."""
    tp, fp, fn, v = _counts(ov, iou_threshold)
    if tp + fp + fn == 0:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(v.sum()) / tp if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def _aji(ov: _Overlaps) -> float:
    """``aggregated_jaccard_index`` on precomputed overlaps."""
    if len(ov.true_ids) == 0 and len(ov.pred_ids) == 0:
        return 1.0
    inter, union, iou = ov.inter, ov.union, ov.iou
    # per true nucleus, its overlapping pair of highest IoU (ties: smallest pred id)
    order = np.lexsort((ov.pair_p, -iou, ov.pair_t))
    pt = ov.pair_t[order]
    best = order[np.r_[True, pt[1:] != pt[:-1]]] if order.size else order
    c = int(inter[best].sum())
    u = int(union[best].sum())
    u += int(ov.true_areas.sum() - ov.true_areas[ov.pair_t[best]].sum())  # unpaired true nuclei
    u += int(ov.pred_areas.sum() - ov.pred_areas[np.unique(ov.pair_p[best])].sum())  # unused predictions, once each
    return c / u if u else 1.0


def _f1(ov: _Overlaps, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """``detection_f1`` on precomputed overlaps."""
    tp, fp, fn, _ = _counts(ov, iou_threshold)
    if tp + fp + fn == 0:
        return {"f1": 1.0, "precision": 1.0, "recall": 1.0, "tp": 0, "fp": 0, "fn": 0}
    return {
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _count(ov: _Overlaps) -> dict[str, float | int]:
    """``count_error`` on precomputed overlaps."""
    nt, npred = len(ov.true_ids), len(ov.pred_ids)
    err = abs(npred - nt)
    return {"true_count": nt, "pred_count": npred, "abs_error": err, "rel_error": err / max(nt, 1)}


def match_instances(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """Match true and predicted nuclei on IoU > ``iou_threshold`` (unique for >= 0.5, Hungarian below).

    Returns ``Matching(pairs, unmatched_true, unmatched_pred)``: ``pairs`` lists ``(true_id, pred_id, iou)`` by
    true id, the others list the sorted ids left without a partner.
    """
    ov = _overlaps(true, pred)
    t, p, v = _match(ov, iou_threshold)
    pairs = [(int(ov.true_ids[i]), int(ov.pred_ids[j]), float(x)) for i, j, x in zip(t, p, v)]
    un_t = np.delete(ov.true_ids, t).tolist()
    un_p = np.delete(ov.pred_ids, p).tolist()
    return Matching(pairs, [int(i) for i in un_t], [int(i) for i in un_p])


def panoptic_quality(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """PQ, DQ, SQ (IoU > 0.5 matching) with TP / FP / FN: keys ``pq, dq, sq, tp, fp, fn``.

    Both maps empty: pq = dq = sq = 1; exactly one empty: 0.
    """
    return _pq(_overlaps(true, pred))


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI (Kumar et al. 2017, HoVer-Net ``get_fast_aji``); a prediction used by several nuclei adds no extra U term.

    Both maps empty: 1; exactly one empty: 0.
    """
    return _aji(_overlaps(true, pred))


def detection_f1(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float | int]:
    """Detection F1 / precision / recall on IoU > ``iou_threshold`` matching: keys ``f1, precision, recall, tp, fp,
    fn``.

    Both maps empty: all three 1.0.
    """
    return _f1(_overlaps(true, pred), iou_threshold)


def count_error(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """Nucleus counts and their error: keys ``true_count, pred_count, abs_error, rel_error`` (abs / max(true, 1))."""
    return _count(_overlaps(true, pred))


def nuclei_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, float | int]:
    """All of the above in one flat dict (one overlap histogram): ``pq, dq, sq, aji, f1, precision, recall, tp, fp,
    fn, true_count, pred_count, count_abs_error, count_rel_error``."""
    ov = _overlaps(true, pred)
    out: dict[str, float | int] = {**_pq(ov), "aji": _aji(ov), **_f1(ov)}
    c = _count(ov)
    out.update(true_count=c["true_count"], pred_count=c["pred_count"])
    out.update(count_abs_error=c["abs_error"], count_rel_error=c["rel_error"])
    return out
