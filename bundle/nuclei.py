"""Nucleus instances from a predicted probability map: watershed split, a per-nucleus table, counts and the CSV.

Method (:func:`split_instances`), the standard distance-transform watershed:

* ``mask = prob > threshold``; 4-connected components with fewer than ``min_size`` pixels are removed;
* ``D = G_sigma * EDT(mask)``: the Euclidean distance of every foreground pixel to the nearest background pixel
  (``scipy.ndimage.distance_transform_edt``), smoothed by a Gaussian with ``sigma = 1`` pixel so that a ragged
  outline does not create spurious ridge peaks;
* markers: the local maxima of ``D`` (``skimage.feature.peak_local_max``, at least ``min_distance`` pixels apart,
  found per connected component), adjacent peak pixels merged into one marker; a component without a peak gets
  one at its maximum of ``D``, so every component becomes at least one nucleus;
* instances: ``watershed(-D, markers, mask=mask, compactness=compactness)`` (4-connected flooding), relabelled
  ``1..N`` in raster order of the markers. Two touching discs give two maxima of ``D`` (one per centre) and
  are cut along the neck, where ``D`` is lowest.

Table (:func:`nuclei_table`), for instance ``i`` with pixel set ``P_i`` (pixel centres at integer coordinates,
``x`` the column, ``y`` the row): ``area = |P_i|``, ``centroid_x = sum(c) / |P_i|``, ``centroid_y = sum(r) / |P_i|``,
``mean_prob = sum(prob[r, c]) / |P_i|`` (NaN read as 0), all from ``np.bincount`` over the label image.

Outlines and QuPath GeoJSON: :mod:`bundle.qupath`.
"""

from __future__ import annotations

import csv
import numbers
import os
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed

from bundle.nuclei_metrics import as_instance_map
from bundle.io import atomic_write

__all__ = ["CSV_FIELDS", "DEFAULT_CLASS", "counts", "nuclei_table", "split_instances", "write_nuclei_csv"]

CSV_FIELDS = ("id", "centroid_x", "centroid_y", "area", "mean_prob", "class_name")
DEFAULT_CLASS = "Nucleus"
_SMOOTH_SIGMA = 1.0



def _as_prob(prob: Any) -> np.ndarray:
    """``prob`` as a finite float 2-D array; bool / integer arrays are masks (nonzero -> 1.0)."""
    a = np.asarray(prob)
    if a.ndim != 2:
        raise ValueError(f"prob must be a 2-D (H, W) array, got shape {a.shape}")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return (a != 0).astype(np.float32)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"prob must be a float, bool or integer array, got dtype {a.dtype}")
    return np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)


def _as_instances(instances: Any) -> np.ndarray:
    """``instances`` as a non-negative integer 2-D label array (0 = background): the one check of
    :func:`bundle.nuclei_metrics.as_instance_map`."""
    return as_instance_map(instances, "instances")


