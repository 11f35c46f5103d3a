"""Point prompts drawn from a target mask: the training prompt sets of SAMPO's preference mining, the fixed
evaluation prompts of METHOD.md, and the single-object prompts of SAM's own objective (pretraining the base).

Training: each sample gets N prompt sets whose quality varies on purpose, so the masks they produce differ and
preference pairs can be mined. A set draws 1..max_pos positives and 0..max_neg negatives, and has one value of
each of three qualities:

* ``interior``: positives in the top half of the distance-to-edge within a target instance, or on the edge;
* ``many``: positives spread over distinct instances (at least 2 where possible), or all on one instance;
* ``hard``: negatives on look-alike non-targets (T2: nuclei of other classes; organ: other organs; T1: the
  background band hugging the nuclei), or on plain background.

Within one sample each quality takes both values as evenly as N allows (shuffled), so any two samples' sets span
good and poor prompts alike: the sets really differ, not only by chance.

Single-object prompts (:func:`single_object_prompts`): K objects of an instance map (nuclei; CT organs), drawn
without replacement among those of at least ``min_area`` pixels, each with 1..max_clicks interior positives (the
``interior`` source above); the target of a prompt is that object only.

Points are (x, y) pixel coordinates; unused slots carry label -1 (SAM's "not a point").
"""

from __future__ import annotations

import zlib

import numpy as np
from scipy import ndimage

from bundle.guidance import PAD_LABEL


def _edge(inst: np.ndarray) -> np.ndarray:
    """Pixels of an instance map that touch another id (4-neighbourhood), background excluded."""
    edge = np.zeros(inst.shape, bool)
    edge[:-1] |= inst[:-1] != inst[1:]
    edge[1:] |= inst[1:] != inst[:-1]
    edge[:, :-1] |= inst[:, :-1] != inst[:, 1:]
    edge[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    return edge & (inst > 0)


def _pick(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    i = rng.integers(len(ys))
    return float(xs[i]), float(ys[i])


class PromptSampler:
    """Prompt sources of one sample, precomputed once, from which any number of prompt sets are drawn.

    Args:
        target: (H, W) bool target mask G.
        target_inst: (H, W) int instance ids of the target objects (0 elsewhere).
        lookalike: (H, W) bool non-target objects that resemble targets (hard negatives).
    """

    def __init__(self, target: np.ndarray, target_inst: np.ndarray, lookalike: np.ndarray) -> None:
        self.target = target.astype(bool)
        self.inst = np.where(self.target, target_inst, 0)
        if self.target.any() and not self.inst.any():  # targets without instance ids (e.g. a plain organ mask): one instance
            self.inst = self.target.astype(np.int32)
        self.ids = np.unique(self.inst[self.inst > 0])
        self.depth = ndimage.distance_transform_edt(self.inst * ~_edge(self.inst) > 0)
        self.lookalike = lookalike.astype(bool) & ~self.target
        self.background = ~self.target & ~self.lookalike
        if not self.background.any():
            self.background = ~self.target

    def positive(self, instance: int, interior: bool, rng: np.random.Generator):
        region = self.inst == instance
        depth = self.depth[region]
        if interior:
            choice = region & (self.depth >= max(depth.max() / 2.0, 1.0))
        else:
            choice = region & (self.depth <= 1.0)
        return _pick(choice if choice.any() else region, rng)

    def negative(self, hard: bool, rng: np.random.Generator):
        source = self.lookalike if hard and self.lookalike.any() else self.background
        return _pick(source, rng) or _pick(~self.target, rng)

    def prompt_set(self, rng: np.random.Generator, max_pos: int = 3, max_neg: int = 3, interior: bool = True,
                   many: bool = False, hard: bool = False):
        """One prompt set of random size with the given qualities: (max_pos + max_neg, 2) points and labels.

        With an empty target (it can vanish when a tiny nucleus is resized away) the set has negatives only.
        """
        spread = many and len(self.ids) > 1 and max_pos > 1
        n_pos = int(rng.integers(2 if spread else 1, max_pos + 1)) if len(self.ids) else 0
        n_neg = int(rng.integers(0 if n_pos else 1, max_neg + 1))
        if n_pos == 0:
            instances = []
        elif spread:  # distinct instances where there are enough
            instances = rng.choice(self.ids, size=n_pos, replace=len(self.ids) < n_pos)
        else:
            instances = np.repeat(rng.choice(self.ids), n_pos)
        points = [self.positive(int(i), interior, rng) for i in instances]
        labels = [1] * n_pos
        for _ in range(n_neg):
            point = self.negative(hard, rng)
            if point is not None:
                points.append(point)
                labels.append(0)
        return _pad(points, labels, max_pos + max_neg)

    @staticmethod
    def qualities(n_sets: int, rng: np.random.Generator) -> list[dict[str, bool]]:
        """The qualities of ``n_sets`` sets: each of ``interior``, ``many``, ``hard`` half true, half false,
        independently shuffled (an odd set out is drawn at random)."""
        columns = {}
        for name in ("interior", "many", "hard"):
            values = np.arange(n_sets) % 2 == 0
            if n_sets % 2:
                values[-1] = rng.uniform() < 0.5
            columns[name] = rng.permutation(values)
        return [{name: bool(columns[name][k]) for name in columns} for k in range(n_sets)]

    def prompt_sets(self, n_sets: int, rng: np.random.Generator, max_pos: int = 3, max_neg: int = 3):
        """``n_sets`` prompt sets of balanced qualities: points (n_sets, P, 2) float32 and labels (n_sets, P)."""
        sets = [self.prompt_set(rng, max_pos, max_neg, **q) for q in self.qualities(n_sets, rng)]
        return np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets])


