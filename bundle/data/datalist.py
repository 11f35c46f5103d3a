"""Read prepared datalists (docs/DATA_CONTRACT.md) into MONAI dataset items."""

from __future__ import annotations

import json
import os

import numpy as np

SPLITS = ("training", "validation", "test")
FRACTIONS = (10, 20, 30, 100)


def read_datalist(path: str | os.PathLike) -> dict:
    """Load a datalist JSON and check its layout; raise naming the file and the key that is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datalist not found: {path} (run a scripts/prepare_*.py, or the default training)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must be a JSON object with task_family, classes and the splits "
                         f"(docs/DATA_CONTRACT.md), got a {type(data).__name__}")
    for key in ("task_family", "classes"):
        if key not in data:
            raise ValueError(f"{path}: missing key '{key}' (see docs/DATA_CONTRACT.md)")
    if data["task_family"] not in ("nuclei", "organ"):
        raise ValueError(f"{path}: task_family must be 'nuclei' or 'organ', got {data['task_family']!r}")
    return data


def load_datalist(path: str | os.PathLike, split: str, fraction: int = 100, task: str | None = None) -> list[dict]:
    """Items of ``split`` with absolute paths.

    Args:
        path: datalist JSON.
        split: ``training``, ``validation`` or ``test``.
        fraction: percentage of the training data (10, 20, 30 or 100); only for ``training``.
        task: for evaluation splits of class-wise tasks (``t2``, ``organ``) each image is listed once per class
            present, with ``target_class`` set, so that evaluation covers every class present.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fraction not in FRACTIONS:
        raise ValueError(f"fraction must be one of {FRACTIONS}, got {fraction!r}")
    data = read_datalist(path)
    if split not in data:
        raise ValueError(f"{path}: no '{split}' split")
    base = os.path.dirname(os.path.abspath(path))
    if not isinstance(data[split], list):
        raise ValueError(f"{path}: '{split}' must be a list of {{'image': ..., 'label': ...}} entries, "
                         f"got {type(data[split]).__name__}")
    items = []
    for i, entry in enumerate(data[split]):
        if not isinstance(entry, dict):
            raise ValueError(
                f"{path}: {split}[{i}] must be an object {{'image': ..., 'label': ...}}, got {entry!r:.80}"
            )
        for key in ("image", "label"):
            if key not in entry:
                raise ValueError(f"{path}: {split}[{i}] has no '{key}'")
            if not isinstance(entry[key], str) or not entry[key]:
                raise ValueError(f"{path}: {split}[{i}]['{key}'] must be a file path relative to the datalist, "
                                 f"got {entry[key]!r}")
        if split == "training" and fraction not in entry.get("subsets", FRACTIONS):
            continue
        item = dict(entry)
        for key in ("image", "label", "proposal"):  # proposal: optional, a human preference pair (human_pairs.py)
            if isinstance(entry.get(key), str) and entry[key]:
                item[key] = os.path.normpath(os.path.join(base, entry[key]))
        item.setdefault("name", os.path.splitext(os.path.basename(entry["image"]))[0])
        items.append(item)
    if split == "training" and not items:
        raise ValueError(f"{path}: no training items" + (f" in the {fraction} % subset" if fraction != 100 else "")
                         + " (re-run the preparation script, or choose another datalist)")
    if task in ("t2", "organ") and split != "training":
        items = [dict(item, target_class=c) for item in items for c in classes_present(item["label"])]
    return items


def classes_present(label_path: str) -> list[int]:
    """Class ids (channel 1 of the label file) present in a prepared label."""
    return [int(c) for c in np.unique(np.load(label_path, mmap_mode="r")[1]) if c > 0]


def load_semi_supervised(path: str | os.PathLike, part: str, labelled_fraction: int = 10,
                         alignment_fraction: int = 100) -> list[dict]:
    """The labelled / unlabelled training items of the virtual-annotator schedule (docs/virtual_annotator.md).

    ``labelled``: the nested ``labelled_fraction`` % training subset, the very images a ``train_fraction`` run of
    that percentage trains on; ``unlabelled``: the items of the ``alignment_fraction`` % subset outside it (100:
    the whole rest of the training split). Both come from the datalist's seeded nested subsets
    (:mod:`bundle.data.splits`), so the split is the same in every run. ``labelled_fraction`` 100 is allowed for
    ``labelled`` only (the supervised stage on all data, with no alignment stage).
    """
    if part not in ("labelled", "unlabelled"):
        raise ValueError(f"part must be 'labelled' or 'unlabelled', got {part!r}")
    partial = tuple(f for f in FRACTIONS if f < 100)
    allowed = FRACTIONS if part == "labelled" else partial
    if labelled_fraction not in allowed:
        why = {0: "the supervised stage needs labelled images",
               100: "it leaves no unlabelled training images to align on (100 % fits only stage2_epochs 0, the "
                    "supervised stage alone)"}.get(labelled_fraction, "the datalist's nested subsets are these")
        raise ValueError(f"labelled_fraction must be one of {list(allowed)} (percent of the training split, a nested "
                         f"subset of {path}), got {labelled_fraction!r}: {why}")
    if part == "labelled":
        return load_datalist(path, "training", fraction=labelled_fraction)
    if alignment_fraction not in FRACTIONS or alignment_fraction <= labelled_fraction:
        raise ValueError(f"alignment_fraction must be one of {[f for f in FRACTIONS if f > labelled_fraction]} "
                         f"(the subset whose images outside the labelled {labelled_fraction} % are aligned on), "
                         f"got {alignment_fraction!r}")
    labelled = {item["image"] for item in load_datalist(path, "training", fraction=labelled_fraction)}
    items = [item for item in load_datalist(path, "training", fraction=alignment_fraction)
             if item["image"] not in labelled]
    if not items:
        raise ValueError(f"{path}: no training images in the {alignment_fraction} % subset outside the labelled "
                         f"{labelled_fraction} % (the split is too small to align on)")
    return items
