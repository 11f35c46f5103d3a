"""Nucleus instances from a predicted probability map: watershed split, a per-nucleus table, counts, and QuPath
GeoJSON (detections) with an exact polygon <-> pixel round trip.

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

Outlines (:func:`instance_polygons`) follow PIXEL EDGES with vertices on pixel corners, QuPath's convention:
pixel ``(r, c)`` covers ``x in [c, c+1]``, ``y in [r, r+1]``, so its centre is ``(c + 0.5, r + 0.5)`` (half a pixel
off the table's centroid convention). Each instance is split into its 4-connected parts, one polygon each (a
MultiPolygon when there are several): pixels touching only at a corner are separate parts, i.e. separate
polygons of the MultiPolygon that share that corner point. Within a part, a corner where the part's own pixels
meet diagonally (around a hole, or a ring closed by a diagonal step) is passed so that the part stays connected
there: the hole becomes an interior ring touching the exterior (or another hole) at that single point, which
keeps every ring simple (OGC/JTS-valid). Exterior rings have positive shoelace area ``1/2 sum(x_i y_(i+1) -
x_(i+1) y_i)`` in the numeric coordinates (RFC 7946's right-hand rule; clockwise as seen on screen, where y
points down), holes negative; QuPath/JTS accept either orientation on import. Collinear vertices are merged and
every ring is closed (first vertex == last). :func:`rasterise_geojson` applies the pixel-centre rule (a pixel
belongs to a feature when its centre lies inside by the even-odd rule over all the feature's rings), which
reproduces every instance exactly.

GeoJSON (:func:`to_geojson`) is the FeatureCollection QuPath 0.4/0.5 imports as detections: per nucleus
``{"type": "Feature", "id": <uuid5 of the nucleus id>, "geometry": Polygon|MultiPolygon, "properties":
{"objectType": "detection", "classification": {"name", "color": [r, g, b]}, "measurements": {"area",
"mean_prob"}, "nucleus_id": id}}``.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import uuid
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed

from bundle.nuclei_metrics import as_instance_map
from bundle.io import atomic_write, save_json

__all__ = ["CSV_FIELDS", "DEFAULT_CLASS", "DEFAULT_COLOR", "counts", "instance_polygons", "nuclei_table",
           "rasterise_geojson", "split_instances", "to_geojson", "write_geojson", "write_nuclei_csv"]

CSV_FIELDS = ("id", "centroid_x", "centroid_y", "area", "mean_prob", "class_name")
DEFAULT_CLASS = "Nucleus"
DEFAULT_COLOR = (255, 0, 0)
_SMOOTH_SIGMA = 1.0
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "bundle.nuclei")
# direction codes in the (x right, y down) pixel frame: 0 = +x, 1 = +y, 2 = -x, 3 = -y
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))

Polygon = list[list[list[int]]]  # [exterior ring, *holes], each ring [[x, y], ...] closed


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


def _trace_rings(part: np.ndarray) -> list[list[list[int]]]:
    """The closed boundary rings of the 4-connected bool ``part`` along pixel edges, in local corner coordinates.

    Every boundary edge is directed with the pixel on its left in the (x, y) plane (top edges +x, right edges +y,
    bottom edges -x, left edges -y), so exteriors get positive shoelace area and holes negative. At a corner where
    two part pixels meet diagonally (two edges in, two out) the ring turns right, keeping the pixels connected.
    """
    p = np.pad(part, 1)
    out: dict[tuple[int, int], list[int]] = {}
    edges = (p[1:, 1:-1] & ~p[:-1, 1:-1],  # +x: top edge of pixel (y, x), from (x, y)
             p[1:-1, :-1] & ~p[1:-1, 1:],  # +y: right edge of pixel (y, x-1), from (x, y)
             p[:-1, 1:-1] & ~p[1:, 1:-1],  # -x: bottom edge of pixel (y-1, x), from (x+1, y)
             p[1:-1, 1:] & ~p[1:-1, :-1])  # -y: left edge of pixel (y, x), from (x, y+1)
    offsets = ((0, 0), (0, 0), (1, 0), (0, 1))
    for d, (arr, (ox, oy)) in enumerate(zip(edges, offsets)):
        for y, x in zip(*np.nonzero(arr)):
            out.setdefault((int(x) + ox, int(y) + oy), []).append(d)
    rings, seen = [], set()
    for y, x in zip(*np.nonzero(edges[0])):
        start = (int(x), int(y))
        if start in seen:
            continue
        seen.add(start)
        ring: list[list[int]] = []
        v, d = start, 0
        while True:
            v = (v[0] + _STEP[d][0], v[1] + _STEP[d][1])
            outs = out[v]
            o = outs[0] if len(outs) == 1 else (d + 3) % 4
            if o != d:
                ring.append([v[0], v[1]])
            if v == start and o == 0:
                break
            if o == 0:
                seen.add(v)
            d = o
        if ring[-1] == [start[0], start[1]]:  # start on the first corner (top-left for exteriors)
            ring.insert(0, ring.pop())
        ring.append(list(ring[0]))
        rings.append(ring)
    return rings


def _area2(ring: list[list[int]]) -> float:
    """Twice the signed shoelace area of a closed ring."""
    return float(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:])))


def instance_polygons(instances: Any) -> dict[int, list[Polygon]]:
    """``{id: [polygon, ...]}``: each instance's outline along pixel edges, one polygon per 4-connected part.

    A polygon is ``[exterior, *holes]``, a ring a closed list of integer ``[x, y]`` pixel corners (pixel ``(r, c)``
    covers ``[c, c+1] x [r, r+1]``) with collinear vertices merged; exteriors have positive shoelace area, holes
    negative. Parts touching only at a corner are separate polygons; see the module docstring for the diagonal
    rule. Rasterising with the pixel-centre rule returns exactly the instance's pixels.
    """
    lab = _as_instances(instances)
    result: dict[int, list[Polygon]] = {}
    if lab.size == 0 or lab.max() == 0:
        return result
    ids = np.unique(lab[lab > 0])
    if ids[-1] <= lab.size:
        slices = ndi.find_objects(lab)
        boxes = [(int(i), slices[i - 1]) for i in ids]
    else:
        compact = np.searchsorted(ids, lab) + 1
        compact[lab == 0] = 0
        boxes = [(int(i), s) for i, s in zip(ids, ndi.find_objects(compact))]
    for i, sl in boxes:
        crop = lab[sl] == i
        r0, c0 = sl[0].start, sl[1].start
        parts, n = ndi.label(crop)
        polygons = []
        for k, psl in enumerate(ndi.find_objects(parts), start=1):
            rings = _trace_rings(parts[psl] == k)
            dx, dy = c0 + psl[1].start, r0 + psl[0].start
            rings = [[[x + dx, y + dy] for x, y in ring] for ring in rings]
            rings.sort(key=_area2, reverse=True)  # the one positive (exterior) ring first
            polygons.append(rings)
        result[i] = polygons
    return result


def _color(color: Any) -> list[int]:
    """``color`` as ``[r, g, b]`` ints in 0..255."""
    c = DEFAULT_COLOR if color is None else color
    try:
        rgb = [int(v) for v in c]
    except (TypeError, ValueError):
        raise ValueError(f"color must be three integers 0..255, got {color!r}") from None
    if len(rgb) != 3 or any(v < 0 or v > 255 for v in rgb) or any(float(v) != float(u) for v, u in zip(rgb, c)):
        raise ValueError(f"color must be three integers 0..255, got {color!r}")
    return rgb


def _number(value: Any) -> float | int | None:
    """A finite JSON number or None (for measurements)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def to_geojson(instances: Any, table: list[dict[str, Any]] | None = None, class_name: str | None = None,
               color: Any = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the nuclei that QuPath (0.4/0.5) imports as detection objects.

    One Feature per id, in id order: ``"id"`` a UUID5 of the nucleus id (deterministic), ``"geometry"`` a
    Polygon (one 4-connected part) or MultiPolygon (:func:`instance_polygons` rings), ``"properties"``:
    ``objectType "detection"``, ``classification {"name": class_name or the table row's class_name or
    "Nucleus", "color": [r, g, b]}`` (``color`` default red), ``measurements`` (``area`` and, when numeric,
    ``mean_prob`` from ``table``; without ``table`` from :func:`nuclei_table`) and ``nucleus_id``.
    """
    lab = _as_instances(instances)
    rgb = _color(color)
    rows = {int(row["id"]): row for row in (table if table is not None else nuclei_table(lab))}
    features = []
    for i, polygons in instance_polygons(lab).items():
        row = rows.get(i, {})
        measurements = {}
        for key in ("area", "mean_prob"):
            value = _number(row.get(key))
            if value is not None:
                measurements[key] = value
        if "area" not in measurements:
            measurements["area"] = int(np.count_nonzero(lab == i))
        geometry = ({"type": "Polygon", "coordinates": polygons[0]} if len(polygons) == 1
                    else {"type": "MultiPolygon", "coordinates": polygons})
        name = class_name or row.get("class_name") or DEFAULT_CLASS
        features.append({"type": "Feature", "id": str(uuid.uuid5(_UUID_NAMESPACE, f"nucleus/{i}")),
                         "geometry": geometry,
                         "properties": {"objectType": "detection",
                                        "classification": {"name": str(name), "color": list(rgb)},
                                        "measurements": measurements, "nucleus_id": i}})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(collection: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``collection`` as compact strict JSON (UTF-8) atomically; returns ``path``."""
    return save_json(collection, path, indent=None, allow_nan=False)


def _feature_rings(geometry: dict[str, Any]) -> list[np.ndarray]:
    """All rings of a Polygon / MultiPolygon geometry as (n, 2) float arrays."""
    kind, coords = geometry.get("type"), geometry.get("coordinates", [])
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        polys = coords
    else:
        raise ValueError(f"expected a Polygon or MultiPolygon geometry, got {kind!r}")
    return [np.asarray(ring, np.float64).reshape(-1, 2) for poly in polys for ring in poly if len(ring)]


def rasterise_geojson(collection: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    """An int32 ``shape`` instance image from a FeatureCollection (features in order, later ones on top).

    Pixel ``(r, c)`` gets a feature's ``properties.nucleus_id`` (its 1-based position without one) when its
    centre ``(c + 0.5, r + 0.5)`` is inside the feature by the even-odd rule over all its rings (holes
    excluded); a centre exactly on an edge counts as inside to its right.
    """
    h, w = (int(s) for s in shape)
    out = np.zeros((h, w), np.int32)
    for n, feature in enumerate(collection.get("features", []), start=1):
        rings = _feature_rings(feature.get("geometry") or {})
        if not rings:
            continue
        nid = int((feature.get("properties") or {}).get("nucleus_id", n))
        pts = np.concatenate(rings)
        x0, x1 = max(0, math.floor(pts[:, 0].min())), min(w, math.ceil(pts[:, 0].max()))
        y0, y1 = max(0, math.floor(pts[:, 1].min())), min(h, math.ceil(pts[:, 1].max()))
        if x0 >= x1 or y0 >= y1:
            continue
        a = np.concatenate([ring[:-1] for ring in rings if len(ring) > 1])
        b = np.concatenate([ring[1:] for ring in rings if len(ring) > 1])
        keep = a[:, 1] != b[:, 1]
        a, b = a[keep], b[keep]
        lo, hi = np.minimum(a[:, 1], b[:, 1]), np.maximum(a[:, 1], b[:, 1])
        r_start = np.clip(np.ceil(lo - 0.5).astype(np.int64), y0, y1)  # rows with lo <= r + 0.5 < hi
        r_stop = np.clip(np.ceil(hi - 0.5).astype(np.int64), y0, y1)
        n_rows = np.maximum(r_stop - r_start, 0)
        edge = np.repeat(np.arange(a.shape[0]), n_rows)
        rows = r_start[edge] + np.arange(edge.size) - np.repeat(np.cumsum(n_rows) - n_rows, n_rows)
        yc = rows + 0.5
        xa, ya, xb, yb = a[edge, 0], a[edge, 1], b[edge, 0], b[edge, 1]
        xc = xa + (yc - ya) * (xb - xa) / (yb - ya)
        cols = np.clip(np.ceil(xc - 0.5).astype(np.int64), x0, x1)  # pixels with c + 0.5 >= crossing
        toggles = np.zeros((y1 - y0, x1 - x0 + 1), np.int64)
        np.add.at(toggles, (rows - y0, cols - x0), 1)
        inside = (np.cumsum(toggles, axis=1)[:, :-1] % 2).astype(bool)
        out[y0:y1, x0:x1][inside] = nid
    return out