def _pad(points: list, labels: list, size: int):
    out_p = np.zeros((size, 2), np.float32)
    out_l = np.full((size,), PAD_LABEL, np.int64)
    if points:
        out_p[: len(points)] = np.asarray(points, np.float32)
        out_l[: len(labels)] = labels
    return out_p, out_l


def single_object_prompts(inst: np.ndarray, n_objects: int, rng: np.random.Generator, min_clicks: int = 1,
                          max_clicks: int = 3, min_area: int = 1):
    """K = ``n_objects`` single-object prompts from an instance map ``inst`` (H, W) (0 background).

    Objects of at least ``min_area`` pixels (all objects if none is that large) are drawn without replacement, with
    replacement when there are fewer than K; each gets ``min_clicks``..``max_clicks`` interior-biased positives.
    A map with no object gives empty targets, each prompted by one negative click anywhere.

    Returns object ids (K,) (0: no object), points (K, max_clicks, 2) float32 and labels (K, max_clicks).
    """
    if not 1 <= min_clicks <= max_clicks:
        raise ValueError(f"need 1 <= min_clicks <= max_clicks, got min_clicks {min_clicks}, max_clicks {max_clicks}")
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    inst = np.asarray(inst)
    ids, areas = np.unique(inst[inst > 0], return_counts=True)
    if not len(ids):
        ys, xs = rng.integers(inst.shape[0], size=n_objects), rng.integers(inst.shape[1], size=n_objects)
        sets = [_pad([(float(x), float(y))], [0], max_clicks) for x, y in zip(xs, ys)]
        return np.zeros(n_objects, np.int64), np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets])
    large = ids[areas >= min_area]
    pool = large if len(large) else ids
    chosen = rng.choice(pool, size=n_objects, replace=len(pool) < n_objects)
    sampler = PromptSampler(inst > 0, inst, np.zeros(inst.shape, bool))
    sets = []
    for obj in chosen:
        n = int(rng.integers(min_clicks, max_clicks + 1))
        sets.append(_pad([sampler.positive(int(obj), True, rng) for _ in range(n)], [1] * n, max_clicks))
    return chosen.astype(np.int64), np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets])


def evaluation_rng(seed: int, key: str) -> np.random.Generator:
    """The generator of one evaluation item, ``key`` = ``name#target_class``: the same prompts in every run and
    every data order (the main evaluation and the sensitivity grid share it)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def evaluation_points(target: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator,
                      size: int | None = None):
    """METHOD.md's evaluation prompts: ``n_pos`` points drawn uniformly in G, ``n_neg`` uniformly outside it.

    Returns points (size, 2) and labels, ``size`` (default n_pos + n_neg) slots; with an empty G there are no
    positives (label -1 slots, which the decoder never sees).
    """
    target = target.astype(bool)
    points, labels = [], []
    for mask, label, n in ((target, 1, n_pos), (~target, 0, n_neg)):
        ys, xs = np.nonzero(mask)
        if len(ys) == 0 or n == 0:
            continue
        idx = rng.choice(len(ys), size=n, replace=len(ys) < n)
        points += [(float(xs[i]), float(ys[i])) for i in idx]
        labels += [label] * n
    return _pad(points, labels, size or n_pos + n_neg)
