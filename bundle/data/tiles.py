"""Cutting a prepared image and its label into tiles (docs/DATA_CONTRACT.md), for the importers that tile
(``bundle.data.consep``, ``bundle.data.folder``).

- Offsets: ``tile_size`` squares at ``stride`` steps plus a last tile flush with the border; ``stride=None`` spreads
  the fewest tiles evenly (1000 px, tile 256 -> offsets 0, 248, 496, 744).
- Each tile's instances are renumbered 1..n; nuclei cut by the tile border keep their visible part. Tiles without a
  nucleus are skipped and counted (unless ``keep_empty``). A cut image's tiles are named ``<stem>_<k:03d>`` and
  record ``tile: [y, x]``.
"""

from __future__ import annotations

import numpy as np

from bundle.tiling import tile_offsets  # noqa: F401  (the one tiling of the bundle; importers name it here)

from .instances import instance_label, relabel_sequential


def write_tiles(writer, split: str, stem: str, image: np.ndarray, label: np.ndarray, tile_size: int,
                stride: int | None = None, source: str | None = None, keep_empty: bool = False, where=None,
                **fields) -> None:
    """Cut ``image`` (H, W[, 3]) and its ``label`` (2, H, W: instances, classes) into tiles and add them to
    ``writer`` (a :class:`~bundle.data.writer.DatasetWriter`) in ``split`` (module docstring). Entries hold
    ``source`` (default ``stem``), ``n_nuclei``, ``tile`` when cut, then ``fields``. An image side shorter than
    ``tile_size`` is a ``ValueError`` naming ``where`` (default ``stem``)."""
    try:
        ys = tile_offsets(image.shape[0], tile_size, stride)
        xs = tile_offsets(image.shape[1], tile_size, stride)
    except ValueError as e:
        raise ValueError(f"{where or stem}: {e}") from e
    tiled = len(ys) * len(xs) > 1
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        crop = label[:, y : y + tile_size, x : x + tile_size]
        local, old = relabel_sequential(crop[0])
        if len(old) == 0 and not keep_empty:
            writer.skip("no nucleus")
            continue
        classes = np.zeros(len(old), np.int32)
        classes[local[local > 0] - 1] = crop[1][local > 0]
        extra = {"tile": [y, x]} if tiled else {}
        tile = np.ascontiguousarray(image[y : y + tile_size, x : x + tile_size])
        writer.add(split, f"{stem}_{k:03d}" if tiled else stem, tile, instance_label(local, classes),
                   source=source or stem, n_nuclei=len(old), **extra, **fields)
