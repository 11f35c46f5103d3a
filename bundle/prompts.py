"""Point prompts drawn from a target mask: the training prompt sets of SAMPO's preference mining and the fixed
evaluation prompts of METHOD.md.

Training: each sample gets N prompt sets whose quality varies on purpose, so the masks they produce differ and
preference pairs can be mined. A set draws 1..max_pos positives and 0..max_neg negatives and mixes:

* interior points (top half of the distance-to-edge within a target instance) vs points on the instance edge;
* positives all on one target instance ("few") vs spread over distinct instances ("many");
* negatives on plain background vs on look-alike non-targets (T2: nuclei of other classes; organ: other organs;
  T1: the background band hugging the nuclei).

Points are (x, y) pixel coordinates; unused slots carry label -1 (SAM's "not a point").
"""

from __future__ import annotations

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

    def prompt_set(self, rng: np.random.Generator, max_pos: int = 3, max_neg: int = 3):
        """One prompt set of random size and quality: (max_pos + max_neg, 2) points and labels.

        With an empty target (it can vanish when a tiny nucleus is resized away) the set has negatives only.
        """
        n_pos = int(rng.integers(1, max_pos + 1)) if len(self.ids) else 0
        n_neg = int(rng.integers(0 if n_pos else 1, max_neg + 1))
        interior_share, hard_share = rng.uniform(), rng.uniform()
        if n_pos == 0:
            instances = []
        elif rng.uniform() < 0.5:  # few: every positive on one instance
            instances = np.repeat(rng.choice(self.ids), n_pos)
        else:  # many: distinct instances where there are enough
            instances = rng.choice(self.ids, size=n_pos, replace=len(self.ids) < n_pos)
        points = [self.positive(int(i), rng.uniform() < interior_share, rng) for i in instances]
        labels = [1] * n_pos
        for _ in range(n_neg):
            point = self.negative(rng.uniform() < hard_share, rng)
            if point is not None:
                points.append(point)
                labels.append(0)
        return _pad(points, labels, max_pos + max_neg)

    def prompt_sets(self, n_sets: int, rng: np.random.Generator, max_pos: int = 3, max_neg: int = 3):
        """``n_sets`` prompt sets: points (n_sets, P, 2) float32 and labels (n_sets, P) int64."""
        sets = [self.prompt_set(rng, max_pos, max_neg) for _ in range(n_sets)]
        return np.stack([s[0] for s in sets]), np.stack([s[1] for s in sets])


def _pad(points: list, labels: list, size: int):
    out_p = np.zeros((size, 2), np.float32)
    out_l = np.full((size,), PAD_LABEL, np.int64)
    if points:
        out_p[: len(points)] = np.asarray(points, np.float32)
        out_l[: len(labels)] = labels
    return out_p, out_l


def evaluation_points(target: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator):
    """METHOD.md's evaluation prompts: ``n_pos`` points drawn uniformly in G, ``n_neg`` uniformly outside it.

    Returns points (n_pos + n_neg, 2) and labels; with an empty G there are no positives (label -1 slots).
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
    return _pad(points, labels, n_pos + n_neg)
