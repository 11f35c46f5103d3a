"""QuPath GeoJSON of nucleus instances: outlines traced on pixel edges, the FeatureCollection QuPath imports as
classified detections, and the exact way back to pixels.

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

import math
import numbers
import os
import uuid
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bundle.io import save_json
from bundle.nuclei import DEFAULT_CLASS, nuclei_table
from bundle.nuclei_metrics import as_instance_map

__all__ = ["DEFAULT_COLOR", "instance_polygons", "rasterise_geojson", "to_geojson", "write_geojson"]

DEFAULT_COLOR = (255, 0, 0)
_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "bundle.nuclei")  # kept: feature ids stay those written before
# direction codes in the (x right, y down) pixel frame: 0 = +x, 1 = +y, 2 = -x, 3 = -y
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))

Polygon = list[list[list[int]]]  # [exterior ring, *holes], each ring [[x, y], ...] closed


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
    lab = as_instance_map(instances, "instances")
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
    lab = as_instance_map(instances, "instances")
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
