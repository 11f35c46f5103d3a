"""The task transform: which pixels the user means (target mask G) and where prompts may come from.

| task  | target G                              | look-alike non-targets (hard negatives)          |
|-------|---------------------------------------|--------------------------------------------------|
| t1    | every nucleus                         | the background band hugging the nuclei           |
| t2    | every nucleus of class c              | nuclei of the other classes                      |
| organ | organ o                               | the other organs                                 |

For t2 / organ, c (o) is the item's ``target_class`` when given (evaluation lists every class present), else it
is drawn among the classes present in the image (training).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

TASKS = ("t1", "t2", "organ")
logger = logging.getLogger(__name__)


class TaskTargetd(Randomizable, MapTransform):
    """Turn the (2, H, W) [instance map, class map] label into the task's target and prompt sources.

    Writes ``label`` (1, H, W) float target G, ``target_inst`` (1, H, W) instance ids of the targets,
    ``lookalike`` (1, H, W) hard-negative mask and ``target_class`` (0 for t1).
    """

    def __init__(self, task: str, keys: KeysCollection = "label", band: int = 3, image_key: str = "image") -> None:
        super().__init__(keys)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.band, self.image_key = task, band, image_key

    def randomize(self, classes: np.ndarray) -> int:
        return int(self.R.choice(classes))

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            maps = np.asarray(d[key])
            if maps.ndim != 3 or maps.shape[0] != 2:
                raise ValueError(f"{key}: expected a (2, H, W) [instance, class] label, got shape {maps.shape}")
            inst, cls = maps[0].astype(np.int32), maps[1].astype(np.int32)
            source = d.get(f"{key}_meta_dict", {}).get("filename_or_obj") or getattr(d[key], "meta", {}).get(
                "filename_or_obj", "sample"
            )
            if self.task == "t1":
                target_class = 0
                target = inst > 0
                lookalike = ndimage.binary_dilation(target, iterations=self.band) & ~target
            else:
                present = np.unique(cls[cls > 0])
                if d.get("target_class") is not None:
                    target_class = int(d["target_class"])
                else:
                    target_class = self.randomize(present) if len(present) else 0
                target = (cls == target_class) & (cls > 0)
                lookalike = (cls > 0) & ~target
            if not target.any():
                logger.warning("%s: no pixel of the target (task %s, class %s): empty target", source, self.task, target_class)
            d[key] = torch.from_numpy(target[None].astype(np.float32))
            d["target_inst"] = torch.from_numpy(np.where(target, inst, 0)[None].astype(np.int32))
            d["lookalike"] = torch.from_numpy(lookalike[None].astype(np.uint8))
            d["target_class"] = target_class
        return d
