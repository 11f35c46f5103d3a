"""Prompt transforms: SAMPO's training prompt sets, the fixed evaluation prompts, the single-object prompts of SAM's
own objective (pretraining), and click guidance channels."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, Transform

from bundle.guidance import points_to_guidance
from bundle.prompt_sampling import PromptSampler, evaluation_points, evaluation_rng, single_object_prompts


class PromptSetsd(Randomizable, Transform):
    """Synthesise ``n_prompt_sets`` prompt sets of varying quality per sample (online preference mining, step 1).

    Reads ``label`` (G), ``target_inst`` and ``lookalike`` from :class:`bundle.transforms.task.TaskTargetd`;
    writes ``points`` (n_prompt_sets, P, 2) and ``point_labels`` (n_prompt_sets, P), P = max_pos + max_neg. Seeded through
    MONAI's ``set_determinism`` / data loader like every random MONAI transform.
    """

    def __init__(self, n_prompt_sets: int = 4, max_pos: int = 3, max_neg: int = 3) -> None:
        if n_prompt_sets < 2:
            raise ValueError(f"n_prompt_sets must be >= 2 to mine preference pairs, got {n_prompt_sets}")
        self.n_prompt_sets, self.max_pos, self.max_neg = n_prompt_sets, max_pos, max_neg

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(2**31))

    def __call__(self, data):
        self.randomize()
        d = dict(data)
        sampler = PromptSampler(_np(d["label"])[0] > 0, _np(d["target_inst"])[0], _np(d["lookalike"])[0] > 0)
        points, labels = sampler.prompt_sets(self.n_prompt_sets, np.random.default_rng(self._seed), self.max_pos, self.max_neg)
        d["points"], d["point_labels"] = torch.from_numpy(points), torch.from_numpy(labels)
        return d


class EvalPromptsd(Transform):
    """METHOD.md's evaluation prompts: ``n_pos`` points in G and ``n_neg`` outside, seeded per image and class.

    The seed is ``seed`` mixed with a checksum of the item's ``name`` and ``target_class``, so each image gets
    the same prompts in every run, whatever the data order. Writes ``points`` (P, 2) and ``point_labels`` (P,).
    """

    def __init__(self, n_pos: int = 3, n_neg: int = 3, seed: int = 0) -> None:
        self.n_pos, self.n_neg, self.seed = n_pos, n_neg, seed

    def __call__(self, data):
        d = dict(data)
        rng = evaluation_rng(self.seed, f"{d.get('name', '')}#{d.get('target_class', 0)}")
        points, labels = evaluation_points(_np(d["label"])[0] > 0, self.n_pos, self.n_neg, rng)
        d["points"], d["point_labels"] = torch.from_numpy(points), torch.from_numpy(labels)
        return d


class SingleObjectPromptsd(Randomizable, Transform):
    """SAM's single-object prompts: K objects of the instance map, each with interior clicks; target = that object.

    Reads ``label``, the (2, H, W) [instance, class] label (CT: channel 0 is the organ map, one organ one instance),
    already at the model's resolution; writes ``label`` (K, H, W) float, one object's mask per prompt,
    ``points`` (K, max_clicks, 2) and ``point_labels`` (K, max_clicks) (see
    :func:`bundle.prompt_sampling.single_object_prompts`).

    Args:
        n_objects: K prompts (objects) per image.
        min_clicks, max_clicks: number of positive clicks per object, drawn uniformly in this range.
        min_area: objects smaller than this (pixels) are not chosen while larger ones exist.
        seed: ``None`` for training (seeded through MONAI's ``set_determinism`` like every random transform); a
            number for validation / evaluation: each image then gets the same prompts in every run, from ``seed``
            mixed with its ``name`` (as :class:`EvalPromptsd`).
    """

    def __init__(self, n_objects: int = 4, min_clicks: int = 1, max_clicks: int = 3, min_area: int = 1,
                 seed: int | None = None) -> None:
        self.n_objects, self.min_clicks, self.max_clicks, self.min_area = n_objects, min_clicks, max_clicks, min_area
        self.seed = seed

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(2**31))

    def __call__(self, data):
        d = dict(data)
        if self.seed is None:
            self.randomize()
            rng = np.random.default_rng(self._seed)
        else:
            rng = evaluation_rng(self.seed, f"{d.get('name', '')}#single")
        maps = _np(d["label"])
        if maps.ndim != 3 or maps.shape[0] != 2:
            raise ValueError(f"label: expected a (2, H, W) [instance, class] label, got shape {maps.shape}")
        inst = maps[0].astype(np.int64)
        ids, points, labels = single_object_prompts(inst, self.n_objects, rng, self.min_clicks, self.max_clicks,
                                                    self.min_area)
        targets = (inst[None] == ids[:, None, None]) & (ids[:, None, None] > 0)
        d["label"] = torch.from_numpy(targets.astype(np.float32))
        d["points"], d["point_labels"] = torch.from_numpy(points), torch.from_numpy(labels)
        return d


class ClickGuidanced(MapTransform):
    """Append the foreground / background click channels of ``points`` to the image (single-tensor contract)."""

    def __init__(self, keys="image", points_key: str = "points", labels_key: str = "point_labels") -> None:
        super().__init__(keys)
        self.points_key, self.labels_key = points_key, labels_key

    def __call__(self, data):
        d = dict(data)
        points = torch.as_tensor(d[self.points_key]).reshape(1, -1, 2)
        labels = torch.as_tensor(d[self.labels_key]).reshape(1, -1)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            guidance = points_to_guidance(points, labels, tuple(image.shape[-2:]))[0]
            d[key] = torch.cat([image, guidance.to(image.dtype)], dim=0)
        return d


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
