"""Write a prepared dataset in the layout of docs/DATA_CONTRACT.md: images/, labels/ and a datalist JSON."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from .datalist import SPLITS
from .splits import FRACTIONS, assign_subsets

DATALIST_NAME = "datalist.json"


class DatasetWriter:
    """Collects converted items, writes their files, counts what was skipped, and writes the datalist.

    Args:
        output: output folder (created); ``images/`` and ``labels/`` go inside it, next to the datalist.
        name: dataset name written into the datalist.
        task_family: ``nuclei`` or ``organ``.
        classes: class id -> name.
    """

    def __init__(self, output: str | os.PathLike, name: str, task_family: str, classes: dict[int, str]):
        if task_family not in ("nuclei", "organ"):
            raise ValueError(f"task_family must be 'nuclei' or 'organ', got {task_family!r}")
        self.output = Path(output)
        self.name, self.task_family = name, task_family
        self.classes = {int(k): str(v) for k, v in classes.items()}
        self.splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.skipped: Counter = Counter()
        self.names: set[str] = set()
        (self.output / "images").mkdir(parents=True, exist_ok=True)
        (self.output / "labels").mkdir(parents=True, exist_ok=True)
        (self.output / DATALIST_NAME).unlink(missing_ok=True)  # a failed run must not leave an older datalist

    def add(self, split: str, stem: str, image: np.ndarray, label: np.ndarray, source: str, **extra) -> dict:
        """Write ``image`` (uint8 (H, W, 3) -> PNG; float (H, W) -> .npy) and ``label`` ((2, H, W) -> int32 .npy)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if stem in self.names:
            raise ValueError(f"two items are named {stem!r}; names must be unique across splits")
        label = np.asarray(label)
        if label.ndim != 3 or label.shape[0] != 2:
            raise ValueError(f"{stem}: label must have shape (2, H, W), got {label.shape}")
        if image.shape[:2] != label.shape[1:]:
            raise ValueError(f"{stem}: image size {image.shape[:2]} != label size {label.shape[1:]}")
        bad = set(np.unique(label[1]).tolist()) - {0, *self.classes}
        if bad:
            raise ValueError(f"{stem}: class ids {sorted(bad)} are not in the classes {self.classes}")
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            rel_image = f"images/{stem}.png"
            Image.fromarray(image).save(self.output / rel_image, compress_level=1)
        elif image.ndim == 2:
            rel_image = f"images/{stem}.npy"
            np.save(self.output / rel_image, image.astype(np.float32))
        else:
            raise ValueError(f"{stem}: image must be uint8 (H, W, 3) or float (H, W), got {image.dtype} {image.shape}")
        rel_label = f"labels/{stem}.npy"
        np.save(self.output / rel_label, label.astype(np.int32))
        self.names.add(stem)
        entry = {"image": rel_image, "label": rel_label, "source": source, **extra}
        self.splits[split].append(entry)
        return entry

    def skip(self, reason: str) -> None:
        """Count an item left out (e.g. 'no nucleus'); the summary prints the counts."""
        self.skipped[reason] += 1

    def finish(self, seed: int, info: dict | None = None, fractions=FRACTIONS) -> Path:
        """Assign the nested training subsets, write the datalist JSON, print a summary; return the JSON path."""
        for split in SPLITS:
            self.splits[split].sort(key=lambda e: e["image"])
        assign_subsets(self.splits["training"], seed=seed, fractions=fractions)
        data = {
            "name": self.name,
            "task_family": self.task_family,
            "classes": {str(k): v for k, v in sorted(self.classes.items())},
            **self.splits,
            "preparation": {"seed": seed, "skipped": dict(self.skipped), **(info or {})},
        }
        path = self.output / DATALIST_NAME
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        print(self.summary())
        return path

    def summary(self) -> str:
        lines = [f"{self.name}: wrote {self.output / DATALIST_NAME}"]
        for split in SPLITS:
            entries = self.splits[split]
            lines.append(f"  {split}: {len(entries)} items from {len({e['source'] for e in entries})} sources")
        for p in FRACTIONS:
            n = sum(p in e.get("subsets", ()) for e in self.splits["training"])
            lines.append(f"  training {p}% subset: {n} items")
        if self.skipped:
            lines += [f"  skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        else:
            lines.append("  skipped: none")
        return "\n".join(lines)
