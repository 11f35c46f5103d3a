"""Seeded splits by source (image or patient) and nested training fractions.

Rules (docs/data.md):

- validation / test by source: the sorted unique sources are permuted once with ``numpy.random.default_rng(seed)``;
  the first ``round(fraction * n)`` go to the held-out split. Every item of a source lands in the same split.
- training fractions: the training entries, sorted by image path, are permuted once with
  ``default_rng(seed)``; an entry of permutation rank r belongs to the p % subset iff ``r < ceil(n * p / 100)``
  (at least one entry). The subsets are prefixes of one permutation, so 10 % ⊂ 20 % ⊂ 30 % ⊂ 100 % by
  construction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

FRACTIONS = (10, 20, 30, 100)


def partition_sources(sources: Iterable[str], fractions: dict[str, float], seed: int = 0) -> dict[str, list[str]]:
    """Sorted unique ``sources`` -> {name: sources} for each held-out split in ``fractions`` plus ``training``.

    One seeded permutation; the held-out splits take consecutive ``round(fraction * n)`` blocks of it in the
    order given, ``training`` keeps the rest.
    """
    unique = sorted(set(sources))
    for name, fraction in fractions.items():
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1), got {fraction}")
    if sum(fractions.values()) >= 1.0:
        raise ValueError(f"held-out fractions {fractions} leave nothing for training")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    out, start = {}, 0
    for name, fraction in fractions.items():
        n = int(round(fraction * len(unique)))
        out[name] = sorted(order[start : start + n])
        start += n
    out["training"] = sorted(order[start:])
    return out


def split_sources(sources: Iterable[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Sorted unique ``sources`` -> (kept, held_out); held_out is a seeded ``round(fraction * n)`` of them."""
    parts = partition_sources(sources, {"held_out": fraction}, seed)
    return parts["training"], parts["held_out"]


def subset_sizes(n: int, fractions: Sequence[int] = FRACTIONS) -> dict[int, int]:
    """Number of entries in each percentage subset of ``n`` training entries."""
    return {p: (min(n, max(1, math.ceil(n * p / 100))) if n else 0) for p in fractions}


def assign_subsets(entries: list[dict], seed: int = 0, fractions: Sequence[int] = FRACTIONS) -> list[dict]:
    """Set ``entry['subsets']`` (the percentages whose subset holds the entry) on every training entry, in place."""
    for p in fractions:
        if not 0 < p <= 100:
            raise ValueError(f"training fraction must be in (0, 100], got {p}")
    if 100 not in fractions:
        raise ValueError(f"training fractions must include 100, got {list(fractions)}")
    order = sorted(range(len(entries)), key=lambda i: entries[i]["image"])
    perm = np.random.default_rng(seed).permutation(len(entries))
    sizes = subset_sizes(len(entries), fractions)
    for rank, k in enumerate(perm):
        entries[order[k]]["subsets"] = [p for p in sorted(fractions) if rank < sizes[p]]
    return entries