def split_instances(prob: Any, threshold: float = 0.5, min_distance: int = 3, min_size: int = 8,
                    footprint: np.ndarray | None = None, compactness: float = 0.0) -> np.ndarray:
    """Nucleus instances (int32 (H, W), 0 = background, ids ``1..N``) from a probability map in [0, 1].

    Distance-transform watershed (module docstring): ``prob > threshold``, components under ``min_size`` pixels
    dropped, markers at the peaks of the smoothed distance transform at least ``min_distance`` apart
    (``footprint`` and ``compactness`` go to ``peak_local_max`` and ``watershed``). A bool / integer ``prob`` is
    a mask (nonzero = foreground). An empty mask gives an all-zero image.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if isinstance(min_distance, bool) or not isinstance(min_distance, numbers.Integral) or min_distance < 1:
        raise ValueError(f"min_distance must be an integer >= 1, got {min_distance!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if not isinstance(compactness, numbers.Real) or not compactness >= 0:
        raise ValueError(f"compactness must be >= 0, got {compactness!r}")
    p = _as_prob(prob)
    comps, n = ndi.label(p > threshold)
    if n and min_size > 1:
        keep = np.bincount(comps.ravel()) >= min_size
        keep[0] = False
        comps, n = ndi.label(keep[comps])
    if n == 0:
        return np.zeros(p.shape, np.int32)
    mask = comps > 0
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(mask), _SMOOTH_SIGMA) * mask
    peaks = peak_local_max(dist, min_distance=int(min_distance), footprint=footprint, labels=comps,
                           exclude_border=False)
    marker_mask = np.zeros(mask.shape, bool)
    marker_mask[tuple(peaks.T)] = True
    markers, n_markers = ndi.label(marker_mask)
    has = np.zeros(n + 1, bool)
    has[comps[marker_mask]] = True
    missing = np.flatnonzero(~has[1:]) + 1
    if missing.size:
        for k, pos in enumerate(ndi.maximum_position(dist, comps, index=missing), start=n_markers + 1):
            markers[pos] = k
    labels = watershed(-dist, markers, mask=mask, compactness=float(compactness))
    return relabel_sequential(labels)[0].astype(np.int32)


def _stats(lab: np.ndarray, prob: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Present ids, areas, sums of columns, rows and (if given) prob per id, via ``np.bincount``."""
    flat = lab.ravel()
    h, w = lab.shape
    if flat.size == 0 or flat.max() == 0:
        return (np.zeros(0, np.int64),) * 5
    if flat.max() <= flat.size:
        index = flat
    else:  # sparse huge ids: compact them first
        uniq, index = np.unique(flat, return_inverse=True)
    cols = np.tile(np.arange(w, dtype=np.float64), h)
    rows = np.repeat(np.arange(h, dtype=np.float64), w)
    area = np.bincount(index)
    sx, sy = np.bincount(index, weights=cols), np.bincount(index, weights=rows)
    sp = np.bincount(index, weights=prob.ravel().astype(np.float64)) if prob is not None else np.zeros_like(sx)
    ids = np.arange(area.size) if index is flat else uniq
    sel = (area > 0) & (ids > 0)
    return ids[sel], area[sel], sx[sel], sy[sel], sp[sel]


def nuclei_table(instances: Any, prob: Any | None = None, class_name: str | None = None) -> list[dict[str, Any]]:
    """One row per nucleus, in id order: ``{"id", "centroid_x", "centroid_y", "area", "mean_prob", "class_name"}``.

    Centroids are in pixels with pixel centres at integer coordinates (x = column, y = row), ``area`` in pixels,
    ``mean_prob`` the mean of ``prob`` over the nucleus (NaN read as 0; ``""`` without ``prob``), ``class_name``
    ``class_name`` or ``"Nucleus"``.
    """
    lab = _as_instances(instances)
    p = None
    if prob is not None:
        p = _as_prob(prob)
        if p.shape != lab.shape:
            raise ValueError(f"prob shape {p.shape} differs from instances shape {lab.shape}")
    name = class_name or DEFAULT_CLASS
    ids, area, sx, sy, sp = _stats(lab, p)
    return [{"id": int(i), "centroid_x": float(x / a), "centroid_y": float(y / a), "area": int(a),
             "mean_prob": float(s / a) if p is not None else "", "class_name": name}
            for i, a, x, y, s in zip(ids, area, sx, sy, sp)]


def counts(instances: Any, class_name: str | None = None) -> dict[str, Any]:
    """``{"n_nuclei": N, "class_name": class_name or "Nucleus", "total_area": pixels in nuclei}``."""
    lab = _as_instances(instances)
    return {"n_nuclei": int(np.unique(lab[lab > 0]).size), "class_name": class_name or DEFAULT_CLASS,
            "total_area": int(np.count_nonzero(lab))}


def write_nuclei_csv(table: list[dict[str, Any]], path: str | os.PathLike) -> str:
    """Write ``table`` (:func:`nuclei_table` rows) as UTF-8 CSV with header ``id,centroid_x,centroid_y,area,
    mean_prob,class_name`` atomically; returns ``path``."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(table)
    return os.fspath(path)
