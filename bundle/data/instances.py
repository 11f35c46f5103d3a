"""Instance maps: sequential relabelling and the (2, H, W) instance + class label of docs/DATA_CONTRACT.md."""

from __future__ import annotations

import numpy as np


def relabel_sequential(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance map -> (map with ids 1..n in ascending order of the old ids, the old ids (n,))."""
    old = np.unique(inst)
    old = old[old != 0]
    new = np.zeros(inst.shape, dtype=np.int32)
    mask = inst != 0
    new[mask] = np.searchsorted(old, inst[mask]) + 1
    return new, old


def instance_label(inst: np.ndarray, inst_class: np.ndarray) -> np.ndarray:
    """Sequential instance map (ids 1..n) and class of each instance ((n,), class of id i+1) -> (2, H, W) int32."""
    inst = np.asarray(inst, dtype=np.int32)
    lut = np.concatenate([[0], np.asarray(inst_class, dtype=np.int32)])
    if inst.max(initial=0) >= len(lut):
        raise ValueError(f"instance id {inst.max()} has no class (only {len(lut) - 1} classes given)")
    return np.stack([inst, lut[inst]]).astype(np.int32)
