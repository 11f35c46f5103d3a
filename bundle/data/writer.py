"""Write a prepared dataset in the layout of docs/DATA_CONTRACT.md: images/, labels/ and a datalist JSON.

Every preparation script (``bundle.data.pannuke``, ``consep``, ``synapse``, ``folder``) writes through
:class:`DatasetWriter`, which never touches an existing output until the new one is complete:

* the files go to a temporary sibling folder ``.<output name>.preparing-XXXX``;
* :meth:`DatasetWriter.finish` writes the datalist there, then swaps it in: the old output is renamed aside, the new
  folder renamed onto ``output`` (atomic on one file system), and only then is the old one deleted;
* a failure before that (a bad input, a full disk, Ctrl-C) deletes the temporary folder and leaves the old output
  exactly as it was. Use the writer as a context manager (``with DatasetWriter(...) as writer:``) for that cleanup.

An existing ``output`` is replaced only if it looks like a prepared dataset (nothing but ``images/``, ``labels/``
and ``datalist.json``), so that a mistyped ``--output`` cannot delete an unrelated folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from bundle.io import save_json, save_npy, save_png, write_error
from bundle.transforms.checks import check_finite

from .datalist import SPLITS
from .splits import FRACTIONS, assign_subsets

DATALIST_NAME = "datalist.json"
PREPARED_ENTRIES = {"images", "labels", DATALIST_NAME}
logger = logging.getLogger(__name__)


def check_output(output: str | os.PathLike) -> Path:
    """``output`` as a Path if a preparation may write it: absent, empty, or a prepared dataset; raise otherwise."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} is a file; give a folder for images/, labels/ and {DATALIST_NAME}")
    if output.is_dir():
        other = sorted(p.name for p in output.iterdir() if p.name not in PREPARED_ENTRIES)
        if other:
            raise ValueError(
                f"output {output} exists and holds {other[:5]}{' ...' if len(other) > 5 else ''}, so it is not a "
                f"prepared dataset (only images/, labels/ and {DATALIST_NAME}); it would be replaced as a whole: "
                "choose a new or empty folder"
            )
    return output


class DatasetWriter:
    """Collects converted items, writes their files, counts what was skipped, and writes the datalist.

    Args:
        output: output folder; ``images/`` and ``labels/`` go inside it, next to the datalist. Written in a
            temporary sibling folder and swapped in by :meth:`finish` (see the module docstring).
        name: dataset name written into the datalist.
        task_family: ``nuclei`` or ``organ``.
        classes: class id -> name.
    """

    def __init__(self, output: str | os.PathLike, name: str, task_family: str, classes: dict[int, str]):
        if task_family not in ("nuclei", "organ"):
            raise ValueError(f"task_family must be 'nuclei' or 'organ', got {task_family!r}")
        self.output = check_output(output)
        self.name, self.task_family = name, task_family
        self.classes = {int(k): str(v) for k, v in classes.items()}
        self.splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
        self.skipped: Counter = Counter()
        self.names: set[str] = set()
        parent = self.output.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.preparing-", dir=parent))
            (self.staging / "images").mkdir()
            (self.staging / "labels").mkdir()
        except OSError as e:
            raise write_error(e, self.output) from e

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Delete the temporary folder; the existing output (if any) is left as it was."""
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
            logger.info("preparation failed: %s left unchanged", self.output)

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
        check_finite(image, f"{stem}: image")
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            rel_image = f"images/{stem}.png"
            save_png(image, self.staging / rel_image, compress_level=1)
        elif image.ndim == 2:
            rel_image = f"images/{stem}.npy"
            save_npy(image.astype(np.float32), self.staging / rel_image)
        else:
            raise ValueError(f"{stem}: image must be uint8 (H, W, 3) or float (H, W), got {image.dtype} {image.shape}")
        rel_label = f"labels/{stem}.npy"
        save_npy(label.astype(np.int32), self.staging / rel_label)
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
        save_json(data, self.staging / DATALIST_NAME)
        self._swap_in()
        print(self.summary())
        return self.output / DATALIST_NAME

    def _swap_in(self) -> None:
        """Rename the complete temporary folder onto ``output``; the old output is deleted only afterwards."""
        old = None
        try:
            if self.output.exists():
                check_output(self.output)  # still a prepared dataset (nothing was added meanwhile)
                old = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.old-", dir=self.staging.parent))
                os.replace(self.output, old / self.output.name)
            os.replace(self.staging, self.output)
        except BaseException:
            if old is not None and not self.output.exists():
                os.replace(old / self.output.name, self.output)  # put the previous output back
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.abort()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

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
